"""A moving average of the weights (train.ema_half_life_epochs): validated, kept, saved and resumed."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from food101.config import ConfigError, load_config
from food101.engine import EpochEnd, checkpoint_best_state, ema_decay, evaluate_batches, fit, make_trainer
from tests.conftest import REPO, make_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread: the results below are compared bit for bit."""


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 5, (8,), generator=generator) for _ in range(count)]
    # Learnable: each class shifts the mean of one colour channel pattern.
    return [(torch.randn(8, 3, 8, 8, generator=generator) + y.view(-1, 1, 1, 1).float() / 2, y) for y in labels]


def recipe(tmp_path, **changes):
    settings = {"epochs": 3, "warmup_epochs": 0.0, "ema_half_life_epochs": 1.0, "early_stopping_patience": 0}
    return dataclasses.replace(make_config(tmp_path).train, **settings | changes)


def test_the_decay_halves_a_step_s_weight_after_the_half_life() -> None:
    decay = ema_decay(half_life_epochs=2.0, steps_per_epoch=10)
    assert decay ** 20 == pytest.approx(0.5)
    assert ema_decay(0.01, 10) == 0.5  # never less than one step


def test_validation_and_the_best_weights_are_the_moving_average_not_the_last_step(tmp_path) -> None:
    plan = recipe(tmp_path)
    trainer = make_trainer(small_net(), plan, CPU, steps_per_epoch=4)
    assert trainer.ema is not None
    train, val = batches(4, seed=1), batches(2, seed=2)
    checkpoints: list[dict] = []
    result = fit(trainer, train, val, plan, steps_per_epoch=4,
                 on_epoch_end=lambda end: checkpoints.append(copy.deepcopy(end.checkpoint)))
    averaged = trainer.ema.module.state_dict()
    raw = trainer.model.state_dict()
    assert not torch.equal(averaged["5.weight"], raw["5.weight"])
    # BatchNorm statistics are copied from the trained network, not averaged.
    assert torch.equal(averaged["1.running_mean"], raw["1.running_mean"])
    # The last epoch's validation scored the average: evaluate it again and compare.
    assert result.history[-1]["val_top1"] == evaluate_batches(trainer, val)["val_top1"]
    trainer.ema = None
    assert evaluate_batches(trainer, val)["val_loss"] != result.history[-1]["val_loss"]
    # The best weights are the average's at the best epoch, not the trained network's.
    best, at_best = result.best_state, checkpoints[result.best_epoch - 1]
    assert set(best) == set(raw)
    assert all(torch.equal(best[k], at_best["ema"][f"module.{k}"]) for k in best)
    assert not torch.equal(best["5.weight"], at_best["model"]["5.weight"])
    # The checkpoint gives the same weights back (best.pt is rebuilt from it when lost).
    from_checkpoint = checkpoint_best_state(at_best)
    assert all(torch.equal(from_checkpoint[k], best[k]) for k in best)


def test_a_resumed_run_ends_with_the_same_moving_average(tmp_path) -> None:
    plan = recipe(tmp_path)
    train, val = batches(4, seed=1), batches(2, seed=2)
    whole = make_trainer(small_net(), plan, CPU, steps_per_epoch=4)
    fit(whole, train, val, plan, steps_per_epoch=4)

    saved: list[dict] = []

    class Killed(Exception):
        pass

    def keep_then_die(end: EpochEnd) -> None:
        saved.append(copy.deepcopy(end.checkpoint))
        raise Killed

    first = make_trainer(small_net(), plan, CPU, steps_per_epoch=4)
    with pytest.raises(Killed):
        fit(first, train, val, plan, steps_per_epoch=4, on_epoch_end=keep_then_die)
    resumed = make_trainer(small_net(), plan, CPU, steps_per_epoch=4)
    fit(resumed, train, val, plan, steps_per_epoch=4, resume=saved[0])
    for key, value in whole.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key


def test_without_a_half_life_there_is_no_average(tmp_path) -> None:
    trainer = make_trainer(small_net(), recipe(tmp_path, ema_half_life_epochs=0.0), CPU, steps_per_epoch=4)
    assert trainer.ema is None


def test_a_negative_half_life_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ema_half_life_epochs"):
        load_config(REPO / "params.yaml", overrides={"train.ema_half_life_epochs": -1})
    # Trained from scratch in a few steps an epoch, the demo keeps no average (it would lag the weights).
    assert math.isclose(load_config(REPO / "params.yaml", profile="demo").train.ema_half_life_epochs, 0.0)
