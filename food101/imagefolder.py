"""Datasets in an image-folder layout, listed as the validate stage lists Food-101's meta files.

Two layouts under `data.local_path` (detected):
- `root/train/<class>/*` and `root/test/<class>/*`: the split is the folders';
- `root/<class>/*`: each class's files, sorted by name, are shuffled by a generator seeded from
  `data.split_seed` and the class name, and the first round(n * `data.test_fraction`) (at least
  one, at most n - 1) go to test. Stratified by construction, the same seed gives the same split,
  and adding a class leaves the other classes' splits alone.

Only files directly in a class folder whose suffix is an image suffix are listed; hidden entries
are skipped. Every listed file then goes through validate's checks unchanged (decode, quarantine,
leakage between splits, counts per class and split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from food101.errors import Food101Error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "test")


class ImageFolderError(Food101Error):
    """data.local_path is not an image folder of either layout."""


@dataclass(frozen=True)
class ImageFolder:
    """The listing: classes, and per split (image_id, path relative to the root) in a stable order."""

    layout: str  # "split-folders" or "class-folders"
    classes: list[str]
    listed: dict[str, list[tuple[str, str]]]
    split_rule: str


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def _entry(root: Path, path: Path, name: str) -> tuple[str, str]:
    return f"{name}/{path.name}", path.relative_to(root).as_posix()


def class_seed(split_seed: int, name: str) -> int:
    """A seed per class: the same class gets the same shuffle whatever other classes exist."""
    return int.from_bytes(hashlib.sha256(f"{split_seed}/{name}".encode()).digest()[:8], "little")


def split_class(files: list[Path], test_fraction: float, split_seed: int, name: str) -> tuple[list[Path], list[Path]]:
    """(train, test) of one class's files, both in file-name order."""
    n = len(files)
    n_test = 0 if n < 2 else min(max(round(n * test_fraction), 1), n - 1)
    order = np.random.default_rng(class_seed(split_seed, name)).permutation(n)
    chosen = set(order[:n_test].tolist())
    return ([f for i, f in enumerate(files) if i not in chosen], [f for i, f in enumerate(files) if i in chosen])


def scan(root: Path, test_fraction: float, split_seed: int) -> ImageFolder:
    """List an image folder in either layout; raise ImageFolderError saying what is expected."""
    root = Path(root)
    expected = "root/<class>/<image> or root/train/<class>/<image> + root/test/<class>/<image>"
    if not root.is_dir():
        raise ImageFolderError(f"data.local_path {root} is not a folder; point it at an image folder ({expected})")
    top = {p.name: p for p in _visible_dirs(root)}
    listed: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    if set(top) == set(SPLITS):
        layout, rule = "split-folders", "the dataset's own train/ and test/ folders"
        classes = sorted({p.name for split in SPLITS for p in _visible_dirs(top[split])})
        for split in SPLITS:
            for folder in _visible_dirs(top[split]):
                listed[split] += [_entry(root, path, folder.name) for path in _images(folder)]
    else:
        layout = "class-folders"
        rule = (f"seeded stratified split: {test_fraction:g} of each class's photos to test "
                f"(data.test_fraction), seed {split_seed} (data.split_seed)")
        classes = sorted(top)
        for name in classes:
            train, test = split_class(_images(top[name]), test_fraction, split_seed, name)
            listed["train"] += [_entry(root, path, name) for path in train]
            listed["test"] += [_entry(root, path, name) for path in test]
    if not classes or not any(listed.values()):
        raise ImageFolderError(f"{root} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)}); "
                               f"expected {expected}")
    return ImageFolder(layout, classes, listed, rule)


def display_name(name: str) -> str:
    """'apple_pie' -> 'Apple pie', as Food-101's labels.txt writes class names."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]
