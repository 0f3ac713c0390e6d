"""Three models on one device: trained one after another, or all at once (as the flow could).

The same pipeline training step (`make_trainer` + `train_step`, the configured recipe) for each
of the configured models, on in-memory batches, timed twice in the same run:
- sequential: model after model, the way `parallel_training: auto` schedules one device;
- concurrent: one thread per model, all started together, the way `parallel_training:
  concurrent` lets the flow's thread runner do it.
`ratio` is concurrent / sequential images/s over all three (above 1: concurrent is faster, and
should be the default on this device). The last line printed is one JSON object.

    .venv/bin/python benchmarks/parallel_training.py                 # CPU: 64 px, batch 32
    .venv/bin/python benchmarks/parallel_training.py --size 224 --batch 256 --steps 40   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import NUM_CLASSES, pipeline_trainer  # noqa: E402
from food101.config import load_config  # noqa: E402
from food101.devices import configure_cpu_threads, resolve_device, synchronize  # noqa: E402
from food101.engine import train_step  # noqa: E402


def make_step(arch: str, recipe, device: torch.device, batch: int, size: int):
    """A ready-to-call training step for `arch` on fixed random data, warmed up."""
    trainer = pipeline_trainer(arch, recipe, device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        train_step(trainer, x, y)

    for _ in range(2):
        step()
    synchronize(device)
    return step


def run_steps(step, device: torch.device, steps: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for _ in range(steps):
        step()
    synchronize(device)


def sequential(steps_by_model: dict, device: torch.device, steps: int) -> float:
    start = time.perf_counter()
    for step in steps_by_model.values():
        run_steps(step, device, steps)
    return time.perf_counter() - start


def concurrent(steps_by_model: dict, device: torch.device, steps: int) -> float:
    errors: list[BaseException] = []

    def worker(step) -> None:
        try:
            run_steps(step, device, steps)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(step,), name=arch) for arch, step in steps_by_model.items()]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo", help="recipe profile (demo: the CPU recipe; full on a GPU)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--repeats", type=int, default=2, help="timings per mode, alternating; the best counts")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    project = Path(__file__).resolve().parents[1]
    config = load_config(project / "params.yaml", profile=args.profile)
    device = resolve_device(args.device)
    threads = configure_cpu_threads() if device.type == "cpu" else torch.get_num_threads()
    steps_by_model = {arch: make_step(arch, dataclasses.replace(config.train.for_model(arch),
                                                                batch_size=args.batch, image_size=args.size),
                                      device, args.batch, args.size)
                      for arch in config.models}
    images = len(steps_by_model) * args.steps * args.batch
    timings: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for _ in range(args.repeats):
        timings["sequential"].append(sequential(steps_by_model, device, args.steps))
        timings["concurrent"].append(concurrent(steps_by_model, device, args.steps))
    rates = {mode: images / min(seconds) for mode, seconds in timings.items()}
    print(json.dumps({
        "benchmark": "parallel_training",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": threads, "models": list(steps_by_model), "size": args.size, "batch": args.batch,
        "steps_per_model": args.steps, "repeats": args.repeats,
        "sequential_images_per_s": round(rates["sequential"], 1),
        "concurrent_images_per_s": round(rates["concurrent"], 1),
        "all_runs_s": {mode: [round(s, 2) for s in seconds] for mode, seconds in timings.items()},
        "ratio": round(rates["concurrent"] / rates["sequential"], 3),
        "faster": "concurrent" if rates["concurrent"] > rates["sequential"] else "sequential",
        "torch": torch.__version__, "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
