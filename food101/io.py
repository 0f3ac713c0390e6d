"""Atomic file writes: every file a stage writes appears whole or not at all.

The pattern is always the same: write to a temporary name in the same folder, flush and fsync,
then `os.replace` onto the final name (atomic on POSIX). A killed process leaves at most a
`*.tmp-*` file behind, which the next writer ignores and overwrites.

Folders that a stage replaces whole are the pipeline's own: each carries a marker file written
when the pipeline created it, and a folder without one (a user's folder a path parameter points
at) is never replaced or deleted. The marker holds no time (its mtime is the creation time), so
two runs that write the same outputs write the same bytes.

What a stage reads back is checked against what it wrote: `file_record` (size and block hashes)
at write time, `verify_files` at read time. `require_free_space` stops a write the disk cannot hold.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from food101.errors import Food101Error

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755
OWNED_MARKER = ".food101-owned"
# Recorded files are hashed in blocks of this size, read and hashed in parallel threads
# (pread and sha256 release the GIL; SHA-NI hashes about 2 GB/s per core).
HASH_BLOCK_BYTES = 32 * 2**20
HASH_THREADS = 8
_OWNER = "food101-benchmark"


class ForeignFolderError(Food101Error):
    """An output path names a folder the pipeline did not create: it is not replaced or deleted."""


class InsufficientSpaceError(Food101Error):
    """Too little free disk for what a stage is about to write."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(FILE_MODE)  # mkstemp makes owner-only files; outputs are ordinary readable files
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """open() that writes to a temporary file and renames it into place on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_text(path: Path, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return Path(path)


def replace_dir(final: Path, staged: Path, stage: str | None = None, adopt: Collection[str] = ()) -> Path:
    """Swap a fully written folder `staged` into place as `final` (old content removed after).

    `final`, when it exists, must be the pipeline's (see `check_owned`, which `adopt` is passed
    to); `staged` is marked, so the folder in place is always the pipeline's.
    """
    final, staged = Path(final), Path(staged)
    check_owned(final, adopt)
    old = final.with_name(f".{final.name}.old")
    if not (staged / OWNED_MARKER).is_file():
        mark_owned(staged, stage)
    remove_owned(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    remove_owned(old)
    return final


def staging_dir(final: Path, stage: str | None = None, adopt: Collection[str] = ()) -> Path:
    """A fresh empty (marked) folder next to `final` to write into before `replace_dir`.

    `final` is checked first, so a folder that would be refused at the swap is refused before
    any work is staged beside it.
    """
    final = Path(final)
    check_owned(final, adopt)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    folder.chmod(DIR_MODE)
    mark_owned(folder, stage)
    return folder


def mark_owned(folder: Path, stage: str | None = None) -> Path:
    """Record that the pipeline created `folder` (which stage; the marker's mtime says when)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_json(folder / OWNED_MARKER, {"owner": _OWNER, "stage": stage})


def check_owned(folder: Path, adopt: Collection[str] = (), parameter: str = "paths.*") -> None:
    """Refuse a folder the pipeline may not replace or delete: one that exists, is not empty and
    has no marker. An empty folder is adopted; so is one whose every entry matches a pattern of
    `adopt` (what the stage itself writes: its outputs from before markers existed)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ForeignFolderError(
            f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder this pipeline "
            f"created; it is left alone: point {parameter} at an empty or new folder"
        )
    if not folder.exists() or (folder / OWNED_MARKER).is_file():
        return
    names = [entry.name for entry in folder.iterdir()]
    if not names:
        return
    if adopt and all(any(fnmatch.fnmatchcase(name, pattern) for pattern in adopt) for name in names):
        log.info("adopting %s: it holds only files this stage writes", folder)
        mark_owned(folder)
        return
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise ForeignFolderError(
        f"{folder} has no {OWNED_MARKER} marker, so it was not created by this pipeline (or by a version "
        f"before markers) and is not replaced or deleted: point {parameter} at an empty or new folder, "
        f"or move its files ({shown}) away yourself"
    )


def remove_owned(folder: Path, adopt: Collection[str] = ()) -> None:
    """shutil.rmtree for the pipeline's own folders only (see `check_owned`); absent is fine."""
    folder = Path(folder)
    check_owned(folder, adopt)
    if folder.exists():
        shutil.rmtree(folder)


def file_record(path: Path, threads: int = HASH_THREADS) -> dict[str, Any]:
    """What verification compares later: the size and the SHA-256 of each block."""
    size = path.stat().st_size
    return {"bytes": size, "block_bytes": HASH_BLOCK_BYTES, "sha256": _block_hashes(path, HASH_BLOCK_BYTES, threads)}


def _block_hashes(path: Path, block_bytes: int, threads: int) -> list[str]:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        offsets = range(0, max(size, 1), block_bytes)

        def digest(offset: int) -> str:  # pread and sha256 release the GIL: threads hash in parallel
            return hashlib.sha256(os.pread(handle.fileno(), block_bytes, offset)).hexdigest()

        if threads <= 1 or len(offsets) == 1:
            return [digest(offset) for offset in offsets]
        with ThreadPoolExecutor(min(threads, len(offsets))) as pool:
            return list(pool.map(digest, offsets))


def verify_files(folder: Path, records: dict[str, Any] | None, names: Collection[str],
                 hashes: bool, threads: int = HASH_THREADS) -> list[str]:
    """What differs from the `file_record`s of `names` in `folder` (an empty list when all match):
    sizes always, hashes when asked."""
    if records is None:
        return ["no sizes or hashes were recorded (written by an older version)"]
    problems = []
    for name in names:
        path, record = folder / name, records.get(name)
        if record is None:
            problems.append(f"{name} has no record")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name} is {path.stat().st_size} bytes, {record['bytes']} were written")
        elif hashes and _block_hashes(path, int(record["block_bytes"]), threads) != record["sha256"]:
            problems.append(f"{name} has changed since it was written")
    return problems


def require_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Stop before writing `needed_bytes` into `folder` when its file system has less free space
    (a full disk under a memory map ends in a bus error, not a message)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise InsufficientSpaceError(
            f"{what} needs {_gib(needed_bytes)} in {existing}, which has {_gib(free)} free; free some "
            "space or point the output parameter at a larger disk"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def fsync_file(path: Path | str) -> None:
    """Flush a file's dirty pages to disk, those written through any process's memory map too."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
