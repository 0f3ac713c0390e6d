"""The CUDA paths: bf16 + channels_last steps, the device feed, a short fit. Skipped without a GPU.

Imports only torch, torchvision, numpy, PIL, PyYAML and the project's engine, feed and models,
so it also runs where nothing else of the stack is installed:

    python -m pytest -o addopts= -o filterwarnings= tests/test_cuda.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from food101.config import load_config
from food101.engine import fit, make_trainer, train_step
from food101.feed import BatchFeed
from food101.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from tests.conftest import REPO, SAMPLE, assert_overfits_one_batch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, np.ndarray]:
    """40 real photos, centre-cropped to 48 px, and labels over 5 classes.

    Decoded here rather than by tasks.preprocess.load_image: that module imports Prefect, and
    this file must run where only PyTorch is installed."""
    paths = sorted((SAMPLE / "images").glob("*/*.jpg"))[::4][:40]
    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            images.append(np.asarray(image.resize((48, 48), Image.Resampling.BILINEAR,
                                                  box=(left, top, left + side, top + side))))
    return np.stack(images), np.arange(len(paths), dtype=np.int64) % 5


def demo_recipe(model: str):
    return load_config(REPO / "params.yaml", profile="demo").train.for_model(model)


def feed(photos, **kwargs) -> BatchFeed:
    images, labels = photos
    options = {"batch_size": 8, "device": "cpu", "train": True, "image_size": 32, "mean": MEAN, "std": STD,
               "seed": 0} | kwargs
    return BatchFeed(images, labels, **options)


def test_bf16_channels_last_step_matches_fp32() -> None:
    recipe = dataclasses.replace(demo_recipe("resnet50"), channels_last=True)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 5, (16,))
    model = build_model("resnet50", 5, pretrained=False)
    reference = build_model("resnet50", 5, pretrained=False)
    reference.load_state_dict(model.state_dict())
    fast = make_trainer(model, recipe, CUDA, 10)
    assert fast.amp
    plain = make_trainer(reference, dataclasses.replace(recipe, channels_last=False), CUDA, 10)
    plain.amp = False
    fast_loss, _ = train_step(fast, x, y)
    plain_loss, _ = train_step(plain, x, y)
    assert float(fast_loss) == pytest.approx(float(plain_loss), rel=0.05)


def test_feed_on_cuda_matches_the_cpu(photos) -> None:
    cpu = list(feed(photos, train=False, image_size=48))
    for options in ({"gpu_resident": False}, {"gpu_resident": True}, {"workers": 2}):
        gpu = list(feed(photos, train=False, image_size=48, device="cuda", **options))
        for (x1, y1), (x2, y2) in zip(cpu, gpu, strict=True):
            assert x2.device.type == "cuda"
            torch.testing.assert_close(x1, x2.cpu(), atol=1e-5, rtol=0)
            assert torch.equal(y1, y2.cpu())
    # Training batches: the same crops on the GPU as on the CPU (the draws are numpy's, per batch).
    for (x1, y1), (x2, y2) in zip(list(feed(photos)), list(feed(photos, device="cuda", workers=2)), strict=True):
        assert x2.shape == (8, 3, 32, 32) and x2.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x1, x2.cpu(), atol=1e-3, rtol=0)
        assert torch.equal(y1, y2.cpu())


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "mobilenet_v3_large"])
def test_each_model_overfits_one_batch_in_bf16(photos, arch: str) -> None:
    """The 12% guard of test_train, on the GPU path: bf16 autocast, channels_last, fused optimizer."""
    images, labels = photos
    rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(5)]))
    x, y = next(iter(feed((images[rows], labels[rows]), train=False, image_size=48, batch_size=len(rows),
                          device="cuda")))
    recipe = dataclasses.replace(demo_recipe(arch), label_smoothing=0.0, warmup_epochs=0.0)
    torch.manual_seed(0)
    trainer = make_trainer(build_model(arch, 5, pretrained=False), recipe, CUDA, steps_per_epoch=1000, label=arch)
    assert trainer.amp
    assert_overfits_one_batch(trainer, x, y)


def test_a_short_fit_on_cuda_runs_and_checkpoints_the_gpu_rng(photos) -> None:
    recipe = dataclasses.replace(demo_recipe("mobilenet_v3_large"), epochs=3, early_stopping_patience=0)
    torch.manual_seed(0)
    train = feed(photos, image_size=48, device="cuda", gpu_resident=True)
    val = feed(photos, train=False, image_size=48, device="cuda", batch_size=16)
    trainer = make_trainer(build_model("mobilenet_v3_large", 5, pretrained=False), recipe, CUDA, len(train))
    checkpoints = []
    result = fit(trainer, train, val, recipe, steps_per_epoch=len(train), on_epoch_end=checkpoints.append)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(np.isfinite(row["val_loss"]) for row in result.history) and result.best_epoch >= 1
    assert all(row["gpu_memory_mb"] > 0 for row in result.history)
    assert len(checkpoints) == 3 and len(checkpoints[-1].checkpoint["rng"]["cuda"]) == torch.cuda.device_count()


# Corruptions on the GPU give the CPU's pixels: exact where the arithmetic is integer or libjpeg's
# (the JPEG goes through the CPU; the noise is the CPU's table added in int16), within the stated
# grey levels where CUDA's float kernels round differently.
CORRUPTION_TOLERANCE = {  # corruption: (largest difference, share of pixels that may differ)
    "contrast": (1, 0.05), "low_resolution": (2, 0.05), "rotation": (2, 0.02), "off_centre_crop": (2, 0.05),
}


@pytest.mark.parametrize("side", [40, 96])
def test_every_corruption_on_cuda_matches_the_cpu_and_stays_uint8_there(side: int) -> None:
    from food101.config import CORRUPTIONS, SEVERITIES
    from food101.corruptions import Draws, corrupt, photo_uniforms

    settings = load_config(REPO / "params.yaml").robustness
    paths = sorted((SAMPLE / "images").glob("*/*.jpg"))[::17][:6]
    photos = []
    for path in paths:
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)))
    cpu_photos = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2)  # channels-last, as the cache feeds
    gpu_photos = cpu_photos.to(CUDA)
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            uniforms = photo_uniforms(settings.seed, name, severity, len(cpu_photos))
            on_cpu = corrupt(cpu_photos, name, severity, settings, Draws(uniforms))
            on_gpu = corrupt(gpu_photos, name, severity, settings, Draws(uniforms.to(CUDA)))
            label = f"{name} severity {severity} at {side} px"
            assert on_gpu.dtype == torch.uint8 and on_gpu.device.type == "cuda", label
            assert on_gpu.shape == cpu_photos.shape, label
            difference = (on_gpu.cpu().int() - on_cpu.int()).abs()
            if name in CORRUPTION_TOLERANCE:
                largest, share = CORRUPTION_TOLERANCE[name]
                assert int(difference.max()) <= largest, f"{label}: {int(difference.max())} grey levels"
                assert float((difference > 0).float().mean()) <= share, label
            else:
                assert int(difference.max()) == 0, f"{label}: {int(difference.max())} grey levels"
