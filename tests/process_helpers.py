"""Helpers that tests send to other processes (pickled by reference, imported there).

They live here, not in a test module: importing a test module imports tests.conftest, which makes
a state folder for its process, and a pool worker exits without removing it.
"""

from __future__ import annotations

import os
import time

import torch
from torchvision.models import get_model


class ForwardLog(torch.nn.Module):
    """A network that appends, for each forward, the id of the process running it, the batch size
    and torch's intra-op thread count to a file (one line each)."""

    def __init__(self, log_file) -> None:
        super().__init__()
        self.log_file = str(log_file)
        self.net = get_model("mobilenet_v3_small", weights=None, num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.log_file, "a") as handle:
            handle.write(f"{os.getpid()} {x.shape[0]} {torch.get_num_threads()}\n")
        return self.net(x)


class Delayed(torch.nn.Module):
    """A model that waits `delay` seconds in every forward: a real, planted slowdown."""

    def __init__(self, inner: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(x)


def burn_cpu(seconds: float) -> float:
    """Spin until this process has used `seconds` of CPU; the CPU time it used."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


class PerProcessDelay(torch.nn.Module):
    """A model that waits the same `delays_s[n]` in every forward of the n-th process to run it
    (n counted in `counter_file` across processes): the process-to-process spread of CPU timings,
    planted, with none of the forward-to-forward noise."""

    def __init__(self, inner: torch.nn.Module, counter_file, delays_s: list[float]) -> None:
        super().__init__()
        self.inner, self.counter_file, self.delays_s = inner, str(counter_file), list(delays_s)
        self._pid, self._delay = None, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pid != os.getpid():
            import fcntl

            with open(self.counter_file, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                handle.seek(0)
                number = len(handle.read().split())
                handle.write(f"{os.getpid()}\n")
            self._pid, self._delay = os.getpid(), self.delays_s[number % len(self.delays_s)]
        time.sleep(self._delay)
        return self.inner(x)
