"""The report's own matplotlib figures: accuracy against a cost with its Pareto front, and learning curves.

Separate from tasks/report.py so that the stage module holds the reading, deciding and writing, and
the drawing (matplotlib's object API: thread-safe, no pyplot state) can be read and reused alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from food101.recommend import pareto_front

DPI = 120


def _figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig


def _colours(models: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {m: palette(i % 10) for i, m in enumerate(models)}


def plot_accuracy_vs_cost(
    metrics: dict[str, dict[str, Any]],
    cost: dict[str, float],
    xlabel: str,
    title: str,
    colours: dict[str, Any],
    cost_high: dict[str, float] | None = None,
    budget: float | None = None,
):
    """Top-1 (with its CI) against a cost per model, the Pareto front drawn as a staircase."""
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    points = {m: (cost[m], metrics[m]["top1"]) for m in cost}
    front = pareto_front(points)
    for m, (x, y) in points.items():
        low, high = metrics[m].get("top1_ci_low"), metrics[m].get("top1_ci_high")
        yerr = [[100 * (y - low)], [100 * (high - y)]] if low is not None and high is not None else None
        xerr = [[0], [cost_high[m] - x]] if cost_high and cost_high.get(m) is not None else None
        ax.errorbar(x, 100 * y, yerr=yerr, xerr=xerr, fmt="o", ms=9 if m in front else 7, capsize=4,
                    color=colours[m], markeredgecolor="black" if m in front else colours[m],
                    label=m + (" (Pareto)" if m in front and len(front) < len(points) else ""), zorder=3)
        ax.annotate(m, (x, 100 * y), textcoords="offset points", xytext=(8, 6), fontsize=9)
    if len(front) > 1:
        xs, ys = [], []
        for m in front:
            x, y = points[m]
            if xs:
                xs.append(x)
                ys.append(ys[-1])
            xs.append(x)
            ys.append(100 * y)
        ax.plot(xs, ys, "--", color="0.35", lw=1.2, label="Pareto front", zorder=2)
    if budget is not None:
        ax.axvline(budget, color="#c0392b", ls=":", lw=1.5, label=f"latency budget {budget:g} ms (p95)")
    values = list(cost.values()) + ([budget] if budget is not None else [])
    if min(values) > 0 and max(values) / min(values) > 8:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy on the test set (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_learning_curves(history: dict[str, pd.DataFrame], train: dict[str, dict], colours: dict[str, Any]):
    """Loss and top-1 per epoch, train dashed and validation solid, every model on the same axes."""
    fig = _figure(11, 4.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for model, frame in history.items():
        colour = colours.get(model, "black")
        for column, ax, scale in (("loss", loss_ax, 1.0), ("top1", acc_ax, 100.0)):
            for split, style in (("train", "--"), ("val", "-")):
                key = f"{split}_{column}"
                if key in frame:
                    values = frame[key].astype(float)
                    if column == "top1" and values.max() > 1.0:
                        values = values / 100.0
                    ax.plot(frame["epoch"], values * scale, style, color=colour, lw=1.8, marker=".",
                            label=f"{model} {split}")
        best_epoch = train.get(model, {}).get("best_epoch")
        if best_epoch is not None and "val_top1" in frame:
            row = frame[frame["epoch"] == best_epoch]
            if len(row):
                value = float(row["val_top1"].iloc[0])
                acc_ax.plot(best_epoch, 100 * (value / 100 if value > 1 else value), "*", ms=13,
                            color=colour, markeredgecolor="black", zorder=4)
    from matplotlib.lines import Line2D

    loss_ax.legend(handles=[Line2D([], [], color="0.2", ls="--", label="train"),
                            Line2D([], [], color="0.2", ls="-", label="validation")], fontsize=8, loc="upper right")
    loss_ax.set_title("Loss per epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    acc_ax.set_title("Top-1 accuracy per epoch (★ = best validation epoch)")
    acc_ax.set_ylabel("top-1 accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right", ncols=2 if len(history) > 2 else 1)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path
