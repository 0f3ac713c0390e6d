"""Training images/s: the pipeline's training step against a plain PyTorch loop, same run.

For each model: the same weights, batch, image size and in-memory data, timed after warm-up
steps. The pipeline's step is `food101.engine.train_step` built by `make_trainer` from the
configured recipe (channels_last, bf16 autocast and the fused optimizer on CUDA, the LR schedule,
label smoothing); the baseline is fp32, NCHW, `torch.optim.SGD` and a bare loop. `ratio` is
pipeline / baseline (target >= 0.95 on the CPU). On CUDA it also measures the pipeline at the
full recipe size (224 px, the configured batch). The last line printed is one JSON object.

    .venv/bin/python benchmarks/train_throughput.py [--size 64 --batch 32 --warmup 2 --steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from food101.config import load_config  # noqa: E402
from food101.devices import configure_cpu_threads, resolve_device, synchronize  # noqa: E402
from food101.engine import make_trainer, train_step  # noqa: E402
from food101.models import build_model  # noqa: E402

NUM_CLASSES = 101


def time_steps(step, device: torch.device, warmup: int, steps: int, batch: int, repeats: int) -> float:
    """Best-of-`repeats` images/s over `steps` steps, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return max(rates)


def pipeline_trainer(arch: str, recipe, device: torch.device):
    """The pipeline's trainer for `arch` (random weights, seeded), in training mode."""
    torch.manual_seed(0)
    trainer = make_trainer(build_model(arch, NUM_CLASSES, pretrained=False), recipe, device,
                           steps_per_epoch=10_000, label=arch)
    trainer.model.train()
    return trainer


def pipeline_rate(arch, recipe, device, x, y, warmup, steps, repeats) -> float:
    trainer = pipeline_trainer(arch, recipe, device)
    return time_steps(lambda: train_step(trainer, x, y), device, warmup, steps, len(y), repeats)


def plain_rate(arch, device, x, y, warmup, steps, repeats) -> float:
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, pretrained=False).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    x = x.contiguous()

    def step() -> None:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return time_steps(step, device, warmup, steps, len(y), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", help="recipe profile (demo: the CPU recipe)")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    project = Path(__file__).resolve().parents[1]
    config = load_config(project / "params.yaml", profile=args.profile)
    full = load_config(project / "params.yaml")
    device = resolve_device(args.device)
    threads = configure_cpu_threads() if device.type == "cpu" else torch.get_num_threads()
    results: dict[str, dict] = {}
    for arch in args.models or config.models:
        recipe = dataclasses.replace(config.train.for_model(arch), batch_size=args.batch, image_size=args.size)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
        # The baseline is timed before and after the pipeline and keeps its better figure,
        # so a machine that warms up (or a noisy neighbour) never flatters the ratio.
        baseline = plain_rate(arch, device, x, y, args.warmup, args.steps, args.repeats)
        pipeline = pipeline_rate(arch, recipe, device, x, y, args.warmup, args.steps, args.repeats)
        baseline = max(baseline, plain_rate(arch, device, x, y, 1, args.steps, 1))
        entry = {"pipeline_ips": round(pipeline, 1), "plain_ips": round(baseline, 1),
                 "ratio": round(pipeline / baseline, 3)}
        if device.type == "cuda":
            big = full.train.for_model(arch)
            xb = torch.randn(big.batch_size, 3, big.image_size, big.image_size, device=device)
            yb = torch.randint(0, NUM_CLASSES, (big.batch_size,), device=device)
            entry[f"pipeline_ips_{big.image_size}px_b{big.batch_size}"] = round(
                pipeline_rate(arch, big, device, xb, yb, 10, 30, 3), 1)
        results[arch] = entry
        print(f"{arch}: {entry}", file=sys.stderr)
    ratios = [r["ratio"] for r in results.values()]
    print(json.dumps({
        "benchmark": "train_throughput",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": threads, "size": args.size, "batch": args.batch, "warmup": args.warmup,
        "steps": args.steps, "repeats": args.repeats, "torch": torch.__version__,
        "python": platform.python_version(), "models": results,
        "ratio": round(statistics.geometric_mean(ratios), 3), "ratio_min": min(ratios),
    }))


if __name__ == "__main__":
    main()
