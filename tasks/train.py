"""Stage train[model]: fine-tune one ImageNet classifier on the cached photos, checkpoint, resume.

The engine (`make_trainer`, `train_step`, `fit`, ...) lives in food101/engine.py; this stage
wires it to the uint8 cache, the device feed, the checkpoint files and MLflow: a checkpoint each
epoch (atomic, with the training's generator state, the best weights' identity and a hash of the
configuration), resume when the hash matches, the best weights by validation top-1, per-epoch
metrics, and a clear failure record.

Every best.pt and checkpoint.pt is checked when read against the sha256 recorded in files.json
when it was written. best.pt is written before the checkpoint that names it, so a kill between
the two leaves a checkpoint whose best weights best.pt may not hold; the re-run then rebuilds
best.pt from the checkpoint (which carries the best weights). A damaged checkpoint is deleted
and the model trained again from the start.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import statistics
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
    checkpoint_best_state,
    fit,
    make_trainer,
    scaled_lr,
)
from food101.errors import Food101Error
from food101.io import atomic_path, read_json, require_free_space, write_bytes, write_json
from food101.models import build_model, model_from_state, normalization
from food101.tracking import Run, stage_run

if TYPE_CHECKING:
    from tasks.preprocess import Cache

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "lr", "images_per_s",
                   "epoch_time_s")
# Bumped when what a checkpoint holds or how a training draws its randomness changes: older
# checkpoints are then not resumed.
CHECKPOINT_FORMAT = 2
# sha256 and size of each checkpoint file, recorded when it is written.
RECORDS_FILE = "files.json"
# Recipe fields that do not change the trained weights (how many replicas, where the images live).
NOT_IN_HASH = ("seeds", "gpu_cache")
# What identifies the data when the cache's key is not given: everything but how it was fetched.
DATA_OPERATIONAL = ("download_retries", "min_free_gb")


class DamagedCheckpoint(Food101Error):
    """A best.pt or checkpoint.pt is not the file the train stage wrote."""


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
    """What a checkpoint must match to be resumed: what changes the trained weights.

    That is this model's recipe (not other models' overrides, not the number of seeds: asking
    for more replicas keeps the trainings already done), the data (the cache's key, which hashes
    every photo used and the preprocessing; the data settings when no key is given) and the
    preprocessing that shapes the pixels. How the data was fetched or how many workers decoded it
    does not count. `seed` replaces the recipe's for a replica.
    """
    recipe = dataclasses.asdict(config.train.for_model(model))
    for field in NOT_IN_HASH:
        recipe.pop(field, None)
    if seed is not None:
        recipe["seed"] = seed
    params = config.preprocess
    data = data_key if data_key is not None else {
        k: v for k, v in dataclasses.asdict(config.data).items() if k not in DATA_OPERATIONAL}
    blob = {"format": CHECKPOINT_FORMAT, "model": model, "recipe": recipe, "data": data,
            "preprocess": {"resize": params.resize, "crop": params.crop, "val_fraction": params.val_fraction,
                           "seed": params.seed}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_params(recipe: TrainConfig) -> dict[str, Any]:
    params = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "overrides"}
    params["peak_lr"] = scaled_lr(recipe)
    return params


def save_checkpoint(path: Path, payload: dict[str, Any]) -> str:
    """torch.save to a temporary file renamed into place, its sha256 and size recorded in
    files.json first; returns the sha256.

    The record keeps the previous file's digest too until the next write, so a kill between the
    record and the rename leaves the old file, which still matches.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    records = _read_records(path.parent)
    previous = records.get(path.name)
    records[path.name] = {**digest, "previous": {k: previous[k] for k in digest} if previous else None}
    write_json(path.parent / RECORDS_FILE, records)
    write_bytes(path, data)
    return digest["sha256"]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_intact(path: Path) -> bool:
    """True when `path` is a file the train stage wrote, unchanged: its size and sha256 are the
    ones recorded in files.json at write time."""
    record = _read_records(path.parent).get(path.name)
    if record is None or not path.is_file():
        return False
    accepted = [entry for entry in (record, record.get("previous")) if entry]
    size = path.stat().st_size
    if all(entry["size"] != size for entry in accepted):
        return False
    sha = file_sha256(path)
    return any(entry["sha256"] == sha and entry["size"] == size for entry in accepted)


def _read_records(folder: Path) -> dict[str, Any]:
    path = folder / RECORDS_FILE
    if not path.is_file():
        return {}
    try:
        records = read_json(path)
    except json.JSONDecodeError:
        log.warning("%s is damaged; the checkpoints it vouched for are not trusted", path)
        return {}
    return records if isinstance(records, dict) else {}


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
    """A best.pt (the model's or a replica's) as a model in eval mode on `device`, and its metadata.

    The file must be the one the train stage wrote (sha256 recorded in files.json); the model is
    built without drawing random numbers, so loading it beside a training changes nothing there.
    """
    if not is_intact(path):
        raise DamagedCheckpoint(
            f"{path} is not the file the train stage wrote (damaged, cut short or replaced: its sha256 does "
            f"not match {path.parent / RECORDS_FILE}). Run the train stage again "
            f"(food101 stage train --model {path.parent.name}), which rebuilds it.")
    payload = load_checkpoint(path)
    state = payload.pop("state_dict")
    net = model_from_state(payload["arch"], payload["num_classes"], state)
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
        """True when this training already finished with the same configuration hash and its
        best.pt is intact (a damaged one is rebuilt by training again, from the checkpoint)."""
        if not (self.out / "train.json").is_file():
            return False
        done = read_json(self.out / "train.json")
        if done.get("status") != "ok" or done.get("config_hash") != self.config_hash:
            return False
        if not is_intact(self.out / "best.pt"):
            log.warning("%s is missing or not the file the train stage wrote; training again from the "
                        "checkpoint to rebuild it", self.out / "best.pt")
            return False
        return True


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
                    # The weights as a state dict (torch.load(weights_only=True)), never a pickled model;
                    # the export stage logs the loadable MLflow model (ONNX flavour).
                    run.log_artifact(training.out / "best.pt")
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
    num_classes = len(cache.classes)
    net = build_model(model, num_classes, recipe.pretrained, seed=recipe.seed)
    # The checkpoint (weights and optimizer state) and best.pt, before the first epoch's writes.
    state_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    require_free_space(out, 3 * state_bytes, f"{model}'s checkpoints")
    mean, std = normalization(model, recipe.pretrained)
    train_images, val_images = cache.images("train"), cache.images("val")
    eval_size = int(val_images.shape[1])
    gpu_resident = _use_gpu_cache(recipe, device, train_images.nbytes + val_images.nbytes)
    common = {"device": device, "mean": mean, "std": std, "seed": recipe.seed,
              "channels_last": recipe.channels_last, "gpu_resident": gpu_resident}

    best_meta = {"arch": model, "num_classes": num_classes, "image_size": eval_size,
                 "train_image_size": recipe.image_size, "mean": list(mean), "std": list(std),
                 "classes": list(cache.classes), "display": list(cache.display)}
    resume = _resumable(out, model, config_hash)
    best_sha256 = None
    if resume is not None and resume["best_epoch"] >= 1:
        best_sha256 = _settled_best(out, resume, best_meta, model)
        if best_sha256 is None:
            resume = None
    run.set_tags({f"{prefix}config_hash": config_hash, f"{prefix}device": str(device),
                  f"{prefix}gpu_resident": gpu_resident,
                  f"{prefix}resumed_from_epoch": resume["epoch"] if resume else 0})

    def on_epoch_end(end: EpochEnd) -> None:
        nonlocal best_sha256
        # best.pt first: the checkpoint then names a best.pt that is already on disk.
        if end.is_best:
            best_sha256 = save_checkpoint(out / "best.pt", _best_payload(end.best_state, best_meta,
                                                                         end.checkpoint))
        save_checkpoint(out / "checkpoint.pt", {**end.checkpoint, "config_hash": config_hash,
                                                "best_sha256": best_sha256})
        write_history(out / "history.csv", end.checkpoint["history"])
        run.log_metrics({f"{prefix}{k}": v for k, v in end.record.items() if k != "epoch"},
                        step=int(end.record["epoch"]))

    # From the first device allocation (a GPU-resident cache, the model) to the last epoch: a
    # diverged or out-of-memory training leaves a failed train.json that says what to do.
    with _failure_recorded(out, model, recipe, device, config_hash):
        train_feed = BatchFeed(train_images, cache.labels("train"), batch_size=recipe.batch_size, train=True,
                               image_size=recipe.image_size, min_scale=recipe.min_scale,
                               color_jitter=recipe.color_jitter, **common)
        val_feed = BatchFeed(val_images, cache.labels("val"), batch_size=2 * recipe.batch_size, train=False,
                             image_size=eval_size, **common)
        steps = len(train_feed) if recipe.max_steps_per_epoch is None else min(len(train_feed),
                                                                               recipe.max_steps_per_epoch)
        # head_init=probe: the train split as evaluation sees it (centre crops, no augmentation).
        probe_feed = BatchFeed(train_images, cache.labels("train"), batch_size=2 * recipe.batch_size, train=False,
                               image_size=eval_size, **common) if recipe.head_init == "probe" else None
        trainer = make_trainer(net, recipe, device, steps, label=model)
        result = fit(trainer, train_feed, val_feed, recipe, steps_per_epoch=steps, resume=resume,
                     on_epoch_end=on_epoch_end, probe_batches=probe_feed)

    history = result.history
    summary = {
        "model": model, "status": "ok", "error": None, "epochs_run": len(history),
        "best_epoch": result.best_epoch, "best_val_top1": result.best_val_top1,
        "train_time_s": sum(row["epoch_time_s"] for row in history),
        # The median epoch: the first one carries cuDNN autotuning and compilation.
        "images_per_s": statistics.median(row["images_per_s"] for row in history) if history else None,
        "device": str(device), "params": recipe_params(recipe), "pretrained": recipe.pretrained,
        "config_hash": config_hash, "resumed_from_epoch": result.start_epoch - 1,
        "stopped_early": result.stopped_early, "head_probe": result.probe,
    }
    write_json(out / "train.json", summary)
    write_history(out / "history.csv", history)
    run.log_metrics({f"{prefix}best_val_top1": result.best_val_top1, f"{prefix}best_epoch": result.best_epoch,
                     f"{prefix}train_time_s": summary["train_time_s"],
                     f"{prefix}train_images_per_s": summary["images_per_s"],
                     **{f"{prefix}head_{k}": v for k, v in (result.probe or {}).items() if v is not None}})
    run.log_artifact(out / "history.csv", training.artifact_path)
    run.log_artifact(out / "train.json", training.artifact_path)
    return summary


def _best_payload(state: dict[str, torch.Tensor], meta: dict[str, Any], checkpoint: dict[str, Any]) -> dict:
    best = checkpoint["history"][checkpoint["best_epoch"] - 1]
    return {"state_dict": state, **meta, "epoch": checkpoint["best_epoch"], "val_top1": best["val_top1"]}


def _resumable(out: Path, model: str, config_hash: str) -> dict[str, Any] | None:
    """The checkpoint to resume from: intact and of this configuration; None to start fresh."""
    path = out / "checkpoint.pt"
    if not path.is_file():
        return None
    if not is_intact(path):
        log.warning("%s: %s is not the file the train stage wrote (damaged or cut short); deleting it and "
                    "training from the start", model, path)
        path.unlink()
        return None
    saved = load_checkpoint(path)
    if saved.get("config_hash") != config_hash:
        log.info("%s: the checkpoint at %s is for another configuration; starting fresh", model, path)
        return None
    log.info("%s: resuming from the checkpoint of epoch %d (config hash %s)", model, saved["epoch"], config_hash)
    return saved


def _settled_best(out: Path, checkpoint: dict[str, Any], meta: dict[str, Any], model: str) -> str | None:
    """Make best.pt hold the best weights `checkpoint` names, rebuilding it from the checkpoint's
    copy when it does not (killed between the two writes, or damaged); returns its sha256, or None
    when it cannot be rebuilt."""
    path = out / "best.pt"
    if is_intact(path) and file_sha256(path) == checkpoint.get("best_sha256"):
        return checkpoint["best_sha256"]
    state = checkpoint_best_state(checkpoint)
    if state is None:
        log.warning("%s: %s does not hold the best epoch %d and the checkpoint has no copy of it; training "
                    "from the start", model, path, checkpoint["best_epoch"])
        return None
    sha256 = save_checkpoint(path, _best_payload(state, meta, checkpoint))
    log.warning("%s: %s did not hold the best epoch %d that the checkpoint names (a run killed between the two "
                "writes, or a damaged file); rebuilt it from the checkpoint", model, path, checkpoint["best_epoch"])
    return sha256


def _result(summary: dict[str, Any], out: Path) -> dict:
    keys = ("model", "status", "epochs_run", "best_epoch", "best_val_top1", "train_time_s", "images_per_s",
            "device")
    return {**{k: summary.get(k) for k in keys}, "best_path": str(out / "best.pt"),
            "history_path": str(out / "history.csv")}

