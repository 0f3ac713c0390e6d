"""Atomic file writes: every file a stage writes appears whole or not at all.

The pattern is always the same: write to a temporary name in the same folder, flush and fsync,
then `os.replace` onto the final name (atomic on POSIX). A killed process leaves at most a
`*.tmp-*` file behind, which the next writer ignores and overwrites.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

FILE_MODE = 0o644
DIR_MODE = 0o755


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


def replace_dir(final: Path, staged: Path) -> Path:
    """Swap a fully written folder `staged` into place as `final` (old content removed after)."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def staging_dir(final: Path) -> Path:
    """A fresh empty folder next to `final` to write into before `replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    folder.chmod(DIR_MODE)
    return folder


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
