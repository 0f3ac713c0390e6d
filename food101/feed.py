"""BatchFeed: batches from the uint8 cache, augmented and normalised on the device.

The cache already holds decoded, centre-cropped uint8 photos, so a batch costs a gather from a
memmap and a copy, never a JPEG decode. Rows are gathered with sorted indices (a memmap read in
file order), into pinned memory on CUDA and copied with `non_blocking`, by `workers` background
threads that stay `prefetch` batches ahead each (batch i is made by thread i mod workers, and the
batches come out in order). The random resized crop and the flip are one batched
`affine_grid` + `grid_sample` on the device, the optional colour jitter a few per-photo
multiply-adds; the normalisation is folded into one multiply-add.

Randomness comes from numpy generators seeded with (seed, epoch[, batch]): the same seed and
epoch give the same batches on any device and whatever the thread timing.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# torchvision's RandomResizedCrop: aspect ratios drawn log-uniformly in [3/4, 4/3], ten tries
# per sample before falling back to the whole image.
RATIO_RANGE = (3 / 4, 4 / 3)
CROP_TRIES = 10


class BatchFeed:
    """(x float32 (B,3,S,S) normalised, y int64 (B,)) batches over (N,H,W,3) uint8 images."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        device: torch.device | str,
        train: bool,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        min_scale: float = 0.25,
        color_jitter: float = 0.0,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = True,
        gpu_resident: bool = False,
        prefetch: int = 2,
        workers: int = 1,
    ) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1 or image_size < 1 or not 0 < min_scale <= 1:
            raise ValueError("batch_size and image_size must be positive and min_scale in (0, 1]")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.image_size = image_size
        self.min_scale = min_scale
        self.color_jitter = color_jitter
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.prefetch = max(0, prefetch)
        self.workers = workers
        self.epoch = 0
        self._pin = self.device.type == "cuda"
        # x = (pixel / 255 - mean) / std  ==  pixel * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(self.device)
        self._resident: torch.Tensor | None = None
        self._resident_labels: torch.Tensor | None = None
        if gpu_resident:
            self._resident = _to_device_in_slices(images, self.device)
            self._resident_labels = torch.from_numpy(self.labels).to(self.device)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffling and augmentation the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batch_indices(self.epoch)
        epoch = self.epoch
        if self.prefetch == 0:
            for number, rows in enumerate(batches):
                yield self._make_batch(rows, epoch, number)
            return
        yield from self._prefetched(batches, epoch)

    # --- batches --------------------------------------------------------------------------------

    def _batch_indices(self, epoch: int) -> list[np.ndarray]:
        n = len(self.images)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # Within a batch the order is immaterial; sorted rows read a memmap front to back.
        return [np.sort(rows) for rows in batches]

    def _make_batch(self, rows: np.ndarray, epoch: int, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = self._gather(rows)
        if self.train:
            pixels = self._augment(pixels, np.random.default_rng([self.seed, epoch, number]))
        else:
            pixels = self._resize_eval(pixels)
        pixels = pixels.mul_(self._scale).add_(self._shift)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return pixels.contiguous(memory_format=memory_format), labels

    def _gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' uint8 pixels (B,H,W,3) and labels, on the device."""
        if self._resident is not None:
            index = torch.from_numpy(rows).to(self.device, non_blocking=True)
            return self._resident.index_select(0, index), self._resident_labels.index_select(0, index)
        shape = (len(rows), *self.images.shape[1:])
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=self._pin)
        np.take(self.images, rows, axis=0, out=host.numpy())
        labels = torch.from_numpy(self.labels[rows])
        if self._pin:
            labels = labels.pin_memory()
        return host.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _augment(self, pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Random resized crop to image_size and random horizontal flip, one grid_sample for the batch;
        then the colour jitter, when there is one."""
        batch, height, width = pixels.shape[:3]
        theta = torch.from_numpy(crop_thetas(rng, batch, height, width, self.min_scale))
        theta = theta.to(self.device, non_blocking=True)
        grid = axis_aligned_grid(theta, self.image_size)
        source = pixels.permute(0, 3, 1, 2).float()  # NHWC storage read as NCHW: channels_last
        out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.color_jitter > 0:  # drawn after the crops: a jitter of 0 leaves every earlier pixel as it was
            factors = torch.from_numpy(jitter_factors(rng, batch, self.color_jitter)).to(self.device)
            out = color_jitter(out, factors)
        return out

    def _resize_eval(self, pixels: torch.Tensor) -> torch.Tensor:
        source = pixels.permute(0, 3, 1, 2).float()
        if source.shape[-2:] == (self.image_size, self.image_size):
            return source
        return F.interpolate(source, size=(self.image_size, self.image_size), mode="bilinear",
                             antialias=True, align_corners=False)

    def _prefetched(self, batches: list[np.ndarray], epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches made on `workers` background threads, each up to `prefetch` ahead of the consumer.

        Thread k makes batches k, k + workers, ... into its own queue; the consumer reads the
        queues in turn, so the order (and, with the seeding per batch, every pixel) is the same
        whatever the number of threads. The heavy ops release the GIL, so threads overlap.
        """
        stop = threading.Event()
        queues = [queue.Queue(maxsize=self.prefetch) for _ in range(self.workers)]

        def produce(worker: int) -> None:
            ready = queues[worker]
            try:
                for number in range(worker, len(batches), self.workers):
                    ready.put(self._make_batch(batches[number], epoch, number))  # the consumer drains on stop
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                ready.put(exc)

        threads = [threading.Thread(target=produce, args=(k,), daemon=True, name=f"batch-feed-{k}")
                   for k in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            for number in range(len(batches)):
                item = queues[number % self.workers].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            for thread, ready in zip(threads, queues, strict=True):
                while thread.is_alive():  # unblock a producer waiting on a full queue
                    try:
                        ready.get_nowait()
                    except queue.Empty:
                        thread.join(timeout=0.05)


def crop_thetas(rng: np.random.Generator, batch: int, height: int, width: int, min_scale: float) -> np.ndarray:
    """(B, 2, 3) float32 affine maps for `affine_grid`: a random resized crop, flipped half the time.

    Drawn like torchvision's RandomResizedCrop (area fraction uniform in [min_scale, 1], aspect
    log-uniform in [3/4, 4/3], the first of ten tries that fits, else the whole image), but for a
    whole batch at once.
    """
    area = height * width
    scale = rng.uniform(min_scale, 1.0, size=(batch, CROP_TRIES))
    log_ratio = rng.uniform(math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]), size=(batch, CROP_TRIES))
    ratio = np.exp(log_ratio)
    crop_w = np.sqrt(area * scale * ratio)
    crop_h = np.sqrt(area * scale / ratio)
    fits = (crop_w <= width) & (crop_h <= height)
    first = fits.argmax(axis=1)
    chosen = np.arange(batch)
    crop_w = np.where(fits.any(axis=1), crop_w[chosen, first], width)
    crop_h = np.where(fits.any(axis=1), crop_h[chosen, first], height)
    left = rng.uniform(0.0, 1.0, size=batch) * (width - crop_w)
    top = rng.uniform(0.0, 1.0, size=batch) * (height - crop_h)
    flip = np.where(rng.uniform(size=batch) < 0.5, -1.0, 1.0)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta = np.zeros((batch, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = crop_w / width * flip
    theta[:, 0, 2] = (left + crop_w / 2) / width * 2 - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (top + crop_h / 2) / height * 2 - 1
    return theta


def jitter_factors(rng: np.random.Generator, batch: int, strength: float) -> np.ndarray:
    """(B, 3) float32 brightness, contrast and saturation factors, each uniform in [1 - s, 1 + s]."""
    return rng.uniform(1.0 - strength, 1.0 + strength, size=(batch, 3)).astype(np.float32)


def color_jitter(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation per photo, as torchvision's ColorJitter (without hue).

    `pixels` is (B, 3, H, W) float in 0..255; `factors` (B, 3) from `jitter_factors`. Brightness
    scales the pixels; contrast blends each photo with its mean grey; saturation blends each pixel
    with its own grey (torchvision's luma weights). Clamped to 0..255 after each step.
    """
    luma = torch.tensor([0.2989, 0.587, 0.114], dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    brightness, contrast, saturation = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
    out = (pixels * brightness).clamp_(0, 255)
    grey_mean = (out * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    out = (out * contrast + grey_mean * (1 - contrast)).clamp_(0, 255)
    grey = (out * luma).sum(dim=1, keepdim=True)
    return (out * saturation + grey * (1 - saturation)).clamp_(0, 255)


def axis_aligned_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`affine_grid(theta, (B, 3, size, size), align_corners=False)` for maps without rotation.

    A crop and a flip only scale and shift each axis, so the grid is an outer broadcast of two
    (B, size) vectors: about 10x cheaper than affine_grid's batched matmul on a CPU.
    """
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    grid_x = theta[:, 0, 0, None] * base + theta[:, 0, 2, None]
    grid_y = theta[:, 1, 1, None] * base + theta[:, 1, 2, None]
    return torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)


def _to_device_in_slices(images: np.ndarray, device: torch.device, rows_per_slice: int = 4096) -> torch.Tensor:
    """The whole uint8 array on the device, copied a slice at a time (host memory stays flat)."""
    resident = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(images), rows_per_slice):
        part = np.array(images[start:start + rows_per_slice])  # a writable copy: torch wants one
        resident[start:start + len(part)].copy_(torch.from_numpy(part))
    return resident
