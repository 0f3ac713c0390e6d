"""BatchFeed: shapes, normalisation, determinism per (seed, epoch), eval is centre, flips flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from food101.feed import BatchFeed, axis_aligned_grid, crop_thetas
from food101.models import IMAGENET_MEAN, IMAGENET_STD
from tasks.preprocess import load_image
from tests.conftest import SAMPLE

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here: one torch thread."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """23 real photos at 48 px as a read-only memmap, like the cache, and their labels."""
    paths = sorted((SAMPLE / "images").glob("*/*.jpg"))[::8][:23]
    array = np.stack([load_image(p, 56, 48) for p in paths])
    file = Path(tmp_path_factory.mktemp("feed")) / "images.npy"
    np.save(file, array)
    return np.load(file, mmap_mode="r"), np.arange(len(paths), dtype=np.int64) % 5


def feed(photos, **kwargs) -> BatchFeed:
    images, labels = photos
    options = {"batch_size": 8, "device": "cpu", "train": True, "image_size": 32, "mean": MEAN, "std": STD,
               "seed": 0} | kwargs
    return BatchFeed(images, labels, **options)


def batches(batch_feed: BatchFeed, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batch_feed.set_epoch(epoch)
    return list(batch_feed)


def test_train_batches_have_the_agreed_shapes_and_types(photos) -> None:
    train = feed(photos)
    out = batches(train)
    assert len(train) == 2 == len(out)  # 23 // 8 with drop_last (the default in train)
    for x, y in out:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(x).all()
    assert sum(len(y) for _, y in out) == 16
    plain = feed(photos, channels_last=False, drop_last=False)
    assert len(plain) == 3 and [len(y) for _, y in batches(plain)] == [8, 8, 7]
    assert batches(plain)[0][0].is_contiguous()


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(photos) -> None:
    first = batches(feed(photos), epoch=3)
    for same in (feed(photos, prefetch=0), feed(photos, workers=3, prefetch=1), feed(photos, workers=2)):
        for (x1, y1), (x2, y2) in zip(first, batches(same, epoch=3), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = batches(feed(photos), epoch=4)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other_epoch, strict=True))
    assert not torch.equal(first[0][0], other_epoch[0][0])
    other_seed = batches(feed(photos, seed=1), epoch=3)
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_eval_is_the_normalised_centre_in_order(photos) -> None:
    images, labels = photos
    evaluate = feed(photos, train=False, image_size=48)
    assert not evaluate.drop_last and len(evaluate) == 3
    out = batches(evaluate, epoch=0)
    assert [torch.equal(a[0], b[0]) for a, b in zip(out, batches(evaluate, epoch=5), strict=True)] == [True] * 3
    x = torch.cat([b[0] for b in out])
    assert torch.equal(torch.cat([b[1] for b in out]), torch.from_numpy(labels))  # no shuffling
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x * std + mean, pixels, atol=1e-5, rtol=0)
    # Another size: an antialiased resize of the whole (centre-cropped) image, as PIL would.
    small = torch.cat([b[0] for b in batches(feed(photos, train=False, image_size=24))])
    assert small.shape == (23, 3, 24, 24)
    pil = np.stack([np.asarray(Image.fromarray(np.asarray(im)).resize((24, 24), Image.Resampling.BILINEAR))
                    for im in images])
    reference = (torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert (small - reference).abs().mean() < 0.02


def test_flip_mirrors_and_full_crop_is_identity(photos) -> None:
    images = np.asarray(photos[0])
    rng = np.random.default_rng(0)
    thetas = crop_thetas(rng, 256, 48, 48, 0.25)
    flipped = thetas[:, 0, 0] < 0
    assert 0.35 < flipped.mean() < 0.65  # about half the samples are flipped
    areas = np.abs(thetas[:, 0, 0] * thetas[:, 1, 1])
    assert areas.min() >= 0.25 - 1e-6 and areas.max() <= 1 + 1e-6
    ratios = np.abs(thetas[:, 0, 0] / thetas[:, 1, 1])
    assert ratios.min() >= 3 / 4 - 1e-6 and ratios.max() <= 4 / 3 + 1e-6

    # min_scale=1 leaves the whole image; the only randomness left is the flip.
    row_ids = np.arange(len(images))  # labels that name their row
    whole = feed((photos[0], row_ids), min_scale=1.0, image_size=48, batch_size=23, drop_last=False)
    (x, y), = batches(whole)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    restored = x * std + mean
    original = torch.from_numpy(images[y.numpy()]).permute(0, 3, 1, 2).float() / 255
    matches_plain = (restored - original).abs().amax(dim=(1, 2, 3)) < 1e-3
    matches_mirror = (restored - original.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert (matches_plain | matches_mirror).all()
    assert matches_plain.any() and matches_mirror.any()  # both happen, and a flip really mirrors


def test_gpu_resident_gives_the_same_batches(photos) -> None:
    """gpu_resident indexes a device copy; on the CPU it must still give identical batches."""
    for (x1, y1), (x2, y2) in zip(batches(feed(photos), 2), batches(feed(photos, gpu_resident=True), 2), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stopping_early_and_errors(photos) -> None:
    train = feed(photos, batch_size=2, prefetch=1)
    for number, _ in enumerate(train):
        if number == 1:
            break  # the producer thread must not hang
    assert len(batches(train)) == 11
    threaded = feed(photos, batch_size=2, prefetch=1, workers=3)
    for number, _ in enumerate(threaded):
        if number == 4:
            break
    assert len(batches(threaded)) == 11

    class Failing(BatchFeed):
        def _make_batch(self, rows, epoch, number):
            if number == 5:
                raise OSError("disk gone at batch 5")
            return super()._make_batch(rows, epoch, number)

    images, labels = photos
    failing = Failing(images, labels, batch_size=2, device="cpu", train=True, image_size=16, mean=MEAN, std=STD,
                      workers=3)
    delivered = []
    with pytest.raises(OSError, match="batch 5"):
        for x, _y in failing:
            delivered.append(x)
    assert len(delivered) == 5  # every batch before the failing one, in order, then the error
    with pytest.raises(ValueError, match="workers"):
        BatchFeed(images, labels, batch_size=1, device="cpu", train=True, image_size=8, mean=MEAN, std=STD, workers=0)
    with pytest.raises(ValueError, match="uint8"):
        BatchFeed(np.zeros((2, 8, 8, 3), np.float32), np.zeros(2), batch_size=1, device="cpu", train=True,
                  image_size=8, mean=MEAN, std=STD)


def test_axis_aligned_grid_equals_affine_grid() -> None:
    theta = torch.from_numpy(crop_thetas(np.random.default_rng(1), 16, 40, 56, 0.25))
    expected = torch.nn.functional.affine_grid(theta, [16, 3, 24, 24], align_corners=False)
    torch.testing.assert_close(axis_aligned_grid(theta, 24), expected, atol=1e-6, rtol=0)


def test_color_jitter_is_torchvisions_brightness_contrast_saturation() -> None:
    from torchvision.transforms.v2 import functional as TF

    from food101.feed import color_jitter, jitter_factors

    pixels = torch.rand(4, 3, 20, 24, generator=torch.Generator().manual_seed(0)) * 255
    factors = torch.from_numpy(jitter_factors(np.random.default_rng(0), 4, 0.6))
    assert factors.shape == (4, 3) and ((factors >= 0.4) & (factors <= 1.6)).all() and factors.std() > 0.1
    ours = color_jitter(pixels.clone(), factors) / 255
    for k in range(4):
        b, c, s = factors[k].tolist()
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(pixels[k] / 255, b), c), s)
        torch.testing.assert_close(ours[k], expected, atol=1e-5, rtol=1e-5)


def test_color_jitter_changes_colours_only_and_zero_changes_nothing(photos) -> None:
    plain = batches(feed(photos))
    jittered = batches(feed(photos, color_jitter=0.4))
    for (x0, y0), (x1, y1) in zip(plain, jittered, strict=True):
        assert torch.equal(y0, y1)
        assert not torch.allclose(x0, x1)
        # The same crops: the jitter is drawn after them, and keeps each photo's layout (its
        # brightest pixels stay among its brighter ones).
        for a, b in zip(x0, x1, strict=True):
            corr = torch.corrcoef(torch.stack([a.mean(0).flatten(), b.mean(0).flatten()]))[0, 1]
            assert corr > 0.9
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, batches(feed(photos, color_jitter=0.0)), strict=True))
    with pytest.raises(ValueError, match="color_jitter"):
        feed(photos, color_jitter=1.0)
