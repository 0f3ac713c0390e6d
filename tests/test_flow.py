"""The whole demo benchmark under Prefect's test harness: every stage, MLflow, the report."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from flows.benchmark import PER_MODEL_STAGES, STAGES
from food101.tracking import tracking_uri
from tasks.evaluate import read_metrics

pytestmark = pytest.mark.slow


def test_every_stage_completes_and_the_report_names_all_models(demo_run):
    config, result = demo_run["config"], demo_run["result"]
    assert result["failures"] == {}
    assert set(result["models"]) == set(config.models)
    report_md = config.paths.reports / "report.md"
    report_html = config.paths.reports / "report.html"
    assert report_md.is_file() and report_html.is_file()
    text = report_md.read_text()
    for model, metrics in result["models"].items():
        assert model in text
        assert 0.0 <= metrics["top1"] <= 1.0
        assert f"{100 * metrics['top1']:.1f}" in text  # top-1 as a percentage, from this run
        # params.yaml's default, recorded by evaluate
        assert read_metrics(config, model)["latency_cpu_threads"] == config.evaluate.latency_threads == 1
    assert "Latency is for one photo at a time (batch 1) on one CPU thread" in text


def test_mlflow_holds_the_parent_run_and_a_nested_run_per_stage_and_model(demo_run):
    config, result = demo_run["config"], demo_run["result"]
    client = MlflowClient(tracking_uri(config))
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["profile"] == "demo"
    assert parent.data.params["train.epochs"] == str(config.train.epochs)
    experiment = parent.info.experiment_id
    children = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
    )
    assert len(children) >= 9
    seen = {(run.data.tags["stage"], run.data.tags.get("model")) for run in children}
    for stage in STAGES:
        if stage in PER_MODEL_STAGES:
            for model in config.models:
                assert (stage, model) in seen
        else:
            assert (stage, None) in seen
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["stage_wall_time_s"] > 0
        assert run.data.metrics["stage_peak_rss_mb"] > 0
    train_runs = [r for r in children if r.data.tags["stage"] == "train"]
    history = client.get_metric_history(train_runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) >= 2


def test_one_failing_model_leaves_the_others_trained_evaluated_and_reported(tmp_path, prefect_harness):
    """A learning rate of 1e9 makes resnet50 diverge (NaN): the other two still finish."""
    from flows.benchmark import benchmark
    from tests.conftest import REPO, generated_overrides

    overrides = generated_overrides(tmp_path) | {
        "train.epochs": 1, "train.max_steps_per_epoch": 2, "evaluate.latency_runs": 3,
        "evaluate.bootstrap_samples": 50, "train.overrides": {"resnet50": {"lr": 1.0e9}},
    }
    result = benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))
    assert set(result["failures"]) == {"resnet50"}
    assert "TrainingDiverged" in result["failures"]["resnet50"]
    assert set(result["models"]) == {"efficientnet_b0", "mobilenet_v3_large"}
    text = (tmp_path / "reports" / "report.md").read_text()
    failures = text.split("## Failures", 1)[1].split("\n## ", 1)[0]
    assert "resnet50" in failures and "TrainingDiverged" in failures
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert set(summary["failed"]) == {"resnet50"}
    assert not (tmp_path / "dvc.lock").exists()
