"""Robustness throughput: the stage's batched corruptions vs a per-photo PIL loop, same photos.

Both apply every corruption of params.yaml's `robustness:` at one severity to the same real
photos (data/sample decoded to `--size` px squares, replicated to `--images`), from the uint8
array the cache holds to a uint8 array again. The stage's path is `food101.corruptions.corrupt` on
batches of `--batch` photos on `--device`; the baseline opens each photo as a PIL image and uses
PIL's own operations (ImageEnhance, GaussianBlur, a 5x5 kernel for motion blur, JPEG through
BytesIO, resize, rotate, a drawn rectangle, crop) and, where Pillow has no such operation, the
stage's own definition in numpy, one photo at a time: for the noise a window of the same seeded
table of rounded normals (drawing fresh normals per photo would time a costlier corruption than the
stage's), for motion blur the same streak (Pillow's kernels stop at 5x5, a shorter streak). No model runs: this measures
the corruptions, not the classification (which is evaluate's forward pass, timed there).

    .venv/bin/python benchmarks/robustness_throughput.py [--images 512] [--size 224] [--severity 3] [--device cuda]
        [--threads 1 2]

The stage's path runs with as many torch threads as the stage gets (torch's default: the cores),
the PIL loop on one (Pillow works one photo at a time on one core). On a CPU the batched path is
timed at each of `--threads` (default: 1 and torch's default), so that the gain from batching
alone (`ratio_one_thread`) is printed beside the stage's as it runs (`ratio`).

The last line printed is one JSON object; `ratio` is batched images/s over the PIL loop's at
torch's default thread count, and `per_corruption` gives each path's milliseconds per photo (the
best of `--repeats`, the paths alternating) and their ratio at each thread count.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from food101 import env  # noqa: E402

env.configure(REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter  # noqa: E402

from food101.config import RobustnessConfig, load_config  # noqa: E402
from food101.corruptions import (  # noqa: E402
    MOTION_DIRECTIONS,
    Draws,
    condition_seed,
    corrupt,
    motion_offsets,
    motion_reach,
    noise_table,
    photo_uniforms,
)


def sample_photos(count: int, size: int) -> np.ndarray:
    """(count, size, size, 3) uint8: the sample's photos, centre-cropped squares, replicated."""
    photos = []
    for path in sorted((REPO / "data" / "sample" / "images").glob("*/*.jpg")):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
            left, top = (image.width - size) // 2, (image.height - size) // 2
            photos.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return np.stack([photos[i % len(photos)] for i in range(count)])


def batched(images: np.ndarray, settings: RobustnessConfig, name: str, severity: int, batch: int,
            device: torch.device) -> float:
    """Seconds for the stage's path under one corruption (uint8 array in, uint8 array out)."""
    start = time.perf_counter()
    uniforms = photo_uniforms(settings.seed, name, severity, len(images)).to(device)
    for first in range(0, len(images), batch):
        x = torch.from_numpy(images[first:first + batch]).to(device).permute(0, 3, 1, 2)
        out = corrupt(x, name, severity, settings, Draws(uniforms[first:first + batch]))
        out.permute(0, 2, 3, 1).cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _pil_one(image: Image.Image, name: str, level: float, rng: np.random.Generator,
             noise: np.ndarray | None = None) -> Image.Image:
    side = image.width
    if name in ("brightness_dark", "brightness_bright"):
        return ImageEnhance.Brightness(image).enhance(level)
    if name == "contrast":
        return ImageEnhance.Contrast(image).enhance(level)
    if name == "gaussian_noise":  # the stage's noise: a window of its table at a random offset
        length = 3 * side * side
        start = int(rng.integers(len(noise) - length))
        noisy = np.asarray(image, dtype=np.int16) + noise[start:start + length].reshape(side, side, 3)
        return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    if name == "gaussian_blur":
        return image.filter(ImageFilter.GaussianBlur(max(level * side, 0.3)))
    if name == "motion_blur":  # PIL's kernels stop at 5x5: the stage's streak, shifted copies summed in numpy
        reach = motion_reach(level, side)
        direction = min(int(rng.random() * MOTION_DIRECTIONS), MOTION_DIRECTIONS - 1)
        offsets = motion_offsets(reach, direction)
        padded = np.pad(np.asarray(image, dtype=np.int16), ((reach, reach), (reach, reach), (0, 0)), mode="reflect")
        total = np.zeros((side, side, 3), dtype=np.int16)
        for dy, dx in offsets:
            total += padded[reach + dy:reach + dy + side, reach + dx:reach + dx + side]
        return Image.fromarray((total.astype(np.float32) * np.float32(1 / len(offsets)) + 0.5).astype(np.uint8))
    if name == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(level))
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    if name == "low_resolution":
        small = max(4, round(level * side))
        return image.resize((small, small), Image.Resampling.BILINEAR).resize((side, side), Image.Resampling.BILINEAR)
    if name == "rotation":
        return image.rotate(level if rng.random() < 0.5 else -level, Image.Resampling.BILINEAR)
    if name == "occlusion":
        box = round(level * side)
        top, left = rng.integers(0, side - box + 1, 2)
        copy = image.copy()
        ImageDraw.Draw(copy).rectangle((left, top, left + box - 1, top + box - 1), fill=(128, 128, 128))
        return copy
    if name == "off_centre_crop":
        keep = round(level * side)
        return image.crop((side - keep, side - keep, side, side)).resize((side, side), Image.Resampling.BILINEAR)
    raise ValueError(f"no PIL version of {name}")


def pil_loop(images: np.ndarray, settings: RobustnessConfig, name: str, severity: int) -> float:
    """Seconds for the per-photo PIL loop under one corruption (uint8 array in, uint8 array out)."""
    rng = np.random.default_rng(condition_seed(settings.seed, name, severity))
    level = float(settings.levels[name][severity - 1])
    noise = noise_table(level, images[0].size, torch.device("cpu")).numpy() if name == "gaussian_noise" else None
    out = np.empty_like(images)
    start = time.perf_counter()  # the table is made once, outside the timing, on both paths
    for i, photo in enumerate(images):
        out[i] = np.asarray(_pil_one(Image.fromarray(photo), name, level, rng, noise))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts for the batched path on a CPU (default: 1 and torch's default)")
    args = parser.parse_args()
    settings = load_config(REPO / "params.yaml").robustness
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    default_threads = torch.get_num_threads()
    threads = sorted(set(args.threads or [1, default_threads]))
    if min(threads) < 1:
        parser.error(f"--threads {threads}: thread counts start at 1")
    headline = default_threads if default_threads in threads else max(threads)
    images = sample_photos(args.images, args.size)
    per_corruption = {}
    for name in settings.corruptions:  # each timed alone, the best of --repeats, both paths alike
        fast = dict.fromkeys(threads, math.inf)
        slow = math.inf
        for count in threads:  # warm-up, the rotation grids and codec threads included
            torch.set_num_threads(count)
            batched(images[: args.batch], settings, name, args.severity, args.batch, device)
        pil_loop(images[:8], settings, name, args.severity)
        for _ in range(args.repeats):  # alternating, so that a change in the machine's load hits every path
            for count in threads:
                torch.set_num_threads(count)
                fast[count] = min(fast[count], batched(images, settings, name, args.severity, args.batch, device))
            slow = min(slow, pil_loop(images, settings, name, args.severity))
        per_corruption[name] = {
            "pil_loop_ms": round(1e3 * slow / len(images), 4),
            "batched_ms": {count: round(1e3 * fast[count] / len(images), 4) for count in threads},
            "ratio": {count: round(slow / fast[count], 2) for count in threads},
        }
    torch.set_num_threads(default_threads)
    slow = sum(v["pil_loop_ms"] for v in per_corruption.values())
    fast = {count: sum(v["batched_ms"][count] for v in per_corruption.values()) for count in threads}
    print(json.dumps({
        "benchmark": "robustness_throughput", "images": args.images, "size": args.size,
        "corruptions": len(settings.corruptions), "severity": args.severity, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": headline, "batched_ips": round(1e3 * len(per_corruption) / fast[headline], 1),
        "pil_loop_ips": round(1e3 * len(per_corruption) / slow, 1), "ratio": round(slow / fast[headline], 2),
        "ratio_one_thread": round(slow / fast[1], 2) if 1 in fast else None,
        "ratio_by_threads": {count: round(slow / fast[count], 2) for count in threads},
        "per_corruption": per_corruption,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
