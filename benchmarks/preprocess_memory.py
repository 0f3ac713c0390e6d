"""Peak memory of preprocessing N and 4N photos: flat, because rows go straight to memmaps.

Each size runs in a fresh child process (so one run's memory cannot hide in the other's); a
sampler thread sums the resident memory of that process and all its children (the pool's
workers and fork server) every 20 ms. Real photos from data/sample, replicated.

Two figures: anonymous memory (RssAnon: what the processes allocated, the part that must fit in
RAM) and total RSS, which also counts the written pages of the memory-mapped output while they
are mapped; those are page cache, written back and dropped by the kernel under pressure.

    .venv/bin/python benchmarks/preprocess_memory.py [--images 800] [--resize 256 --crop 224]

The last line printed is one JSON object; `ratio` is peak anonymous memory at 4N / at N (1.0 is
flat); `rss_ratio` the same for total RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def anon_bytes(pid: int) -> int:
    """RssAnon of one process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_memory(process) -> tuple[int, int]:
    """(RSS, anonymous RSS) summed over the process and its children."""
    import psutil

    rss, anon = process.memory_info().rss, anon_bytes(process.pid)
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            rss += child.memory_info().rss  # a child may exit between listing and reading
            anon += anon_bytes(child.pid)
    return rss, anon


def child(images: int, resize: int, crop: int, workers: int) -> None:
    """Preprocess `images` photos once, printing the peak RSS of the process tree as JSON."""
    from food101 import env

    env.configure(REPO)
    import psutil

    from food101.config import load_config
    from tasks.preprocess import build_cache
    from tests.conftest import sample_classes, sample_manifest

    manifest = sample_manifest(rows=images)
    params = dataclasses.replace(load_config(REPO / "params.yaml").preprocess, resize=resize, crop=crop)
    me = psutil.Process()
    before = tree_memory(me)
    peak = list(before)
    stop = threading.Event()

    def measure() -> None:
        rss, anon = tree_memory(me)
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)

    def sample() -> None:
        while not stop.wait(0.02):
            measure()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        start = time.perf_counter()
        summary = build_cache(manifest, REPO / "data" / "sample", sample_classes(), params, Path(tmp) / "cache",
                              workers=workers, progress_bar=False)
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        measure()
    print(json.dumps({"images": images, "peak_rss_mb": peak[0] / 2**20, "peak_anon_mb": peak[1] / 2**20,
                      "rss_before_mb": before[0] / 2**20, "cache_mb": summary["bytes"] / 2**20,
                      "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800, help="N; the second run has 4N")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.resize, args.crop, args.workers)
        return

    runs = {}
    for images in (args.images, 4 * args.images):
        out = subprocess.run([sys.executable, __file__, "--child", str(images), "--resize", str(args.resize),
                              "--crop", str(args.crop), "--workers", str(args.workers)],
                             check=True, capture_output=True, text=True, cwd=REPO)
        runs[images] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = runs[args.images], runs[4 * args.images]
    report = {
        "benchmark": "preprocess_memory",
        "resize": args.resize, "crop": args.crop, "workers": args.workers,
        "n_images": small["images"], "n_peak_anon_mb": round(small["peak_anon_mb"], 1),
        "n_peak_rss_mb": round(small["peak_rss_mb"], 1), "n_cache_mb": round(small["cache_mb"], 1),
        "4n_images": large["images"], "4n_peak_anon_mb": round(large["peak_anon_mb"], 1),
        "4n_peak_rss_mb": round(large["peak_rss_mb"], 1), "4n_cache_mb": round(large["cache_mb"], 1),
        "rss_before_mb": round(small["rss_before_mb"], 1),
        "ratio": round(large["peak_anon_mb"] / small["peak_anon_mb"], 3),
        "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "note": "summed over the process tree; RSS includes the mapped output's written pages",
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
