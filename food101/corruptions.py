"""Corruptions of phone photos for the robustness stage (ImageNet-C's idea), as a library.

Every operation takes uint8 photos (B, 3, H, W) on any device and returns the same shape and
dtype; the randomness comes from `Draws`, seeded per (seed, corruption, severity) by
`condition_seed`, so a photo's corruption is the same in every benchmark and every batch.
No Prefect or MLflow here: the throughput benchmark runs this on machines without them.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
import torchvision.transforms.v2.functional as F

from food101.config import CORRUPTIONS, RobustnessConfig

OCCLUSION_GREY = 128
CPU_CHUNK_PIXELS = 8 * 224 * 224  # 1.2 MB of uint8 photos
MOTION_DIRECTIONS = 16  # streak directions, 11.25 degrees apart
NOISE_TABLE_SIZE = 1 << 20  # seeded standard normals that every photo's noise is a window of
NOISE_TABLE_SEED = 101
# Bump whenever any corruption's pixels change for the same seed. 2: motion blur, 16 directions per photo.
# 3: noise from the seeded table, the same on every device and in every batch.
CORRUPTIONS_VERSION = 3


@dataclass
class Draws:
    """The randomness of one corruption at one severity: two uniforms per photo (positions, signs,
    directions, noise offsets) drawn up front, so a photo's corruption does not depend on the batch
    it falls in, nor on the device (a CUDA generator draws other numbers than the CPU's)."""

    uniforms: torch.Tensor  # (B, 2) on the images' device, this batch's rows


def _scale_shift(x: torch.Tensor, factor: float, offset: torch.Tensor | None = None) -> torch.Tensor:
    """floor(x * factor + offset) clamped to 0-255, as torchvision's uint8 blend, in 32-bit fixed
    point with 16 fractional bits: the same values within 1/65536 of a grey level, without the
    uint8 -> float32 -> uint8 round trip that costs several times more on a CPU."""
    out = x.to(torch.int32).mul_(round(factor * 65536))
    if offset is not None:
        out.add_((offset * 65536).round_().to(torch.int32))
    return out.bitwise_right_shift_(16).clamp_(0, 255).to(torch.uint8)


def _per_group(x: torch.Tensor, groups: list[int], apply: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """`apply(photos, group)` on each group's photos as one slice of the batch, the photos back in
    their order after: on a CPU, masked gathers and scatters cost a third of a rotation. The slices
    come out of index_select contiguous (B, 3, H, W), which suits grid_sample and padding."""
    keys = torch.tensor(groups)
    order = torch.argsort(keys, stable=True)
    sorted_photos = x.index_select(0, order.to(x.device))
    parts, first = [], 0
    for group, count in zip(*torch.unique_consecutive(keys[order], return_counts=True), strict=True):
        parts.append(apply(sorted_photos[first:first + int(count)], int(group)))
        first += int(count)
    return torch.cat(parts).index_select(0, torch.argsort(order).to(x.device))


def _brightness(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: adjust_brightness's x * level in fixed point (see _scale_shift).
    if not 0 <= level < 128:  # beyond int32 in fixed point
        return F.adjust_brightness(x, level)
    return _scale_shift(x, level)


def _contrast(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: adjust_contrast's blend towards the mean grey in fixed point (see _scale_shift);
    # the mean grey is the channel means under its grey weights.
    if not 0 <= level < 128:
        return F.adjust_contrast(x, level)
    weights = torch.tensor([0.2989, 0.587, 0.114], device=x.device)
    grey = x.float().mean(dim=(-2, -1)) @ weights
    return _scale_shift(x, level, (grey * (1 - level)).view(-1, 1, 1, 1))


@functools.lru_cache(maxsize=16)
def noise_table(level: float, length: int, device: torch.device) -> torch.Tensor:
    """int16 round(255 * level * z) for max(NOISE_TABLE_SIZE, length) standard normals z drawn on
    the CPU from NOISE_TABLE_SEED, its first `length` values repeated at the end so that a window of
    `length` starts at any of its positions; x + round(s) is round(x + s) for whole grey levels x."""
    size = _noise_table_size(length)
    z = torch.randn(size, generator=torch.Generator().manual_seed(NOISE_TABLE_SEED), dtype=torch.float64)
    table = z.mul_(255.0 * level).round_().clamp_(-255, 255).to(torch.int16)
    return torch.cat([table, table[:length]]).to(device)


def _noise_table_size(length: int) -> int:
    """Distinct values in noise_table: at least a photo's worth."""
    return max(NOISE_TABLE_SIZE, length)


def noise_offsets(uniforms: torch.Tensor, length: int) -> list[int]:
    """Each photo's window into noise_table, from its first uniform (computed on the CPU)."""
    size = _noise_table_size(length)
    return (uniforms[:, 0].cpu().double() * size).long().clamp_(max=size - 1).tolist()


def _gaussian_noise(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's gaussian_noise draws float noise from the global RNG on the device. Each
    # photo's noise is a window of a seeded table of rounded normals (window picked by its uniform),
    # added in int16: the same pixels on every device and in every batch, without a draw per pixel.
    # Windows of two photos may overlap; within a photo the values are independent draws.
    height, width = x.shape[-2:]
    length = 3 * height * width
    table = noise_table(level, length, x.device)
    out = x.to(torch.int16)
    for photo, offset in enumerate(noise_offsets(draws.uniforms, length)):  # (H, W, 3): the cache's order
        out[photo].add_(table[offset:offset + length].view(height, width, 3).permute(2, 0, 1))
    return out.clamp_(0, 255).to(torch.uint8)


def _gaussian_taps(sigma: float, radius: int) -> list[int]:
    """The Gaussian's 2 * radius + 1 taps in 1/256ths: rounded cumulatively, so they are never
    negative and sum to exactly 256 (a blurred photo keeps its mean brightness)."""
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    cumulative = (256 * taps.cumsum(0) / taps.sum()).round().long()
    return torch.diff(cumulative, prepend=torch.zeros(1, dtype=torch.long)).tolist()


def _reflect_padded(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """x as int16 minus 128, reflect-padded by `radius` along `dim`, contiguous.

    Written here: TF.pad's reflect mode on uint8 channels-last photos costs 20x a sweep on the CPU;
    a copy into a new buffer and two small flipped copies give the same pixels."""
    size = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = size + 2 * radius
    out = torch.empty(shape, dtype=torch.int16, device=x.device)
    out.narrow(dim, radius, size).copy_(x)
    out.narrow(dim, 0, radius).copy_(out.narrow(dim, radius + 1, radius).flip(dim))
    out.narrow(dim, radius + size, radius).copy_(out.narrow(dim, size - 1, radius).flip(dim))
    return out.sub_(128)


def _blur_pass(padded: torch.Tensor, dim: int, taps: list[int]) -> torch.Tensor:
    """One 1-D pass along `dim` over _reflect_padded photos in int16 fixed point, rounded
    half up: the blurred photo minus 128, as int16.

    Centred on 128, a pixel times taps that sum to 256 stays within int16's range; integer sums are
    the same on every device, and a sweep of int16 is half the memory of float32."""
    size = padded.shape[dim] - len(taps) + 1
    weighted = [(offset, weight) for offset, weight in enumerate(taps) if weight]
    total = padded.narrow(dim, weighted[0][0], size).mul(weighted[0][1])
    for offset, weight in weighted[1:]:
        total.add_(padded.narrow(dim, offset, size), alpha=weight)
    return total.add_(128).bitwise_right_shift_(8)


def _gaussian_blur(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's gaussian_blur convolves in float32 with the whole k x k kernel. Two 1-D
    # passes of shifted adds in int16 with taps in 1/256ths cost 2k cheap sweeps a pixel, about 2x
    # less than float32 depthwise convolutions at 224 px, and give the same pixels on every device;
    # they differ from a float32 Gaussian by at most 1 grey level (the sample, 64 and 224 px).
    sigma = max(level * x.shape[-1], 0.3)
    radius = min(math.ceil(3 * sigma), min(x.shape[-2:]) // 2 - 1)
    taps = _gaussian_taps(sigma, radius)
    photos = x.permute(0, 2, 3, 1)  # (B, H, W, 3), the cache's layout: no transposing copy
    across = _blur_pass(_reflect_padded(photos, 2, radius), 2, taps).add_(128)  # 0-255, as a uint8 pass gives
    down = _blur_pass(_reflect_padded(across, 1, radius), 1, taps).add_(128).to(torch.uint8)
    return down.permute(0, 3, 1, 2)


def _motion_blur(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: torchvision has no motion blur. ImageNet-C's line kernel is the mean of the
    # photo shifted along the line: one add per point, where a dense L x L convolution does L * L.
    # Each photo's direction is one of MOTION_DIRECTIONS, picked by its own uniform, so a photo gets
    # the same streak on every device and in every chunk (the device generators differ).
    reach = motion_reach(level, x.shape[-1])
    directions = (draws.uniforms[:, 0] * MOTION_DIRECTIONS).long().clamp_(max=MOTION_DIRECTIONS - 1).tolist()
    height, width = x.shape[-2:]

    def streak(photos: torch.Tensor, direction: int) -> torch.Tensor:
        offsets = motion_offsets(reach, direction)
        # Sums in int16: at most ~2 * length points of 255 each, far inside its range.
        padded = TF.pad(photos, [reach] * 4, mode="reflect").to(torch.int16)
        total = torch.zeros(photos.shape, dtype=torch.int16, device=x.device)
        for dy, dx in offsets:
            total += padded[..., reach + dy:reach + dy + height, reach + dx:reach + dx + width]
        return total.float().mul_(1 / len(offsets)).add_(0.5).to(torch.uint8)

    return _per_group(x, directions, streak)


def motion_reach(level: float, side: int) -> int:
    """Half the streak's length in pixels: the length is `level` of the side, odd, at least 3."""
    return max(3, round(level * side) | 1) // 2


def motion_offsets(reach: int, direction: int) -> list[tuple[int, int]]:
    """The (dy, dx) pixel offsets a streak of half-length `reach` in `direction` averages, each once."""
    angle = direction * math.pi / MOTION_DIRECTIONS
    steps = torch.linspace(-1, 1, 4 * (2 * reach + 1)).tolist()
    return sorted({(round(v * reach * math.sin(angle)), round(v * reach * math.cos(angle))) for v in steps})


@functools.lru_cache(maxsize=4)
def _codec_threads(workers: int) -> ThreadPoolExecutor:
    """Threads for libjpeg, kept for the process: torch runs it on one core per call."""
    return ThreadPoolExecutor(workers, thread_name_prefix="food101-jpeg")


def _jpeg(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # torchvision encodes a CUDA tensor with nvjpeg, then refuses to decode bytes held on the GPU
    # (0.26 to 0.29), and nvjpeg's encoder is not libjpeg's: libjpeg on the CPU and back gives
    # every device the same pixels. libjpeg codes one photo at a time on one core and releases the
    # GIL, so the batch is split over as many threads as torch uses for its own operations (one
    # thread under OMP_NUM_THREADS=1): each photo is coded alone, so the pixels do not depend on it.
    photos = x.cpu()
    workers = min(torch.get_num_threads(), len(photos))
    if workers <= 1:
        out = F.jpeg(photos, int(level))
    else:
        parts = _codec_threads(workers).map(lambda part: F.jpeg(part, int(level)), photos.tensor_split(workers))
        out = torch.cat(list(parts))
    return out.to(x.device)


def _low_resolution(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    side = x.shape[-1]
    small = max(4, round(level * side))
    return F.resize(F.resize(x, [small, small], antialias=True), [side, side], antialias=False)


@functools.lru_cache(maxsize=16)
def _rotation_grid(height: int, width: int, angle: float, device: torch.device) -> torch.Tensor:
    """F.rotate's sampling grid (1, H, W, 2) for `angle` degrees about the centre, built with the
    same float32 operations as torchvision's (so the same pixels), once per angle and size."""
    turn = math.radians(-(angle % 360))  # F.rotate's inverse matrix, shear 0 and scale 1
    theta = torch.tensor([math.cos(turn), math.sin(turn), 0.0, -math.sin(turn), math.cos(turn), 0.0],
                         dtype=torch.float32, device=device).reshape(1, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)
                       .unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32, device=device))
    return base.view(1, height * width, 3).bmm(scaled).view(1, height, width, 2)


def _rotation(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # F.rotate's bilinear rotation, its grid cached: F.rotate rebuilds the grid (a bmm over every
    # pixel) on each call, half its time on a CPU. The corners are black (grid_sample's zero padding).
    clockwise = (draws.uniforms[:, 0] < 0.5).long().tolist()
    height, width = x.shape[-2:]

    def turn(photos: torch.Tensor, clockwise: int) -> torch.Tensor:
        grid = _rotation_grid(height, width, -level if clockwise else level, x.device)
        return TF.grid_sample(photos.float(), grid.expand(len(photos), -1, -1, -1), mode="bilinear",
                              padding_mode="zeros", align_corners=False).round_().to(torch.uint8)

    return _per_group(x, clockwise, turn)


def _occlusion(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    # Written here: v2's erase takes one box per call and copies the batch each time; a slice
    # assignment per photo gives each photo its own box on one copy.
    height, width = x.shape[-2:]
    box = max(1, round(level * min(height, width)))
    tops = (draws.uniforms[:, 0] * (height - box + 1)).floor().long().tolist()
    lefts = (draws.uniforms[:, 1] * (width - box + 1)).floor().long().tolist()
    out = x.clone()  # in its own layout: a channels-last photo copied to (B, 3, H, W) costs 15x more
    for photo, (top, left) in enumerate(zip(tops, lefts, strict=True)):
        out[photo, :, top:top + box, left:left + box] = OCCLUSION_GREY
    return out


def _off_centre_crop(x: torch.Tensor, level: float, draws: Draws) -> torch.Tensor:
    height, width = x.shape[-2:]
    keep_h, keep_w = max(1, round(level * height)), max(1, round(level * width))
    corners = (draws.uniforms[:, 0] * 4).floor().long().clamp_(max=3).tolist()

    # Each photo cut towards its corner, as a hasty framing; the cuts stacked channels-last (uint8
    # resizing is several times faster so on a CPU) and resized as one batch.
    photos = x.permute(0, 2, 3, 1)
    tops, lefts = [(height - keep_h) * (c // 2) for c in corners], [(width - keep_w) * (c % 2) for c in corners]
    cuts = torch.stack([photos[i, top:top + keep_h, left:left + keep_w]
                        for i, (top, left) in enumerate(zip(tops, lefts, strict=True))])
    return F.resize(cuts.permute(0, 3, 1, 2), [height, width], antialias=True)


Corruption = Callable[[torch.Tensor, float, Draws], torch.Tensor]
OPERATIONS: dict[str, Corruption] = {
    "brightness_dark": _brightness, "brightness_bright": _brightness, "contrast": _contrast,
    "gaussian_noise": _gaussian_noise, "gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur,
    "jpeg": _jpeg, "low_resolution": _low_resolution, "rotation": _rotation, "occlusion": _occlusion,
    "off_centre_crop": _off_centre_crop,
}
# Motion blur splits the batch by streak direction, into groups about a chunk's size or smaller:
# chunking first would only make more and smaller groups (3x the slices at 224 px). JPEG codes each
# photo alone and splits the batch over its threads.
WHOLE_BATCH_ON_CPU = frozenset({"motion_blur", "jpeg"})
assert set(OPERATIONS) == set(CORRUPTIONS), "food101.config.CORRUPTIONS and OPERATIONS must name the same"


def condition_seed(seed: int, corruption: str, severity: int) -> int:
    """A stable seed per (seed, corruption, severity): the same whatever subset is run."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}".encode())


def photo_uniforms(seed: int, corruption: str, severity: int, n: int) -> torch.Tensor:
    """(n, 2) uniforms for the photos of the test split, in cache order."""
    generator = torch.Generator().manual_seed(condition_seed(seed, corruption, severity))
    return torch.rand(n, 2, generator=generator)


def corrupt(x: torch.Tensor, corruption: str, severity: int, settings: RobustnessConfig, draws: Draws) -> torch.Tensor:
    """The photos `x` (uint8, B x 3 x H x W) under `corruption` at `severity`; severity 0 is identity.

    On a CPU the batch goes through in chunks of about CPU_CHUNK_PIXELS, whose float and int32
    intermediates stay in cache: 2-3x faster at 224 px than one pass over 64 photos. The chunks
    are fixed by the photos' size, so the result is the same in every run."""
    if severity == 0:
        return x
    operation, level = OPERATIONS[corruption], float(settings.levels[corruption][severity - 1])
    whole = x.device.type != "cpu" or corruption in WHOLE_BATCH_ON_CPU
    step = len(x) if whole else max(1, CPU_CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
    if step >= len(x):
        return operation(x, level, draws)
    return torch.cat([operation(x[i:i + step], level, Draws(draws.uniforms[i:i + step]))
                      for i in range(0, len(x), step)])
