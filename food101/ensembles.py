"""Ensembles: models of one run combined by their softmax probabilities, with no training.

An ensemble's test probabilities are a (weighted) mean of its members' saved test probabilities.
`mean` weighs members equally; `weighted` fits the weights on the validation split (members'
val_probs.npy, the cache's val labels) by minimising log-loss over a grid on the simplex. The test
split never enters the fit, so the ensemble's test scores stay an honest estimate.

Cost figures follow from running every member on each photo, one after the other: latency and
size add up, throughput combines as 1 / sum(1 / t).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-12
# Summed over members: each photo goes through every member in turn.
ADDITIVE_KEYS = ("latency_cpu_p50_ms", "latency_cpu_p95_ms", "latency_gpu_p50_ms", "latency_gpu_p95_ms",
                 "params", "size_mb", "gflops", "train_time_s")
THROUGHPUT_KEYS = ("throughput_cpu_ips", "throughput_gpu_ips")
# Kept when every member agrees (a mixed ensemble has no single value): how its sums were measured.
SHARED_KEYS = ("latency_cpu_threads",)


@dataclass(frozen=True)
class Fit:
    """Weights of the members (sum 1) and the rows they were fit on."""

    weights: np.ndarray
    split: str  # "val" for a fit, "none" for equal weights
    rows: int
    val_log_loss: float | None


def combine(probs: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The weighted mean of the members' (N, C) probabilities (equal weights when none given)."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    if len({p.shape for p in stacked}) != 1:
        raise ValueError("members' probabilities must have the same shape")
    w = np.full(len(stacked), 1.0 / len(stacked)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), stacked, axes=1)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, EPS, 1.0))))


def simplex_grid(members: int, steps: int) -> np.ndarray:
    """Every weight vector with entries in multiples of 1/steps that sums to 1."""
    points = [np.array(c, dtype=np.float64) / steps
              for c in itertools.product(range(steps + 1), repeat=members - 1) if sum(c) <= steps]
    return np.array([np.append(p, 1.0 - p.sum()) for p in points])


def grid_steps(members: int, max_points: int = 2000) -> int:
    """The finest grid (at most 20 steps) with at most `max_points` weight vectors."""
    for steps in range(20, 1, -1):
        if math.comb(steps + members - 1, members - 1) <= max_points:
            return steps
    return 1


def fit_weights(val_probs: Sequence[np.ndarray], val_labels: np.ndarray) -> Fit:
    """Weights minimising validation log-loss over a simplex grid (ties: the earliest, most even first)."""
    labels = np.asarray(val_labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("the validation split is empty: weights cannot be fit; use method mean")
    if any(len(p) != len(labels) for p in val_probs):
        raise ValueError("members' validation probabilities and the validation labels differ in length")
    members = len(val_probs)
    grid = simplex_grid(members, grid_steps(members))
    equal = np.full(members, 1.0 / members)
    candidates = np.vstack([equal, grid])
    losses = [log_loss(combine(val_probs, w), labels) for w in candidates]
    best = int(np.argmin(losses))
    return Fit(candidates[best], "val", len(labels), float(losses[best]))


def equal_weights(members: int) -> Fit:
    return Fit(np.full(members, 1.0 / members), "none", 0, None)


def cost_figures(member_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latency, size, parameters, FLOPs and training time summed; throughput as 1 / sum(1 / t); the
    CPU latency's thread count when every member shares it."""
    out: dict[str, Any] = {}
    for key in ADDITIVE_KEYS:
        values = [m.get(key) for m in member_metrics]
        out[key] = None if any(v is None for v in values) else float(sum(values))
    for key in THROUGHPUT_KEYS:
        values = [m.get(key) for m in member_metrics]
        out[key] = None if any(not v for v in values) else 1.0 / sum(1.0 / v for v in values)
    for key in SHARED_KEYS:
        values = {m.get(key) for m in member_metrics}
        out[key] = values.pop() if len(values) == 1 else None
    if out["params"] is not None:
        out["params"] = int(out["params"])
    return out


def busiest_state(member_metrics: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The machine state for the summed timings: each numeric field's worst (largest) value."""
    states = [m.get("machine_state") for m in member_metrics if isinstance(m.get("machine_state"), dict)]
    if not states:
        return None
    merged: dict[str, Any] = {}
    for state in states:
        for key, value in state.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                previous = merged.get(key)
                merged[key] = value if previous is None else max(previous, value)
            else:
                merged.setdefault(key, value)
    return merged
