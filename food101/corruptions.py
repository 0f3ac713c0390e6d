"""Corruptions of phone photos for the robustness stage (ImageNet-C's idea), as a library.

Every operation takes uint8 photos (B, 3, H, W) on any device and returns the same shape and
dtype; the randomness comes from `Draws`, seeded per (seed, corruption, severity) by
`condition_seed`, so a photo's corruption is the same in every benchmark and every batch.
No Prefect or MLflow here: the throughput benchmark runs this on machines without them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
import torchvision.transforms.v2.functional as F

from food101.config import CORRUPTIONS, RobustnessConfig

OCCLUSION_GREY = 128


@dataclass
class Draws:
    """The randomness of one corruption at one severity: a generator for noise on the device and
    two uniforms per photo (positions, signs) drawn up front, so a photo's corruption does not
    depend on the batch it falls in."""

    generator: torch.Generator
    uniforms: torch.Tensor  # (B, 2) on the images' device, this batch's rows


def _brightness(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    return F.adjust_brightness(x, level)


def _contrast(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    return F.adjust_contrast(x, level)


def _gaussian_noise(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's gaussian_noise draws from the global RNG, not from a seeded generator.
    noise = torch.randn(x.shape, generator=draws.generator, device=x.device).mul_(255.0 * level)
    return x.float().add_(noise).round_().clamp_(0, 255).to(torch.uint8)


def _gaussian_blur(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's gaussian_blur convolves with the whole k x k kernel; two 1-D passes give
    # the same blur at 2k multiplies a pixel instead of k * k (10x fewer at 224 px, severity 3).
    sigma = max(level * x.shape[-1], 0.3)
    radius = min(math.ceil(3 * sigma), x.shape[-1] // 2 - 1)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.device)
    out = TF.pad(x.float(), [radius] * 4, mode="reflect")
    out = TF.conv2d(out, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = TF.conv2d(out, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _motion_blur(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: torchvision has no motion blur. ImageNet-C's line kernel is the mean of the
    # photo shifted along the line: one add per point, where a dense L x L convolution does L * L.
    length = max(3, round(level * x.shape[-1]) | 1)
    angle = float(torch.rand(1, generator=draws.generator, device=x.device)) * math.pi
    reach = length // 2
    t = torch.linspace(-1, 1, 4 * length)
    offsets = sorted({(round(float(v) * reach * math.sin(angle)), round(float(v) * reach * math.cos(angle)))
                      for v in t})
    height, width = x.shape[-2:]
    padded = TF.pad(x.float(), [reach] * 4, mode="reflect")
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for dy, dx in offsets:
        out += padded[..., reach + dy:reach + dy + height, reach + dx:reach + dx + width]
    return out.div_(len(offsets)).round_().clamp_(0, 255).to(torch.uint8)


def _jpeg(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    return F.jpeg(x, int(level))


def _low_resolution(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    side = x.shape[-1]
    small = max(4, round(level * side))
    return F.resize(F.resize(x, [small, small], antialias=True), [side, side], antialias=False)


def _rotation(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    clockwise = draws.uniforms[:, 0] < 0.5
    out = x.clone()
    for mask, angle in ((clockwise, -level), (~clockwise, level)):
        if mask.any():
            out[mask] = F.rotate(x[mask], angle, interpolation=F.InterpolationMode.BILINEAR, fill=[0.0])
    return out


def _occlusion(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's erase takes one box per call; a mask gives each photo its own box.
    height, width = x.shape[-2:]
    box = max(1, round(level * min(height, width)))
    top = (draws.uniforms[:, 0] * (height - box + 1)).floor().long()[:, None]
    left = (draws.uniforms[:, 1] * (width - box + 1)).floor().long()[:, None]
    ys, xs = torch.arange(height, device=x.device)[None], torch.arange(width, device=x.device)[None]
    inside = (((ys >= top) & (ys < top + box))[:, :, None] & ((xs >= left) & (xs < left + box))[:, None, :])
    return x.masked_fill(inside[:, None], OCCLUSION_GREY)


def _off_centre_crop(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    height, width = x.shape[-2:]
    keep_h, keep_w = max(1, round(level * height)), max(1, round(level * width))
    corner = (draws.uniforms[:, 0] * 4).floor().long().clamp_(max=3)
    out = x.clone()
    for index in range(4):  # towards one of the four corners, as a hasty framing would
        mask = corner == index
        if mask.any():
            top, left = (height - keep_h) * (index // 2), (width - keep_w) * (index % 2)
            out[mask] = F.resized_crop(x[mask], top, left, keep_h, keep_w, [height, width], antialias=True)
    return out


Corruption = Callable[[torch.Tensor, float, Draws], torch.Tensor]
OPERATIONS: dict[str, Corruption] = {
    "brightness_dark": _brightness, "brightness_bright": _brightness, "contrast": _contrast,
    "gaussian_noise": _gaussian_noise, "gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur,
    "jpeg": _jpeg, "low_resolution": _low_resolution, "rotation": _rotation, "occlusion": _occlusion,
    "off_centre_crop": _off_centre_crop,
}
assert set(OPERATIONS) == set(CORRUPTIONS), "food101.config.CORRUPTIONS and OPERATIONS must name the same"


def condition_seed(seed: int, corruption: str, severity: int) -> int:
    """A stable seed per (seed, corruption, severity): the same whatever subset is run."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}".encode())


def photo_uniforms(seed: int, corruption: str, severity: int, n: int) -> torch.Tensor:
    """(n, 2) uniforms for the photos of the test split, in cache order."""
    generator = torch.Generator().manual_seed(condition_seed(seed, corruption, severity))
    return torch.rand(n, 2, generator=generator)


def corrupt(x: torch.Tensor, corruption: str, severity: int, settings: RobustnessConfig, draws: Draws) -> torch.Tensor:
    """The photos `x` (uint8, B x 3 x H x W) under `corruption` at `severity`; severity 0 is identity."""
    if severity == 0:
        return x
    return OPERATIONS[corruption](x, float(settings.levels[corruption][severity - 1]), draws)
