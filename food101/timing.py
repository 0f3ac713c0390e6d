"""Timings that carry their noise: the machine's state while timing, and a rank test between runs.

A single throughput figure cannot tell a slower model from a busier machine. Evaluation keeps
every timed forward (timing_samples.parquet) and what else the machine was doing meanwhile
(`machine_state` in metrics.json); two benchmarks' timings are then compared with a
Mann-Whitney U test on the samples, a minimum effect size, and a refusal to conclude anything
when either machine was busy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

# Outcomes of comparing one metric between two benchmarks.
REGRESSION = "regression"
IMPROVEMENT = "improvement"
INCONCLUSIVE = "inconclusive"
NO_CHANGE = "no change"
ALPHA = 0.05
MIN_WINDOW_S = 0.5  # the shortest window machine_monitor measures over
# CPU seconds that the block spent in a process that is neither this one nor a waited-for child
# (a pool worker): the block adds them to the state under this key, and they count as its own.
WORKER_CPU_KEY = "worker_cpu_s"

log = logging.getLogger(__name__)


class QuietLock:
    """Timings exclusive, heavy untimed work shared, within one process (Prefect's thread runner).

    A stage that times (evaluate's latency, export's runtime probes) holds `timing()`; untimed work
    that runs beside it in the flow holds `heavy()`: evaluate's and robustness's loading, scoring
    and plots, export's conversion, scoring and quantization, the ensemble and confusion stages.
    Any number of heavy blocks run together, never beside a timing. A waiting timing goes first:
    no heavy block starts while one waits, so it waits only for those already running.

    A heavy block must not wait for anything a timing holds (a training slot): the timing would
    wait for it in turn. Heavy blocks nest in one thread; a timing inside one is refused, as it
    would wait for its own thread.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heavy = 0        # heavy blocks running
        self._timing = False   # a timing running
        self._waiting = 0      # timings waiting
        self._mine = threading.local()  # this thread's heavy depth

    @contextmanager
    def heavy(self) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        if depth == 0:
            with self._changed:
                self._changed.wait_for(lambda: not self._timing and not self._waiting)
                self._heavy += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            if depth == 0:
                with self._changed:
                    self._heavy -= 1
                    self._changed.notify_all()

    @contextmanager
    def timing(self) -> Iterator[None]:
        if getattr(self._mine, "depth", 0):
            raise RuntimeError("a timing inside a heavy block would wait for its own thread")
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: not self._timing and not self._heavy)
            finally:
                self._waiting -= 1
            self._timing = True
        try:
            yield
        finally:
            with self._changed:
                self._timing = False
                self._changed.notify_all()

    def __reduce__(self) -> tuple[Any, tuple]:
        # Under Dask a task function travels by value with the globals it names, QUIET among them.
        # A lock orders the threads of one process: the copy is the receiving process's own.
        return _process_quiet, ()

    def state(self) -> tuple[int, bool, int]:
        """(heavy blocks running, a timing running, timings waiting): for tests."""
        with self._changed:
            return self._heavy, self._timing, self._waiting


# The flow's one: every timing in this process and the heavy work beside it.
QUIET = QuietLock()


def _process_quiet() -> QuietLock:
    return QUIET


@contextmanager
def machine_monitor() -> Iterator[dict[str, Any]]:
    """Measure what the rest of the machine did while the block ran; the dict is filled on exit.

    other_cpu_share is the fraction of all cores busy with anything but this process, the
    children it waited for and the worker CPU the block reported under WORKER_CPU_KEY
    (whole-machine busy time minus their CPU time, over wall time x cores); load average, CPU
    frequency and steal time are read where the platform exposes them.
    """
    state: dict[str, Any] = {}
    own = psutil.Process(os.getpid())
    cores = psutil.cpu_count() or 1
    before_sys, before_own, start = psutil.cpu_times(), own.cpu_times(), time.perf_counter()
    try:
        yield state
    finally:
        # CPU times tick every 10 ms: a window of a few ticks reads a busy machine as idle.
        time.sleep(max(0.0, MIN_WINDOW_S - (time.perf_counter() - start)))
        after_sys, after_own, wall = psutil.cpu_times(), own.cpu_times(), time.perf_counter() - start
        busy = _busy(after_sys) - _busy(before_sys)
        mine = _own(after_own) - _own(before_own) + state.pop(WORKER_CPU_KEY, 0.0)
        state["cores"] = cores
        state["seconds"] = round(wall, 3)
        state["other_cpu_share"] = round(min(1.0, max(0.0, (busy - mine) / (wall * cores))), 4) if wall > 0 else None
        steal = getattr(after_sys, "steal", None)
        state["steal_share"] = (round(max(0.0, steal - before_sys.steal) / (wall * cores), 4)
                                if steal is not None and wall > 0 else None)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        state["load_1min"] = round(load[0], 3) if load else None
        state["load_per_core"] = round(load[0] / cores, 3) if load else None
        frequency = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
        state["cpu_mhz"] = round(frequency.current, 1) if frequency else None


def settle(max_other_cpu_share: float, timeout_s: float) -> float:
    """Wait until the rest of the machine uses at most `max_other_cpu_share` of all cores over one
    machine_monitor window, or `timeout_s` has passed; the seconds waited. Called before timing:
    a burst of other work (Prefect's API server recording the task states of the stages that just
    ended) passes in seconds, and a timing started in it reads as a busy machine. A `timeout_s`
    of 0 or less does not wait."""
    if timeout_s <= 0:
        return 0.0
    start = time.perf_counter()
    while True:
        with machine_monitor() as state:
            pass  # the monitor's shortest window, MIN_WINDOW_S
        share = state["other_cpu_share"]
        waited = time.perf_counter() - start
        if share is None or share <= max_other_cpu_share or waited >= timeout_s:
            return round(waited, 2)


@contextmanager
def settled_window(max_other_cpu_share: float, settle_s: float) -> Iterator[dict[str, Any]]:
    """`settle`, then a `machine_monitor` around the block: the state it yields is filled on exit,
    with `settle_wait_s`, the seconds the settle waited. Evaluate's and export's timings use it."""
    waited = settle(max_other_cpu_share, settle_s)
    if waited >= MIN_WINDOW_S * 2:
        log.info("waited %.1f s for other processes to quieten before timing", waited)
    with machine_monitor() as state:
        yield state
    state["settle_wait_s"] = waited


def _own(times: Any) -> float:
    """CPU seconds of this process and of its children it has waited for (a timing probe runs in
    one: its work is this timing's, not another process's)."""
    return times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)


def _busy(times: Any) -> float:
    """Busy CPU seconds over all cores: everything but idle and iowait (steal is not ours either)."""
    idle = times.idle + getattr(times, "iowait", 0.0) + getattr(times, "steal", 0.0)
    return sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def noise_reasons(state: dict[str, Any] | None, max_load_per_core: float, max_other_cpu_share: float,
                  which: str) -> list[str]:
    """Why the machine of `which` benchmark was too busy to trust its timings (empty: it was quiet).
    An empty `which` names none ("load average 1.20 per core > 1")."""
    if not state:
        return [f"the {which + ' ' if which else ''}benchmark did not record the machine's state"]
    named, labelled = (f"{which} ", f"{which}: ") if which else ("", "")
    reasons = []
    load = state.get("load_per_core")
    if load is not None and load > max_load_per_core:
        reasons.append(f"{named}load average {load:.2f} per core > {max_load_per_core:g}")
    other = state.get("other_cpu_share")
    if other is not None and other > max_other_cpu_share:
        reasons.append(f"{labelled}other processes used {other:.0%} of the CPU > {max_other_cpu_share:.0%}")
    steal = state.get("steal_share")
    if steal is not None and steal > max_other_cpu_share:
        reasons.append(f"{labelled}hypervisor steal {steal:.0%} of the CPU > {max_other_cpu_share:.0%}")
    return reasons


@dataclass(frozen=True)
class TimingVerdict:
    """The outcome of comparing one timing metric's samples, with the test and the reason."""

    outcome: str
    reason: str
    test: str
    p_value: float | None = None
    effect: float | None = None  # relative change of the median, signed (positive: larger now)


def compare_samples(before: list[float], after: list[float], higher_is_better: bool, min_effect: float,
                    alpha: float = ALPHA, unit: str = "samples") -> TimingVerdict:
    """Mann-Whitney U (two-sided) on two runs' samples, plus a minimum change of the median.

    A significant shift smaller than `min_effect` is "no change"; a large shift that is not
    significant (too few samples, too much spread) is "inconclusive", never a regression. `unit`
    names what the values are (the history passes each probe process's median).
    """
    import numpy as np
    from scipy.stats import mannwhitneyu

    if len(before) < 2 or len(after) < 2:
        return TimingVerdict(INCONCLUSIVE, f"too few {unit} ({len(before)} and {len(after)})", "none")
    median_before, median_after = float(np.median(before)), float(np.median(after))
    effect = (median_after - median_before) / median_before if median_before else 0.0
    spread = f"median {_median_iqr(before)} -> {_median_iqr(after)}"
    p_value = float(mannwhitneyu(before, after, alternative="two-sided").pvalue)
    test = f"mann-whitney u p={p_value:.3g} (n={len(before)}, {len(after)} {unit})"
    worse = effect < 0 if higher_is_better else effect > 0
    if p_value >= alpha:
        if abs(effect) >= min_effect:
            return TimingVerdict(INCONCLUSIVE, f"{spread} ({effect:+.0%}) but the samples do not show it "
                                 f"(p={p_value:.3g} >= {alpha})", test, p_value, effect)
        return TimingVerdict(NO_CHANGE, f"{spread} ({effect:+.1%}), not significant", test, p_value, effect)
    if abs(effect) < min_effect:
        return TimingVerdict(NO_CHANGE, f"{spread} ({effect:+.1%}): significant but below the minimum effect "
                             f"{min_effect:.0%}", test, p_value, effect)
    outcome = REGRESSION if worse else IMPROVEMENT
    return TimingVerdict(outcome, f"{spread} ({effect:+.0%}; {test})", test, p_value, effect)


def _median_iqr(values: list[float]) -> str:
    """'10.1 [IQR 9.9-10.3]': the spread beside the median, so a reader sees how noisy the samples were."""
    import numpy as np

    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"{median:.4g} [IQR {q1:.4g}-{q3:.4g}]"
