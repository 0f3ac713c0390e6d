"""History and regressions: real MLflow on SQLite, benchmarks recorded the way the flow records them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from food101 import comparability, history
from food101.tracking import client_for, finish_run, start_benchmark_run
from tests.conftest import make_config

N_TEST = 50
HARDWARE = "cpu: Test CPU x2; gpu: none"
CLASSES = [f"dish_{i}" for i in range(5)]
DATA_HASH = "a1" * 32


def metrics(top1: float, train_ips: float = 100.0, cpu_ips: float = 400.0, half_width: float = 0.1) -> dict:
    """A metrics.json as evaluate writes it (the fields this module reads, plus a few it ignores)."""
    return {
        "model": "ignored text", "n_test": N_TEST, "top1": top1, "top1_ci_low": top1 - half_width,
        "top1_ci_high": top1 + half_width, "top5": 0.9, "top5_ci_low": 0.85, "top5_ci_high": 0.95,
        "macro_f1": top1 - 0.02, "ece": 0.05, "latency_cpu_p50_ms": 10.0, "latency_gpu_p50_ms": None,
        "throughput_cpu_ips": cpu_ips, "throughput_gpu_ips": None, "train_images_per_s": train_ips,
        "train_time_s": 60.0, "params": 1000, "size_mb": 4.0,
    }


def predictions(correct: list[bool]) -> pd.DataFrame:
    """predictions.parquet's columns for N_TEST photos; right answers have label 0 first in top-5."""
    paths = [f"images/dish_{i % 5}/{1000 + i}.jpg" for i in range(len(correct))]
    return pd.DataFrame({
        "path": paths, "label": [i % 5 for i in range(len(correct))],
        "pred": [i % 5 if ok else (i + 1) % 5 for i, ok in enumerate(correct)], "correct": correct,
        "top5_labels": [[(i + j) % 5 for j in (0, 1, 2, 3, 4)] if ok else [(i + 1) % 5] * 5
                        for i, ok in enumerate(correct)],
        "top5_probs": [[0.5, 0.2, 0.1, 0.1, 0.1]] * len(correct),
    })


def key(config, models, hardware=HARDWARE, data_hash=DATA_HASH, classes=CLASSES) -> dict:
    """The comparability key of a benchmark of `models` on the given data (validate's outputs absent)."""
    return comparability.comparability_key(config, list(models), hardware, data_hash=data_hash, classes=classes)


def benchmark(config, metrics_by_model, correct_by_model, hardware=HARDWARE, finish=True, timing=None, **data):
    run = start_benchmark_run(config)
    record = history.record_benchmark(
        config, run, metrics_by_model, hardware,
        predictions_by_model={m: predictions(c) for m, c in correct_by_model.items()},
        key=key(config, metrics_by_model, hardware, **data), timing_by_model=timing or {},
    )
    if finish:
        finish_run(run)
    return run, record


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking")


def isolated_config(root, tracking_root, experiment: str, **overrides):
    """A config writing under `root` that shares one MLflow database (creating one costs ~3 s) but
    has an experiment of its own, so each test sees only its own benchmarks."""
    return make_config(root, paths__tracking_db=str(tracking_root / "mlflow.db"),
                       paths__tracking_artifacts=str(tracking_root / "mlruns"),
                       tracking__experiment=experiment, **overrides)


@pytest.fixture
def config(tmp_path, tracking_root, request):
    return isolated_config(tmp_path, tracking_root, request.node.name)


BASE_CORRECT = [i % 5 != 0 for i in range(N_TEST)]  # 40 of 50 right


def test_second_benchmark_finds_the_first_and_gets_deltas(config, tmp_path, tracking_root):
    first, _ = benchmark(config, {"resnet50": metrics(0.80), "mobilenet_v3_large": metrics(0.70)},
                         {"resnet50": BASE_CORRECT, "mobilenet_v3_large": BASE_CORRECT})
    # Neither a failed run nor another profile's run is "the previous benchmark".
    failed = start_benchmark_run(config)
    history.record_benchmark(config, failed, {"resnet50": metrics(0.1)}, HARDWARE, predictions_by_model={})
    finish_run(failed, "FAILED")
    full = isolated_config(tmp_path, tracking_root, config.tracking.experiment, profile=None)
    benchmark(full, {"resnet50": metrics(0.2)}, {})
    # The previous benchmark's local files are gone: the comparison must come from MLflow alone.
    assert not config.paths.eval.exists()

    second, current = benchmark(config, {"resnet50": metrics(0.82), "mobilenet_v3_large": metrics(0.70)},
                                {"resnet50": BASE_CORRECT, "mobilenet_v3_large": BASE_CORRECT}, finish=False)
    client = client_for(config)
    previous = history.find_previous(config, client, second.run_id, current.key)
    assert previous is not None and previous.run_id == first.run_id
    assert previous.correctness("resnet50") == dict(zip(predictions(BASE_CORRECT)["path"], BASE_CORRECT,
                                                        strict=True))

    comparison = history.compare(current, previous, config.alerts)
    assert comparison["previous"]["run_id"] == first.run_id
    assert comparison["previous"]["metrics"]["resnet50"]["top1"] == pytest.approx(0.80)
    assert comparison["same_hardware"] is True
    by_key = {(d["model"], d["metric"]): d for d in comparison["deltas"]}
    top1 = by_key[("resnet50", "top1")]
    assert top1["delta"] == pytest.approx(0.02) and top1["previous"] == pytest.approx(0.80)
    assert top1["test"].startswith("mcnemar p=") and top1["significant"] is False
    assert ("mobilenet_v3_large", "throughput_cpu_ips") in by_key
    assert ("resnet50", "params") not in by_key  # not a compared metric
    assert comparison["regressions"] == []
    # Five classes: top-5 is 100% by construction, so it is n/a and never compared.
    assert ("resnet50", "top5") not in by_key
    assert comparison["not_applicable"] == [
        {"metric": "top5", "reason": "top-5 with 5 classes is 100% by construction"}]

    path = history.write_history(config, comparison)
    assert path == config.paths.reports / "history.json"
    assert json.loads(path.read_text())["previous"]["run_id"] == first.run_id
    assert history.read_history(config)["deltas"] == json.loads(json.dumps(comparison["deltas"]))


def test_first_benchmark_has_nothing_to_compare(config):
    run, current = benchmark(config, {"resnet50": metrics(0.8)}, {"resnet50": BASE_CORRECT}, finish=False)
    previous = history.find_previous(config, client_for(config), run.run_id, current.key)
    assert previous is None
    comparison = history.compare(current, previous, config.alerts)
    assert comparison["previous"] is None and comparison["deltas"] == [] and comparison["regressions"] == []
    history.write_history(config, comparison)
    assert history.read_history(config)["previous"] is None


def test_planted_regression_is_detected_tagged_and_raised(tmp_path, tracking_root):
    config = isolated_config(tmp_path, tracking_root, "planted", alerts__fail_on_regression=True)
    benchmark(config, {"resnet50": metrics(0.80), "efficientnet_b0": metrics(0.75)},
              {"resnet50": BASE_CORRECT, "efficientnet_b0": BASE_CORRECT})
    # resnet50 loses 15 photos it had right and gains none: McNemar's exact p = 2 * 0.5**15.
    worse = [ok and i >= 19 for i, ok in enumerate(BASE_CORRECT)]
    assert sum(BASE_CORRECT) - sum(worse) == 15
    run, current = benchmark(
        config,
        {"resnet50": metrics(0.50), "efficientnet_b0": metrics(0.75, train_ips=80.0, cpu_ips=390.0)},
        {"resnet50": worse, "efficientnet_b0": BASE_CORRECT}, finish=False,
    )
    client = client_for(config)
    comparison = history.compare(current, history.find_previous(config, client, run.run_id, current.key),
                                 config.alerts)
    found = {(r["model"], r["metric"]) for r in comparison["regressions"]}
    # A 20% training-throughput drop without samples to test is inconclusive, not a regression.
    assert found == {("resnet50", "top1")}
    train_ips = next(d for d in comparison["deltas"] if (d["model"], d["metric"]) == ("efficientnet_b0",
                                                                                    "train_images_per_s"))
    assert train_ips["outcome"] == "inconclusive" and "no samples" in train_ips["reason"]
    top1 = next(d for d in comparison["deltas"] if (d["model"], d["metric"]) == ("resnet50", "top1"))
    assert top1["significant"] and top1["p_value"] == pytest.approx(2 * 0.5**15)

    flagged = history.flag_regressions(run, comparison)
    assert flagged == comparison["regressions"]
    assert all(r["message"].startswith(f"{r['model']} {r['metric']}: ") for r in flagged)
    tags = client.get_run(run.run_id).data.tags
    assert tags["regression"] == "true" and "resnet50 top1" in tags["regression_details"]
    with pytest.raises(history.RegressionDetected, match="resnet50 top1") as raised:
        history.raise_if_regressed(config, comparison)
    assert len(raised.value.regressions) == 1
    # Without fail_on_regression the same comparison is recorded but does not fail the run.
    history.raise_if_regressed(isolated_config(tmp_path, tracking_root, "planted"), comparison)


def test_interval_overlap_without_correctness_vectors(config):
    benchmark(config, {"resnet50": metrics(0.80, half_width=0.02)}, {})
    run, current = benchmark(config, {"resnet50": metrics(0.70, half_width=0.02)}, {}, finish=False)
    comparison = history.compare(current, history.find_previous(config, client_for(config), run.run_id, current.key),
                                 config.alerts)
    top1 = next(d for d in comparison["deltas"] if d["metric"] == "top1")
    assert top1["test"] == "interval overlap" and top1["significant"] is True
    assert [r["metric"] for r in comparison["regressions"]] == ["top1"]
    # A small drop inside overlapping intervals is not a regression.
    _, close = benchmark(config, {"resnet50": metrics(0.79, half_width=0.02)}, {}, finish=False)
    assert not history.compare(close, history.find_previous(config, client_for(config), close.run_id, close.key),
                               config.alerts)["deltas"][0]["significant"]


def test_throughput_on_different_hardware_is_shown_but_never_a_regression(config):
    benchmark(config, {"resnet50": metrics(0.8)}, {"resnet50": BASE_CORRECT}, hardware="cpu: Old CPU x2; gpu: none")
    run, current = benchmark(config, {"resnet50": metrics(0.8, train_ips=50.0, cpu_ips=200.0)},
                             {"resnet50": BASE_CORRECT}, finish=False)
    comparison = history.compare(current, history.find_previous(config, client_for(config), run.run_id, current.key),
                                 config.alerts)
    assert comparison["same_hardware"] is False and comparison["regressions"] == []
    speed = {d["metric"]: d for d in comparison["deltas"] if d["metric"] in history.THROUGHPUT_METRICS}
    assert speed["train_images_per_s"]["delta"] == pytest.approx(-50.0)
    assert speed["throughput_cpu_ips"]["test"] == "different hardware: not comparable"
    assert history.flag_regressions(run, comparison) == []
    assert client_for(config).get_run(run.run_id).data.tags["regression"] == "false"


def test_trends_over_past_benchmarks(config, tracking_root):
    for top1 in (0.6, 0.7):
        benchmark(config, {"resnet50": metrics(top1), "efficientnet_b0": metrics(top1 - 0.05)},
                  {"resnet50": BASE_CORRECT})
    current, _ = benchmark(config, {"resnet50": metrics(0.75), "efficientnet_b0": metrics(0.7)},
                           {"resnet50": BASE_CORRECT}, finish=False)
    frame = history.trend_frame(config, client_for(config), include_run_id=current.run_id)
    assert len(frame) == 6 and set(frame["model"]) == {"resnet50", "efficientnet_b0"}
    assert list(frame[frame["model"] == "resnet50"]["top1"]) == pytest.approx([0.6, 0.7, 0.75])
    assert frame["date"].is_monotonic_increasing and frame["run_id"].iloc[-1] == current.run_id
    assert {"hardware", "train_images_per_s", "throughput_cpu_ips"} <= set(frame.columns)
    png = history.plot_trends(frame, history.trends_path(config))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    history.write_history(config, history.compare(_record(config, current.run_id), None, config.alerts), frame)
    assert len(history.read_history(config)["trend"]) == 6
    # Without a current run only FINISHED ones count; an empty profile plots a readable placeholder.
    assert len(history.trend_frame(config, client_for(config))) == 4
    other_profile = isolated_config(config.paths.models.parent.parent, tracking_root,
                                    config.tracking.experiment, profile=None)
    empty = history.trend_frame(other_profile, client_for(config))
    assert empty.empty and history.plot_trends(empty, config.paths.reports / "empty.png").is_file()


def _record(config, run_id):
    client = client_for(config)
    return history.load_record(client, client.get_run(run_id))
