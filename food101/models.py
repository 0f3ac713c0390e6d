"""Classifiers built by name from torchvision, with ImageNet weights and a head for our classes.

No model is special-cased: the weights come from torchvision's weights enum of the architecture,
the classifier head is the model's last `nn.Linear` whatever it is called, and the input
normalisation is the one the weights were trained with.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights

from food101.errors import Food101Error

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The best ImageNet weights torchvision publishes come first.
PREFERRED_WEIGHTS = ("IMAGENET1K_V2", "IMAGENET1K_V1", "DEFAULT")


class WeightsUnavailable(Food101Error):
    """Pretrained weights were asked for and cannot be loaded (not downloaded, no network, corrupt)."""


def pretrained_weights(arch: str) -> WeightsEnum:
    """The ImageNet weights used for `arch`: IMAGENET1K_V2 where it exists, else V1, else DEFAULT."""
    enum = get_model_weights(arch)
    for name in PREFERRED_WEIGHTS:
        if name in enum.__members__:
            return enum[name]
    raise WeightsUnavailable(f"torchvision publishes no ImageNet weights for {arch!r}; set train.pretrained=false")


def expected_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub looks for (and downloads) these weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def build_model(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    """A torchvision classifier with its head replaced for `num_classes` classes.

    With `pretrained`, the ImageNet weights must load; otherwise WeightsUnavailable says where to
    put the file. There is no fall-back to random weights: that would silently produce a model
    10-20 points worse that still looks like a valid result.
    """
    model = get_model(arch, weights=None)
    if pretrained:
        weights = pretrained_weights(arch)
        state = _load_state_dict(arch, weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsUnavailable(
                f"{expected_weights_path(weights)} does not match {arch}'s ImageNet weights "
                f"({str(exc)[:300]}). {_what_to_do(weights)}"
            ) from exc
        log.info("loaded ImageNet weights %s for %s from %s", weights, arch, expected_weights_path(weights))
    replace_head(model, num_classes, zero_init=pretrained)
    return model


def normalization(arch: str, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input normalisation: the weights' own, ImageNet's when from scratch."""
    if not pretrained:
        return IMAGENET_MEAN, IMAGENET_STD
    preset = pretrained_weights(arch).transforms()
    return tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std)


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the model's last nn.Linear: the classifier of torchvision models."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as a classifier head")
    return found[-1]


def replace_head(model: nn.Module, num_classes: int, zero_init: bool = False) -> nn.Linear:
    """Swap the last nn.Linear for a fresh one with `num_classes` outputs.

    `zero_init` (used when fine-tuning) starts from uniform predictions, so the first steps do not
    push random-head gradients into the pretrained backbone (the BiT fine-tuning practice).
    """
    name, old = classifier_head(model)
    head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if zero_init:
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)
    return head


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: weight decay on weights of convolutions and linears, none on norms and biases.

    Every 0-d/1-d parameter is a bias or a norm scale/shift in these architectures; decaying them
    only pulls BatchNorm scales towards zero and hurts accuracy.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _what_to_do(weights: WeightsEnum) -> str:
    path = expected_weights_path(weights)
    torch_home = os.environ.get("TORCH_HOME", "(unset; default ~/.cache/torch)")
    return (
        f"Copy the file {path.name} (from {weights.url}) to {path} (TORCH_HOME={torch_home}), "
        "or train from scratch with train.pretrained=false."
    )


def _load_state_dict(arch: str, weights: WeightsEnum) -> dict[str, torch.Tensor]:
    path = expected_weights_path(weights)
    try:
        # check_hash only applies to a download (torch.hub checks the sha256 prefix in the file
        # name then); a file already at `path` is loaded as is, and checked by load_state_dict.
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as exc:  # urllib's URLError is an OSError: no network, or a failed download
        raise WeightsUnavailable(
            f"ImageNet weights {weights} for {arch} are not at {path} and could not be downloaded "
            f"({type(exc).__name__}: {exc}). {_what_to_do(weights)}"
        ) from exc
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise WeightsUnavailable(
            f"ImageNet weights {weights} for {arch} at {path} cannot be read ({type(exc).__name__}: "
            f"{exc}): the file is corrupt or incomplete. Delete it, then: {_what_to_do(weights)}"
        ) from exc
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} does not hold a state dict. {_what_to_do(weights)}")
    return state
