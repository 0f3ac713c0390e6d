"""Download stage: make a Food-101 dataset root in the official layout available, safely.

Sources (`data.source`):
- `sample`: the bundled real subset at `paths.sample`, used in place.
- `local`: `data.local_path` is either an extracted folder (used in place) or the official
  `.tar.gz`, which is MD5-verified and extracted under `paths.raw`.
- `imagefolder`: `data.local_path` is a folder of `<class>/` folders, or of `train/<class>/` and
  `test/<class>/` (food101/imagefolder.py), used in place; validate lists it.
- `food101`: `data.url` is downloaded to `paths.raw/food-101.tar.gz` (resumable, retried,
  MD5-verified), then extracted under `paths.raw`.

Safe to re-run and to run twice at once: work happens under a file lock, and a finished, verified
extraction is found and reused. An archive is used only with a 32-hex `data.md5` (verification
cannot be switched off) and only over http(s) for `data.url`.

Extraction does not trust tarfile's "data" filter alone (CVE-2025-4517 and its relatives bypass it
on the Pythons we support): every member is checked before anything is written, and only regular
files and folders with plain relative names are accepted (no links of either kind, devices or
FIFOs, no `..`, no NUL, no duplicates), within bounds on member count and size. The stage then
writes each file itself through folder descriptors it created, with O_CREAT|O_EXCL|O_NOFOLLOW, so
no write can follow a link. It extracts into a marked staging folder that is renamed into place, so
a killed run never leaves a half tree where the next run would trust it; the next run removes such
folders.

The subset (`data.classes`, `data.train_per_class`, `data.test_per_class`) is not applied here:
validate selects the rows when it builds the manifest, so no image is ever copied.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import requests
import urllib3
from prefect import task
from prefect.cache_policies import NONE
from tqdm import tqdm

from food101.config import Config
from food101.dataset import DatasetLayoutError, check_layout
from food101.errors import Food101Error, StageOutputMissing
from food101.io import read_json, replace_dir, write_json

log = logging.getLogger(__name__)

ARCHIVE_NAME = "food-101.tar.gz"
EXTRACTED_NAME = "food-101"  # the official archive's top folder
EXTRACTED_MARKER = ".food101-extracted.json"  # written inside the tree before it is renamed into place
EXTRACTING_MARKER = ".food101-extracting.json"  # marks a staging folder as this stage's own
MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")
# The official archive holds about 101,200 members, 5.0 GB once extracted; twice that leaves room
# for a repacked copy and still stops an archive bomb before it fills the disk.
MAX_ARCHIVE_MEMBERS = 250_000
MAX_EXTRACTED_BYTES = 10 * 10**9
MAX_MEMBER_NAME = 1024  # Food-101's longest member name is under 60 characters
CHUNK_BYTES = 1 << 20
NETWORK_CHUNK_BYTES = 1 << 16  # a connection cut mid-read loses at most this much of the partial file
BACKOFF_BASE_S = 1.0
HTTP_TIMEOUT_S = 60.0


class DownloadError(Food101Error):
    """The dataset could not be fetched or unpacked; the message says what to do."""


class DownloadUnavailableError(DownloadError):
    """The server could not be reached (or kept failing) after every retry."""


class ChecksumError(DownloadError):
    """A file's MD5 is not the one `data.md5` expects."""


class UnsafeArchiveError(DownloadError):
    """An archive member would be written outside the extraction folder."""


class DiskSpaceError(DownloadError):
    """Not enough free disk for the download or the extraction."""


class _ServerError(Exception):
    """A 5xx answer: worth retrying."""


class _IncompleteBody(Exception):
    """The connection ended before the announced length arrived: worth resuming."""


# --- small pure helpers ------------------------------------------------------------------------


def md5_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """MD5 of a file, streamed."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding `folder` (or its nearest existing parent)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    free = free_bytes(folder)
    if free < needed_bytes:
        raise DiskSpaceError(
            f"not enough free disk for {what}: {needed_bytes / 1e9:.2f} GB needed in {folder}, "
            f"{free / 1e9:.2f} GB free. Free some space, or point paths.raw at a bigger disk "
            "(lower data.min_free_gb only if you know the archive fits)."
        )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the block; other processes wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def require_md5(value: object) -> str:
    """The configured archive MD5, lower-case; anything but 32 hex digits is refused, never skipped."""
    if not isinstance(value, str) or not MD5_HEX.fullmatch(value.strip()):
        raise DownloadError(
            f"data.md5 is {value!r}, not a 32-hex-digit MD5: an archive is only extracted after its "
            "checksum is verified, and verification cannot be turned off. Set data.md5 to the "
            "archive's MD5 (params.yaml holds the official one)."
        )
    return value.strip().lower()


def require_http_url(url: str) -> str:
    """Only http(s) is fetched; a file on this machine is data.source=local."""
    parts = urlsplit(str(url))
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise DownloadError(
            f"data.url {url!r}: only http:// and https:// URLs are supported; for a file on this "
            "machine use data.source=local with data.local_path=<the .tar.gz or the extracted folder>"
        )
    return url


# --- HTTP download -------------------------------------------------------------------------------


def http_download(
    url: str,
    dest: Path,
    md5: str | None,
    retries: int,
    backoff_s: float = BACKOFF_BASE_S,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming it with Range requests.

    Connection errors, cut-off bodies and 5xx answers are retried with exponential back-off
    (`retries` times); other HTTP errors are not. The finished file is MD5-checked before it is
    renamed onto `dest`: a mismatch deletes it and raises ChecksumError.
    """
    require_http_url(url)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    with requests.Session() as session:
        while True:
            try:
                _fetch_into(session, url, part, timeout_s)
                break
            except (requests.ConnectionError, requests.Timeout, _ServerError, _IncompleteBody) as exc:
                if attempt >= retries:
                    raise DownloadUnavailableError(
                        f"could not download {url} after {attempt + 1} attempt(s): {exc}. Check the "
                        "URL and the network; without internet access, fetch food-101.tar.gz "
                        "elsewhere and run with data.source=local and data.local_path=<the .tar.gz "
                        "or the extracted food-101 folder>. A partial download is kept in "
                        f"{part} and resumed next time."
                    ) from exc
                delay = backoff_s * 2**attempt
                log.warning("download of %s failed (%s); retry %d/%d in %.1f s",
                            url, exc, attempt + 1, retries, delay)
                time.sleep(delay)
                attempt += 1
    if md5:
        verify_md5(part, md5, url)
    os.replace(part, dest)
    return dest


def verify_md5(path: Path, expected: str, origin: str) -> str:
    """Check a file's MD5; on a mismatch delete the file (nothing corrupt stays) and raise."""
    actual = md5_file(path)
    if actual.lower() != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"MD5 mismatch for {origin}: expected {expected}, got {actual}. The file was corrupt or "
            "tampered with and has been deleted; run the download stage again, or check data.md5 "
            "if you meant to use another archive."
        )
    return actual


def _fetch_into(session: requests.Session, url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    # The archive's own bytes: a server adding Content-Encoding: gzip must not get them decoded.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if response.status_code == 416 and have:
            # Range not satisfiable: the partial file is already whole (or longer than the file).
            total = _content_range_total(response.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise _IncompleteBody(f"partial file of {have} bytes does not fit a {total}-byte file; restarting")
        if response.status_code >= 500:
            raise _ServerError(f"HTTP {response.status_code} from {url}")
        if response.status_code >= 400:
            raise DownloadError(
                f"{url} answered HTTP {response.status_code} {response.reason}; check data.url, or use "
                "data.source=local with data.local_path=<food-101.tar.gz or the extracted folder>"
            )
        resume = have > 0 and response.status_code == 206 and _content_range_start(
            response.headers.get("Content-Range", "")) == have
        if have and not resume:
            log.info("server ignored the Range request for %s; restarting from byte 0", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if total is not None:
            check_free_space(part.parent, total - have, f"downloading {url}")
        with open(part, "ab" if resume else "wb") as handle, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=None,
        ) as bar:
            try:
                for block in response.raw.stream(NETWORK_CHUNK_BYTES, decode_content=False):
                    handle.write(block)
                    bar.update(len(block))
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
                raise _IncompleteBody(f"connection to {url} ended early: {exc}") from exc
    size = part.stat().st_size
    if total is not None and size < total:
        raise _IncompleteBody(f"connection to {url} ended after {size} of {total} bytes")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    # "bytes */1000"
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


# --- archives ----------------------------------------------------------------------------------


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path as plain components below the extraction folder; refuse anything else."""
    name = member.name
    if len(name) > MAX_MEMBER_NAME:
        raise UnsafeArchiveError(f"archive member {name[:80]!r}... has a {len(name)}-character name, longer "
                                 f"than {MAX_MEMBER_NAME}; refusing to extract this archive")
    if "\0" in name:
        raise UnsafeArchiveError(f"archive member {name!r} has a NUL byte in its name; refusing to extract "
                                 "this archive")
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"archive member {name!r} has an absolute path; refusing to extract this archive"
        )
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(
            f"archive member {name!r} would be written outside the extraction folder; refusing to "
            "extract this archive (it is not the official Food-101 archive)"
        )
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    kinds = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "device",
             tarfile.BLKTYPE: "device", tarfile.FIFOTYPE: "FIFO"}
    return "sparse file" if member.issparse() else kinds.get(member.type, f"member of type {member.type!r}")


def check_members(members: list[tarfile.TarInfo], root: Path) -> list[tuple[tuple[str, ...], tarfile.TarInfo]]:
    """Check every member before anything is written; return each with its path components.

    Only regular files and folders pass: without links no member can redirect where a later one
    lands, which is what every tarfile filter bypass so far needs. Bounds stop archive bombs.
    """
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeArchiveError(
            f"the archive has {len(members)} members, at most {MAX_ARCHIVE_MEMBERS} are accepted (the "
            "official Food-101 archive has about 101,200); refusing to extract this archive"
        )
    planned: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    total = 0
    for member in members:
        parts = _member_parts(member)
        if member.isdir():
            folders.add(parts)
        elif member.isreg() and not member.issparse() and parts:
            if parts in files:
                raise UnsafeArchiveError(f"archive member {member.name!r} appears twice; refusing to extract "
                                         "this archive")
            files.add(parts)
            total += member.size
        else:
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a {_kind(member)}; only regular files and folders are "
                "accepted, refusing to extract this archive (it is not the official Food-101 archive)"
            )
        if hasattr(tarfile, "data_filter"):  # a second opinion; never the only check
            tarfile.data_filter(member, str(root))
        planned.append((parts, member))
    clashes = [parts for parts, _ in planned if parts in files and parts in folders] + [
        parts for parts, _ in planned for cut in range(1, len(parts)) if parts[:cut] in files]
    if clashes:
        raise UnsafeArchiveError(f"archive member {'/'.join(clashes[0])!r} is both a file and a folder; "
                                 "refusing to extract this archive")
    if total > MAX_EXTRACTED_BYTES:
        raise UnsafeArchiveError(
            f"the archive would extract to {total} bytes, at most {MAX_EXTRACTED_BYTES} bytes are accepted "
            "(the official Food-101 archive holds about 5.0 GB); refusing to extract this archive"
        )
    return planned


def write_members(tar: tarfile.TarFile, planned: list[tuple[tuple[str, ...], tarfile.TarInfo]],
                  root: Path) -> None:
    """Write checked members under `root` without ever following a link.

    Folders are made and opened one component at a time relative to their parent's descriptor
    (O_NOFOLLOW), and files are created with O_CREAT|O_EXCL|O_NOFOLLOW: nothing already on disk,
    and nothing the archive put there, can send a write elsewhere.
    """
    folder_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    opened = {(): os.open(root, folder_flags)}

    def folder(parts: tuple[str, ...]) -> int:
        if parts in opened:
            return opened[parts]
        if len(opened) > 1024:  # bound the open descriptors on archives with many folders
            for key in [key for key in opened if key]:
                os.close(opened.pop(key))
        known = len(parts)
        while parts[:known] not in opened:
            known -= 1
        descriptor = opened[parts[:known]]
        for end in range(known + 1, len(parts) + 1):
            with contextlib.suppress(FileExistsError):
                os.mkdir(parts[end - 1], 0o755, dir_fd=descriptor)
            descriptor = opened[parts[:end]] = os.open(parts[end - 1], folder_flags, dir_fd=descriptor)
        return descriptor

    total = sum(member.size for _, member in planned if member.isreg())
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="extract",
                  disable=None) as bar:
            for parts, member in planned:
                if member.isdir():
                    folder(parts)
                    continue
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=folder(parts[:-1]))
                with os.fdopen(fd, "wb") as out, tar.extractfile(member) as source:  # type: ignore[union-attr]
                    written = _copy(source, out, bar)
                if written != member.size:
                    raise DownloadError(f"archive member {member.name!r} ended after {written} of "
                                        f"{member.size} bytes; delete the archive and download it again")
    finally:
        for descriptor in opened.values():
            os.close(descriptor)


def _copy(source: IO[bytes], out: IO[bytes], bar: tqdm) -> int:
    written = 0
    while block := source.read(CHUNK_BYTES):
        out.write(block)
        written += len(block)
        bar.update(len(block))
    return written


def extraction_folder(dest: Path) -> Path:
    """A fresh staging folder next to `dest`, marked as this stage's so a later run may remove it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    stage.chmod(0o755)
    write_json(stage / EXTRACTING_MARKER, {"pid": os.getpid(), "for": str(dest)})
    return stage


def remove_leftovers(dest: Path) -> None:
    """Remove staging folders a killed run left next to `dest` (up to the archive's size each).

    Called under the download lock, so none is in use. Only folders this stage names and made are
    touched: `.<name>.extract-*` holding the marker (or still empty), and `.<name>.tmp-*`, the name
    its extraction used before the marker existed.
    """
    candidates = [*dest.parent.glob(f".{dest.name}.extract-*"), *dest.parent.glob(f".{dest.name}.tmp-*")]
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        legacy = folder.name.startswith(f".{dest.name}.tmp-")
        if not (legacy or (folder / EXTRACTING_MARKER).is_file() or not any(folder.iterdir())):
            continue
        log.info("removing %s, left by an interrupted run of the download stage", folder)
        shutil.rmtree(folder)


def extract_archive(archive: Path, dest: Path, archive_md5: str) -> Path:
    """Extract a verified Food-101 archive so that `dest` is its dataset root, atomically.

    Members are all checked before anything is written; extraction goes into a staging folder
    next to `dest`, whose dataset root is renamed onto `dest` once complete.
    """
    dest = Path(dest)
    stage = extraction_folder(dest)
    tree_parent = stage / "tree"
    tree_parent.mkdir(mode=0o755)
    try:
        with tarfile.open(archive, "r:*") as tar:
            planned = check_members(tar.getmembers(), tree_parent)
            needed = sum(member.size for _, member in planned if member.isreg())
            check_free_space(stage, needed, f"extracting {archive}")
            write_members(tar, planned, tree_parent)
        tree = _dataset_root_in(tree_parent)
        check_layout(tree)
        write_json(tree / EXTRACTED_MARKER, {"archive": str(archive), "archive_md5": archive_md5})
        replace_dir(dest, tree)
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive}: {exc}; refusing to extract this archive") from exc
    except (tarfile.ReadError, EOFError) as exc:
        raise DownloadError(
            f"{archive} is not a readable .tar.gz ({exc}); delete it and download it again"
        ) from exc
    except OSError as exc:
        raise DownloadError(f"could not extract {archive} into {stage}: {exc}; check the disk and "
                            "paths.raw, then run the download stage again") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def _dataset_root_in(folder: Path) -> Path:
    """The folder holding meta/ inside an extraction: the folder itself or its single top folder."""
    if (folder / "meta").is_dir():
        return folder
    tops = [p for p in folder.iterdir() if p.is_dir()]
    if len(tops) == 1:
        return tops[0]
    raise DatasetLayoutError(
        f"the archive does not hold one Food-101 folder (found {sorted(p.name for p in tops)}); "
        "expected a single top folder food-101/ with images/ and meta/"
    )


def extracted_is_current(root: Path, archive_md5: str) -> bool:
    """True when `root` was fully extracted from the archive with this MD5."""
    marker = Path(root) / EXTRACTED_MARKER
    if not marker.is_file():
        return False
    return str(read_json(marker).get("archive_md5", "")).lower() == archive_md5.lower()


def verified_md5(archive: Path, expected: str, owned: bool) -> str:
    """MD5-check an archive once: a sidecar remembers a verified (size, mtime) to skip re-hashing.

    A mismatching archive that this stage downloaded (`owned`) is deleted; a user's file is kept.
    """
    sidecar = archive.with_name(archive.name + ".md5.json")
    stat = archive.stat()
    if sidecar.is_file():
        seen = read_json(sidecar)
        if (seen.get("size"), seen.get("mtime_ns"), seen.get("md5")) == (stat.st_size, stat.st_mtime_ns,
                                                                          expected.lower()):
            return expected.lower()
    actual = md5_file(archive)
    if actual != expected.lower():
        if owned:
            archive.unlink()
            sidecar.unlink(missing_ok=True)
        raise ChecksumError(
            f"MD5 mismatch for {archive}: expected {expected}, got {actual}. The archive is corrupt, "
            "incomplete or not the official Food-101 archive; fetch it again (or fix data.md5)."
        )
    remember_md5(archive, actual)
    return actual


def remember_md5(archive: Path, md5: str) -> None:
    stat = archive.stat()
    write_json(archive.with_name(archive.name + ".md5.json"),
               {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5.lower()})


# --- the sources -------------------------------------------------------------------------------


def resolve_dataset(config: Config) -> dict[str, Any]:
    """Make the configured source available; return the dataset.json record and download figures."""
    source = config.data.source
    if source == "sample":
        return {"source": source, "root": str(check_layout(config.paths.sample).resolve()),
                "archive": None, "archive_md5": None, "bytes": 0, "reused": True}
    if source == "imagefolder":
        from food101.imagefolder import scan

        folder = Path(str(config.data.local_path)).expanduser().resolve()
        found = scan(folder, config.data.test_fraction, config.data.split_seed)
        log.info("image folder %s: %s, %d classes", folder, found.layout, len(found.classes))
        return {"source": source, "root": str(folder), "archive": None, "archive_md5": None, "bytes": 0,
                "reused": True}
    if source == "local":
        local = Path(str(config.data.local_path)).expanduser().resolve()
        if local.is_dir():
            return {"source": source, "root": str(check_layout(local)), "archive": None,
                    "archive_md5": None, "bytes": 0, "reused": True}
        if not local.is_file():
            raise DownloadError(
                f"data.local_path {local} does not exist; point it at the extracted food-101 folder "
                "or at food-101.tar.gz"
            )
        return _from_archive(config, source, local, fetch_url=None)
    return _from_archive(config, source, config.paths.raw / ARCHIVE_NAME,
                         fetch_url=require_http_url(config.data.url))


def _from_archive(config: Config, source: str, archive: Path, fetch_url: str | None) -> dict[str, Any]:
    root = config.paths.raw / EXTRACTED_NAME
    expected_md5 = require_md5(config.data.md5)

    def finished() -> dict[str, Any] | None:
        if extracted_is_current(root, expected_md5):
            check_layout(root)
            return {"source": source, "root": str(root), "archive": str(archive),
                    "archive_md5": expected_md5, "bytes": 0, "reused": True}
        return None

    with file_lock(config.paths.raw / ".download.lock"):
        remove_leftovers(root)
        if (done := finished()) is not None:  # found, or another process finished while we waited
            return done
        downloaded = 0
        if fetch_url is not None and not archive.is_file():
            check_free_space(config.paths.raw, int(config.data.min_free_gb * 1e9),
                             "downloading and extracting Food-101 (data.min_free_gb)")
            part = archive.with_name(archive.name + ".part")
            before = part.stat().st_size if part.exists() else 0
            http_download(fetch_url, archive, expected_md5, config.data.download_retries)
            remember_md5(archive, expected_md5)  # just verified: no second hash of 5 GB
            downloaded = archive.stat().st_size - before
        elif fetch_url is None and not archive.is_file():
            raise DownloadError(f"archive {archive} does not exist")
        md5 = verified_md5(archive, expected_md5, owned=fetch_url is not None)
        log.info("extracting %s into %s", archive, root)
        extract_archive(archive, root, md5)
        return {"source": source, "root": str(root), "archive": str(archive), "archive_md5": md5,
                "bytes": downloaded, "reused": False}


def read_dataset(config: Config) -> dict[str, Any]:
    """The dataset record the download stage wrote (source, root, archive, archive_md5)."""
    path = config.paths.dataset
    if not path.is_file():
        raise StageOutputMissing(f"{path} does not exist; run the download stage first (food101 stage download)")
    return read_json(path)


def _retry_when_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retries the task only when the server could not be reached, never on bad data."""
    return isinstance(getattr(state, "data", None), DownloadUnavailableError)


@task(name="download", cache_policy=NONE, retries=2, retry_delay_seconds=60,
      retry_condition_fn=_retry_when_unreachable)
def download(config: Config, parent_run_id: str | None = None) -> dict:
    """Make the configured Food-101 source available as a dataset root and record it in dataset.json."""
    from food101.tracking import stage_run  # here: the data stages' worker processes preload this module, not MLflow

    params = {"source": config.data.source, "url": config.data.url, "md5": config.data.md5,
              "local_path": config.data.local_path, "download_retries": config.data.download_retries,
              "min_free_gb": config.data.min_free_gb}
    with stage_run(config, "download", parent_run_id, params=params) as run:
        start = time.perf_counter()
        resolved = resolve_dataset(config)
        seconds = time.perf_counter() - start
        record = {k: resolved[k] for k in ("source", "root", "archive", "archive_md5")}
        write_json(config.paths.dataset, record)
        run.set_tags({"dataset_root": record["root"], "archive_md5": record["archive_md5"] or "none"})
        run.log_metrics({"download_bytes": resolved["bytes"], "download_seconds": seconds,
                         "reused": float(resolved["reused"])})
        run.log_artifact(config.paths.dataset)
        log.info("dataset %s at %s (%s)", record["source"], record["root"],
                 "reused" if resolved["reused"] else f"{resolved['bytes']} bytes in {seconds:.1f} s")
        return {**record, "bytes": resolved["bytes"], "seconds": round(seconds, 3),
                "reused": resolved["reused"]}
