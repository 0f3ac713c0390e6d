"""The dataset's listing: the official layout check, the meta files, and the selection of classes and rows.

Library code, apart from the download and validate stages (tasks/download.py, tasks/validate.py), so that
a benchmark or a script can list a Food-101 folder on a machine without the orchestration stack (Prefect,
MLflow, Great Expectations). Selecting rows reads only the meta files: no image is opened or copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from food101.config import Config, ConfigError
from food101.errors import Food101Error

SPLITS = ("train", "test")
REQUIRED_META = ("classes.txt", "labels.txt", "train.txt", "test.txt")


class DatasetLayoutError(Food101Error):
    """A dataset folder is not in the official Food-101 layout."""


class ManifestValidationError(Food101Error):
    """The dataset's listing or manifest is unusable: inconsistent meta files, a critical expectation
    that failed, or too many images quarantined."""


@dataclass(frozen=True)
class DatasetMeta:
    """The meta/ files of a Food-101 root."""

    classes: list[str]
    display: list[str]
    listed: dict[str, list[str]]  # split -> image ids ("apple_pie/1005649") in file order
    # (split, image id) -> path under the root, where not images/<id>.jpg (data.source=imagefolder)
    paths: dict[tuple[str, str], str] | None = None
    split_rule: str = "the official train/test lists (meta/train.txt, meta/test.txt)"


def check_layout(root: Path) -> Path:
    """Raise DatasetLayoutError naming the first missing piece of the official layout."""
    root = Path(root)
    expected = ("images/<class>/<id>.jpg, meta/classes.txt, meta/labels.txt, meta/train.txt, "
                "meta/test.txt")
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset folder {root} does not exist; set data.local_path (data.source=local) or "
            "paths.sample (data.source=sample) to a Food-101 folder in the official layout "
            f"({expected})"
        )
    missing = [root / "meta" / name for name in REQUIRED_META if not (root / "meta" / name).is_file()]
    if not (root / "images").is_dir():
        missing.insert(0, root / "images")
    if missing:
        names = ", ".join(str(path) for path in missing)
        raise DatasetLayoutError(
            f"{root} is not a Food-101 dataset folder: missing {names}. Expected the official layout "
            f"({expected}). Restore the file from the original archive, point data.local_path at "
            "the extracted food-101 folder or the .tar.gz, or delete the folder and run the "
            "download stage again to re-extract it."
        )
    return root


def read_meta(root: Path) -> DatasetMeta:
    """Read classes, display names and the split lists; a missing file is a clear error."""
    check_layout(root)
    meta = Path(root) / "meta"

    def lines(name: str) -> list[str]:
        return [line.strip() for line in (meta / name).read_text().splitlines() if line.strip()]

    classes, display = lines("classes.txt"), lines("labels.txt")
    if len(display) != len(classes):
        raise ManifestValidationError(
            f"{meta / 'labels.txt'} has {len(display)} names but {meta / 'classes.txt'} has "
            f"{len(classes)} classes; restore both files from the original archive"
        )
    return DatasetMeta(classes, display, {split: lines(f"{split}.txt") for split in SPLITS})


def dataset_meta(config: Config, root: Path) -> DatasetMeta:
    """The listing of the dataset root: Food-101's meta files, or an image folder's (food101/imagefolder.py)."""
    if config.data.source != "imagefolder":
        return read_meta(root)
    from food101 import imagefolder

    found = imagefolder.scan(root, config.data.test_fraction, config.data.split_seed)
    return DatasetMeta(found.classes, [imagefolder.display_name(c) for c in found.classes],
                       {split: [image_id for image_id, _ in rows] for split, rows in found.listed.items()},
                       {(split, image_id): path for split, rows in found.listed.items() for image_id, path in rows},
                       f"{found.layout}: {found.split_rule}")


def select_classes(all_classes: list[str], selection: list[str] | int | None) -> list[str]:
    """The selected class names in classes.txt order (all, the first N, or the named ones)."""
    if selection is None:
        return list(all_classes)
    if isinstance(selection, int):
        if not 1 <= selection <= len(all_classes):
            raise ConfigError(f"data.classes={selection}: choose between 1 and {len(all_classes)} classes")
        return list(all_classes[:selection])
    unknown = [name for name in selection if name not in all_classes]
    if unknown:
        raise ConfigError(
            f"data.classes names unknown classes {unknown}; valid names (meta/classes.txt): "
            f"{', '.join(all_classes)}"
        )
    if len(set(selection)) != len(selection):
        raise ConfigError(f"data.classes lists a class twice: {selection}")
    chosen = set(selection)
    return [name for name in all_classes if name in chosen]


def select_rows(meta: DatasetMeta, classes: list[str], train_per_class: int | None,
                test_per_class: int | None) -> pd.DataFrame:
    """The listing of selected images: path, image_id, class, label, split (first K per class)."""
    label_of = {name: index for index, name in enumerate(classes)}
    known = set(meta.classes)
    limits = {"train": train_per_class, "test": test_per_class}
    records = []
    for split in SPLITS:
        taken: dict[str, int] = {}
        for image_id in meta.listed[split]:
            name = image_id.split("/", 1)[0]
            if name not in known:
                raise ManifestValidationError(
                    f"meta/{split}.txt lists {image_id!r}, whose class {name!r} is not in meta/classes.txt; "
                    "restore the meta files from the original archive"
                )
            if name not in label_of:
                continue
            limit = limits[split]
            if limit is not None and taken.get(name, 0) >= limit:
                continue
            taken[name] = taken.get(name, 0) + 1
            path = meta.paths[(split, image_id)] if meta.paths else f"images/{image_id}.jpg"
            records.append((path, image_id, name, label_of[name], split))
    return pd.DataFrame.from_records(records, columns=["path", "image_id", "class", "label", "split"])
