"""Where training runs: device resolution, CPU threads, and slots for running models in parallel.

Prefect's thread runner submits the three train tasks at once. What they may do at the same time
depends on the machine:
- k GPUs: up to k models at once, each pinned to its own GPU (a model waits for a free GPU).
- one GPU: `orchestration.parallel_training` decides; `auto` means sequential (see
  `concurrent_on_one_gpu`).
- CPU: one model at a time. Two trainings would split the cores and each run at half speed,
  finishing no sooner, with twice the memory and meaningless per-model images/s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch

from food101.config import Config, ConfigError

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> torch.device:
    """'auto' -> the first GPU when CUDA is usable, else the CPU; 'cuda' without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible here; use train.device=auto or cpu")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: {requested!r} is not one of auto, cpu, cuda")
    return torch.device(requested)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a CPU has none queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads() -> int:
    """Use every core the process may run on for intra-op parallelism; returns the count.

    OMP_NUM_THREADS, when set, wins (the usual way to share a machine between processes: two
    processes spinning two OpenMP threads each on two cores run many times slower than one).
    """
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(requested) if requested.isdigit() and int(requested) > 0 else cpu_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def concurrent_on_one_gpu(config: Config) -> bool:
    """Whether several models train on one GPU at the same time.

    `auto` is sequential. Concurrency on one GPU pays only when a single training leaves the GPU
    idle; here the data already sits in GPU memory and is augmented there, and ResNet-50 and
    EfficientNet-B0 at batch 256 / 224 px keep an H100 busy on their own. The small model that
    could leave gaps (MobileNetV3) is launch-bound on the CPU side, and threads in one Python
    process share the GIL, so a second model's kernels do not arrive any faster. Sequential also
    keeps the per-model images/s and train time honest (they are reported and compared across
    runs) and needs a third of the GPU memory. Choose `concurrent` to measure the opposite.
    """
    return config.orchestration.parallel_training == "concurrent"


class DeviceSlots:
    """A pool of places to train: each slot is a device; `acquire()` blocks until one is free."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = list(devices)
        self._free = list(devices)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def acquire(self, label: str = "") -> Iterator[torch.device]:
        with self._cond:
            if not self._free:
                log.info("%s waits for a free training slot (%d in use)", label or "a model", len(self.devices))
            self._cond.wait_for(lambda: bool(self._free))
            device = self._free.pop(0)
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # per thread: kernels and allocations land on this GPU
            yield device
        finally:
            with self._cond:
                self._free.append(device)
                self._cond.notify()


_pools: dict[tuple, DeviceSlots] = {}
_pools_lock = threading.Lock()


def slot_devices(config: Config) -> list[torch.device]:
    """The slots for this configuration: one per GPU, one per model on a shared GPU, or one CPU."""
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        return [torch.device("cpu")]
    count = gpu_count()
    if count > 1:
        return [torch.device("cuda", i) for i in range(count)]
    if concurrent_on_one_gpu(config):
        return [torch.device("cuda", 0)] * len(config.models)
    return [torch.device("cuda", 0)]


def training_slots(config: Config) -> DeviceSlots:
    """The process-wide pool for this machine and configuration (shared by all train tasks)."""
    devices = slot_devices(config)
    key = tuple(str(d) for d in devices)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = DeviceSlots(devices)
        return _pools[key]


@contextlib.contextmanager
def training_slot(config: Config, model: str) -> Iterator[torch.device]:
    """Hold a training slot for `model` for the duration of the block; yields its device."""
    with training_slots(config).acquire(model) as device:
        if device.type == "cpu":
            configure_cpu_threads()
        log.info("%s trains on %s", model, _describe(device))
        yield device


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
