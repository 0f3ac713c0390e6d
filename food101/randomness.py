"""Randomness of its own for every model and training: torch's process-wide generator is shared
by the flow's threads, so nothing here reads or advances it.

Initialisation draws from a generator seeded with the recipe's seed (`private_generator`), and
dropout and stochastic depth are swapped for modules that draw from the training's own generator
(`draw_dropout_from`), which refuses any dropout flavour it cannot redirect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.ops import StochasticDepth

from food101.errors import Food101Error

# Sampling functions that take a `generator=` but are often called without one.
SAMPLING_FUNCTIONS = frozenset({
    "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
})
# Independent streams derived from one recipe seed.
INIT_STREAM, DROPOUT_STREAM = 0, 1


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
    """Replace every nn.Dropout, StochasticDepth and timm DropPath in `model` by the same layer
    drawing from `generator`; returns how many were replaced.

    Any other dropout flavour (a _DropoutNd, or a leaf module whose class name says "drop") would
    draw from torch's process-wide generator, so it is refused.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (GeneratorDropout, GeneratorStochasticDepth)):
            module.generator = generator
            continue
        swap = _generator_twin(module, generator)
        if swap is None:
            if isinstance(module, nn.modules.dropout._DropoutNd) or (
                    "drop" in type(module).__name__.lower() and not any(module.children())):
                raise Food101Error(f"{name} ({type(module).__name__}) would draw from torch's process-wide "
                                   "generator, so its training would not be reproducible; only nn.Dropout, "
                                   "StochasticDepth and timm's DropPath draw from a training's own generator: "
                                   "choose another model (or set its rate to 0 in the model function)")
            continue
        parent_name, _, attr = name.rpartition(".")
        swap.train(module.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, swap)
        replaced += 1
    return replaced


def _generator_twin(module: nn.Module, generator: torch.Generator) -> nn.Module | None:
    """The layer drawing from `generator` that does what `module` does, or None when there is none."""
    if type(module) is nn.Dropout:
        return GeneratorDropout(module.p, module.inplace, generator)
    if isinstance(module, StochasticDepth):
        return GeneratorStochasticDepth(module.p, module.mode, generator)
    # timm's DropPath is StochasticDepth in "row" mode (the survivors scaled when scale_by_keep).
    if type(module).__name__ == "DropPath" and getattr(module, "scale_by_keep", None) is True:
        return GeneratorStochasticDepth(float(module.drop_prob), "row", generator)
    return None
