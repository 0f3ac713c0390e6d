"""Preprocess stage: the Prefect task that builds the uint8 cache and records the run in MLflow.

The cache itself (planning, decoding, crash-safe writing, the verified reader) is food101/cache.py,
which imports without Prefect or MLflow; the names other modules import from here are re-exported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from food101.cache import (  # noqa: F401
    CACHE_FORMAT,
    META_FILE,
    Cache,
    CacheChangedError,
    CacheNotReadyError,
    PreprocessError,
    build_cache,
    load_cache,
    load_image,
    open_cache,
    plan_cache,
    record_cache_files,
    staging_path,
)
from food101.config import Config


@task(name="preprocess", cache_policy=NONE)
def preprocess(config: Config, parent_run_id: str | None = None) -> dict:
    """Decode the validated photos into the uint8 memmap cache (resumable, skipped when unchanged)."""
    from tasks.download import read_dataset
    from tasks.validate import read_classes, read_manifest

    params = config.preprocess
    from food101.tracking import stage_run  # here: the decode workers preload this module, not MLflow

    with stage_run(config, "preprocess", parent_run_id, params={"preprocess": dataclasses.asdict(params)}) as run:
        manifest = read_manifest(config)
        classes = read_classes(config)
        root = Path(read_dataset(config)["root"])
        summary = build_cache(manifest, root, classes, params, config.paths.cache)
        run.set_tags({"cache_key": summary["key"]})
        run.log_metrics({
            **{f"images_{split}": n for split, n in summary["counts"].items()},
            "images_decoded": summary["images"],
            "images_per_s": summary["images_per_s"],
            "preprocess_seconds": summary["seconds"],
            "cache_bytes": summary["bytes"],
            "rebuilt": float(summary["rebuilt"]),
            "chunks_resumed": summary["chunks_resumed"],
        })
        run.log_artifact(config.paths.cache / META_FILE)
        return summary
