"""Preprocess throughput: the stage's decoder (1 and 2 processes) vs a naive PIL loop, same photos.

The naive loop opens each photo at full size, converts it to RGB, resizes the shorter side and
centre-crops it, one process. The stage uses JPEG draft mode and one box-resize, and writes into
memory-mapped .npy files from a process pool. Both produce the same output size from the same
real photos (data/sample, replicated for enough work), in the same run.

    .venv/bin/python benchmarks/preprocess_throughput.py [--images 1600] [--resize 256 --crop 224]

The last line printed is one JSON object; `ratio` is the per-process speed-up over the naive loop.
`decode_only_2proc_vs_1proc` is the machine's own ceiling for the 2-process figure: two processes
decoding and discarding, with nothing else running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from food101 import env  # noqa: E402

env.configure(REPO)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from food101.config import load_config  # noqa: E402
from tasks.preprocess import build_cache, load_image  # noqa: E402
from tests.conftest import sample_classes, sample_manifest  # noqa: E402

SAMPLE = REPO / "data" / "sample"


def naive_loop(paths: list[Path], resize: int, crop: int) -> np.ndarray:
    out = np.empty((len(paths), crop, crop, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = resize / min(width, height)
            new_w, new_h = round(width * scale), round(height * scale)
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - crop) // 2, (new_h - crop) // 2
            out[i] = np.asarray(image.crop((left, top, left + crop, top + crop)))
    return out


def decode_only(paths: list[Path], resize: int, crop: int) -> float:
    """Seconds to decode `paths` with the stage's decoder, writing nothing (a ceiling's ingredient)."""
    start = time.perf_counter()
    for path in paths:
        load_image(path, resize, crop)
    return time.perf_counter() - start


def machine_scaling(paths: list[Path], resize: int, crop: int) -> float:
    """How much faster two processes decode the photos than one, with nothing shared: no output,
    no parent, no progress record. The ceiling for `ratio_2proc_vs_1proc` on this machine."""
    one = decode_only(paths, resize, crop)
    half = len(paths) // 2
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(decode_only, [(paths[:20], resize, crop)] * 2)  # start both outside the timing
        start = time.perf_counter()
        pool.starmap(decode_only, [(paths[:half], resize, crop), (paths[half:], resize, crop)])
        two = time.perf_counter() - start
    return one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600, help="photos per measurement (sample replicated)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the best is kept")
    args = parser.parse_args()

    manifest = sample_manifest(rows=args.images)
    paths = [SAMPLE / p for p in manifest["path"]]
    params = dataclasses.replace(load_config(REPO / "params.yaml").preprocess, resize=args.resize,
                                 crop=args.crop, val_fraction=0.1, seed=0)
    classes = sample_classes()

    def run_stage(workers: int, folder: Path) -> float:
        start = time.perf_counter()
        summary = build_cache(manifest, SAMPLE, classes, params, folder, workers=workers, progress_bar=False)
        assert summary["rebuilt"] and sum(summary["counts"].values()) == len(manifest)
        return len(manifest) / (time.perf_counter() - start)

    results: dict[str, list[float]] = {"naive": [], "stage_1proc": [], "stage_2proc": []}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tmp_path = Path(tmp)
        # Warm-up: page cache for the photos, and the pool's fork server (started once per process).
        naive_loop(paths[:50], args.resize, args.crop)
        start = time.perf_counter()
        build_cache(manifest.iloc[:64], SAMPLE, classes, params, tmp_path / "warm", workers=2, progress_bar=False)
        pool_first_start_s = time.perf_counter() - start
        for repeat in range(args.repeats):
            start = time.perf_counter()
            naive_loop(paths, args.resize, args.crop)
            results["naive"].append(len(paths) / (time.perf_counter() - start))
            results["stage_1proc"].append(run_stage(1, tmp_path / f"one-{repeat}"))
            results["stage_2proc"].append(run_stage(2, tmp_path / f"two-{repeat}"))

        scaling = max(machine_scaling(paths, args.resize, args.crop) for _ in range(args.repeats))

    best = {name: max(values) for name, values in results.items()}
    report = {
        "benchmark": "preprocess_throughput",
        "images": len(manifest), "resize": args.resize, "crop": args.crop, "repeats": args.repeats,
        "naive_images_per_s": round(best["naive"], 1),
        "stage_1proc_images_per_s": round(best["stage_1proc"], 1),
        "stage_2proc_images_per_s": round(best["stage_2proc"], 1),
        "all_runs_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
        "ratio": round(best["stage_1proc"] / best["naive"], 2),
        "ratio_2proc_vs_1proc": round(best["stage_2proc"] / best["stage_1proc"], 2),
        "ratio_2proc_vs_naive": round(best["stage_2proc"] / best["naive"], 2),
        "decode_only_2proc_vs_1proc": round(scaling, 2),
        "pool_first_start_s": round(pool_first_start_s, 2),
        "targets": {"ratio": 1.3, "ratio_2proc_vs_1proc": 1.8},
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
