"""Past benchmarks of a profile read back from MLflow as a table, and the plot of that table.

Separate from food101/history.py, which records one benchmark and compares it with the previous
one: this module only searches the finished benchmark runs and reads their `<model>.<metric>`
metrics, which both the comparison and the trend plot need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from food101.config import Config
from food101.io import atomic_path
from food101.tracking import experiment_id


def trend_frame(config: Config, client: MlflowClient, include_run_id: str | None = None) -> pd.DataFrame:
    """One row per (benchmark, model) of the profile, oldest first: date, run_id, model, hardware, metrics.

    Past benchmarks count when FINISHED; `include_run_id` adds the current (still running) one.
    """
    runs = [r for r in _benchmark_runs(config, client, max_results=1000) if r.info.run_id != include_run_id]
    if include_run_id:
        runs.append(client.get_run(include_run_id))
    rows = []
    for run in runs:
        for model, values in _metrics_from_run(run).items():
            rows.append({
                "date": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                "run_id": run.info.run_id,
                "model": model,
                "hardware": run.data.tags.get("hardware", ""),
                "git_commit": run.data.tags.get("git_commit", ""),
                **values,
            })
    if not rows:
        return pd.DataFrame(columns=["date", "run_id", "model", "hardware", "git_commit"])
    return pd.DataFrame(rows).sort_values(["date", "model"], kind="stable").reset_index(drop=True)


def plot_trends(frame: pd.DataFrame, path: Path) -> Path:
    """Top-1 (with its interval), top-5, inference and training images/s over past benchmarks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("top1", "Top-1 accuracy (%)", 100.0), ("top5", "Top-5 accuracy (%)", 100.0),
              ("throughput_cpu_ips", "CPU inference (images/s)", 1.0),
              ("train_images_per_s", "Training (images/s)", 1.0)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    runs = frame.drop_duplicates("run_id")[["run_id", "date"]] if len(frame) else frame
    order = {run_id: i for i, run_id in enumerate(runs["run_id"])} if len(frame) else {}
    labels = [f"{d:%Y-%m-%d %H:%M}\n{r[:7]}" for r, d in zip(runs["run_id"], runs["date"], strict=True)] \
        if len(frame) else []
    for ax, (metric, title, scale) in zip(axes.flat, panels, strict=True):
        ax.set_title(title, fontsize=12)
        ax.grid(alpha=0.3)
        if metric not in frame.columns or frame[metric].isna().all():
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        for model, rows in frame.dropna(subset=[metric]).groupby("model", sort=True):
            x = [order[r] for r in rows["run_id"]]
            y = rows[metric] * scale
            low, high = f"{metric}_ci_low", f"{metric}_ci_high"
            if low in rows and high in rows and rows[[low, high]].notna().all().all():
                err = [(rows[metric] - rows[low]) * scale, (rows[high] - rows[metric]) * scale]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model)
            else:
                ax.plot(x, y, marker="o", label=model)
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30, ha="right")
        ax.legend(fontsize=9)
    n_runs = len(labels)
    fig.suptitle(f"Benchmarks over time ({n_runs} run{'s' if n_runs != 1 else ''})", fontsize=14)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _benchmark_runs(config: Config, client: MlflowClient, max_results: int, where: str | None = None) -> list[Any]:
    """FINISHED benchmark parent runs, newest first: of this profile, or of any that matches `where`."""
    scope = where if where is not None else f"tags.profile = '{config.profile}'"
    return list(client.search_runs(
        [experiment_id(config, client)],
        filter_string=f"tags.kind = 'benchmark' and {scope} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    ))


def _metrics_from_run(run: Any) -> dict[str, dict[str, float]]:
    """{model: {metric: value}} from a parent run's `<model>.<metric>` metrics."""
    models = json.loads(run.data.tags.get("benchmark_models", "null") or "null")
    out: dict[str, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        model, dot, metric = key.partition(".")
        # Model names may hold dots themselves (timm tags, package.module:function): the longest known one.
        named = [m for m in models or () if key.startswith(f"{m}.")]
        if named:
            model = max(named, key=len)
            metric = key[len(model) + 1:]
        if dot and (models is None or model in models):
            out.setdefault(model, {})[metric] = value
    return out
