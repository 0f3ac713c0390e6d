"""History: each benchmark compared with the last comparable one, found in MLflow.

A benchmark leaves everything the next one needs on its MLflow parent run, never only on disk
(the next run overwrites artifacts/ and reports/): `<model>.<metric>` metrics for trends, and
`benchmark_summary.json` with the metrics plus, per model, which test photos it got right (for
McNemar's exact test on the photos both evaluated), the raw timing samples with the machine's
state while they were taken (for a rank test), the effective recipe, and the comparability key
(food101.comparability): only a benchmark on the same data with the same evaluation settings is
"the previous one".

Each compared metric gets one outcome: regression, improvement, inconclusive or no change. The
robustness figures are tested only when the key's `robustness` entry agrees too; otherwise they
are inconclusive, "not comparable", with what changed, and never a regression.

The flow calls, after evaluation and before the report:
record_benchmark -> find_previous (find_latest when none) -> compare -> write_history ->
flag_regressions, and raises `RegressionDetected` (via `raise_if_regressed`) when
`alerts.fail_on_regression` is set. Searching the past benchmark runs, and the trend table and
plot drawn from them, live in food101/trends.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from food101 import comparability, timing
from food101.config import AlertsConfig, Config
from food101.errors import Food101Error
from food101.io import read_json, write_json
from food101.timing import IMPROVEMENT, INCONCLUSIVE, NO_CHANGE, REGRESSION
from food101.tracking import Run
from food101.trends import (  # noqa: F401  (trend_frame, plot_trends: callers use history.trend_frame)
    _benchmark_runs,
    _metrics_from_run,
    plot_trends,
    trend_frame,
)

log = logging.getLogger(__name__)

SUMMARY_ARTIFACT = "benchmark_summary.json"
SUMMARY_VERSION = 2
HISTORY_FILE = "history.json"
TRENDS_FILE = "trends.png"
KEY_TAG = "comparability_key"
ALPHA = 0.05  # significance level of McNemar's and Mann-Whitney's tests

# Metrics compared between benchmarks, with the direction that is better. Latency p95 is shown in
# the report but not tested: the p50 row carries the test on the same samples.
HIGHER_IS_BETTER = ("top1", "top5", "macro_precision", "macro_recall", "macro_f1", "mean_corruption_accuracy",
                    "throughput_cpu_ips", "throughput_gpu_ips", "train_images_per_s")
LOWER_IS_BETTER = ("ece", "mce", "latency_cpu_p50_ms", "latency_gpu_p50_ms", "train_time_s")
COMPARED_METRICS = HIGHER_IS_BETTER + LOWER_IS_BETTER
# Timing metrics with raw samples in timing_samples.parquet: metric -> (sample metric, device).
SAMPLED_METRICS = {
    "latency_cpu_p50_ms": ("latency_ms", "cpu"), "latency_gpu_p50_ms": ("latency_ms", "gpu"),
    "throughput_cpu_ips": ("throughput_ips", "cpu"), "throughput_gpu_ips": ("throughput_ips", "gpu"),
}
# CPU timings are compared on their probe processes' medians: a process, not a forward, is the unit
# that varies (food101.speed.time_on_cpu_in_processes). GPU timings run in the flow's process.
PROCESS_MEDIANS = "process_medians"
THROUGHPUT_METRICS = ("train_images_per_s", "throughput_cpu_ips", "throughput_gpu_ips")
# Speed figures only mean something against the same hardware.
SPEED_METRICS = (*SAMPLED_METRICS, "train_images_per_s", "train_time_s")
# Accuracy metrics with a bootstrap interval in metrics.json and a per-photo correctness vector.
# Robustness figures (tasks/robustness.py) have a bootstrap interval but no correctness vector.
INTERVAL_METRICS = ("top1", "top5", "mean_corruption_accuracy", "mce")
# The robustness stage's figures: compared only when the key's `robustness` entry agrees.
ROBUSTNESS_METRICS = ("mean_corruption_accuracy", "mce")
# Top-k accuracy metrics: with k classes or fewer they are 100% by construction.
TOP_K = {"top5": 5}


class RegressionDetected(Food101Error):
    """This benchmark is significantly worse than the previous one (alerts.fail_on_regression)."""

    def __init__(self, regressions: list[dict[str, Any]], previous_run_id: str | None = None) -> None:
        self.regressions = regressions
        since = f" since benchmark {previous_run_id}" if previous_run_id else ""
        lines = "; ".join(f"{r['model']} {r['metric']}: {r['reason']}" for r in regressions)
        super().__init__(
            f"{len(regressions)} regression(s){since}: {lines}. The MLflow parent run is tagged "
            "regression=true; set alerts.fail_on_regression=false to record regressions without failing."
        )


@dataclass
class BenchmarkRecord:
    """What one benchmark left in MLflow: headline metrics and per-photo correctness per model.

    `correct[model]` is a string aligned with `test_paths`: '1' right, '0' wrong, '.' not evaluated.
    `timing[model]` maps "<sample metric>/<device>" (latency_ms/cpu) to the raw samples, and
    `machine_state[model]` is what else the machine did while they were taken.
    """

    run_id: str
    date: str  # ISO 8601, UTC
    profile: str
    hardware: str
    metrics: dict[str, dict[str, float]]
    test_paths: list[str] = field(default_factory=list)
    correct: dict[str, str] = field(default_factory=dict)
    correct_top5: dict[str, str] = field(default_factory=dict)
    git_commit: str = ""
    config_hash: str = ""
    key: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    machine_state: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": SUMMARY_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchmarkRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def correctness(self, model: str, metric: str = "top1") -> dict[str, bool] | None:
        """{test path: correct} for one model, or None when the vector was not recorded."""
        bits = {"top1": self.correct, "top5": self.correct_top5}.get(metric, {}).get(model)
        if not bits or len(bits) != len(self.test_paths):
            return None
        return {path: bit == "1" for path, bit in zip(self.test_paths, bits, strict=True) if bit != "."}

    def samples(self, model: str, metric: str) -> list[float] | None:
        """The raw samples behind a timing metric (latency_cpu_p50_ms), or None when not recorded."""
        name, device = SAMPLED_METRICS[metric]
        values = self.timing.get(model, {}).get(f"{name}/{device}")
        return list(values) if values else None

    def units(self, model: str, metric: str) -> list[float] | None:
        """What a comparison tests for a timing metric: on the CPU each probe process's median
        (None for a benchmark recorded before they were kept), on a GPU the raw samples."""
        name, device = SAMPLED_METRICS[metric]
        if device == "gpu":
            return self.samples(model, metric)
        values = self.timing.get(model, {}).get(f"{name}/{device}/{PROCESS_MEDIANS}")
        return list(values) if values else None


# --- recording ---------------------------------------------------------------------------------


def hardware_description() -> str:
    """A stable description of this machine's compute: CPU model and cores, GPU names.

    Two benchmarks are "on the same hardware" when these strings are equal.
    """
    import torch

    from food101.environment_info import cpu_model

    gpus = "none"

    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"cpu: {cpu_model()} x{os.cpu_count()}; gpu: {gpus}"


def correctness_vectors(
    predictions_by_model: dict[str, pd.DataFrame],
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Sorted test paths and, per model, top-1 and top-5 correctness strings aligned with them."""
    paths = sorted({str(p) for frame in predictions_by_model.values() for p in frame["path"]})
    position = {p: i for i, p in enumerate(paths)}
    top1: dict[str, str] = {}
    top5: dict[str, str] = {}
    for model, frame in predictions_by_model.items():
        bits1 = ["."] * len(paths)
        bits5 = ["."] * len(paths)
        for path, label, correct, top5_labels in zip(
            frame["path"], frame["label"], frame["correct"], frame["top5_labels"], strict=True
        ):
            i = position[str(path)]
            bits1[i] = "1" if bool(correct) else "0"
            bits5[i] = "1" if int(label) in {int(v) for v in top5_labels} else "0"
        top1[model] = "".join(bits1)
        top5[model] = "".join(bits5)
    return paths, top1, top5


def read_predictions_if_present(config: Config, models: list[str]) -> dict[str, pd.DataFrame]:
    """predictions.parquet of each model that has one (evaluate's format)."""
    out = {}
    for model in models:
        path = config.paths.eval / model / "predictions.parquet"
        if path.is_file():
            out[model] = pd.read_parquet(path, columns=["path", "label", "correct", "top5_labels"])
        else:
            log.warning("no %s: %s's correctness is not recorded (comparisons fall back to intervals)",
                        path, model)
    return out


def timing_by_metric(frame: pd.DataFrame) -> dict[str, list[float]]:
    """{"latency_ms/cpu": [...], ...} from timing_samples.parquet's rows, in sample order; with a
    `process` column also each probe process's median, in process order, under
    "latency_ms/cpu/process_medians"."""
    out: dict[str, list[float]] = {}
    for (metric, device), rows in frame.sort_values("sample_index").groupby(["metric", "device"], sort=True):
        out[f"{metric}/{device}"] = [float(v) for v in rows["value"]]
        if "process" in rows:
            medians = rows.groupby("process", sort=True)["value"].median()
            out[f"{metric}/{device}/{PROCESS_MEDIANS}"] = [float(v) for v in medians]
    return out


def read_timing_if_present(config: Config, models: list[str]) -> dict[str, dict[str, list[float]]]:
    """Each model's raw timing samples (evaluate's timing_samples.parquet), where recorded."""
    from tasks.evaluate import TIMING_FILE

    out = {}
    for model in models:
        path = config.paths.eval / model / TIMING_FILE
        if path.is_file():
            out[model] = timing_by_metric(pd.read_parquet(path))
        else:
            log.warning("no %s: %s's timings cannot be tested against another benchmark", path, model)
    return out


def record_benchmark(
    config: Config,
    parent_run: Run | str,
    metrics_by_model: dict[str, dict[str, Any]],
    hardware: str,
    predictions_by_model: dict[str, pd.DataFrame] | None = None,
    key: dict[str, Any] | None = None,
    timing_by_model: dict[str, dict[str, list[float]]] | None = None,
) -> BenchmarkRecord:
    """Log this benchmark's metrics, correctness, timings and comparability key to its parent run.

    `metrics_by_model` is each evaluated model's metrics.json; predictions and timing samples
    default to each model's files under config.paths.eval, the key to comparability_key's.
    """
    run = _as_run(config, parent_run)
    models = list(metrics_by_model)
    if predictions_by_model is None:
        predictions_by_model = read_predictions_if_present(config, models)
    if timing_by_model is None:
        timing_by_model = read_timing_if_present(config, models)
    if key is None:
        key = comparability.comparability_key(config, models, hardware)
    metrics = {model: _numeric(values) for model, values in metrics_by_model.items()}
    paths, top1, top5 = correctness_vectors(
        {m: frame for m, frame in predictions_by_model.items() if m in metrics}
    )
    info = run.client.get_run(run.run_id)
    record = BenchmarkRecord(
        run_id=run.run_id,
        date=_iso(info.info.start_time),
        profile=config.profile,
        hardware=hardware,
        metrics=metrics,
        test_paths=paths,
        correct=top1,
        correct_top5=top5,
        git_commit=info.data.tags.get("git_commit", ""),
        config_hash=info.data.tags.get("config_hash", ""),
        key=key,
        recipes=comparability.recipes(config, models),
        timing={m: v for m, v in timing_by_model.items() if m in metrics},
        machine_state={m: v["machine_state"] for m, v in metrics_by_model.items()
                       if isinstance(v.get("machine_state"), dict)},
    )
    run.log_metrics({f"{model}.{name}": value for model, values in metrics.items() for name, value in values.items()})
    with tempfile.TemporaryDirectory(prefix="food101-summary-") as folder:
        summary = Path(folder) / SUMMARY_ARTIFACT
        summary.write_text(json.dumps(record.to_json(), separators=(",", ":")))
        run.log_artifact(summary)
    run.set_tags({"hardware": hardware, "benchmark_models": json.dumps(sorted(metrics)),
                  KEY_TAG: comparability.key_tag(key)})
    log.info("recorded benchmark %s: %d models, %d test photos", run.run_id, len(metrics), len(paths))
    return record


# --- finding and comparing ---------------------------------------------------------------------


def find_previous(
    config: Config, client: MlflowClient, exclude_run_id: str | None, key: dict[str, Any]
) -> BenchmarkRecord | None:
    """The most recent FINISHED benchmark with the same data and evaluation settings as `key`, or None.

    Any profile counts: the data and the evaluation settings decide what a benchmark measured,
    not the profile's name.
    """
    if not comparability.is_comparable(key):
        log.warning("this benchmark has no data hash or class list: it is compared with nothing")
        return None
    tag = comparability.key_tag(key)
    for run in _benchmark_runs(config, client, max_results=50, where=f"tags.{KEY_TAG} = '{tag}'"):
        if run.info.run_id == exclude_run_id:
            continue
        record = load_record(client, run)
        if record is not None and record.metrics and comparability.key_tag(record.key) == tag:
            return record
    return None


def find_latest(config: Config, client: MlflowClient, exclude_run_id: str | None) -> BenchmarkRecord | None:
    """The most recent FINISHED benchmark of the experiment, comparable or not (to say what differs)."""
    for run in _benchmark_runs(config, client, max_results=5, where="tags.benchmark_models != ''"):
        if run.info.run_id != exclude_run_id:
            record = load_record(client, run)
            if record is not None:
                return record
    return None


def load_record(client: MlflowClient, run: Any) -> BenchmarkRecord | None:
    """A past benchmark from its summary artifact; from its `<model>.<metric>` metrics without one."""
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    if SUMMARY_ARTIFACT in artifacts:
        with tempfile.TemporaryDirectory(prefix="food101-summary-") as folder:
            local = client.download_artifacts(run.info.run_id, SUMMARY_ARTIFACT, folder)
            return BenchmarkRecord.from_json(read_json(Path(local)))
    metrics = _metrics_from_run(run)
    if not metrics:
        return None
    tags = run.data.tags
    return BenchmarkRecord(
        run_id=run.info.run_id, date=_iso(run.info.start_time), profile=tags.get("profile", ""),
        hardware=tags.get("hardware", ""), metrics=metrics, git_commit=tags.get("git_commit", ""),
        config_hash=tags.get("config_hash", ""),
    )


def compare(
    current: BenchmarkRecord, previous: BenchmarkRecord | None, thresholds: AlertsConfig,
    latest: BenchmarkRecord | None = None,
) -> dict[str, Any]:
    """One outcome per model and metric (regression, improvement, inconclusive, no change), the
    recipe changes beside them, and the metrics that cannot discriminate (n/a, never compared).

    Without a comparable `previous`, `latest` (the newest benchmark of any kind) says what differs.
    """
    result: dict[str, Any] = {
        "current": {"run_id": current.run_id, "date": current.date, "hardware": current.hardware,
                    "machine_state": current.machine_state},
        "previous": None,
        "not_comparable": None,
        "robustness_not_comparable": None,
        "same_hardware": None,
        "recipe_changes": {},
        "not_applicable": not_applicable(current),
        "deltas": [],
        "regressions": [],
    }
    if previous is None:
        if latest is not None:
            differences = comparability.key_differences(current.key, latest.key) or ["none recorded"]
            result["not_comparable"] = {
                "run_id": latest.run_id, "date": latest.date, "profile": latest.profile,
                "differences": differences,
                "message": (f"no comparable earlier benchmark; the latest one (run {latest.run_id} of "
                            f"{latest.date}, profile {latest.profile}) differs: {'; '.join(differences)}"),
            }
        return result
    same_hardware = bool(current.hardware) and current.hardware == previous.hardware
    result["previous"] = {
        "run_id": previous.run_id, "date": previous.date, "hardware": previous.hardware,
        "profile": previous.profile, "git_commit": previous.git_commit, "metrics": previous.metrics,
        "machine_state": previous.machine_state,
    }
    result["same_hardware"] = same_hardware
    result["recipe_changes"] = comparability.recipe_changes(previous.recipes, current.recipes)
    skipped = {item["metric"] for item in result["not_applicable"]}
    robustness_gap = comparability.robustness_differences(current.key, previous.key)
    for model in [m for m in current.metrics if m in previous.metrics]:
        now, before = current.metrics[model], previous.metrics[model]
        for metric in COMPARED_METRICS:
            if metric not in now or metric not in before or metric in skipped:
                continue
            gap = robustness_gap if metric in ROBUSTNESS_METRICS else []
            delta = _delta(model, metric, current, previous, same_hardware, thresholds, gap)
            delta["recipe_change"] = result["recipe_changes"].get(model)
            result["deltas"].append(delta)
            if delta["outcome"] == REGRESSION:
                result["regressions"].append({
                    "model": model, "metric": metric, "reason": delta["reason"], "test": delta["test"],
                    "p_value": delta.get("p_value"), "previous": delta["previous"], "current": delta["current"],
                    "relative": delta["relative"], "recipe_change": delta["recipe_change"],
                    "message": f"{model} {metric}: {delta['reason']}",
                })
    if any(d["metric"] in ROBUSTNESS_METRICS for d in result["deltas"]) and robustness_gap:
        result["robustness_not_comparable"] = {
            "metrics": list(ROBUSTNESS_METRICS), "differences": robustness_gap,
            "message": f"robustness metrics not comparable with run {previous.run_id}: {'; '.join(robustness_gap)}",
        }
        log.info("%s", result["robustness_not_comparable"]["message"])
    return result


def not_applicable(record: BenchmarkRecord) -> list[dict[str, str]]:
    """Top-k metrics with k >= the number of classes: 100% by construction, so shown as n/a."""
    n_classes = len(record.key.get("classes") or [])
    if not n_classes:
        return []
    return [{"metric": metric, "reason": f"top-{k} with {n_classes} classes is 100% by construction"}
            for metric, k in TOP_K.items() if k >= n_classes]


def mcnemar_exact(before: dict[str, bool], after: dict[str, bool]) -> tuple[float, int, int, int]:
    """McNemar's exact test on the photos both evaluated: (p, lost, gained, shared photos)."""
    from food101 import metrics  # scipy: loaded only when two benchmarks are compared

    shared = sorted(before.keys() & after.keys())
    result = metrics.mcnemar_exact([before[p] for p in shared], [after[p] for p in shared])
    return result.p_value, result.n_a_only, result.n_b_only, len(shared)


def _delta(
    model: str, metric: str, current: BenchmarkRecord, previous: BenchmarkRecord,
    same_hardware: bool, thresholds: AlertsConfig, not_comparable: list[str] | None = None,
) -> dict[str, Any]:
    """`not_comparable`: why this metric was measured another way (shown beside, never tested)."""
    now, before = current.metrics[model][metric], previous.metrics[model][metric]
    delta = now - before
    entry: dict[str, Any] = {
        "model": model, "metric": metric, "previous": before, "current": now, "delta": delta,
        "relative": (delta / before) if before else None,
        "higher_is_better": metric in HIGHER_IS_BETTER,
        "significant": False, "test": "none (point estimate)", "p_value": None,
    }
    if not_comparable:
        entry.update(outcome=INCONCLUSIVE, test="robustness settings differ: not comparable",
                     reason=f"not comparable: {'; '.join(not_comparable)}")
    elif metric in INTERVAL_METRICS:
        entry.update(_accuracy_significance(model, metric, current, previous))
        worse = delta < 0 if entry["higher_is_better"] else delta > 0
        if entry["significant"]:
            entry["outcome"] = REGRESSION if worse else IMPROVEMENT
            entry["reason"] = (f"{metric} {'fell' if delta < 0 else 'rose'} from {before:.2%} to {now:.2%} "
                               f"({delta * 100:+.2f} points; {entry['test']})")
        else:
            entry["outcome"] = NO_CHANGE
            entry["reason"] = f"{delta * 100:+.2f} points, not significant ({entry['test']})"
    elif metric in SPEED_METRICS:
        entry.update(_timing_outcome(model, metric, current, previous, same_hardware, thresholds))
    elif delta == 0:
        entry.update(outcome=NO_CHANGE, reason="identical")
    else:
        entry.update(outcome=INCONCLUSIVE, reason="a point estimate without a test")
    return entry


def _timing_outcome(
    model: str, metric: str, current: BenchmarkRecord, previous: BenchmarkRecord,
    same_hardware: bool, thresholds: AlertsConfig,
) -> dict[str, Any]:
    """Inconclusive unless both runs have samples, the same hardware and a quiet machine; then the rank test."""
    if not same_hardware:
        return {"outcome": INCONCLUSIVE, "test": "different hardware: not comparable",
                "reason": f"different hardware ({previous.hardware} -> {current.hardware})"}
    if metric not in SAMPLED_METRICS:
        if current.metrics[model][metric] == previous.metrics[model][metric]:
            return {"outcome": NO_CHANGE, "reason": "identical (the same training)"}
        return {"outcome": INCONCLUSIVE, "reason": "one figure per training: no samples to test"}
    raw = previous.samples(model, metric), current.samples(model, metric)
    if None in raw:
        which = " and ".join(name for name, s in zip(("the previous", "this"), raw, strict=True) if s is None)
        return {"outcome": INCONCLUSIVE, "reason": f"no raw timing samples in {which} benchmark"}
    before, after = previous.units(model, metric), current.units(model, metric)
    if before is None or after is None:
        which = " and ".join(name for name, s in (("the previous", before), ("this", after)) if s is None)
        return {"outcome": INCONCLUSIVE, "reason": f"no per-process timing samples in {which} benchmark (timed "
                "in one process: the process-to-process spread cannot be told from a change)"}
    unit = "raw samples" if SAMPLED_METRICS[metric][1] == "gpu" else "process medians"
    noisy = (timing.noise_reasons(previous.machine_state.get(model), thresholds.max_load_per_core,
                                  thresholds.max_other_cpu_share, "previous")
             + timing.noise_reasons(current.machine_state.get(model), thresholds.max_load_per_core,
                                    thresholds.max_other_cpu_share, "this"))
    verdict = timing.compare_samples(before, after, metric in HIGHER_IS_BETTER, thresholds.min_timing_effect,
                                     unit=unit)
    out = {"test": verdict.test, "p_value": verdict.p_value, "effect": verdict.effect,
           "significant": verdict.outcome in (REGRESSION, IMPROVEMENT)}
    if noisy:
        return out | {"outcome": INCONCLUSIVE, "significant": False,
                      "reason": f"machine busy while timing ({'; '.join(noisy)}); the test said: {verdict.reason}"}
    return out | {"outcome": verdict.outcome, "reason": f"{metric} {verdict.reason}"
                  if verdict.outcome in (REGRESSION, IMPROVEMENT) else verdict.reason}


def _accuracy_significance(
    model: str, metric: str, current: BenchmarkRecord, previous: BenchmarkRecord
) -> dict[str, Any]:
    after, before = current.correctness(model, metric), previous.correctness(model, metric)
    if after is not None and before is not None and (after.keys() & before.keys()):
        p_value, lost, gained, shared = mcnemar_exact(before, after)
        return {
            "significant": p_value < ALPHA,
            "test": f"mcnemar p={p_value:.3g} ({lost} photos lost, {gained} gained of {shared} shared)",
            "p_value": p_value,
        }
    now, old = current.metrics[model], previous.metrics[model]
    bounds = (f"{metric}_ci_low", f"{metric}_ci_high")
    if all(b in now and b in old for b in bounds):
        overlap = now[bounds[0]] <= old[bounds[1]] and old[bounds[0]] <= now[bounds[1]]
        return {"significant": not overlap, "test": "interval overlap"}
    return {"significant": False, "test": "none (no interval recorded)"}


# --- publishing --------------------------------------------------------------------------------


def history_path(config: Config) -> Path:
    return config.paths.reports / HISTORY_FILE


def trends_path(config: Config) -> Path:
    return config.paths.reports / TRENDS_FILE


def write_history(config: Config, comparison: dict[str, Any], trend: pd.DataFrame | None = None) -> Path:
    """reports/history.json: the comparison (and the trend points when given), for the report."""
    data = dict(comparison)
    if trend is not None:
        frame = trend.copy()
        frame["date"] = frame["date"].map(lambda d: d.isoformat())
        data["trend"] = json.loads(frame.to_json(orient="records"))
    return write_json(history_path(config), data)


def read_history(config: Config) -> dict[str, Any] | None:
    """The comparison written by write_history, or None when this benchmark wrote none."""
    path = history_path(config)
    return read_json(path) if path.is_file() else None


def flag_regressions(parent_run: Run, comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """Tag the parent run regression=true|false (and the details) and return the regressions."""
    regressions = list(comparison.get("regressions", []))
    tags: dict[str, Any] = {"regression": "true" if regressions else "false"}
    if comparison.get("previous"):
        tags["compared_with"] = comparison["previous"]["run_id"]
    if regressions:
        details = "; ".join(f"{r['model']} {r['metric']}: {r['reason']}" for r in regressions)
        tags["regression_details"] = details[:5000]  # MLflow caps tag values
    parent_run.set_tags(tags)
    for item in regressions:
        log.warning("regression: %s %s: %s", item["model"], item["metric"], item["reason"])
    return regressions


def raise_if_regressed(config: Config, comparison: dict[str, Any]) -> None:
    """Raise RegressionDetected when the comparison has regressions and alerts.fail_on_regression is set."""
    regressions = comparison.get("regressions", [])
    if regressions and config.alerts.fail_on_regression:
        previous = comparison.get("previous") or {}
        raise RegressionDetected(regressions, previous.get("run_id"))


# --- internals ---------------------------------------------------------------------------------


def _as_run(config: Config, run: Run | str) -> Run:
    if isinstance(run, Run):
        return run
    from food101.tracking import client_for

    return Run(client_for(config), run)


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _iso(millis: int | None) -> str:
    if millis is None:
        return ""
    return datetime.fromtimestamp(millis / 1000, tz=UTC).isoformat(timespec="seconds")
