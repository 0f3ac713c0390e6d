"""Stage train[model]: fine-tune one ImageNet classifier on the cached photos, checkpoint, resume.

The engine is a few plain functions: `make_optimizer`, `make_scheduler`, `train_step`,
`train_one_epoch`, `evaluate_batches` and `fit`, which takes a model and any re-iterable source of
(x, y) batches; the stage entry `train` wires them to the uint8 cache, the device feed, the
checkpoint files and MLflow.

Recipe (known-good fine-tuning practice, see params.yaml): SGD with Nesterov momentum (LR scaled
by batch/256) or AdamW; linear warm-up then cosine decay stepped per iteration; label smoothing;
no weight decay on norms and biases; a zero-initialised head; optional head-only first epochs;
model selection and early stopping on the validation split (never the test split).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NONE
from torch import nn
from tqdm.auto import tqdm

from food101.config import Config, TrainConfig
from food101.devices import training_slot
from food101.errors import Food101Error
from food101.io import atomic_path, read_json, write_json
from food101.models import build_model, classifier_head, normalization, parameter_groups
from food101.tracking import Run, stage_run

if TYPE_CHECKING:
    from tasks.preprocess import Cache

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "lr", "images_per_s",
                   "epoch_time_s")
# Reading the loss back from the GPU every step would stall the pipeline; check this often.
CHECK_EVERY = 20
# pip requirements of the logged MLflow model, given so MLflow does not spend seconds inferring them.
MODEL_PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "torchvision"]


class TrainingDiverged(Food101Error):
    """The training loss became NaN or infinite."""


class TrainingOutOfMemory(Food101Error):
    """The device ran out of memory during training."""


# --- the engine -------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What one training needs at every step. `model` is the module whose weights are saved;
    `forward` is the same module, possibly compiled."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    device: torch.device
    amp: bool
    channels_last: bool
    label: str = "model"


@dataclass
class EpochEnd:
    """Handed to `fit`'s `on_epoch_end` callback after each epoch."""

    record: dict[str, float]
    checkpoint: dict[str, Any]
    is_best: bool
    best_state: dict[str, torch.Tensor] | None


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_top1: float
    best_state: dict[str, torch.Tensor] | None
    start_epoch: int
    stopped_early: bool = False


def scaled_lr(recipe: TrainConfig) -> float:
    """The peak learning rate: params give SGD's for batch 256, scaled linearly; AdamW's as given."""
    return recipe.lr * recipe.batch_size / 256 if recipe.optimizer == "sgd" else recipe.lr


def make_optimizer(model: nn.Module, recipe: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over decay/no-decay groups; the fused kernels on CUDA."""
    groups = parameter_groups(model, recipe.weight_decay)
    fused = {"fused": True} if device.type == "cuda" else {}
    lr = scaled_lr(recipe)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, recipe: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine, stepped once per iteration (a per-epoch step jumps at epoch edges)."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _LrSchedule(warmup, total))


@dataclass
class _LrSchedule:
    # A picklable callable rather than a lambda, so the scheduler's state is plain data.
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)


def make_trainer(
    model: nn.Module, recipe: TrainConfig, device: torch.device, steps_per_epoch: int, label: str = "model"
) -> Trainer:
    """Put the model on the device in its training layout and build optimizer, schedule, loss."""
    channels_last = recipe.channels_last
    adapt_batchnorm_momentum(model, steps_per_epoch)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = make_optimizer(model, recipe, device)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    forward = model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if recipe.compile:
            forward = torch.compile(model)
    return Trainer(
        model=model, forward=forward, optimizer=optimizer, scheduler=scheduler,
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), device=device,
        # bf16 autocast on CUDA: same range as fp32, so no grad scaler (fp16 would need one).
        amp=device.type == "cuda", channels_last=channels_last, label=label,
    )


def adapt_batchnorm_momentum(model: nn.Module, steps_per_epoch: int) -> None:
    """Let BatchNorm running statistics follow the weights within one epoch.

    EfficientNet and MobileNetV3 use momentum 0.01 (an average over ~100 steps), tuned for long
    ImageNet runs. With few steps per epoch (a small dataset, the demo) the running statistics
    used at evaluation still describe the initial weights, and every prediction is the same
    class. Raising the momentum to 1/steps_per_epoch changes nothing for Food-101 (~270 steps).
    """
    floor = min(1.0, 1.0 / max(1, steps_per_epoch))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, floor)


def _to_device(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(trainer.device, non_blocking=True)
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op when the feed already did it
    return x, y.to(trainer.device, non_blocking=True)


def train_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns (loss, number correct) as device tensors (no sync)."""
    x, y = _to_device(trainer, x, y)
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
        logits = trainer.forward(x)
        loss = trainer.criterion(logits.float(), y)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def _check_finite(trainer: Trainer, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        lr = trainer.optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(
            f"{trainer.label}: the training loss became {float(loss_sum)} at epoch {epoch}, by step {step} "
            f"(learning rate {lr:.3g}). Lower train.lr or raise train.warmup_epochs for this model "
            f"(train.overrides.{trainer.label}.lr)."
        )


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the classifier head (head-only warm-up epochs)."""
    head = {id(p) for p in classifier_head(model)[1].parameters()}
    for param in model.parameters():
        param.requires_grad_(trainable or id(param) in head)


def train_one_epoch(
    trainer: Trainer, batches: Iterable, *, epoch: int, steps: int, desc: str = ""
) -> dict[str, float]:
    """Train over `steps` batches; returns train_loss, train_top1, images, train_time_s."""
    trainer.model.train()
    loss_sum = torch.zeros((), device=trainer.device)
    correct = torch.zeros((), device=trainer.device, dtype=torch.long)
    images = 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=None, leave=False, unit="batch")
    try:
        for step, (x, y) in enumerate(itertools.islice(batches, steps), start=1):
            loss, hits = train_step(trainer, x, y)
            loss_sum += loss * y.shape[0]
            correct += hits
            images += y.shape[0]
            if step % CHECK_EVERY == 0:
                _check_finite(trainer, loss_sum, epoch, step)
                bar.set_postfix(loss=f"{float(loss_sum) / images:.3f}", refresh=False)
            bar.update()
    finally:
        bar.close()
    if images == 0:
        raise ValueError(f"{trainer.label}: the training split gave no batches (is it empty?)")
    _check_finite(trainer, loss_sum, epoch, steps)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return {
        "train_loss": float(loss_sum) / images,
        "train_top1": float(correct) / images,
        "images": images,
        "train_time_s": time.perf_counter() - start,
    }


@torch.inference_mode()
def evaluate_batches(trainer: Trainer, batches: Iterable) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and top-1 over every batch."""
    trainer.model.eval()
    loss_sum = torch.zeros((), device=trainer.device)
    correct = torch.zeros((), device=trainer.device, dtype=torch.long)
    images = 0
    for x, y in batches:
        x, y = _to_device(trainer, x, y)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            logits = trainer.forward(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        images += y.shape[0]
    if images == 0:
        return {"val_loss": float("nan"), "val_top1": float("nan")}
    return {"val_loss": float(loss_sum) / images, "val_top1": float(correct) / images}


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain Python (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    trainer: Trainer,
    train_batches: Iterable,
    val_batches: Iterable,
    recipe: TrainConfig,
    *,
    steps_per_epoch: int,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
) -> FitResult:
    """Train for `recipe.epochs` epochs (from `resume`'s epoch + 1 when given).

    After each epoch: validation, the best weights kept (validation top-1), a checkpoint payload
    handed to `on_epoch_end` (which writes it), and early stopping after
    `recipe.early_stopping_patience` epochs without improvement (0 turns it off). Sources with a
    `set_epoch` method are told the epoch, so their shuffling and augmentation replay on resume.
    """
    history: list[dict[str, float]] = []
    best_epoch, best_val_top1, start_epoch = 0, -1.0, 1
    if resume is not None:
        trainer.model.load_state_dict(resume["model"])
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        history = [dict(row) for row in resume["history"]]
        best_epoch, best_val_top1 = resume["best_epoch"], resume["best_val_top1"]
        start_epoch = resume["epoch"] + 1
    result = FitResult(history, best_epoch, best_val_top1, None, start_epoch)
    for epoch in range(start_epoch, recipe.epochs + 1):
        if _patience_ran_out(recipe, epoch - 1, result.best_epoch):
            result.stopped_early = True
            log.info("%s: no validation improvement for %d epochs; stopping early after epoch %d",
                     trainer.label, recipe.early_stopping_patience, epoch - 1)
            break
        set_backbone_trainable(trainer.model, epoch > recipe.freeze_backbone_epochs)
        for source in (train_batches, val_batches):
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        start = time.perf_counter()
        desc = f"{trainer.label} {epoch}/{recipe.epochs}"
        trained = train_one_epoch(trainer, train_batches, epoch=epoch, steps=steps_per_epoch, desc=desc)
        validated = evaluate_batches(trainer, val_batches)
        if math.isinf(validated["val_loss"]) or (math.isnan(validated["val_loss"]) and trained["images"]
                                                  and _has_rows(val_batches)):
            raise TrainingDiverged(
                f"{trainer.label}: the validation loss became {validated['val_loss']} after epoch {epoch} "
                f"(training loss {trained['train_loss']:.3g}): the weights blew up. Lower train.lr or raise "
                f"train.warmup_epochs for this model (train.overrides.{trainer.label}.lr)."
            )
        record = {
            "epoch": epoch,
            "train_loss": trained["train_loss"],
            "train_top1": trained["train_top1"],
            **validated,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "images_per_s": trained["images"] / trained["train_time_s"],
            "epoch_time_s": time.perf_counter() - start,
        }
        if trainer.device.type == "cuda":
            record["gpu_memory_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        result.history.append(record)
        is_best = validated["val_top1"] > result.best_val_top1
        if is_best:
            result.best_epoch, result.best_val_top1 = epoch, validated["val_top1"]
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        log.info("%s epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f%s | lr %.3g | "
                 "%.0f img/s | %.1f s", trainer.label, epoch, recipe.epochs, record["train_loss"],
                 record["train_top1"], record["val_loss"], record["val_top1"], " (best)" if is_best else "",
                 record["lr"], record["images_per_s"], record["epoch_time_s"])
        if on_epoch_end is not None:
            checkpoint = {
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "epoch": epoch,
                "rng": rng_state(),
                "history": [dict(row) for row in result.history],
                "best_epoch": result.best_epoch,
                "best_val_top1": result.best_val_top1,
            }
            on_epoch_end(EpochEnd(record, checkpoint, is_best, result.best_state if is_best else None))
    return result


def _has_rows(source: Iterable) -> bool:
    """False only for a source known to be empty (an empty validation split gives NaN by design)."""
    return not hasattr(source, "__len__") or len(source) > 0


def _patience_ran_out(recipe: TrainConfig, last_epoch: int, best_epoch: int) -> bool:
    patience = recipe.early_stopping_patience
    return patience > 0 and last_epoch > 0 and last_epoch - best_epoch >= patience


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
    train_feed = BatchFeed(train_images, cache.labels("train"), batch_size=recipe.batch_size, train=True,
                           image_size=recipe.image_size, min_scale=recipe.min_scale, **common)
    val_feed = BatchFeed(val_images, cache.labels("val"), batch_size=2 * recipe.batch_size, train=False,
                         image_size=eval_size, **common)
    steps = len(train_feed) if recipe.max_steps_per_epoch is None else min(len(train_feed),
                                                                           recipe.max_steps_per_epoch)
    trainer = make_trainer(net, recipe, device, steps, label=model)

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

    try:
        result = fit(trainer, train_feed, val_feed, recipe, steps_per_epoch=steps, resume=resume,
                     on_epoch_end=on_epoch_end)
    except TrainingDiverged as exc:
        _write_failure(out, model, recipe, device, str(exc), config_hash)
        raise
    except torch.OutOfMemoryError as exc:
        message = (f"{model}: out of memory on {device} at batch size {recipe.batch_size}, "
                   f"{recipe.image_size} px; lower train.overrides.{model}.batch_size "
                   f"(or set train.gpu_cache=off). {str(exc).splitlines()[0]}")
        _write_failure(out, model, recipe, device, message, config_hash)
        raise TrainingOutOfMemory(message) from exc

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

