"""Download stage against a real HTTP server on 127.0.0.1 serving a small official-layout archive."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.download import (
    ChecksumError,
    DiskSpaceError,
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
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
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
