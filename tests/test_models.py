"""Models by name: heads for our classes, weights' own normalisation, and weights that must load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import get_model
from torchvision.ops import StochasticDepth, stochastic_depth

from food101.errors import Food101Error
from food101.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeneratorDropout,
    GeneratorStochasticDepth,
    WeightsUnavailable,
    build_model,
    classifier_head,
    draw_dropout_from,
    expected_weights_path,
    normalization,
    parameter_groups,
    pretrained_weights,
)

MODELS = ["resnet50", "efficientnet_b0", "mobilenet_v3_large"]
# The smallest of the three (22 MB of weights): the one the weights-file tests write to disk.
SMALL = "mobilenet_v3_large"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here: one torch thread."""


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME (torch.hub reads it on every call)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.mark.parametrize("arch", MODELS)
def test_head_is_replaced_for_our_classes(arch: str) -> None:
    model = build_model(arch, num_classes=7, pretrained=False)
    name, head = classifier_head(model)
    assert head.out_features == 7
    reference_name, reference = classifier_head(get_model(arch))
    assert (name, head.in_features) == (reference_name, reference.in_features)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("arch", MODELS)
def test_weights_are_the_best_published_and_normalisation_comes_from_them(arch: str) -> None:
    # The newest ImageNet weights torchvision publishes for each (EfficientNet-B0 has no V2).
    expected = {"resnet50": "IMAGENET1K_V2", "efficientnet_b0": "IMAGENET1K_V1", "mobilenet_v3_large": "IMAGENET1K_V2"}
    assert pretrained_weights(arch).name == expected[arch]
    assert normalization(arch, pretrained=True) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization(arch, pretrained=False) == (IMAGENET_MEAN, IMAGENET_STD)


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = build_model("efficientnet_b0", 5, pretrained=False)
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert id(module.weight) in no_decay_ids and id(module.bias) in no_decay_ids
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) not in no_decay_ids
            if module.bias is not None:
                assert id(module.bias) in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_missing_weights_are_a_clear_error_naming_torch_home_and_the_file(torch_home: Path) -> None:
    expected = expected_weights_path(pretrained_weights(SMALL))
    assert expected == torch_home / "hub" / "checkpoints" / "mobilenet_v3_large-5c1a4163.pth"
    with pytest.raises(WeightsUnavailable) as caught:
        build_model(SMALL, 5, pretrained=True)  # no network here: the download fails at once
    message = str(caught.value)
    assert str(expected) in message and f"TORCH_HOME={torch_home}" in message
    assert "train.pretrained=false" in message
    assert not expected.exists()  # nothing half-downloaded left behind


def test_weights_in_torch_home_are_loaded(torch_home: Path) -> None:
    """A state dict at the path torch.hub expects is used as is (the hash in the file name is
    checked only on download), and every pretrained tensor arrives unchanged."""
    torch.manual_seed(123)
    saved = get_model(SMALL).state_dict()
    path = expected_weights_path(pretrained_weights(SMALL))
    path.parent.mkdir(parents=True)
    torch.save(saved, path)

    model = build_model(SMALL, 5, pretrained=True)
    head_name, head = classifier_head(model)
    loaded = model.state_dict()
    for key, value in saved.items():
        if key.startswith(head_name + "."):
            continue
        assert torch.equal(loaded[key], value), key
    assert torch.count_nonzero(head.weight) == 0  # fine-tuning starts from a zero head
    # A fresh random model would differ: the weights really came from the file.
    assert not torch.equal(get_model(SMALL).state_dict()["features.0.0.weight"], loaded["features.0.0.weight"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100], ids=["empty", "garbage"])
def test_corrupt_weights_are_a_clear_error(torch_home: Path, content: bytes) -> None:
    path = expected_weights_path(pretrained_weights(SMALL))
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(WeightsUnavailable, match="corrupt") as caught:
        build_model(SMALL, 5, pretrained=True)
    assert str(path) in str(caught.value)


def test_weights_of_another_model_are_a_clear_error(torch_home: Path) -> None:
    path = expected_weights_path(pretrained_weights(SMALL))
    path.parent.mkdir(parents=True)
    torch.save(get_model("mobilenet_v3_small").state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not match"):
        build_model(SMALL, 5, pretrained=True)


# --- randomness in the forward pass ---------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_generator_dropout_is_nn_dropout_drawing_from_its_own_generator(inplace: bool) -> None:
    """The same mask as torch's dropout given the same generator state, scaled by 1/(1-p)."""
    x = torch.randn(64, 40)
    torch.manual_seed(5)
    expected = nn.Dropout(0.3)(x.clone())
    layer = GeneratorDropout(0.3, inplace, torch.Generator().manual_seed(5))
    before = torch.get_rng_state()
    got = layer(x.clone())
    assert torch.equal(got, expected) and torch.equal(torch.get_rng_state(), before)
    kept = got != 0
    assert torch.allclose(got[kept], x[kept] / 0.7)
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_generator_stochastic_depth_is_torchvisions_drawing_from_its_own_generator(mode: str) -> None:
    x = torch.randn(32, 8, 4, 4)
    torch.manual_seed(9)
    expected = stochastic_depth(x, 0.4, mode, training=True)
    got = GeneratorStochasticDepth(0.4, mode, torch.Generator().manual_seed(9))(x)
    assert torch.equal(got, expected)
    dropped = (got.flatten(1) == 0).all(1)
    assert 0 < int(dropped.sum()) < len(x) if mode == "row" else int(dropped.sum()) in (0, len(x))
    assert torch.equal(GeneratorStochasticDepth(0.4, mode, torch.Generator()).eval()(x), x)


def test_every_dropout_of_a_model_draws_from_the_training_generator() -> None:
    model = build_model("efficientnet_b0", 5, pretrained=False)
    generator = torch.Generator().manual_seed(0)
    replaced = draw_dropout_from(model, generator)
    modules = list(model.modules())
    assert replaced == sum(isinstance(m, (GeneratorDropout, GeneratorStochasticDepth)) for m in modules) > 16
    assert not any(type(m) is nn.Dropout or isinstance(m, StochasticDepth) for m in modules)
    assert all(m.generator is generator for m in modules if isinstance(m, (GeneratorDropout, GeneratorStochasticDepth)))
    with pytest.raises(Food101Error, match="Dropout2d"):
        draw_dropout_from(nn.Sequential(nn.Dropout2d(0.1)), generator)


def test_timm_drop_path_draws_from_the_training_generator_and_unknown_dropouts_are_refused() -> None:
    from timm.layers import DropBlock2d, DropPath

    generator = torch.Generator().manual_seed(0)
    model = build_model("timm:resnet10t", 5, pretrained=False)
    model.layer1[0].drop_path = DropPath(0.5)
    assert draw_dropout_from(model, generator) == 1
    assert isinstance(model.layer1[0].drop_path, GeneratorStochasticDepth)
    before = torch.random.get_rng_state()
    model.train()(torch.zeros(4, 3, 32, 32))
    assert torch.equal(before, torch.random.get_rng_state())
    # timm's DropPath semantics: whole rows dropped, survivors scaled by 1/keep.
    x = torch.ones(8, 2, 3, 3)
    ours = GeneratorStochasticDepth(0.5, "row", torch.Generator().manual_seed(1)).train()(x)
    assert set(ours.flatten().tolist()) <= {0.0, 2.0} and (ours.flatten(1).std(1) == 0).all()

    for refused in (DropBlock2d(0.1, 3), DropPath(0.1, scale_by_keep=False)):
        with pytest.raises(Food101Error, match=type(refused).__name__):
            draw_dropout_from(nn.Sequential(nn.Conv2d(3, 3, 1), refused), generator)
