"""Benchmarks in a row: the comparison with the last one, a planted regression, the champion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.benchmark import benchmark
from food101 import history
from food101.history import RegressionDetected
from food101.tracking import finish_run, start_benchmark_run, tracking_uri
from tasks.evaluate import read_metrics, read_predictions, read_timing_samples
from tests.conftest import REPO, SAMPLE, generated_overrides, make_config
from tests.test_notifications import Receiver

pytestmark = pytest.mark.slow

# A quicker recipe, the same evaluation settings: other evaluation settings would not be comparable.
# Two of the demo's three models: the comparison goes model by model over the models both runs have,
# and each model costs its own evaluation, export and robustness passes in both later runs.
FAST = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "train.overrides": {},
        "models": ["resnet50", "mobilenet_v3_large"]}


def same_tracking(demo_run, root) -> dict:
    """Outputs under `root`, MLflow in the demo run's database: the demo run's files stay intact."""
    tracking = {k: v for k, v in demo_run["overrides"].items() if k.startswith("paths.tracking")}
    return generated_overrides(root) | tracking | FAST


@pytest.fixture(scope="module")
def later(demo_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("later-benchmarks")
    overrides = same_tracking(demo_run, root)
    config = make_config(root, **{k.replace(".", "__"): v for k, v in overrides.items()})
    return root, overrides, config


@pytest.fixture(scope="module")
def second_run(demo_run, later):
    """A second (quicker) demo benchmark, recorded in the same MLflow database as the first."""
    _, overrides, _ = later
    return benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))


def test_second_benchmark_reports_changes_since_the_first(demo_run, second_run, later):
    _, _, config = later
    comparison = second_run["comparison"]
    assert comparison["previous"]["run_id"] == demo_run["result"]["parent_run_id"]
    saved = json.loads((config.paths.reports / "history.json").read_text())
    top1 = [d for d in saved["deltas"] if d["metric"] == "top1"]
    assert {d["model"] for d in top1} == set(config.models)
    text = (config.paths.reports / "report.md").read_text()
    since = text.split("## Since the last benchmark", 1)[1].split("\n## ", 1)[0]
    assert demo_run["result"]["parent_run_id"] in since
    for delta in top1:
        assert f"{delta['current']:.4g}" in since  # this run's own numbers, in the table
    # The quicker recipe is shown as a recipe change beside the metric changes it caused.
    assert "epochs 10 -> 1" in saved["recipe_changes"]["resnet50"] and "Recipe changes" in since
    assert "top5" not in {d["metric"] for d in saved["deltas"]}  # 5 classes: n/a, never compared
    # Timings carry their samples and the machine's state; they are tested, never thresholded.
    for model in config.models:
        samples = read_timing_samples(config, model)
        assert list(samples.columns) == ["metric", "device", "sample_index", "value", "process"]
        assert (samples["metric"] == "latency_ms").sum() == config.evaluate.latency_runs
        assert samples["process"].nunique() == min(config.evaluate.timing_processes, config.evaluate.latency_runs)
        assert "other_cpu_share" in read_metrics(config, model)["machine_state"]
    speed = [d for d in saved["deltas"] if d["metric"] == "throughput_cpu_ips"]
    assert speed and all(d["test"].startswith("mann-whitney u p=") for d in speed)


def test_a_planted_regression_is_flagged_and_fails_the_flow_when_configured(second_run, later):
    _, overrides, config = later
    # Plant a previous benchmark that was right on every photo and trained 10x faster.
    planted = start_benchmark_run(config, {"planted": "true"})
    metrics, predictions = {}, {}
    for model in config.models:
        values = read_metrics(config, model)
        metrics[model] = values | {"top1": 1.0, "top1_ci_low": 0.99, "top1_ci_high": 1.0,
                                   "train_images_per_s": 10 * values["train_images_per_s"]}
        predictions[model] = read_predictions(config, model).assign(correct=True)
    history.record_benchmark(config, planted, metrics, history.hardware_description(), predictions)
    finish_run(planted)

    with Receiver() as receiver:
        state = benchmark(profile="demo", overrides=overrides | {"alerts.fail_on_regression": True,
                                                                 "alerts.notify_url": receiver.url},
                          params_file=str(REPO / "params.yaml"),
                          return_state=True)
    assert state.is_failed()
    # One message for the regression; the failure it causes is not announced a second time.
    [post] = receiver.posts
    assert post["json"]["event"] == "regression"
    assert {f["metric"] for f in post["json"]["findings"]} >= {"top1"}
    with pytest.raises(RegressionDetected, match="top1"):
        state.result()

    client = MlflowClient(tracking_uri(config))
    runs = client.search_runs([planted.info.experiment_id], filter_string="tags.kind = 'benchmark'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].data.tags["regression"] == "true"
    assert runs[0].data.tags["compared_with"] == planted.run_id
    assert runs[0].info.status == "FAILED"  # never the baseline of the next benchmark
    text = (config.paths.reports / "report.md").read_text()
    assert "Regression since the last benchmark" in text


def test_predict_uses_the_champion_a_demo_run_registered(demo_run):
    config = demo_run["config"]
    photos = sorted((SAMPLE / "images" / "bibimbap").glob("*.jpg"))[:2]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{config.paths.tracking_db}"}
    done = subprocess.run([sys.executable, "-m", "food101", "predict", "--profile", "demo", *map(str, photos)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    display = set(pd.read_csv(SAMPLE / "meta" / "labels.txt", header=None)[0])
    lines = [line.strip() for line in done.stdout.splitlines() if "%" in line]
    assert len(lines) == 2 * 5
    probabilities = []
    for line in lines:
        probability, dish = line.split("%", 1)
        assert dish.strip() in display
        probabilities.append(float(probability))
    for first in (0, 5):
        ranked = probabilities[first:first + 5]
        assert ranked == sorted(ranked, reverse=True) and 99.0 <= sum(ranked) <= 100.5


def test_predict_without_a_champion_says_what_to_do(tmp_path):
    config = make_config(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{config.paths.tracking_db}"}
    photo = next((SAMPLE / "images" / "bibimbap").glob("*.jpg"))
    done = subprocess.run([sys.executable, "-m", "food101", "predict", "--profile", "demo", str(photo)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "run a benchmark first" in done.stderr and "Traceback" not in done.stderr
