"""Download stage against a real HTTP server on 127.0.0.1 serving a small official-layout archive."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import tasks.download as download_module
from food101.errors import Food101Error
from tasks.download import (
    ChecksumError,
    DiskSpaceError,
    DownloadError,
    DownloadUnavailableError,
    UnsafeArchiveError,
    check_layout,
    download,
    read_dataset,
    resolve_dataset,
)
from tests.conftest import SAMPLE, make_config

CLASSES = ["apple_pie", "bibimbap"]


def build_archive(extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    """A .tar.gz in the official layout (food-101/images, food-101/meta) from a few sample photos."""
    files: dict[str, bytes] = {}
    listed = {"train": [], "test": []}
    for split in ("train", "test"):
        ids = (SAMPLE / "meta" / f"{split}.txt").read_text().split()
        for name in CLASSES:
            for image_id in [i for i in ids if i.startswith(name + "/")][:3]:
                listed[split].append(image_id)
                files[f"food-101/images/{image_id}.jpg"] = (SAMPLE / "images" / f"{image_id}.jpg").read_bytes()
    display = dict(zip((SAMPLE / "meta/classes.txt").read_text().split(),
                       (SAMPLE / "meta/labels.txt").read_text().splitlines(), strict=True))
    files["food-101/meta/classes.txt"] = "\n".join(CLASSES).encode() + b"\n"
    files["food-101/meta/labels.txt"] = "\n".join(display[c] for c in CLASSES).encode() + b"\n"
    for split, ids in listed.items():
        files[f"food-101/meta/{split}.txt"] = "\n".join(ids).encode() + b"\n"
        grouped = {c: [i for i in ids if i.startswith(c + "/")] for c in CLASSES}
        files[f"food-101/meta/{split}.json"] = json.dumps(grouped).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Server:
    """A tiny HTTP server with Range support that can cut its next answers midway."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str | None]] = []
        self.cut_next = 0
        self.ignore_range = False
        self.content_encoding: str | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "accept_encoding": self.headers.get("Accept-Encoding")})
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, wanted = 0, self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if server.content_encoding:
                    self.send_header("Content-Encoding", server.content_encoding)
                self.end_headers()
                if server.cut_next > 0:
                    server.cut_next -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    running = Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()
    running.thread.join()


@pytest.fixture(scope="module")
def archive() -> bytes:
    return build_archive()


def food101_config(tmp_path: Path, url: str, archive_md5: str, **more):
    settings = {"data__source": "food101", "data__url": url, "data__md5": archive_md5,
                "data__min_free_gb": 0.0, "data__download_retries": 2}
    return make_config(tmp_path, **(settings | more))


def test_downloads_verifies_and_extracts(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    result = download.fn(config)
    root = Path(result["root"])
    assert root == config.paths.raw / "food-101"
    check_layout(root)
    assert sorted(p.name for p in (root / "images").iterdir()) == CLASSES
    assert (root / "meta" / "classes.txt").read_text().split() == CLASSES
    assert md5((config.paths.raw / "food-101.tar.gz").read_bytes()) == md5(archive)
    assert not list(config.paths.raw.glob("*.part"))
    assert read_dataset(config) == {"source": "food101", "root": str(root),
                                    "archive": str(config.paths.raw / "food-101.tar.gz"),
                                    "archive_md5": md5(archive)}
    assert result["bytes"] == len(archive) and result["reused"] is False
    # A second run finds the verified tree and asks the server for nothing.
    again = download.fn(config)
    assert again["reused"] is True and len(server.requests) == 1


def test_tampered_archive_is_refused_and_not_kept(tmp_path, server, archive):
    tampered = bytearray(archive)
    tampered[len(tampered) // 2] ^= 0xFF
    server.files["/food-101.tar.gz"] = bytes(tampered)
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    with pytest.raises(ChecksumError, match="MD5 mismatch.*deleted"):
        resolve_dataset(config)
    assert not (config.paths.raw / "food-101.tar.gz").exists()
    assert not (config.paths.raw / "food-101.tar.gz.part").exists()
    assert not (config.paths.raw / "food-101").exists()


def _escaping(kind: str, outside: Path) -> tuple[tarfile.TarInfo, bytes | None]:
    if kind == "dotdot":
        info = tarfile.TarInfo("food-101/../../evil.txt")
    elif kind == "absolute":
        info = tarfile.TarInfo(str(outside / "evil.txt"))
    elif kind == "symlink":
        info = tarfile.TarInfo("food-101/images/evil")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../../evil.txt"
        return info, None
    else:  # hardlink
        info = tarfile.TarInfo("food-101/images/evil")
        info.type, info.linkname = tarfile.LNKTYPE, "../evil.txt"
        return info, None
    data = b"owned\n"
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_archive_member_outside_root_is_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = build_archive([_escaping(kind, outside)])
    local = tmp_path / "food-101.tar.gz"
    local.write_bytes(bad)
    config = make_config(tmp_path, data__source="local", data__local_path=str(local), data__md5=md5(bad))
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        resolve_dataset(config)
    assert not (config.paths.raw / "food-101").exists()
    assert not list(tmp_path.rglob("evil*"))
    assert local.exists()  # the user's own file is never deleted


def test_local_archive_is_verified_and_extracted(tmp_path, archive):
    local = tmp_path / "food-101.tar.gz"
    local.write_bytes(archive)
    config = make_config(tmp_path, data__source="local", data__local_path=str(local), data__md5=md5(archive))
    record = resolve_dataset(config)
    assert record["archive_md5"] == md5(archive)
    check_layout(Path(record["root"]))
    with pytest.raises(ChecksumError):
        resolve_dataset(make_config(tmp_path / "other", data__source="local", data__local_path=str(local)))


def test_interrupted_download_resumes_from_the_partial_file(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    server.cut_next = 1
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    resolve_dataset(config)
    assert len(server.requests) == 2
    assert server.requests[0]["range"] is None
    resumed_at = int(server.requests[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(archive)
    assert md5((config.paths.raw / "food-101.tar.gz").read_bytes()) == md5(archive)


def test_server_ignoring_range_restarts_cleanly(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    server.ignore_range = True
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    config.paths.raw.mkdir(parents=True)
    (config.paths.raw / "food-101.tar.gz.part").write_bytes(archive[:1000])
    resolve_dataset(config)
    assert server.requests[0]["range"] == "bytes=1000-"
    assert md5((config.paths.raw / "food-101.tar.gz").read_bytes()) == md5(archive)


def test_unreachable_server_names_the_url(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/food-101.tar.gz"
    config = food101_config(tmp_path, url, "0" * 32, data__download_retries=0)
    with pytest.raises(DownloadUnavailableError) as failure:
        resolve_dataset(config)
    assert url in str(failure.value)
    assert "data.source=local" in str(failure.value) and "data.local_path" in str(failure.value)


def test_not_enough_disk_is_a_clear_error(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive), data__min_free_gb=1e9)
    with pytest.raises(DiskSpaceError, match="not enough free disk"):
        resolve_dataset(config)
    assert server.requests == []


def test_sample_and_local_folder_are_used_in_place(tmp_path):
    assert resolve_dataset(make_config(tmp_path))["root"] == str(SAMPLE.resolve())
    local = make_config(tmp_path, data__source="local", data__local_path=str(SAMPLE))
    assert resolve_dataset(local)["root"] == str(SAMPLE.resolve())


# --- crafted archives ----------------------------------------------------------------------------


def _member(name: str, kind: str = "file", data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = link
    if kind == "dir":
        info.mode = 0o777
    if kind == "chardev":
        info.devmajor, info.devminor = 1, 3
    if kind == "file":
        info.size = len(data)
        return info, data
    return info, None


def realpath_limit_attack(staging_len: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """CVE-2025-4517, after CPython's test_realpath_limit_attack: links nested past PATH_MAX stop
    os.path.realpath, so tarfile's "data" filter passes a link that climbs three folders above the
    extraction folder (paths.raw/.<name>), i.e. into the test's tmp_path; then a hardlink through it
    overwrites `flag` there and a file is created beside it."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - staging_len - 1) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members.append(_member(os.path.join(path, component), "dir"))
        members.append(_member(os.path.join(path, step), "symlink", link=component))
        path = os.path.join(path, component)
    linkpath = os.path.join(*steps, "l" * 254)
    members.append(_member(linkpath, "symlink", link=os.path.join(*[".."] * len(steps))))
    members.append(_member("escape", "symlink", link=os.path.join(linkpath, "..", "..", "..")))
    members.append(_member("flaglink", "hardlink", link=os.path.join("escape", "flag")))
    members.append(_member("flaglink", data=b"overwritten\n"))
    members.append(_member("escape/newfile", data=b"new\n"))
    return members


def simple_attack(kind: str, outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    owned = b"owned\n"
    return {
        "absolute": [_member(str(outside / "newfile"), data=owned)],
        "dotdot": [_member("food-101/../../../../newfile", data=owned)],
        "symlink_then_file": [_member("food-101/images/out", "symlink", link="../../../../.."),
                              _member("food-101/images/out/newfile", data=owned)],
        "hardlink_then_overwrite": [_member("food-101/images/flag", "hardlink", link=str(outside / "flag")),
                                    _member("food-101/images/flag", data=owned)],
        "hardlink_etc_passwd": [_member("food-101/images/passwd", "hardlink", link="/etc/passwd")],
        "inside_symlink": [_member("food-101/images/here", "symlink", link="apple_pie")],
        "chardev": [_member("food-101/images/zero", "chardev")],
        "fifo": [_member("food-101/images/pipe", "fifo")],
        # A long name goes into a pax header, which keeps the NUL.
        "nul_name": [_member("food-101/images/" + "x" * 100 + "\0/../../../../newfile", data=owned)],
        "duplicate_file": [_member("food-101/meta/classes.txt", data=b"pizza\n")],
    }[kind]


def snapshot(root: Path, skip: Path) -> dict[str, bytes | str]:
    """Every path under `root` but `skip` (paths.raw), its parents and the stage's MD5 sidecar of a
    local archive: file bytes, link targets, '<dir>'."""
    seen: dict[str, bytes | str] = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents or path in skip.parents or path.name.endswith(".md5.json"):
            continue
        seen[str(path.relative_to(root))] = (f"-> {os.readlink(path)}" if path.is_symlink() else
                                             "<dir>" if path.is_dir() else path.read_bytes())
    return seen


def serve_archive(tmp_path: Path, server: Server, data: bytes, delivery: str):
    """A config whose download stage receives `data` as the user would: a local .tar.gz or over HTTP."""
    if delivery == "local":
        local = tmp_path / "food-101.tar.gz"
        local.write_bytes(data)
        return make_config(tmp_path, data__source="local", data__local_path=str(local), data__md5=md5(data))
    server.files["/food-101.tar.gz"] = data
    return food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(data))


def assert_refused_and_nothing_outside(tmp_path: Path, config, match: str = "refusing") -> None:
    (tmp_path / "flag").write_bytes(b"original\n")
    before = snapshot(tmp_path, config.paths.raw)
    with pytest.raises(Food101Error, match=match) as failure:
        resolve_dataset(config)
    assert "\n" not in str(failure.value)
    assert snapshot(tmp_path, config.paths.raw) == before  # the sentinel `flag` included
    assert not (config.paths.raw / "food-101").exists()
    assert not [p for p in config.paths.raw.iterdir() if p.is_dir()]  # no extraction folder left


@pytest.mark.parametrize("delivery", ["local", "http"])
def test_realpath_limit_attack_writes_nothing_outside(tmp_path, server, delivery):
    raw = tmp_path / "data" / "raw"
    # The extraction folder's name has the length of staging_dir's `.food-101.tmp-XXXXXXXX`.
    bad = build_archive(realpath_limit_attack(len(str(raw / ".food-101.tmp-abcdefgh"))))
    config = serve_archive(tmp_path, server, bad, delivery)
    assert config.paths.raw == raw
    assert_refused_and_nothing_outside(tmp_path, config)


@pytest.mark.parametrize("delivery", ["local", "http"])
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_then_file", "hardlink_then_overwrite",
                                  "hardlink_etc_passwd", "inside_symlink", "chardev", "fifo", "nul_name",
                                  "duplicate_file"])
def test_crafted_archive_is_refused_before_anything_is_written(tmp_path, server, kind, delivery):
    bad = build_archive(simple_attack(kind, tmp_path))
    config = serve_archive(tmp_path, server, bad, delivery)
    assert_refused_and_nothing_outside(tmp_path, config)


def test_archive_bounds_are_checked_before_extraction(tmp_path, monkeypatch, archive):
    monkeypatch.setattr(download_module, "MAX_ARCHIVE_MEMBERS", 5)
    local = tmp_path / "food-101.tar.gz"
    local.write_bytes(archive)
    config = make_config(tmp_path, data__source="local", data__local_path=str(local), data__md5=md5(archive))
    with pytest.raises(UnsafeArchiveError, match="members.*at most 5"):
        resolve_dataset(config)
    monkeypatch.setattr(download_module, "MAX_ARCHIVE_MEMBERS", 1000)
    monkeypatch.setattr(download_module, "MAX_EXTRACTED_BYTES", 1000)
    with pytest.raises(UnsafeArchiveError, match="bytes.*at most 1000"):
        resolve_dataset(config)
    assert not (config.paths.raw / "food-101").exists()


# --- checksum, URLs, encodings -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["food101", "local"])
@pytest.mark.parametrize("bad_md5", ["", None, "not-hex", "0" * 31])
def test_archive_sources_refuse_to_run_without_an_md5(tmp_path, server, archive, source, bad_md5):
    config = serve_archive(tmp_path, server, archive, "http" if source == "food101" else "local")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, md5=bad_md5))
    with pytest.raises(DownloadError, match="data.md5.*32"):
        resolve_dataset(config)
    assert server.requests == []
    assert not (config.paths.raw / "food-101").exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/food-101.tar.gz", "food-101.tar.gz"])
def test_non_http_url_is_a_clear_error(tmp_path, url):
    config = food101_config(tmp_path, "http://127.0.0.1:9/food-101.tar.gz", "0" * 32)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, url=url))
    with pytest.raises(DownloadError, match="only http:// and https://.*data.source=local"):
        resolve_dataset(config)


def test_archive_sent_with_content_encoding_gzip_is_kept_byte_for_byte(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    server.content_encoding = "gzip"  # the body is the .tar.gz itself, as misconfigured servers send it
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    record = resolve_dataset(config)
    assert md5((config.paths.raw / "food-101.tar.gz").read_bytes()) == md5(archive)
    check_layout(Path(record["root"]))
    assert server.requests[0]["accept_encoding"] == "identity"


def test_interrupted_gzip_encoded_download_resumes(tmp_path, server, archive):
    server.files["/food-101.tar.gz"] = archive
    server.content_encoding = "gzip"
    server.cut_next = 1
    config = food101_config(tmp_path, server.url("/food-101.tar.gz"), md5(archive))
    resolve_dataset(config)
    assert len(server.requests) == 2 and server.requests[1]["range"] is not None
    assert md5((config.paths.raw / "food-101.tar.gz").read_bytes()) == md5(archive)


# --- leftovers -------------------------------------------------------------------------------------


def test_extraction_folders_of_a_killed_run_are_removed_at_the_next_start(tmp_path, archive, caplog):
    local = tmp_path / "food-101.tar.gz"
    local.write_bytes(archive)
    config = make_config(tmp_path, data__source="local", data__local_path=str(local), data__md5=md5(archive))
    raw = config.paths.raw
    killed = raw / ".food-101.extract-killed1"  # what a run killed mid-extraction leaves
    (killed / "food-101" / "images").mkdir(parents=True)
    (killed / download_module.EXTRACTING_MARKER).write_text("{}")
    (killed / "food-101" / "images" / "big.jpg").write_bytes(b"x" * 1000)
    empty = raw / ".food-101.extract-killed2"  # killed before it marked the folder
    empty.mkdir()
    legacy = raw / ".food-101.tmp-killed3"  # the staging name used before
    (legacy / "food-101").mkdir(parents=True)
    foreign = raw / ".food-101.extract-notmine"  # same pattern, not marked, not empty: not ours
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    user = raw / "notes"
    user.mkdir()
    with caplog.at_level(logging.INFO, logger="tasks.download"):
        resolve_dataset(config)
    assert not killed.exists() and not empty.exists() and not legacy.exists()
    assert (foreign / "notes.txt").read_text() == "keep me" and user.is_dir()
    assert any("left by an interrupted run" in r.getMessage() and str(killed) in r.getMessage()
               for r in caplog.records)
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == [".food-101.extract-notmine", "food-101",
                                                                    "notes"]
