"""Feed throughput: BatchFeed over the uint8 cache vs ImageFolder + PIL transforms + DataLoader.

Both deliver augmented, normalised float batches (random resized crop, horizontal flip) of the
same size from the same real photos (data/sample, the cache built from them by the preprocess
stage); the baseline decodes the JPEGs every epoch in 2 DataLoader worker processes. Both see the
photos replicated 20 times, so that neither pays its per-epoch start-up every couple of batches
(the sample is ~170 photos; a real epoch is ~270 batches). CPU only: BatchFeed's "device" work runs
on the CPU too. Each combination of producer threads and torch threads is tried; the best counts.

    .venv/bin/python benchmarks/feed_throughput.py [--size 64] [--batch-size 64]

The last line printed is one JSON object; `ratio` is BatchFeed images/s over the baseline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
import torch  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from food101.config import load_config  # noqa: E402
from food101.feed import BatchFeed  # noqa: E402
from tasks.preprocess import build_cache, load_cache  # noqa: E402
from tests.conftest import sample_classes, sample_manifest  # noqa: E402

SAMPLE = REPO / "data" / "sample"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images_per_s(batches, min_images: int) -> float:
    """Images delivered per second, pulling batches until at least `min_images` arrived."""
    seen, start = 0, time.perf_counter()
    while seen < min_images:
        for x, _y in batches():
            seen += len(x)
            if seen >= min_images:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="output image size (the demo profile's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-scale", type=float, default=0.35)
    parser.add_argument("--baseline-images", type=int, default=2400)
    parser.add_argument("--feed-images", type=int, default=20000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to try for BatchFeed (the best is reported)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="BatchFeed producer-thread counts to try (the best is reported)")
    args = parser.parse_args()

    baseline = baseline_images_per_s(args)
    feed_rates = feed_images_per_s(args)
    best = max(feed_rates, key=feed_rates.get)
    delivered = feed_rates[best]
    report = {
        "benchmark": "feed_throughput",
        "size": args.size, "batch_size": args.batch_size, "device": "cpu",
        "baseline": "ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize + DataLoader(num_workers=2)",
        "baseline_images_per_s": round(baseline, 1),
        "feed_images_per_s": round(delivered, 1),
        "feed_images_per_s_by_workers_threads": {f"{w}x{t}": round(v, 1) for (w, t), v in feed_rates.items()},
        "feed_best_workers_threads": list(best),
        "ratio": round(delivered / baseline, 2),
        "target_ratio": 20,
        "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print(json.dumps(report))


def baseline_images_per_s(args: argparse.Namespace) -> float:
    """The photos as an ImageFolder, replicated, decoded and augmented by PIL in 2 workers."""
    augment = transforms.Compose([
        transforms.RandomResizedCrop(args.size, scale=(args.min_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    folder = datasets.ImageFolder(str(SAMPLE / "images"), transform=augment)
    replicated = ConcatDataset([folder] * 20)
    loader = DataLoader(replicated, batch_size=args.batch_size, shuffle=True, num_workers=2,
                        persistent_workers=True, drop_last=True)
    torch.set_num_threads(1)  # the main process only collates; the decoding is in the workers
    next(iter(loader))  # start the workers outside the timing
    return images_per_s(lambda: loader, args.baseline_images)


def feed_images_per_s(args: argparse.Namespace) -> dict[tuple[int, int], float]:
    """BatchFeed over the cache built from the same photos, per (producer threads, torch threads)."""
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        # The cache at the size a run trains from: resize a little above, crop at the output size.
        params = dataclasses.replace(load_config(REPO / "params.yaml").preprocess,
                                     resize=round(args.size * 8 / 7), crop=args.size, val_fraction=0.1)
        manifest = sample_manifest()
        manifest = manifest.assign(split="train")  # every photo in the train split, like the baseline
        build_cache(manifest, SAMPLE, sample_classes(), params, Path(tmp) / "cache", workers=2, progress_bar=False)
        cache = load_cache(Path(tmp) / "cache")
        # Replicated 20 times like the baseline's ImageFolder, into a memmap like the cache itself.
        images, labels = cache.images("train"), cache.labels("train")
        replicated = np.lib.format.open_memmap(Path(tmp) / "replicated.npy", mode="w+", dtype=np.uint8,
                                               shape=(20 * len(images), *images.shape[1:]))
        for copy in range(20):
            replicated[copy * len(images):(copy + 1) * len(images)] = images
        replicated.flush()
        replicated = np.load(Path(tmp) / "replicated.npy", mmap_mode="r")
        labels = np.tile(labels, 20)

        rates = {}
        for workers in args.workers:
            for threads in args.threads:
                torch.set_num_threads(threads)
                feed = BatchFeed(replicated, labels, batch_size=args.batch_size, device="cpu", train=True,
                                 image_size=args.size, mean=MEAN, std=STD, min_scale=args.min_scale,
                                 workers=workers)
                epoch = iter(range(10**9))

                def feed_epoch(feed=feed, epoch=epoch):
                    feed.set_epoch(next(epoch))
                    return feed

                images_per_s(feed_epoch, 2000)  # warm-up
                rates[(workers, threads)] = images_per_s(feed_epoch, args.feed_images)
    return rates


if __name__ == "__main__":
    main()
