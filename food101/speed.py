"""Batch-1 latency and throughput of a network, timm-style; on the CPU, in a process of its own.

Warm-up forwards first, then every timed forward is kept (the history compares the samples), with
`torch.cuda.synchronize()` around each on a GPU.

On the CPU the timing runs in a process of its own, forked from the pipeline's forkserver (a clean
process with torch loaded, food101.processes), or in a fresh interpreter (`python -m food101.speed
FILE`) from a Dask worker, which may not start a pool. In the flow's own process, its other threads
(Prefect's engine and log shipping, progress bars, MLflow, the tasks waiting for a slot) take the
GIL between a small network's operators: in the demo, mobilenet_v3_large at 64 px timed 15 ms at
the median there and 3.3 ms alone, so the report said that no model met a 20 ms budget which all
three met. The export stage's probes (food101.onnx_inference) are timed alone for the same reason.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from food101.devices import synchronize
from food101.processes import process_pool, start_forkserver

PROBE_TIMEOUT_S = 1800  # a ResNet-50 at 224 px on a slow CPU, 100 runs and the throughput batches


@dataclass(frozen=True)
class Timed:
    """One device's timing: latency percentiles and throughput, and every sample behind them."""

    latency_p50_ms: float
    latency_p95_ms: float
    throughput_ips: float
    latency_samples_ms: list[float]
    throughput_samples_ips: list[float]
    worker_cpu_s: float = 0.0  # CPU seconds the timing took in a worker process (0: timed in this one)
    # Which probe process took each sample (time_on_cpu_in_processes); empty: all in one process.
    latency_process: list[int] = dataclasses.field(default_factory=list)
    throughput_process: list[int] = dataclasses.field(default_factory=list)


def autocast(device: torch.device):
    # bf16 on CUDA as in training (no grad scaler needed); plain fp32 on the CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _timed_forwards(model: nn.Module, x: torch.Tensor, device: torch.device, warmup: int, runs: int) -> list[float]:
    """Seconds of each of `runs` forwards of `x` (at least one) after `warmup` untimed ones."""
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    seconds = []
    with torch.inference_mode(), autocast(device):
        for _ in range(warmup):
            model(x)
        synchronize(device)
        for _ in range(max(1, runs)):
            start = time.perf_counter()
            model(x)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return seconds


def measure_latency(
    model: nn.Module, example: torch.Tensor, device: torch.device, warmup: int, runs: int,
    samples: list[float] | None = None,
) -> tuple[float, float]:
    """(p50, p95) in milliseconds of single forwards of `example` after `warmup` untimed ones;
    every forward's time is appended to `samples` when given."""
    times = [1000.0 * t for t in _timed_forwards(model, example, device, warmup, runs)]
    if samples is not None:
        samples.extend(times)
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)


def measure_throughput(
    model: nn.Module, batch: torch.Tensor, device: torch.device, warmup: int, runs: int,
    samples: list[float] | None = None,
) -> float:
    """Images per second over `runs` forwards of `batch` after `warmup` untimed ones; each
    batch's images/s is appended to `samples` when given (the spread the history compares)."""
    elapsed = _timed_forwards(model, batch, device, warmup, runs)
    if samples is not None:
        samples.extend(len(batch) / seconds for seconds in elapsed)
    return len(batch) * len(elapsed) / sum(elapsed)


def time_model(model: nn.Module, single: torch.Tensor, batch: torch.Tensor, device: torch.device,
               latency: tuple[int, int], throughput: tuple[int, int], latency_threads: int | None = None) -> Timed:
    """Latency over `latency` = (warm-up, timed) single forwards, then throughput over
    `throughput` = (warm-up, timed) batches, in this process on `device`; on the CPU the latency
    runs on `latency_threads` intra-op threads when given (throughput on the process's own count)."""
    model = model.eval().to(memory_format=torch.channels_last)
    latency_samples: list[float] = []
    rate_samples: list[float] = []
    threads = torch.get_num_threads()
    if latency_threads and device.type == "cpu":
        torch.set_num_threads(latency_threads)
    try:
        p50, p95 = measure_latency(model, single, device, *latency, latency_samples)
    finally:
        torch.set_num_threads(threads)
    ips = measure_throughput(model, batch, device, *throughput, rate_samples)
    return Timed(p50, p95, ips, latency_samples, rate_samples)


def time_on_cpu_alone(model: nn.Module, single: torch.Tensor, batch: torch.Tensor,
                      latency: tuple[int, int], throughput: tuple[int, int], threads: int,
                      latency_threads: int | None = None) -> Timed:
    """`time_model` on the CPU with `threads` intra-op threads (`latency_threads` for the batch-1
    latency when given), in a process of its own: a worker forked from the pipeline's forkserver
    (food101.processes), which has torch loaded and none of the flow's threads; the network and
    inputs travel to it pickled, the figures come back with the CPU time the worker spent (a
    machine monitor counts it as the timing's own). A daemonic process (a Dask worker) may not
    start a pool: there, a fresh interpreter times it."""
    network = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
    if multiprocessing.current_process().daemon:
        return _time_in_fresh_interpreter(network, single.cpu(), batch.cpu(), latency, throughput, threads,
                                          latency_threads)
    with process_pool(1) as pool:
        return pool.submit(_time_on_cpu, network, single.cpu(), batch.cpu(), latency, throughput,
                           threads, latency_threads).result(timeout=PROBE_TIMEOUT_S)


def split_runs(runs: int, processes: int) -> list[int]:
    """`runs` timed runs shared out over `processes` as evenly as can be (the first get the extra)."""
    return [runs // processes + (1 if k < runs % processes else 0) for k in range(processes)]


def time_on_cpu_in_processes(model: nn.Module, single: torch.Tensor, batch: torch.Tensor,
                             latency: tuple[int, int], throughput: tuple[int, int], threads: int,
                             latency_threads: int | None, processes: int) -> Timed:
    """`time_on_cpu_alone` in `processes` fresh processes, one after another, each with the whole
    warm-up and its share of the timed runs (the latency runs exactly; at least one throughput
    batch each); the samples pooled, each tagged with its process.

    The same network timed in six fresh processes back to back on a quiet machine gave batch-1
    medians 7.4-10.3 ms (efficientnet_b0, 64 px), 5.6-8.8 ms (mobilenet_v3_large), 20.1-26.9 ms
    (resnet50), each process's own interquartile range a few percent: the process, not the forward,
    is the unit of variation, and a comparison of two runs' samples from one process each reports
    that variation as a regression (food101.history compares per-process medians).
    """
    count = max(1, min(processes, latency[1]))
    latency_shares = split_runs(latency[1], count)
    throughput_shares = [max(1, share) for share in split_runs(throughput[1], count)]
    parts = [time_on_cpu_alone(model, single, batch, (latency[0], lat), (throughput[0], tp), threads, latency_threads)
             for lat, tp in zip(latency_shares, throughput_shares, strict=True)]
    latency_samples = [v for part in parts for v in part.latency_samples_ms]
    rates = [v for part in parts for v in part.throughput_samples_ips]
    p50, p95 = np.percentile(latency_samples, [50, 95])
    return Timed(float(p50), float(p95), len(rates) / sum(1.0 / r for r in rates), latency_samples, rates,
                 worker_cpu_s=sum(part.worker_cpu_s for part in parts),
                 latency_process=[k for k, part in enumerate(parts) for _ in part.latency_samples_ms],
                 throughput_process=[k for k, part in enumerate(parts) for _ in part.throughput_samples_ips])


def prepare_cpu_probe() -> None:
    """Start what `time_on_cpu_alone` forks its probe from (food101.processes.start_forkserver),
    before a timing window opens. A Dask worker, which times in a fresh interpreter, has nothing to
    start."""
    if not multiprocessing.current_process().daemon:
        start_forkserver()


def _time_on_cpu(model: nn.Module, single: torch.Tensor, batch: torch.Tensor, latency: tuple[int, int],
                 throughput: tuple[int, int], threads: int, latency_threads: int | None = None) -> Timed:
    torch.set_num_threads(threads)
    timed = time_model(model, single, batch, torch.device("cpu"), latency, throughput, latency_threads)
    # The worker lives for this timing only, so all its CPU since it started (every thread; its
    # start-up, which re-imports the parent's main module, included) is the timing's.
    return dataclasses.replace(timed, worker_cpu_s=time.process_time())


def _time_in_fresh_interpreter(model: nn.Module, single: torch.Tensor, batch: torch.Tensor,
                               latency: tuple[int, int], throughput: tuple[int, int], threads: int,
                               latency_threads: int | None = None) -> Timed:
    """`python -m food101.speed FILE`: the network pickled into a private temporary folder that
    this call creates and removes; the child unpickles only that file. A waited-for child, so a
    machine monitor counts its CPU as the timing's own without being told."""
    with tempfile.TemporaryDirectory(prefix="food101-speed-") as folder:
        spec = Path(folder) / "spec.pt"
        torch.save({"model": model, "single": single, "batch": batch, "latency": latency,
                    "throughput": throughput, "threads": threads, "latency_threads": latency_threads}, spec)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "-m", "food101.speed", str(spec)], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"timing the model in a process of its own failed (exit {done.returncode}): {tail}")
    return Timed(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    # The file is the one _time_in_fresh_interpreter has just written in its own temporary folder.
    spec = torch.load(argv[1], map_location="cpu", weights_only=False)
    torch.set_num_threads(spec["threads"])
    timed = time_model(spec["model"], spec["single"], spec["batch"], torch.device("cpu"),
                       tuple(spec["latency"]), tuple(spec["throughput"]), spec.get("latency_threads"))
    sys.stdout.write(json.dumps(dataclasses.asdict(timed)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
