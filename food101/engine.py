"""The training engine: optimizer, schedule, one step, one epoch, validation, `fit` with resume.

Plain functions over a model and any re-iterable source of (x, y) batches, with no files, no
MLflow and no Prefect: the train stage (tasks/train.py) wires them to the uint8 cache, the
device feed, checkpoints and tracking, and the benchmarks time them as they are.

Recipe (known-good fine-tuning practice, see params.yaml): SGD with Nesterov momentum (LR scaled
by batch/256) or AdamW; linear warm-up then cosine decay stepped per iteration; label smoothing;
no weight decay on norms and biases; a zero-initialised head; optional head-only first epochs;
model selection and early stopping on the validation split (never the test split). On CUDA:
bf16 autocast, channels_last, fused optimizer, cuDNN benchmark, optional torch.compile.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from food101.config import TrainConfig
from food101.devices import synchronize
from food101.errors import Food101Error
from food101.linear_probe import init_head_from_probe
from food101.models import DROPOUT_STREAM, classifier_head, draw_dropout_from, parameter_groups, stream_seed

log = logging.getLogger(__name__)

# Reading the loss back from the GPU every step would stall the pipeline; check this often.
CHECK_EVERY = 20


class TrainingDiverged(Food101Error):
    """The training loss became NaN or infinite."""


class TrainingOutOfMemory(Food101Error):
    """The device ran out of memory during training."""


@dataclass
class Trainer:
    """What one training needs at every step. `model` is the module whose weights are saved;
    `forward` is the same module, possibly compiled. `generator` is the only source of randomness
    inside the model (dropout, stochastic depth): torch's process-wide generator is shared by
    every thread of the flow."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    device: torch.device
    amp: bool
    channels_last: bool
    generator: torch.Generator
    label: str = "model"
    hold_batchnorm: bool = False  # every BatchNorm layer in eval mode while training (recipe.frozen_batchnorm)
    ema: AveragedModel | None = None  # recipe.ema_half_life_epochs > 0: validated, kept and saved instead of `model`


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
    probe: dict[str, float | None] | None = None  # head_init=probe: the probe's penalty and accuracy


def scaled_lr(recipe: TrainConfig) -> float:
    """The peak learning rate: params give SGD's for batch 256, scaled linearly; AdamW's as given."""
    return recipe.lr * recipe.batch_size / 256 if recipe.optimizer == "sgd" else recipe.lr


def make_optimizer(model: nn.Module, recipe: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over decay/no-decay groups, each split into the head (at the peak
    LR) and the backbone (at `backbone_lr_scale` times it, so the new head's first large steps do
    not distort the pretrained features); the fused kernels on CUDA.

    With `backbone_lr_decay` < 1 the backbone is cut by depth into LR_DECAY_DEPTHS groups, the
    first (the input's) at `backbone_lr_decay` times the last's LR, geometric between."""
    lr = scaled_lr(recipe)
    head = {id(p) for p in classifier_head(model)[1].parameters()}
    depth = backbone_depths(model, head) if recipe.backbone_lr_decay < 1.0 else {}
    levels = LR_DECAY_DEPTHS if depth else 1
    groups = []
    for group in parameter_groups(model, recipe.weight_decay):
        in_head = [p for p in group["params"] if id(p) in head]
        if in_head:
            groups.append({**group, "params": in_head, "lr": lr, "backbone": False})
        for level in range(levels):
            params = [p for p in group["params"] if id(p) not in head and depth.get(id(p), 0) == level]
            # The last (deepest) level at backbone_lr_scale, the first at backbone_lr_decay times that.
            scale = recipe.backbone_lr_scale * recipe.backbone_lr_decay ** ((levels - 1 - level) / max(1, levels - 1))
            if params:
                groups.append({**group, "params": params, "lr": lr * scale, "backbone": True})
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


LR_DECAY_DEPTHS = 8  # backbone_lr_decay's groups: enough for a smooth decay, few for the optimizer


def backbone_depths(model: nn.Module, head: set[int]) -> dict[int, int]:
    """Each backbone parameter's depth group, 0 (input side) to LR_DECAY_DEPTHS - 1: its place in
    `model.parameters()`, which every torchvision and timm family lists from the stem to the head,
    cut into equal runs of parameter tensors."""
    backbone = [p for p in model.parameters() if id(p) not in head]
    return {id(p): index * LR_DECAY_DEPTHS // len(backbone) for index, p in enumerate(backbone)}


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_step: int = 0) -> float:
    """0 before `start_step`, then a linear warm-up from ~0 to 1 over `warmup_steps`, then cosine
    decay to 0 at `total_steps`."""
    if step < start_step:
        return 0.0
    step, total_steps = step - start_step, total_steps - start_step
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, recipe: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine, stepped once per iteration (a per-epoch step jumps at epoch edges).

    The head's groups warm up from the first step. The backbone's warm up from the step it
    unfreezes (after `freeze_backbone_epochs`): starting it mid-schedule at nearly the peak LR
    undid what the head-only epochs had learned (benchmarks/RECIPE.md)."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    unfreeze = min(total, recipe.freeze_backbone_epochs * steps_per_epoch)
    schedules = [_LrSchedule(warmup, total, unfreeze if group.get("backbone") else 0)
                 for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


@dataclass
class _LrSchedule:
    # A picklable callable rather than a lambda, so the scheduler's state is plain data.
    warmup_steps: int
    total_steps: int
    start_step: int = 0

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.start_step)


def make_trainer(
    model: nn.Module, recipe: TrainConfig, device: torch.device, steps_per_epoch: int, label: str = "model"
) -> Trainer:
    """Put the model on the device in its training layout and build optimizer, schedule, loss."""
    channels_last = recipe.channels_last
    adapt_batchnorm_momentum(model, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(stream_seed(recipe.seed, DROPOUT_STREAM))
    draw_dropout_from(model, generator)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = make_optimizer(model, recipe, device)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    ema = make_ema(model, recipe, steps_per_epoch)
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
        amp=device.type == "cuda", channels_last=channels_last, generator=generator, label=label,
        hold_batchnorm=recipe.frozen_batchnorm, ema=ema,
    )


def ema_decay(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose weight on a step halves after `half_life_epochs` epochs."""
    return 0.5 ** (1.0 / max(1.0, half_life_epochs * steps_per_epoch))


def make_ema(model: nn.Module, recipe: TrainConfig, steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of the weights (torch's AveragedModel), or None when
    `ema_half_life_epochs` is 0. Buffers are copied, not averaged: BatchNorm statistics follow the
    trained network (or stay the pretrained ones with frozen_batchnorm)."""
    if recipe.ema_half_life_epochs <= 0:
        return None
    decay = ema_decay(recipe.ema_half_life_epochs, steps_per_epoch)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.module.requires_grad_(False)
    return ema


def evaluated_model(trainer: Trainer) -> nn.Module:
    """The network validation scores and best.pt keeps: the moving average when there is one."""
    return trainer.model if trainer.ema is None else trainer.ema.module


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
    if trainer.ema is not None:
        trainer.ema.update_parameters(trainer.model)
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


def hold_frozen_batchnorm(model: nn.Module, every_layer: bool = False) -> None:
    """BatchNorm layers whose parameters are frozen (head-only epochs), or every one with
    `every_layer`, run in eval mode, so their running statistics stay the pretrained ones: at small
    batch, statistics drift alone moves the features (EfficientNet-Lite0 on real photos: a linear
    probe loses 12 points after one epoch; see benchmarks/RECIPE.md)."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        frozen = every_layer or (params and not any(p.requires_grad for p in params))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
            module.eval()


def train_one_epoch(
    trainer: Trainer, batches: Iterable, *, epoch: int, steps: int, desc: str = ""
) -> dict[str, float]:
    """Train over `steps` batches; returns train_loss, train_top1, images, train_time_s."""
    trainer.model.train()
    hold_frozen_batchnorm(trainer.model, every_layer=trainer.hold_batchnorm)
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
    synchronize(trainer.device)
    return {
        "train_loss": float(loss_sum) / images,
        "train_top1": float(correct) / images,
        "images": images,
        "train_time_s": time.perf_counter() - start,
    }


@torch.inference_mode()
def evaluate_batches(trainer: Trainer, batches: Iterable) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and top-1 over every batch, of the moving average
    of the weights when the recipe keeps one."""
    model = evaluated_model(trainer)
    model.eval()
    forward = trainer.forward if model is trainer.model else model
    loss_sum = torch.zeros((), device=trainer.device)
    correct = torch.zeros((), device=trainer.device, dtype=torch.long)
    images = 0
    for x, y in batches:
        x, y = _to_device(trainer, x, y)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            logits = forward(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        images += y.shape[0]
    if images == 0:
        return {"val_loss": float("nan"), "val_top1": float("nan")}
    return {"val_loss": float(loss_sum) / images, "val_top1": float(correct) / images}


def rng_state(trainer: Trainer) -> dict[str, Any]:
    """The training's generator state (a tensor: loadable with weights_only)."""
    return {"generator": trainer.generator.get_state()}


def set_rng_state(trainer: Trainer, state: dict[str, Any]) -> None:
    trainer.generator.set_state(state["generator"])


def fit(
    trainer: Trainer,
    train_batches: Iterable,
    val_batches: Iterable,
    recipe: TrainConfig,
    *,
    steps_per_epoch: int,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    probe_batches: Iterable | None = None,
) -> FitResult:
    """Train for `recipe.epochs` epochs (from `resume`'s epoch + 1 when given).

    After each epoch: validation, the best weights kept (validation top-1), a checkpoint payload
    handed to `on_epoch_end` (which writes it), and early stopping after
    `recipe.early_stopping_patience` epochs without improvement (0 turns it off). Sources with a
    `set_epoch` method are told the epoch, so their shuffling and augmentation replay on resume.

    With `recipe.head_init == "probe"` a fresh run first fits the head as a linear probe on the
    frozen features of `probe_batches` (the train split without augmentation; penalty chosen on
    `val_batches`), then fine-tunes from there (food101/linear_probe.py).
    """
    history: list[dict[str, float]] = []
    best_epoch, best_val_top1, start_epoch = 0, -1.0, 1
    if resume is not None:
        trainer.model.load_state_dict(resume["model"])
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(trainer, resume["rng"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(resume["ema"])
        history = [dict(row) for row in resume["history"]]
        best_epoch, best_val_top1 = resume["best_epoch"], resume["best_val_top1"]
        start_epoch = resume["epoch"] + 1
    result = FitResult(history, best_epoch, best_val_top1, checkpoint_best_state(resume) if resume else None,
                       start_epoch)
    if resume is None and recipe.head_init == "probe":
        result.probe = _start_head_from_probe(trainer, probe_batches, val_batches)
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
        if math.isinf(validated["val_loss"]) or (math.isnan(validated["val_loss"]) and _has_rows(val_batches)):
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
            result.best_state = {k: v.detach().to("cpu", copy=True)
                                 for k, v in evaluated_model(trainer).state_dict().items()}
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
                "rng": rng_state(trainer),
                "ema": None if trainer.ema is None else trainer.ema.state_dict(),
                "history": [dict(row) for row in result.history],
                "best_epoch": result.best_epoch,
                "best_val_top1": result.best_val_top1,
                # The best weights travel with the checkpoint (a copy only when they are not "model"),
                # so a lost or stale best.pt can be rebuilt from it.
                "best_state": None if result.best_epoch == epoch else result.best_state,
            }
            on_epoch_end(EpochEnd(record, checkpoint, is_best, result.best_state if is_best else None))
    return result


def _start_head_from_probe(trainer: Trainer, probe_batches: Iterable | None,
                           val_batches: Iterable) -> dict[str, float | None]:
    if probe_batches is None:
        raise ValueError(f"{trainer.label}: train.head_init=probe needs the train split without augmentation "
                         "(fit's probe_batches)")
    start = time.perf_counter()
    num_classes = classifier_head(trainer.model)[1].weight.shape[0]
    probe = init_head_from_probe(trainer.model, probe_batches, val_batches if _has_rows(val_batches) else None,
                                 num_classes)
    summary = {"probe_penalty": probe.penalty, "probe_train_top1": probe.train_top1,
               "probe_val_top1": probe.val_top1, "probe_time_s": time.perf_counter() - start}
    log.info("%s: head initialised from a linear probe (penalty %g): train top-1 %.4f, val top-1 %s, %.1f s",
             trainer.label, probe.penalty, probe.train_top1,
             "n/a" if probe.val_top1 is None else f"{probe.val_top1:.4f}", summary["probe_time_s"])
    return summary


def checkpoint_best_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The best epoch's weights a checkpoint carries: its own (or its moving average's) when it is
    the best epoch."""
    if checkpoint["best_epoch"] == checkpoint["epoch"]:
        if checkpoint.get("ema") is not None:
            prefix = "module."
            return {k[len(prefix):]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}
        return checkpoint["model"]
    return checkpoint.get("best_state")


def _has_rows(source: Iterable) -> bool:
    """False only for a source known to be empty (an empty validation split gives NaN by design)."""
    return not hasattr(source, "__len__") or len(source) > 0


def _patience_ran_out(recipe: TrainConfig, last_epoch: int, best_epoch: int) -> bool:
    patience = recipe.early_stopping_patience
    return patience > 0 and last_epoch > 0 and last_epoch - best_epoch >= patience
