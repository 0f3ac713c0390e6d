"""Stage train[model]: fine-tune one ImageNet classifier on the cached photos, checkpoint, resume.

The engine (`make_trainer`, `train_step`, `fit`, ...) lives in food101/engine.py; this stage
wires it to the uint8 cache, the device feed, the checkpoint files and MLflow: a checkpoint each
epoch (atomic, with RNG states and a hash of the configuration), resume when the hash matches,
the best weights by validation top-1, per-epoch metrics, and a clear failure record.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NONE
from torch import nn

from food101.config import Config, TrainConfig
from food101.devices import training_slot
from food101.engine import (
    EpochEnd,
    TrainingDiverged,
    TrainingOutOfMemory,
    fit,
    make_trainer,
    scaled_lr,
    seed_everything,
)
from food101.io import atomic_path, read_json, write_json
from food101.models import build_model, normalization
from food101.tracking import Run, stage_run

if TYPE_CHECKING:
    from tasks.preprocess import Cache

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "lr", "images_per_s",
                   "epoch_time_s")
# pip requirements of the logged MLflow model, given so MLflow does not spend seconds inferring them.
MODEL_PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "torchvision"]


# --- the stage --------------------------------------------------------------------------------


def model_dir(config: Config, model: str) -> Path:
    return config.paths.models / model


def replica_seeds(recipe: TrainConfig) -> list[int]:
    """The seeds of the extra trainings `train.seeds` asks for: seed+1 ... seed+seeds-1 (none for 1)."""
    return [recipe.seed + k for k in range(1, recipe.seeds)]


def replica_dir(config: Config, model: str, seed: int) -> Path:
    """Where the extra training of `model` with `seed` keeps its files (best.pt, train.json, ...)."""
    return model_dir(config, model) / "seeds" / str(seed)


def training_hash(config: Config, model: str, data_key: str | None = None, seed: int | None = None) -> str:
    """What a checkpoint must match to be resumed: this model's recipe, the data and preprocessing.

    Only this model's recipe counts (not other models' overrides), so editing one model's
    settings does not restart the others. `seed` replaces the recipe's for a replica; the number
    of seeds is left out, so asking for more replicas keeps the trainings already done.
    """
    recipe = dataclasses.asdict(config.train.for_model(model))
    del recipe["seeds"]
    if seed is not None:
        recipe["seed"] = seed
    blob = {"model": model, "recipe": recipe, "data": config.raw.get("data"),
            "preprocess": config.raw.get("preprocess"), "data_key": data_key}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_params(recipe: TrainConfig) -> dict[str, Any]:
    params = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "overrides"}
    params["peak_lr"] = scaled_lr(recipe)
    return params


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file renamed into place: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def write_history(path: Path, history: list[dict[str, float]]) -> Path:
    columns = list(HISTORY_COLUMNS) + sorted({k for row in history for k in row} - set(HISTORY_COLUMNS))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path


def read_history(config: Config, model: str) -> pd.DataFrame:
    """history.csv of a trained model: one row per epoch."""
    return pd.read_csv(_required(model_dir(config, model) / "history.csv", model))


def read_train_summary(config: Config, model: str) -> dict[str, Any]:
    """train.json of a model (status ok or failed)."""
    return read_json(_required(model_dir(config, model) / "train.json", model))


def load_trained_model(config: Config, model: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The best checkpoint as a model in eval mode on `device`, and its metadata (classes, mean, std...)."""
    return load_best(_required(model_dir(config, model) / "best.pt", model), device)


def load_best(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A best.pt (the model's or a replica's) as a model in eval mode on `device`, and its metadata."""
    payload = load_checkpoint(path)
    state = payload.pop("state_dict")
    net = build_model(payload["arch"], payload["num_classes"], pretrained=False)
    net.load_state_dict(state)
    return net.to(device).eval(), payload


def _required(path: Path, model: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the train stage for {model} first "
                                f"(food101 stage train --model {model})")
    return path


def _use_gpu_cache(recipe: TrainConfig, device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda" or recipe.gpu_cache == "off":
        return False
    if recipe.gpu_cache == "on":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.4 * free  # leave most of the memory to activations


def _write_failure(out: Path, model: str, recipe: TrainConfig, device: torch.device, error: str,
                   config_hash: str) -> None:
    write_json(out / "train.json", {
        "model": model, "status": "failed", "error": error, "epochs_run": 0, "best_epoch": None,
        "best_val_top1": None, "train_time_s": None, "images_per_s": None, "device": str(device),
        "params": recipe_params(recipe), "pretrained": recipe.pretrained, "config_hash": config_hash,
    })


@dataclass(frozen=True)
class Training:
    """One training of a model: the primary one with `train.seed`, or a replica with another seed."""

    recipe: TrainConfig
    out: Path
    config_hash: str
    prefix: str = ""                 # MLflow metric and tag names of a replica: "seed1_best_val_top1"
    artifact_path: str | None = None  # where a replica's files go among the run's artifacts

    def is_done(self) -> bool:
        """True when this training already finished with the same configuration hash."""
        if not (self.out / "train.json").is_file() or not (self.out / "best.pt").is_file():
            return False
        done = read_json(self.out / "train.json")
        return done.get("status") == "ok" and done.get("config_hash") == self.config_hash


def trainings(config: Config, model: str, data_key: str | None) -> list[Training]:
    """The primary training of `model`, then one replica per extra seed (`train.seeds` > 1)."""
    recipe = config.train.for_model(model)
    primary = Training(recipe, model_dir(config, model), training_hash(config, model, data_key))
    replicas = [
        Training(dataclasses.replace(recipe, seed=seed), replica_dir(config, model, seed),
                 training_hash(config, model, data_key, seed=seed), f"seed{seed}_", f"seeds/{seed}")
        for seed in replica_seeds(recipe)
    ]
    return [primary, *replicas]


@task(name="train", cache_policy=NONE)
def train(config: Config, model: str, parent_run_id: str | None = None) -> dict:
    """Fine-tune one model on the cached training split, keeping the best epoch on validation.

    With `train.seeds` > 1 the same training runs again with the next seeds, into seeds/<seed>/.
    """
    from tasks.preprocess import open_cache

    cache = open_cache(config)
    primary, *replicas = trainings(config, model, cache.meta.get("key"))
    pending = []
    for training in (primary, *replicas):
        if training.is_done():
            log.info("%s: already trained with seed %d and this configuration (%s); not training again",
                     model, training.recipe.seed, training.config_hash)
        else:
            pending.append(training)
    if pending:
        with training_slot(config, model) as device, stage_run(
            config, "train", parent_run_id, model=model, params=recipe_params(primary.recipe), system_metrics=True
        ) as run:
            for training in pending:
                train_into(training, model, cache, device, run)
                if training is primary:
                    log_model_to_mlflow(run, config, model)
    return _result(read_train_summary(config, model), primary.out)


@contextlib.contextmanager
def _failure_recorded(out: Path, model: str, recipe: TrainConfig, device: torch.device,
                      config_hash: str) -> Iterator[None]:
    """Turn a diverged or out-of-memory training into a failed train.json, then re-raise it."""
    try:
        yield
    except TrainingDiverged as exc:
        _write_failure(out, model, recipe, device, str(exc), config_hash)
        raise
    except torch.OutOfMemoryError as exc:
        message = (f"{model}: out of memory on {device} at batch size {recipe.batch_size}, "
                   f"{recipe.image_size} px; lower train.overrides.{model}.batch_size "
                   f"(or set train.gpu_cache=off). {str(exc).splitlines()[0]}")
        _write_failure(out, model, recipe, device, message, config_hash)
        raise TrainingOutOfMemory(message) from exc


def train_into(training: Training, model: str, cache: Cache, device: torch.device, run: Run) -> dict[str, Any]:
    """Train `model` with `training.recipe` into `training.out`, resuming a checkpoint of the same
    hash; writes checkpoint.pt, best.pt, history.csv and train.json and returns the summary."""
    from food101.feed import BatchFeed

    recipe, out, config_hash, prefix = training.recipe, training.out, training.config_hash, training.prefix
    log.info("%s: training with seed %d into %s", model, recipe.seed, out)
    seed_everything(recipe.seed)
    num_classes = len(cache.classes)
    net = build_model(model, num_classes, recipe.pretrained)
    mean, std = normalization(model, recipe.pretrained)
    train_images, val_images = cache.images("train"), cache.images("val")
    eval_size = int(val_images.shape[1])
    gpu_resident = _use_gpu_cache(recipe, device, train_images.nbytes + val_images.nbytes)
    common = {"device": device, "mean": mean, "std": std, "seed": recipe.seed,
              "channels_last": recipe.channels_last, "gpu_resident": gpu_resident}

    resume = None
    if (out / "checkpoint.pt").is_file():
        saved = load_checkpoint(out / "checkpoint.pt")
        if saved.get("config_hash") == config_hash:
            log.info("%s: resuming from the checkpoint of epoch %d (config hash %s)", model,
                     saved["epoch"], config_hash)
            resume = saved
        else:
            log.info("%s: the checkpoint at %s is for another configuration; starting fresh",
                     model, out / "checkpoint.pt")
    run.set_tags({f"{prefix}config_hash": config_hash, f"{prefix}device": str(device),
                  f"{prefix}gpu_resident": gpu_resident,
                  f"{prefix}resumed_from_epoch": resume["epoch"] if resume else 0})
    best_meta = {"arch": model, "num_classes": num_classes, "image_size": eval_size,
                 "train_image_size": recipe.image_size, "mean": list(mean), "std": list(std),
                 "classes": list(cache.classes), "display": list(cache.display)}

    def on_epoch_end(end: EpochEnd) -> None:
        save_checkpoint(out / "checkpoint.pt", {**end.checkpoint, "config_hash": config_hash})
        if end.is_best:
            save_checkpoint(out / "best.pt", {"state_dict": end.best_state, **best_meta,
                                              "epoch": end.record["epoch"], "val_top1": end.record["val_top1"]})
        write_history(out / "history.csv", end.checkpoint["history"])
        run.log_metrics({f"{prefix}{k}": v for k, v in end.record.items() if k != "epoch"},
                        step=int(end.record["epoch"]))

    # From the first device allocation (a GPU-resident cache, the model) to the last epoch: a
    # diverged or out-of-memory training leaves a failed train.json that says what to do.
    with _failure_recorded(out, model, recipe, device, config_hash):
        train_feed = BatchFeed(train_images, cache.labels("train"), batch_size=recipe.batch_size, train=True,
                               image_size=recipe.image_size, min_scale=recipe.min_scale, **common)
        val_feed = BatchFeed(val_images, cache.labels("val"), batch_size=2 * recipe.batch_size, train=False,
                             image_size=eval_size, **common)
        steps = len(train_feed) if recipe.max_steps_per_epoch is None else min(len(train_feed),
                                                                               recipe.max_steps_per_epoch)
        trainer = make_trainer(net, recipe, device, steps, label=model)
        result = fit(trainer, train_feed, val_feed, recipe, steps_per_epoch=steps, resume=resume,
                     on_epoch_end=on_epoch_end)

    history = result.history
    summary = {
        "model": model, "status": "ok", "error": None, "epochs_run": len(history),
        "best_epoch": result.best_epoch, "best_val_top1": result.best_val_top1,
        "train_time_s": sum(row["epoch_time_s"] for row in history),
        # The median epoch: the first one carries cuDNN autotuning and compilation.
        "images_per_s": statistics.median(row["images_per_s"] for row in history) if history else None,
        "device": str(device), "params": recipe_params(recipe), "pretrained": recipe.pretrained,
        "config_hash": config_hash, "resumed_from_epoch": result.start_epoch - 1,
        "stopped_early": result.stopped_early,
    }
    write_json(out / "train.json", summary)
    write_history(out / "history.csv", history)
    run.log_metrics({f"{prefix}best_val_top1": result.best_val_top1, f"{prefix}best_epoch": result.best_epoch,
                     f"{prefix}train_time_s": summary["train_time_s"],
                     f"{prefix}train_images_per_s": summary["images_per_s"]})
    run.log_artifact(out / "history.csv", training.artifact_path)
    run.log_artifact(out / "train.json", training.artifact_path)
    return summary


def log_model_to_mlflow(run: Any, config: Config, model: str) -> float:
    """Save the best model in MLflow's pytorch flavour and attach it to the run; returns seconds.

    `save_model` + `log_artifacts` keeps to our explicit run id (the fluent `log_model` needs an
    active run, which Prefect's worker threads do not share); the pickle format needs no
    input example or torch.export pass, and explicit pip requirements skip their inference.
    """
    import mlflow.pytorch

    start = time.perf_counter()
    net, _ = load_trained_model(config, model)
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        target = Path(tmp) / "model"
        mlflow.pytorch.save_model(net, target, pip_requirements=MODEL_PIP_REQUIREMENTS,
                                  serialization_format="pickle")
        run.log_artifacts(target, "model")
    seconds = time.perf_counter() - start
    log.info("%s: logged the best model to MLflow in %.1f s", model, seconds)
    return seconds


def _result(summary: dict[str, Any], out: Path) -> dict:
    keys = ("model", "status", "epochs_run", "best_epoch", "best_val_top1", "train_time_s", "images_per_s",
            "device")
    return {**{k: summary.get(k) for k in keys}, "best_path": str(out / "best.pt"),
            "history_path": str(out / "history.csv")}

