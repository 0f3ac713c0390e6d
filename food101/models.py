"""Classifiers built by name from torchvision, with ImageNet weights and a head for our classes.

No model is special-cased: the weights come from torchvision's weights enum of the architecture,
the classifier head is the model's last `nn.Linear` whatever it is called, and the input
normalisation is the one the weights were trained with.

No model touches torch's process-wide generator, which the flow's threads share: random
initialisation draws from a generator of its own seeded with the recipe's seed, a model loaded
from saved weights is built on the meta device and draws nothing, and dropout and stochastic
depth are swapped for modules that draw from the training's own generator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models import WeightsEnum, get_model, get_model_weights
from torchvision.ops import StochasticDepth

from food101.errors import Food101Error

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The best ImageNet weights torchvision publishes come first.
PREFERRED_WEIGHTS = ("IMAGENET1K_V2", "IMAGENET1K_V1", "DEFAULT")
# Sampling functions that take a `generator=` but are often called without one.
SAMPLING_FUNCTIONS = frozenset({
    "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
})
# Independent streams derived from one recipe seed.
INIT_STREAM, DROPOUT_STREAM = 0, 1


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


def stream_seed(seed: int, stream: int) -> int:
    """A seed for one use (`INIT_STREAM`, `DROPOUT_STREAM`) of the recipe's seed, so the uses do
    not share one random sequence."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class _PrivateGenerator(TorchFunctionMode):
    # Torch function modes are per thread: only this thread's sampling is redirected.
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        asks_default = "generator" in kwargs and kwargs["generator"] is None  # nn.init passes None
        if asks_default or ("generator" not in kwargs and getattr(func, "__name__", "") in SAMPLING_FUNCTIONS):
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


@contextlib.contextmanager
def private_generator(seed: int) -> Iterator[torch.Generator]:
    """Inside the block, this thread's sampling on the CPU (torchvision's weight initialisation)
    draws from a generator seeded with `seed` instead of torch's process-wide one."""
    generator = torch.Generator().manual_seed(seed)
    with _PrivateGenerator(generator):
        yield generator


def build_model(arch: str, num_classes: int, pretrained: bool, seed: int = 0) -> nn.Module:
    """A torchvision classifier with its head replaced for `num_classes` classes, initialised from
    `seed` alone (torch's process-wide generator is neither read nor advanced).

    With `pretrained`, the ImageNet weights must load; otherwise WeightsUnavailable says where to
    put the file. There is no fall-back to random weights: that would silently produce a model
    10-20 points worse that still looks like a valid result.
    """
    if not pretrained:
        with private_generator(stream_seed(seed, INIT_STREAM)):
            model = get_model(arch, weights=None)
            replace_head(model, num_classes)
        return model
    weights = pretrained_weights(arch)
    state = _load_state_dict(arch, weights)
    try:
        model = model_from_state(arch, None, state)
    except RuntimeError as exc:
        raise WeightsUnavailable(
            f"{expected_weights_path(weights)} does not match {arch}'s ImageNet weights "
            f"({str(exc)[:300]}). {_what_to_do(weights)}"
        ) from exc
    log.info("loaded ImageNet weights %s for %s from %s", weights, arch, expected_weights_path(weights))
    with private_generator(stream_seed(seed, INIT_STREAM)):
        replace_head(model, num_classes, zero_init=True)
    return model


def model_from_state(arch: str, num_classes: int | None, state: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture `arch` (head for `num_classes`, or torchvision's own with None) holding
    `state`'s tensors, built without random initialisation.

    The model is built on the meta device (no memory, no sampling) and takes the state's tensors
    as they are. An architecture that cannot be built on meta, or keeps tensors outside its state
    dict, is built on the CPU with a fixed private generator instead; either way torch's
    process-wide generator is untouched, so evaluating beside a training cannot change it.
    """
    try:
        with torch.device("meta"):
            model = _architecture(arch, num_classes)
    except NotImplementedError:  # "Cannot copy out of meta tensor": its __init__ reads values
        model = None
    if model is not None:
        model.load_state_dict(state, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    with private_generator(0):
        model = _architecture(arch, num_classes)
    model.load_state_dict(state)
    return model


def _architecture(arch: str, num_classes: int | None) -> nn.Module:
    model = get_model(arch, weights=None)
    if num_classes is not None:
        replace_head(model, num_classes)
    return model


class GeneratorDropout(nn.Module):
    """nn.Dropout drawing its mask from `generator` (zeroes with probability p, scales the rest by
    1/(1-p) in training, the identity in evaluation)."""

    def __init__(self, p: float, inplace: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.inplace, self.generator = p, inplace, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x.zero_() if self.inplace else torch.zeros_like(x)
        mask = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator).div_(1.0 - self.p)
        return x.mul_(mask) if self.inplace else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class GeneratorStochasticDepth(nn.Module):
    """torchvision's StochasticDepth drawing from `generator`: in training, drops the whole input
    per row ("row") or for the batch ("batch") with probability p, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float, mode: str, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.mode, self.generator = p, mode, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival, generator=self.generator)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def draw_dropout_from(model: nn.Module, generator: torch.Generator) -> int:
    """Replace every nn.Dropout and StochasticDepth in `model` by the same layer drawing from
    `generator`; returns how many were replaced.

    Any other dropout flavour would draw from torch's process-wide generator, so it is refused.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (GeneratorDropout, GeneratorStochasticDepth)):
            module.generator = generator
            continue
        if type(module) is nn.Dropout:
            swap: nn.Module = GeneratorDropout(module.p, module.inplace, generator)
        elif isinstance(module, StochasticDepth):
            swap = GeneratorStochasticDepth(module.p, module.mode, generator)
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            raise Food101Error(f"{name} ({type(module).__name__}) would draw from torch's process-wide generator, "
                               "so its training would not be reproducible; only nn.Dropout and StochasticDepth "
                               "draw from a training's own generator: choose another model")
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        swap.train(module.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, swap)
        replaced += 1
    return replaced


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
