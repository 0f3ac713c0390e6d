"""train.seeds: replicas trained with the next seeds, scored on the test set, mean ± sd in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from food101.config import ConfigError, load_config
from food101.io import read_json, write_json
from food101.recommend import recommend
from food101.tracking import client_for, experiment_id
from tasks.download import download
from tasks.evaluate import eval_dir, evaluate, read_metrics, read_seeds
from tasks.preprocess import preprocess
from tasks.report import SEEDS_COLUMN, report
from tasks.train import model_dir, read_train_summary, replica_dir, train, training_hash
from tasks.validate import validate
from tests.conftest import REPO, make_config
from tests.report_fixtures import MODEL_SPECS, write_upstream_outputs

MODEL = "mobilenet_v3_large"


def test_seeds_below_one_are_refused() -> None:
    with pytest.raises(ConfigError, match="train.seeds must be at least 1"):
        load_config(REPO / "params.yaml", overrides=["train.seeds=0"])


def test_asking_for_more_seeds_keeps_the_primary_training(tmp_path: Path) -> None:
    once, thrice = make_config(tmp_path), make_config(tmp_path, train__seeds=3)
    assert training_hash(once, MODEL, "key") == training_hash(thrice, MODEL, "key")
    # A replica is the same training with another seed: seed 1 of seed 0 is seed 1 on its own.
    assert training_hash(thrice, MODEL, "key", seed=1) == training_hash(
        make_config(tmp_path, train__seed=1), MODEL, "key")


@pytest.mark.usefixtures("one_thread")
def test_two_seeds_are_trained_scored_and_summarised(tmp_path: Path) -> None:
    config = make_config(tmp_path, train__overrides={}, train__epochs=1, train__max_steps_per_epoch=2,
                         train__seeds=2, evaluate__latency_runs=3, evaluate__bootstrap_samples=50,
                         preprocess__workers=1)
    download.fn(config)
    validate.fn(config)
    preprocess.fn(config)

    train.fn(config, MODEL)
    replica = replica_dir(config, MODEL, config.train.seed + 1)
    assert (model_dir(config, MODEL) / "best.pt").is_file() and (replica / "best.pt").is_file()
    assert read_json(replica / "train.json")["status"] == "ok"
    assert read_train_summary(config, MODEL)["params"]["seed"] == config.train.seed
    assert read_json(replica / "train.json")["params"]["seed"] == config.train.seed + 1

    client = client_for(config)
    (run,) = client.search_runs([experiment_id(config, client)], "tags.stage = 'train'")
    assert "seed1_best_val_top1" in run.data.metrics and "best_val_top1" in run.data.metrics

    # Both trainings done with this configuration: neither is trained again.
    stamps = [(folder / "history.csv").stat().st_mtime_ns for folder in (model_dir(config, MODEL), replica)]
    train.fn(config, MODEL)
    assert [(folder / "history.csv").stat().st_mtime_ns for folder in (model_dir(config, MODEL), replica)] == stamps

    evaluate.fn(config, MODEL)
    seeds = read_seeds(config, MODEL)
    assert [entry["seed"] for entry in seeds] == [0, 1]
    assert all(set(entry) == {"seed", "top1", "top5", "macro_f1"} for entry in seeds)
    metrics = read_metrics(config, MODEL)
    assert seeds[0]["top1"] == metrics["top1"]
    assert metrics["n_seeds"] == 2 and math.isfinite(metrics["top1_seed_sd"])
    assert metrics["top1_seed_mean"] == pytest.approx((seeds[0]["top1"] + seeds[1]["top1"]) / 2)
    assert metrics["top1_seed_sd"] == pytest.approx(abs(seeds[0]["top1"] - seeds[1]["top1"]) / math.sqrt(2))


# --- the report ----------------------------------------------------------------------------------

SDS = {"resnet50": 0.008, "efficientnet_b0": 0.006, "mobilenet_v3_large": 0.004}


def test_report_shows_top1_over_seeds_and_compares_the_gap_with_the_spread(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_upstream_outputs(config)
    for model, sd in SDS.items():
        path = eval_dir(config, model) / "metrics.json"
        write_json(path, read_json(path) | {"n_seeds": 3, "top1_seed_mean": MODEL_SPECS[model]["top1"] - 0.001,
                                            "top1_seed_sd": sd})
    markdown = Path(report.fn(config)["report_md"]).read_text()

    header = next(line for line in markdown.splitlines() if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[2] == SEEDS_COLUMN
    row = next(line for line in markdown.splitlines() if line.startswith("| resnet50"))
    assert [c.strip() for c in row.strip("|").split("|")][2] == "81.9 ± 0.8 (3 seeds)"
    # resnet50 and efficientnet_b0 are 0.5 points apart, less than resnet50's 0.8-point sd.
    executive = markdown.split("## Executive summary")[1].split("\n## ")[0]
    assert "another seed could swap them" in executive
    summary = json.loads((config.paths.reports / "summary.json").read_text())
    assert summary["models"]["resnet50"]["top1_seed_sd"] == 0.008


def test_a_gap_wider_than_the_seed_spread_is_called_so() -> None:
    metrics = {
        "a": {"top1": 0.80, "n_seeds": 3, "top1_seed_mean": 0.80, "top1_seed_sd": 0.005},
        "b": {"top1": 0.70, "n_seeds": 3, "top1_seed_mean": 0.70, "top1_seed_sd": 0.01},
    }
    reason = recommend(metrics, latency_budget_ms=20.0, within_points=1.0).best_accuracy.reason
    assert "10.0 points apart in mean top-1, more than the seed-to-seed standard deviation" in reason
    once = {m: {"top1": v["top1"]} for m, v in metrics.items()}
    assert "seed" not in recommend(once, latency_budget_ms=20.0, within_points=1.0).best_accuracy.reason
