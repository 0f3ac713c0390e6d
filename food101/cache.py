"""The preprocessed cache: the validated photos decoded once into memory-mapped uint8 arrays, one per split.

Library code, apart from the Prefect stage in tasks/preprocess.py, so that a benchmark or a script can build
and read a cache on a machine without the orchestration stack (Prefect, MLflow, Great Expectations).

Each photo is decoded with JPEG draft mode (the decoder scales by 1/2, 1/4 or 1/8 in the DCT, so
a 512 px photo bound for 72 px never decodes at full size), converted to RGB, its shorter side
resized and centre-cropped in one `resize(box=...)`, and written straight into the split's
`.npy` memmap by a worker process, so memory stays flat whatever the dataset size.

Crash safety: everything is written into a staging folder next to the cache, with a progress
record of finished chunks that is replaced atomically only after the parent fsynced their rows
(the workers write into the page cache and go on decoding; the disk wait is the parent's, once
per SYNC_INTERVAL_S for the chunks finished meanwhile). A
re-run with the same cache key continues the missing chunks (a chunk not in the record is
rewritten whole, never trusted); the cache appears by rename only when complete. The key hashes
the manifest rows used and the preprocessing params, so an unchanged input is a no-op and a
changed param rebuilds.

Trust on read: meta.json records each file's size and the SHA-256 of each 32 MiB block,
hashed from disk once the rows are durable (fixed blocks, not chunks, so the record does not
depend on how many workers wrote the file). "Up to date" needs every hash to match, else the
cache is rebuilt with a log line saying why; the reader checks sizes on open and a split's
hashes the first time that split is read, so a stage never trains or evaluates on a cache that
changed after it was written. Hashing runs at about 2 GB/s per core (SHA-NI), seconds for the
14 GB cache across threads, against minutes to hours of the reading stage's own work.

The cache folder is the pipeline's own (food101.io's marker): a folder `paths.cache` names that
holds anything else is refused before any work, and the disk's free space is checked first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from food101.config import Config, PreprocessConfig
from food101.errors import Food101Error
from food101.io import (
    check_owned,
    file_record,
    fsync_file,
    mark_owned,
    read_json,
    remove_owned,
    replace_dir,
    require_free_space,
    verify_files,
    write_json,
    write_npy,
    write_parquet,
)
from food101.processes import process_pool

log = logging.getLogger(__name__)

CACHE_SPLITS = ("train", "val", "test")
# Bumped when the bytes a given key produces change (decoder, resampling, layout).
CACHE_FORMAT = 1
# Rows per unit of work and of crash recovery: large enough to amortise a task round trip and
# a progress write, small enough that a kill loses seconds of work and that the last chunks
# do not leave a core idle (at least CHUNKS_PER_WORKER chunks per worker).
MAX_CHUNK_SIZE = 256
MIN_CHUNK_SIZE = 16
CHUNKS_PER_WORKER = 16
PROGRESS_FILE = "progress.json"
# Finished chunks are made durable (fsync) and recorded at most this often: a kill loses at most
# this much work beyond the chunks in flight, and the disk sees a few large flushes, not many small.
SYNC_INTERVAL_S = 0.5
META_FILE = "meta.json"
INDEX_FILE = "index.parquet"
RUN_STAGE_HINT = "run the preprocess stage first: food101 stage preprocess"
REBUILD_HINT = "run the preprocess stage again (food101 stage preprocess): it rebuilds a changed cache"
# Free disk kept beyond the cache's own size: index, labels, meta and the file system's overhead.
FREE_SPACE_RESERVE = 256 * 2**20


class CacheNotReadyError(Food101Error):
    """The cache is missing or was never completed."""


class PreprocessError(Food101Error):
    """A photo that validation let through cannot be decoded, or the manifest is unusable."""


class CacheChangedError(CacheNotReadyError):
    """A cache file's size or hash is not what preprocess recorded when it wrote the file."""


# --- pure functions ----------------------------------------------------------------------------


def select_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows that go into the cache: not quarantined, in a stable order."""
    needed = {"path", "label", "split", "status"}
    missing = needed - set(manifest.columns)
    if missing:
        raise PreprocessError(f"manifest lacks columns {sorted(missing)}; re-run the validate stage")
    rows = manifest[manifest["status"] != "quarantined"]
    bad_split = set(rows["split"]) - {"train", "test"}
    if bad_split:
        raise PreprocessError(f"manifest has unknown splits {sorted(bad_split)}; re-run the validate stage")
    return rows.sort_values("path", kind="stable").reset_index(drop=True)


def carve_val(train_rows: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """A boolean mask over `train_rows`: round(n * val_fraction) rows of each class go to val.

    Stratified and seeded per class (the draw for one class does not depend on the others), so
    adding a class does not reshuffle the validation rows of the rest.
    """
    is_val = np.zeros(len(train_rows), dtype=bool)
    labels = train_rows["label"].to_numpy()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(len(members) * val_fraction))
        if n_val == 0:
            continue
        rng = np.random.default_rng([seed, int(label)])
        is_val[rng.choice(members, size=n_val, replace=False)] = True
    return pd.Series(is_val, index=train_rows.index)


def plan_cache(manifest: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """One row per cached image: split (train/val/test), position in that split, path, label."""
    rows = select_rows(manifest)
    train = rows[rows["split"] == "train"]
    is_val = carve_val(train, val_fraction, seed)
    parts = {"train": train[~is_val], "val": train[is_val], "test": rows[rows["split"] == "test"]}
    frames = []
    for split, part in parts.items():
        part = part.reset_index(drop=True)
        frame = pd.DataFrame({
            "split": split,
            "position": np.arange(len(part), dtype=np.int64),
            "path": part["path"].astype(str),
            "label": part["label"].astype(np.int64),
            "image_id": part["image_id"].astype(str) if "image_id" in part else part["path"].astype(str),
            "sha256": part["sha256"].astype(str) if "sha256" in part else "",
        })
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def cache_key(plan: pd.DataFrame, params: PreprocessConfig, classes: dict[str, list[str]]) -> str:
    """sha256 of the rows used (path, sha256, label, source split) and the params that shape the bytes."""
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "resize": params.resize,
        "crop": params.crop,
        "val_fraction": params.val_fraction,
        "seed": params.seed,
        "classes": list(classes["names"]),
        "display": list(classes.get("display", [])),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    source_split = plan["split"].where(plan["split"] != "val", "train")
    for path, sha, label, split in zip(plan["path"], plan["sha256"], plan["label"], source_split, strict=True):
        digest.update(f"{path}\t{sha}\t{label}\t{split}\n".encode())
    return digest.hexdigest()


def load_image(path: Path | str, resize: int, crop: int) -> np.ndarray:
    """(crop, crop, 3) uint8: RGB, shorter side resized to `resize`, centre crop `crop`.

    Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale (never below `resize`); the resize
    and the crop are one `resize(box=...)` over the central region only. Greyscale, CMYK,
    palette and PNG inputs all come out RGB.
    """
    with Image.open(path) as image:
        image.draft("RGB", (resize, resize))
        image = image.convert("RGB")
        width, height = image.size
        side = crop * min(width, height) / resize  # the crop's size in source pixels
        left, top = (width - side) / 2, (height - side) / 2
        out = image.resize((crop, crop), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        return np.asarray(out, dtype=np.uint8)


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of one split: the unit of parallel work and of crash recovery."""

    split: str
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"{self.split}:{self.start}"


def default_chunk_size(total: int, workers: int) -> int:
    return max(MIN_CHUNK_SIZE, min(MAX_CHUNK_SIZE, math.ceil(total / (max(workers, 1) * CHUNKS_PER_WORKER))))


def make_chunks(counts: dict[str, int], chunk_size: int) -> list[Chunk]:
    return [Chunk(split, start, min(start + chunk_size, n))
            for split, n in counts.items() for start in range(0, n, chunk_size)]


# --- the worker ----------------------------------------------------------------------------------


def _fill_chunk(images_path: str, chunk: Chunk, paths: list[str], resize: int, crop: int) -> str:
    """Decode a chunk's photos into its rows of the split's memmap and report its id.

    The rows land in the page cache, shared with every process that maps the file (a killed
    worker loses nothing it wrote); the parent makes them durable with an fsync before it
    records the chunk, so the workers never wait on the disk.
    """
    images = np.load(images_path, mmap_mode="r+")
    try:
        for offset, path in enumerate(paths):
            try:
                images[chunk.start + offset] = load_image(path, resize, crop)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise PreprocessError(
                    f"cannot decode {path}: {exc}; re-run the validate stage (it quarantines unreadable "
                    "files) or remove the file"
                ) from exc
    finally:
        del images
    return chunk.id


def _run_chunks(
    chunks: list[Chunk], paths: dict[str, list[str]], images_paths: dict[str, str],
    resize: int, crop: int, workers: int,
) -> Iterator[str]:
    """Yield each chunk's id once its rows are on disk (in completion order)."""
    def args(chunk: Chunk) -> tuple:
        return images_paths[chunk.split], chunk, paths[chunk.split][chunk.start:chunk.stop], resize, crop

    if workers <= 1:
        for chunk in chunks:
            yield _fill_chunk(*args(chunk))
        return
    with process_pool(workers) as pool:
        # A bounded window of pending chunks: the parent never holds every task at once.
        queue = iter(chunks)
        pending = {pool.submit(_fill_chunk, *args(c)) for c in _take(queue, workers * 4)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                pending.update(pool.submit(_fill_chunk, *args(c)) for c in _take(queue, 1))


def _record_done(staging: Path, images_paths: dict[str, str], unsynced: list[str], done: set[str],
                 key: str, chunk_size: int) -> None:
    """fsync the files the `unsynced` chunks wrote, then add them to the progress record."""
    if not unsynced:
        return
    for split in sorted({chunk_id.split(":")[0] for chunk_id in unsynced}):
        fsync_file(images_paths[split])
    done.update(unsynced)
    unsynced.clear()
    write_json(staging / PROGRESS_FILE, {"key": key, "chunk_size": chunk_size, "done": sorted(done)})


def _take(items: Iterator[Chunk], n: int) -> list[Chunk]:
    out = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


# --- the cache on disk ---------------------------------------------------------------------------


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


# The files whose sizes and hashes meta.json records.
CACHE_FILES = (*(name(split) for split in CACHE_SPLITS for name in (images_file, labels_file)), INDEX_FILE)
# Everything a cache or its staging folder holds: a folder written before ownership markers that
# holds nothing else is the pipeline's and is adopted; any other file makes the folder foreign.
CACHE_NAMES = (*CACHE_FILES, META_FILE, PROGRESS_FILE, ".*.tmp-*")


def record_cache_files(folder: Path) -> dict[str, Any]:
    """meta.json's "files": the size and block hashes of each cache file in `folder`."""
    return {name: file_record(folder / name) for name in CACHE_FILES}


def staging_path(out_dir: Path) -> Path:
    """Where an unfinished cache lives (a fixed name, so a re-run finds it and resumes)."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def _is_complete(folder: Path, key: str | None = None) -> bool:
    meta_path = folder / META_FILE
    if not meta_path.is_file() or (folder / PROGRESS_FILE).exists():
        return False
    meta = read_json(meta_path)
    if key is not None and meta.get("key") != key:
        return False
    return all((folder / name(split)).is_file() for split in CACHE_SPLITS for name in (images_file, labels_file))


def _start_staging(staging: Path, plan: pd.DataFrame, key: str, crop: int, chunk_size: int) -> dict[str, Any]:
    """A fresh staging folder: sized (sparse) image files, labels, index, an empty progress record."""
    remove_owned(staging, adopt=CACHE_NAMES)
    staging.mkdir(parents=True)
    mark_owned(staging, "preprocess")
    for split in CACHE_SPLITS:
        part = plan[plan["split"] == split]
        shape = (len(part), crop, crop, 3)
        if len(part):
            np.lib.format.open_memmap(staging / images_file(split), mode="w+", dtype=np.uint8, shape=shape).flush()
        else:  # mmap cannot map an empty file region
            write_npy(staging / images_file(split), np.zeros(shape, dtype=np.uint8))
        write_npy(staging / labels_file(split), part["label"].to_numpy(dtype=np.int64))
    write_parquet(staging / INDEX_FILE, plan[["split", "position", "path", "label", "image_id"]])
    progress = {"key": key, "chunk_size": chunk_size, "done": []}
    write_json(staging / PROGRESS_FILE, progress)
    return progress


def build_cache(
    manifest: pd.DataFrame,
    dataset_root: Path,
    classes: dict[str, list[str]],
    params: PreprocessConfig,
    out_dir: Path,
    *,
    chunk_size: int | None = None,
    workers: int | None = None,
    progress_bar: bool | None = None,
    reserve_bytes: int = FREE_SPACE_RESERVE,
) -> dict[str, Any]:
    """Write (or resume, or keep) the cache for `manifest` under `out_dir`; a summary comes back.

    `classes` is classes.json's content ({"names": [...], "display": [...]}). `workers` defaults
    to params.worker_count; 1 decodes in this process. `chunk_size` (rows per unit of work)
    defaults to a size that gives every worker several chunks; a resumed run keeps the size the
    interrupted one used, whatever is asked. `reserve_bytes` is the free disk kept beyond the
    cache's own size.
    """
    out_dir, dataset_root = Path(out_dir), Path(dataset_root)
    staging = staging_path(out_dir)
    # Before any work: a folder that is not the pipeline's is never replaced.
    check_owned(out_dir, adopt=CACHE_NAMES, parameter="paths.cache")
    check_owned(staging, adopt=CACHE_NAMES, parameter="paths.cache")
    plan = plan_cache(manifest, params.val_fraction, params.seed)
    key = cache_key(plan, params, classes)
    counts = {split: int((plan["split"] == split).sum()) for split in CACHE_SPLITS}
    summary: dict[str, Any] = {"cache": str(out_dir), "key": key, "counts": counts, "rebuilt": False,
                               "images": 0, "seconds": 0.0, "images_per_s": 0.0, "chunks_resumed": 0}
    workers = params.worker_count if workers is None else workers
    if _is_complete(out_dir, key):
        problems = verify_files(out_dir, read_json(out_dir / META_FILE).get("files"), CACHE_FILES, hashes=True)
        if not problems:
            log.info("preprocess: cache %s is up to date (key %s); nothing to do", out_dir, key[:12])
            return summary | {"bytes": _folder_bytes(out_dir)}
        log.warning("preprocess: cache %s does not match what was written (%s); rebuilding it",
                    out_dir, "; ".join(problems))

    if _is_complete(staging, key):  # killed between the two renames of a previous finish
        if not verify_files(staging, read_json(staging / META_FILE).get("files"), CACHE_FILES, hashes=True):
            replace_dir(out_dir, staging, stage="preprocess")
            return summary | {"rebuilt": True, "bytes": _folder_bytes(out_dir)}
        log.warning("preprocess: the finished cache in %s changed before it was put in place; rebuilding it",
                    staging)
        remove_owned(staging)
    record = read_json(staging / PROGRESS_FILE) if (staging / PROGRESS_FILE).is_file() else None
    require_free_space(out_dir.parent, _bytes_to_write(staging, counts, params.crop) + reserve_bytes,
                       f"the preprocessed cache {out_dir}")
    if record is None or record.get("key") != key:
        if record is not None:
            log.info("preprocess: discarding an unfinished cache for another key")
        chunk_size = chunk_size or default_chunk_size(len(plan), workers)
        record = _start_staging(staging, plan, key, params.crop, chunk_size)
    else:
        log.info("preprocess: resuming an unfinished cache: %d chunks already done", len(record["done"]))
        for debris in staging.glob(".*.tmp-*"):  # half-written files of the killed run: never trusted
            debris.unlink()
    chunk_size = int(record["chunk_size"])  # chunk ids mean rows only with the size that wrote them

    chunks = make_chunks(counts, chunk_size)
    done = set(record["done"])
    todo = [c for c in chunks if c.id not in done]
    paths = {split: [str(dataset_root / p) for p in plan.loc[plan["split"] == split, "path"]]
             for split in CACHE_SPLITS}
    images_paths = {split: str(staging / images_file(split)) for split in CACHE_SPLITS}
    sizes = {c.id: c.stop - c.start for c in chunks}
    n_todo = sum(sizes[c.id] for c in todo)
    log.info("preprocess: %d images to decode in %d chunks on %d process(es)", n_todo, len(todo), workers)

    start = time.perf_counter()
    disable_bar = None if progress_bar is None else not progress_bar  # None: on when a terminal
    with tqdm(total=n_todo, unit="img", desc="preprocess", disable=disable_bar) as bar:
        unsynced: list[str] = []
        last_sync = time.monotonic()
        try:
            for chunk_id in _run_chunks(todo, paths, images_paths, params.resize, params.crop, workers):
                unsynced.append(chunk_id)
                bar.update(sizes[chunk_id])
                if time.monotonic() - last_sync >= SYNC_INTERVAL_S:
                    _record_done(staging, images_paths, unsynced, done, key, chunk_size)
                    last_sync = time.monotonic()
        finally:  # after a bad photo or Ctrl-C too: the chunks that did finish are kept for the re-run
            _record_done(staging, images_paths, unsynced, done, key, chunk_size)
    seconds = time.perf_counter() - start

    meta = {"key": key, "classes": list(classes["names"]), "display": list(classes.get("display", [])),
            "resize": params.resize, "crop": params.crop, "counts": counts,
            "val_fraction": params.val_fraction, "seed": params.seed, "format": CACHE_FORMAT,
            "files": record_cache_files(staging)}
    write_json(staging / META_FILE, meta)
    (staging / PROGRESS_FILE).unlink()
    replace_dir(out_dir, staging, stage="preprocess")
    log.info("preprocess: cache written to %s (%s)", out_dir, counts)
    return summary | {
        "rebuilt": True, "images": n_todo, "seconds": seconds,
        "images_per_s": n_todo / seconds if seconds > 0 else 0.0,
        "chunks_resumed": len(chunks) - len(todo), "bytes": _folder_bytes(out_dir),
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _bytes_to_write(staging: Path, counts: dict[str, int], crop: int) -> int:
    """The cache's size less what a resumed staging folder already holds on disk (its image
    files are sparse: only the rows written so far take space)."""
    total = sum(n * (crop * crop * 3 + 8) for n in counts.values())
    held = sum(p.stat().st_blocks * 512 for p in staging.iterdir() if p.is_file()) if staging.is_dir() else 0
    return max(total - held, 0)


# --- the reader ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cache:
    """The preprocessed cache: read-only memmapped images, labels, classes and the index."""

    root: Path
    meta: dict[str, Any]
    _index: list[pd.DataFrame] = field(default_factory=list, repr=False, compare=False)
    _verified: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def display(self) -> list[str]:
        return list(self.meta["display"])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.meta["counts"])

    @property
    def index(self) -> pd.DataFrame:
        if not self._index:
            self._verify(INDEX_FILE)
            self._index.append(pd.read_parquet(self.root / INDEX_FILE))
        return self._index[0]

    def images(self, split: str) -> np.ndarray:
        """(N, crop, crop, 3) uint8, memory-mapped read-only (an empty split is an empty array).

        The split's file is hashed against the record the first time it is read: a stage reads
        every row of it anyway, and a changed cache must stop it, not shift its numbers."""
        self._check_split(split)
        self._verify(images_file(split))
        return np.load(self.root / images_file(split), mmap_mode="r" if self.meta["counts"][split] else None)

    def labels(self, split: str) -> np.ndarray:
        self._check_split(split)
        self._verify(labels_file(split))
        return np.load(self.root / labels_file(split))

    def _verify(self, name: str) -> None:
        if name in self._verified:
            return
        problems = verify_files(self.root, self.meta.get("files"), (name,), hashes=True)
        if problems:
            raise CacheChangedError(f"the preprocessed cache {self.root} is not what preprocess wrote "
                                    f"({'; '.join(problems)}); {REBUILD_HINT}")
        self._verified.add(name)

    def _check_split(self, split: str) -> None:
        if split not in CACHE_SPLITS:
            raise ValueError(f"unknown split {split!r}; the cache has {list(CACHE_SPLITS)}")


def load_cache(folder: Path) -> Cache:
    """The cache in `folder`; a clear error when it is missing or unfinished."""
    folder = Path(folder)
    if not _is_complete(folder):
        state = "unfinished" if staging_path(folder).exists() else "missing"
        raise CacheNotReadyError(f"the preprocessed cache {folder} is {state}; {RUN_STAGE_HINT}")
    meta = read_json(folder / META_FILE)
    problems = verify_files(folder, meta.get("files"), CACHE_FILES, hashes=False)
    if problems:
        raise CacheChangedError(f"the preprocessed cache {folder} is not what preprocess wrote "
                                f"({'; '.join(problems)}); {REBUILD_HINT}")
    return Cache(folder, meta)


def open_cache(config: Config) -> Cache:
    """The cache the preprocess stage wrote for this configuration."""
    cache = load_cache(config.paths.cache)
    expected = {"resize": config.preprocess.resize, "crop": config.preprocess.crop}
    found = {k: cache.meta.get(k) for k in expected}
    if found != expected:
        raise CacheNotReadyError(
            f"the cache in {config.paths.cache} was built with {found}, the configuration asks for "
            f"{expected}; {RUN_STAGE_HINT}"
        )
    return cache
