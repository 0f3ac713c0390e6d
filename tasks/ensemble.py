"""ensemble: score each ensemble of `ensembles:` from its members' saved probabilities.

Runs after every evaluate[model] and before confusion. Nothing is trained or run again: the
members' probs.npy (test) are combined by food101/ensembles.py, and with method `weighted` the
weights are fit on their val_probs.npy against the cache's validation labels, never on test.
Each ensemble gets an evaluation folder like a model's (`paths.eval/<ensemble>/`: metrics.json
with the same keys, per_class.csv, confusion counts, predictions.parquet, probs.npy), plus
ensemble.json (members, method, weights, the rows the weights were fit on), so the confusion
stage, the report, the history and the recommendations treat it as one more model. Its latency
is the sum of its members' batch-1 latencies: the members run one after the other.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from food101 import ensembles
from food101.config import Config, EnsembleConfig
from food101.errors import Food101Error
from food101.io import read_json, write_json
from food101.tracking import stage_run
from tasks.evaluate import (
    METRIC_KEYS,
    PROBS_FILE,
    eval_dir,
    read_metrics,
    read_predictions,
    read_probs,
    score,
    write_evaluation,
)
from tasks.preprocess import open_cache

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.json"
RECORD_SUFFIX = "-ensembles.json"  # beside paths.eval: the stage's one output DVC can order on


class EnsembleInputError(Food101Error):
    """Members' saved outputs do not fit together or with the cache."""


def record_path(config: Config) -> Path:
    """What the stage scored and skipped, beside (not inside) paths.eval: DVC refuses an output
    inside a stage's own dependency, and confusion and report must run after this stage."""
    return config.paths.eval.with_name(config.paths.eval.name + RECORD_SUFFIX)


def ensemble_names(config: Config) -> list[str]:
    return [e.name for e in config.ensembles]


def read_ensemble(config: Config, name: str) -> dict[str, Any]:
    """ensemble.json: members, method, weights and the rows they were fit on."""
    return read_json(eval_dir(config, name) / ENSEMBLE_FILE)


def evaluate_ensemble(config: Config, spec: EnsembleConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Combine the members' probabilities, score them like a model, write the evaluation folder."""
    settings = config.evaluate
    params = {"members": spec.members, "method": spec.method}
    with stage_run(config, "ensemble", parent_run_id, model=spec.name, params=params) as run:
        cache = open_cache(config)
        classes, display = list(cache.classes), list(cache.display) or list(cache.classes)
        labels = np.asarray(cache.labels("test"), dtype=np.int64)
        index = cache.index
        paths = index[index["split"] == "test"].sort_values("position")["path"].astype(str).tolist()
        test_probs = []
        for member in spec.members:
            probs = read_probs(config, member, "test")
            predicted = read_predictions(config, member)
            if probs.shape != (len(labels), len(classes)) or predicted["path"].astype(str).tolist() != paths:
                raise EnsembleInputError(
                    f"ensemble {spec.name}: {member}'s {PROBS_FILE} does not match the cache's test split "
                    f"({probs.shape} vs {len(labels)} photos x {len(classes)} classes); evaluate it again "
                    f"(food101 stage evaluate --model {member})")
            test_probs.append(probs)
        if spec.method == "weighted":
            val_labels = np.asarray(cache.labels("val"), dtype=np.int64)
            fit = ensembles.fit_weights([read_probs(config, m, "val") for m in spec.members], val_labels)
        else:
            fit = ensembles.equal_weights(len(spec.members))
        probs = ensembles.combine(test_probs, fit.weights)
        scores = score(probs, labels, settings)
        member_metrics = [read_metrics(config, m) for m in spec.members]
        values: dict[str, Any] = {
            "model": spec.name, **scores.metrics, **ensembles.cost_figures(member_metrics),
            "train_images_per_s": None, "n_seeds": 1, "top1_seed_mean": scores.metrics["top1"],
            "top1_seed_sd": None, "machine_state": ensembles.busiest_state(member_metrics),
        }
        values = {key: values.get(key) for key in METRIC_KEYS}
        record = {"name": spec.name, "members": list(spec.members), "method": spec.method,
                  "weights": [float(w) for w in fit.weights], "weights_fit_on": fit.split,
                  "weights_fit_rows": fit.rows, "val_log_loss": fit.val_log_loss,
                  "latency_rule": "sum of the members' batch-1 latencies (members run one after the other)"}
        final = write_evaluation(
            eval_dir(config, spec.name), values, scores, paths, labels, classes, display,
            f"{spec.name} ({' + '.join(spec.members)}): reliability on {len(labels)} test photos",
            arrays={PROBS_FILE: probs.astype(np.float32)})
        write_json(final / ENSEMBLE_FILE, record)
        run.set_tags({"ensemble_members": ",".join(spec.members), "ensemble_method": spec.method})
        run.log_params({"weights": record["weights"], "weights_fit_rows": fit.rows})
        run.log_metrics({k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None})
        run.log_artifacts(final, "eval")
        log.info("ensemble %s (%s, %s): top-1 %.4f [%.4f, %.4f], weights %s", spec.name, " + ".join(spec.members),
                 spec.method, values["top1"], values["top1_ci_low"], values["top1_ci_high"],
                 ", ".join(f"{w:.2f}" for w in fit.weights))
        return {"model": spec.name, "eval_dir": str(final), "n_test": values["n_test"], "top1": values["top1"],
                "top5": values["top5"], "macro_f1": values["macro_f1"], "ece": values["ece"],
                "latency_cpu_p50_ms": values["latency_cpu_p50_ms"], "weights": record["weights"]}


@task(name="ensemble", cache_policy=NONE)
def ensemble(config: Config, models: list[str] | None = None, parent_run_id: str | None = None) -> dict:
    """Score every ensemble whose members were all evaluated; the others are listed as skipped."""
    evaluated = list(models if models is not None else config.models)
    done: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    params = {"ensembles": [dataclasses.asdict(e) for e in config.ensembles]}
    with stage_run(config, "ensemble", parent_run_id, params=params) as run:  # one per stage, as the others
        for spec in config.ensembles:
            missing = [m for m in spec.members if m not in evaluated]
            if missing:
                skipped[spec.name] = f"members not evaluated: {', '.join(missing)}"
                log.error("ensemble %s is out of this benchmark: %s", spec.name, skipped[spec.name])
                continue
            done[spec.name] = evaluate_ensemble(config, spec, parent_run_id)
        result = {"ensembles": done, "skipped": skipped}
        run.log_metrics({"ensembles_scored": len(done), "ensembles_skipped": len(skipped)})
        run.log_artifact(write_json(record_path(config), result))
    return result
