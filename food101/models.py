"""Classifiers built by name, with pretrained weights and a head for our classes.

A name in `models:` is one of three kinds, told apart by its syntax alone:

- `resnet50`, `resnet50.IMAGENET1K_V1`: a torchvision classification model, with the weights enum
  member named after a dot, as timm names its tags (default: the best ImageNet weights torchvision
  publishes). Not `@`: MLflow refuses it in the metric and parameter names that carry model names;
- `timm:convnext_atto`, `timm:resnet18.a1_in1k`: a timm model (the optional `timm` extra), its
  weights as timm provides them (the Hugging Face cache, or $TORCH_HOME/hub/checkpoints);
- `package.module:function`: an in-house network, `function(num_classes=, pretrained=)` returning
  an nn.Module with its head for `num_classes` classes.

No model is special-cased: the head is the last linear (or 1x1 convolution) layer with the
original class count, whatever it is called, and the input normalisation is the one the weights
were trained with (the weights' metadata, timm's data config, or the function's `normalization`).

No model touches torch's process-wide generator, which the flow's threads share: random
initialisation draws from a generator of its own seeded with the recipe's seed, a model loaded
from saved weights is built on the meta device and draws nothing, and dropout and stochastic
depth are swapped for modules that draw from the training's own generator (food101/randomness.py).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import logging
import os
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models

from food101.errors import Food101Error
from food101.randomness import (  # noqa: F401 - re-exported: the trainer and tests import them from here
    DROPOUT_STREAM,
    INIT_STREAM,
    GeneratorDropout,
    GeneratorStochasticDepth,
    draw_dropout_from,
    private_generator,
    stream_seed,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The best ImageNet weights torchvision publishes come first.
PREFERRED_WEIGHTS = ("IMAGENET1K_V2", "IMAGENET1K_V1", "DEFAULT")
# The class count of torchvision's classifiers built without weights.
TORCHVISION_CLASSES = 1000

# torch.export and modules built on the meta device both go through torch.fx's process-wide
# tracing metadata; two threads doing either at once fail with KeyError('custom'). The flow runs
# evaluate, robustness and export on parallel threads, so both take this lock.
TORCH_TRACING_LOCK = threading.RLock()


@contextlib.contextmanager
def on_meta_device() -> Iterator[None]:
    """`torch.device("meta")` under TORCH_TRACING_LOCK."""
    with TORCH_TRACING_LOCK, torch.device("meta"):
        yield




class WeightsUnavailable(Food101Error):
    """Pretrained weights were asked for and cannot be loaded (not downloaded, no network, corrupt)."""


class UnknownModel(Food101Error):
    """A name in `models:` that resolves to no model; the message lists the closest known names."""


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


def build_model(name: str, num_classes: int, pretrained: bool, seed: int = 0) -> nn.Module:
    """The model `name` (see the module's docstring) with its head for `num_classes` classes,
    initialised from `seed` alone (torch's process-wide generator is neither read nor advanced).

    With `pretrained`, the weights must load; otherwise WeightsUnavailable says where to put the
    file. There is no fall-back to random weights: that would silently produce a model 10-20
    points worse that still looks like a valid result.
    """
    source = resolve_model(name)
    if pretrained:
        model = source.pretrained(num_classes, stream_seed(seed, INIT_STREAM))
    else:
        with private_generator(stream_seed(seed, INIT_STREAM)):
            model = source.architecture(num_classes)
    return _checked_module(model, name)


def model_from_state(name: str, num_classes: int | None, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model `name` (head for `num_classes`, or its source's own with None) holding `state`'s
    tensors, built without random initialisation.

    The model is built on the meta device (no memory, no sampling) and takes the state's tensors
    as they are. An architecture that cannot be built on meta, or keeps tensors outside its state
    dict, is built on the CPU with a fixed private generator instead; either way torch's
    process-wide generator is untouched, so evaluating beside a training cannot change it.
    """
    return _from_state(resolve_model(name), num_classes, state)


def _from_state(source: ModelSource, num_classes: int | None, state: dict[str, torch.Tensor]) -> nn.Module:
    try:
        with on_meta_device():
            model = source.architecture(num_classes)
    except NotImplementedError:  # "Cannot copy out of meta tensor": its __init__ reads values
        model = None
    if model is not None:
        model.load_state_dict(state, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    with private_generator(0):
        model = source.architecture(num_classes)
    model.load_state_dict(state)
    return model


def _checked_module(model: object, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise Food101Error(f"{name} returned a {type(model).__name__}, not a torch.nn.Module: "
                           "a model function must return the network")
    return model


def normalization(name: str, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input normalisation in 0..1 units, as the model's source gives it.

    A torchvision name (no ':') from scratch is ImageNet's without looking the name up.
    """
    if not pretrained and ":" not in name:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = resolve_model(name).normalization(pretrained)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _output_count(module: nn.Module) -> int | None:
    """Outputs of a layer that can be a classifier: a linear layer or a 1x1 convolution."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module.out_channels
    return None


def classifier_head(model: nn.Module, num_outputs: int | None = None) -> tuple[str, nn.Module]:
    """(qualified name, module) of the classifier: the last linear layer or 1x1 convolution with
    `num_outputs` outputs (by default, the last such layer whatever its outputs).

    That is `fc` of ResNet and RegNet, `classifier[-1]` of EfficientNet and MobileNet,
    `classifier[2]` of ConvNeXt, `heads.head` of ViT, `head` of Swin, `classifier` of DenseNet
    and the 1x1 convolution of SqueezeNet, with no list of architectures to keep up to date.
    """
    found = [(name, module) for name, module in model.named_modules() if _output_count(module) is not None]
    if num_outputs is not None:
        found = [(name, module) for name, module in found if _output_count(module) == num_outputs]
    if not found:
        outputs = f" with {num_outputs} outputs" if num_outputs is not None else ""
        raise ValueError(f"{type(model).__name__} has no linear layer or 1x1 convolution{outputs} "
                         "to use as a classifier head")
    return found[-1]


def replace_head(model: nn.Module, num_classes: int, zero_init: bool = False,
                 num_outputs: int | None = None) -> nn.Module:
    """Swap the classifier (see classifier_head; `num_outputs` is its present class count) for a
    fresh layer of the same kind with `num_classes` outputs.

    `zero_init` (used when fine-tuning) starts from uniform predictions, so the first steps do not
    push random-head gradients into the pretrained backbone (the BiT fine-tuning practice).
    """
    name, old = classifier_head(model, num_outputs)
    head: nn.Module
    if isinstance(old, nn.Linear):
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        head = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    if zero_init:
        _zero(head)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)
    return head


def _zero(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


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


# --- where a name's model comes from ------------------------------------------------------------

TIMM_PREFIX = "timm:"
# Weights files timm looks for in a Hugging Face model repository, preferred first.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


class ModelSource:
    """What a name in `models:` resolves to: how to build it with and without weights."""

    name: str
    kind: str

    def architecture(self, num_classes: int | None) -> nn.Module:
        """The network without weights, its head for `num_classes` (None: the source's own)."""
        raise NotImplementedError

    def pretrained(self, num_classes: int, seed: int) -> nn.Module:
        """The network with its pretrained weights and a new head, drawing only from `seed`."""
        raise NotImplementedError

    def normalization(self, pretrained: bool) -> Normalization:
        raise NotImplementedError

    def input_size(self) -> int | None:
        """The crop size, in pixels, that its weights were trained at (None when not known)."""
        return None

    def weights_label(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class TorchvisionModel(ModelSource):
    name: str
    arch: str
    weights_name: str | None  # a member of the architecture's weights enum, or None for the best
    kind: str = "torchvision"

    def weights(self) -> WeightsEnum:
        if self.weights_name is None:
            return pretrained_weights(self.arch)
        return get_model_weights(self.arch)[self.weights_name]

    def architecture(self, num_classes: int | None) -> nn.Module:
        model = get_model(self.arch, weights=None)
        _drop_auxiliary_heads(model)
        if num_classes is not None:
            replace_head(model, num_classes, num_outputs=TORCHVISION_CLASSES)
        return model

    def pretrained(self, num_classes: int, seed: int) -> nn.Module:
        weights = self.weights()
        state = _load_state_dict(self.arch, weights)
        with on_meta_device():
            dropped = _drop_auxiliary_heads(get_model(self.arch, weights=None))
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{d}." for d in dropped))}
        try:
            model = _from_state(self, None, state)
        except RuntimeError as exc:
            raise WeightsUnavailable(
                f"{expected_weights_path(weights)} does not match {self.arch}'s weights {weights} "
                f"({str(exc)[:300]}). {_what_to_do(weights)}"
            ) from exc
        log.info("loaded weights %s for %s from %s", weights, self.arch, expected_weights_path(weights))
        with private_generator(seed):
            replace_head(model, num_classes, zero_init=True, num_outputs=len(weights.meta["categories"]))
        return model

    def normalization(self, pretrained: bool) -> Normalization:
        if not pretrained:
            return IMAGENET_MEAN, IMAGENET_STD
        preset = self.weights().transforms()
        return tuple(preset.mean), tuple(preset.std)

    def input_size(self) -> int | None:
        crop = self.weights().transforms().crop_size
        return int(crop[0])

    def weights_label(self) -> str:
        weights = self.weights()
        return f"{type(weights).__name__}.{weights.name}"


def _drop_auxiliary_heads(model: nn.Module) -> list[str]:
    """Remove the auxiliary classifiers (Inception, GoogLeNet) so training returns plain logits;
    the names of the children removed."""
    if not getattr(model, "aux_logits", False):
        return []
    model.aux_logits = False
    dropped = [name for name, child in model.named_children() if "Aux" in type(child).__name__]
    for name in dropped:
        setattr(model, name, None)
    return dropped


@dataclass(frozen=True)
class TimmModel(ModelSource):
    name: str
    timm_name: str  # `architecture` or `architecture.pretrained_tag`
    kind: str = "timm"

    def data_config(self) -> dict:
        from timm.data import resolve_data_config

        cfg = _timm().get_pretrained_cfg(self.timm_name)
        return resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg is not None else {})

    def architecture(self, num_classes: int | None) -> nn.Module:
        classes = {} if num_classes is None else {"num_classes": num_classes}
        return _timm().create_model(self.timm_name, pretrained=False, **classes)

    def weights_file(self) -> tuple[Path | None, list[str]]:
        """The weights file already on this machine (or None), and where it was looked for."""
        import huggingface_hub

        cfg = _timm().get_pretrained_cfg(self.timm_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise WeightsUnavailable(f"timm publishes no pretrained weights for {self.timm_name!r}; "
                                     "set train.pretrained=false or name a tag with weights")
        places: list[str] = []
        if cfg.file:
            places.append(str(cfg.file))
            if Path(cfg.file).is_file():
                return Path(cfg.file), places
        if cfg.hf_hub_id:
            for filename in TIMM_HUB_FILES:
                found = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str):
                    return Path(found), places
            places.append(f"{huggingface_hub.constants.HF_HUB_CACHE} (as `hf download {cfg.hf_hub_id}` "
                          "puts it, HF_HOME)")
        if cfg.url:
            path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
            places.append(f"{path} (from {cfg.url}, TORCH_HOME)")
            if path.is_file():
                return path, places
        return None, places

    def pretrained(self, num_classes: int, seed: int) -> nn.Module:
        import huggingface_hub

        path, places = self.weights_file()
        overlay = {"pretrained_cfg_overlay": {"file": str(path)}} if path is not None else {}
        if path is None and huggingface_hub.constants.HF_HUB_OFFLINE:
            raise WeightsUnavailable(f"timm weights for {self.timm_name} are not on this machine (looked in "
                                     f"{'; '.join(places)}); put them there, or set train.pretrained=false")
        try:
            with private_generator(seed):
                model = _timm().create_model(self.timm_name, pretrained=True, num_classes=num_classes, **overlay)
                replace_head(model, num_classes, zero_init=True, num_outputs=num_classes)
        except OSError as exc:  # no network, a failed download, a missing file
            raise WeightsUnavailable(
                f"timm weights for {self.timm_name} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {str(exc)[:200]}). Put them in {'; or '.join(places)}, "
                "or set train.pretrained=false") from exc
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            raise WeightsUnavailable(
                f"timm weights for {self.timm_name} at {path} cannot be read ({type(exc).__name__}: "
                f"{str(exc)[:200]}): the file is corrupt or not these weights; delete it and put the right "
                "one there, or set train.pretrained=false") from exc
        log.info("loaded timm weights for %s from %s", self.timm_name, path or "the Hugging Face hub")
        return model

    def normalization(self, pretrained: bool) -> Normalization:
        # The architecture's own input statistics, with or without its weights (not always ImageNet's).
        config = self.data_config()
        return tuple(config["mean"]), tuple(config["std"])

    def input_size(self) -> int | None:
        return int(self.data_config()["input_size"][-1])

    def weights_label(self) -> str:
        cfg = _timm().get_pretrained_cfg(self.timm_name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            return "none"
        return cfg.hf_hub_id or cfg.url or str(cfg.file)


@dataclass(frozen=True)
class CallableModel(ModelSource):
    """`package.module:function`: `function(num_classes=..., pretrained=...)` returns the network
    with its head for `num_classes` (pretrained weights loaded when asked). Its input normalisation
    is a `normalization = ((r, g, b), (r, g, b))` attribute (mean, std in 0..1 units) of the
    function, or of the module it returns, else ImageNet's; an `input_size` attribute (pixels) is
    shown by `food101 models`."""

    name: str
    module: str
    function: str
    kind: str = "callable"

    def factory(self) -> Callable[..., nn.Module]:
        return _import_callable(self.name, self.module, self.function)

    def architecture(self, num_classes: int | None) -> nn.Module:
        if num_classes is None:
            raise ValueError(f"{self.name} is built for a given class count only")
        return _checked_module(self.factory()(num_classes=num_classes, pretrained=False), self.name)

    def pretrained(self, num_classes: int, seed: int) -> nn.Module:
        with private_generator(seed):
            return _checked_module(self.factory()(num_classes=num_classes, pretrained=True), self.name)

    def _attribute(self, attribute: str) -> object:
        factory = self.factory()
        if hasattr(factory, attribute):
            return getattr(factory, attribute)
        try:
            with on_meta_device():
                model = self.architecture(2)
        except NotImplementedError:  # its __init__ reads values: build it for real, privately
            with private_generator(0):
                model = self.architecture(2)
        return getattr(model, attribute, None)

    def normalization(self, pretrained: bool) -> Normalization:
        found = self._attribute("normalization")
        if found is None:
            return IMAGENET_MEAN, IMAGENET_STD
        try:
            mean, std = (tuple(float(v) for v in part) for part in found)  # type: ignore[union-attr]
        except (TypeError, ValueError) as exc:
            raise Food101Error(f"{self.name}: normalization must be ((mean r, g, b), (std r, g, b)) in 0..1 "
                               f"units (got {found!r})") from exc
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise Food101Error(f"{self.name}: normalization must hold three means and three positive "
                               f"standard deviations (got {found!r})")
        return mean, std

    def input_size(self) -> int | None:
        found = self._attribute("input_size")
        return int(found) if found is not None else None  # type: ignore[call-overload]

    def weights_label(self) -> str:
        return str(getattr(self.factory(), "weights", "the function's own"))


def _timm():  # noqa: ANN202 - the module, imported on first use: an optional dependency
    try:
        import timm
    except ImportError as exc:
        raise UnknownModel("timm: models need the timm package: pip install 'food101-benchmark[timm]' "
                           "(or -c constraints.txt timm)") from exc
    return timm


def _import_callable(name: str, module_name: str, function: str) -> Callable[..., nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModel(f"{name!r}: cannot import module {module_name!r} ({exc}); a model function is "
                           "named package.module:function and must be importable (installed or on PYTHONPATH)") from exc
    factory = getattr(module, function, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UnknownModel(f"{name!r}: module {module_name} has no function {function!r}{_closest(function, public)}")
    return factory


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def torchvision_names() -> list[str]:
    """Every classification model of torchvision."""
    return sorted(list_models(module=__import__("torchvision").models))


@functools.lru_cache(maxsize=256)
def resolve_model(name: str) -> ModelSource:
    """The source of the model `name` (syntax in the module docstring); UnknownModel with the
    closest known names when it names nothing."""
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX):]
        if not _timm().is_model(timm_name):
            raise UnknownModel(f"{name!r} is not a timm model{_closest(timm_name, _timm().list_models())} "
                               "(food101 models --filter NAME lists them)")
        return TimmModel(name, timm_name)
    if ":" in name:
        module_name, _, function = name.partition(":")
        if not module_name or not function:
            raise UnknownModel(f"{name!r}: a model function is named package.module:function")
        _import_callable(name, module_name, function)
        return CallableModel(name, module_name, function)
    arch, _, weights_name = name.partition(".")
    known = torchvision_names()
    if arch not in known:
        raise UnknownModel(f"{name!r} is not a torchvision classification model{_closest(arch, known)} "
                           "(timm models are named timm:NAME, in-house ones package.module:function)")
    if weights_name:
        members = list(get_model_weights(arch).__members__)
        if weights_name not in members:
            raise UnknownModel(f"{name!r}: {arch} has no weights {weights_name!r} (it has {', '.join(members)})")
    return TorchvisionModel(name, arch, weights_name or None)


def parameter_count(source: ModelSource) -> int:
    """Parameters of the source's own architecture, counted on the meta device (no memory) where
    it can be built there."""
    classes = TORCHVISION_CLASSES if isinstance(source, CallableModel) else None
    try:
        with on_meta_device():
            model = source.architecture(classes)
    except NotImplementedError:  # its __init__ reads values (RegNet's widths): only the weights on meta
        with _parameters_on_meta(), private_generator(0):
            model = source.architecture(classes)
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lives on the meta device (RegNetY-128GF would
    take 2.6 GB on the CPU). It patches nn.Module for every thread: for `food101 models` only."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def available_models(name_filter: str = "", include_timm: bool = True) -> tuple[list[str], int | None]:
    """(names that can go in `models:` containing `name_filter`, how many timm models there are in
    all, or None when timm is not installed). timm's are listed only under a filter."""
    names = [n for n in torchvision_names() if name_filter in n]
    try:
        import timm
    except ImportError:
        return names, None
    timm_names = timm.list_models()
    if include_timm and name_filter:
        names += [f"{TIMM_PREFIX}{n}" for n in timm_names if name_filter in f"{TIMM_PREFIX}{n}"]
    return names, len(timm_names)


def describe_model(name: str) -> dict[str, object]:
    """What `food101 models` shows for a name: kind, parameters, default weights and input size."""
    source = resolve_model(name)
    return {"name": name, "kind": source.kind, "parameters": parameter_count(source),
            "weights": source.weights_label(), "input_size": source.input_size()}
