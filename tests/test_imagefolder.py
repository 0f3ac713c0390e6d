"""data.source=imagefolder: the sample photos re-laid as image folders, through the real stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from food101.imagefolder import ImageFolderError, scan
from tasks import evaluate as ev
from tasks.download import download
from tasks.preprocess import open_cache, preprocess
from tasks.report import report
from tasks.train import train
from tasks.validate import read_manifest, read_validation, validate
from tests.conftest import SAMPLE, make_config, single_torch_thread

MODEL = "mobilenet_v3_small"
FAST = {
    "models": [MODEL], "train__epochs": 1, "train__max_steps_per_epoch": 2, "train__overrides": {},
    "evaluate__latency_warmup": 1, "evaluate__latency_runs": 3, "evaluate__throughput_batch": 4,
    "evaluate__bootstrap_samples": 100, "preprocess__workers": 1,
}


def sample_ids(split: str) -> list[str]:
    return (SAMPLE / "meta" / f"{split}.txt").read_text().split()


def split_folders(root: Path, train_per_class: int | None = None) -> Path:
    """root/train/<class>/<id>.jpg and root/test/<class>/<id>.jpg from the sample's official split."""
    for split in ("train", "test"):
        taken: dict[str, int] = {}
        for image_id in sample_ids(split):
            name = image_id.split("/")[0]
            if split == "train" and train_per_class is not None and taken.get(name, 0) >= train_per_class:
                continue
            taken[name] = taken.get(name, 0) + 1
            target = root / split / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SAMPLE / "images" / f"{image_id}.jpg", target)
    return root


def class_folders(root: Path, per_class: int = 12) -> Path:
    """root/<class>/<id>.jpg: the first photos of each class, no split given."""
    taken: dict[str, int] = {}
    for image_id in sample_ids("train"):
        name = image_id.split("/")[0]
        if taken.get(name, 0) < per_class:
            taken[name] = taken.get(name, 0) + 1
            (root / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SAMPLE / "images" / f"{image_id}.jpg", root / f"{image_id}.jpg")
    return root


@pytest.mark.parametrize("layout", ["split-folders", "class-folders"])
def test_image_folder_validates_preprocesses_trains_evaluates_and_reports(tmp_path, layout):
    data = tmp_path / "photos"
    if layout == "split-folders":
        split_folders(data, train_per_class=10)
    else:
        class_folders(data, per_class=12)
    config = make_config(tmp_path / "out", data__source="imagefolder", data__local_path=str(data),
                         data__test_fraction=0.25, data__split_seed=3, **FAST)
    with single_torch_thread():
        assert download.fn(config)["root"] == str(data.resolve())
        checked = validate.fn(config)
        manifest = read_manifest(config)
        assert checked["success"] and checked["quarantined"] == 0 and checked["images"] == len(manifest)
        counts = manifest.groupby(["class", "split"]).size()
        if layout == "split-folders":
            assert set(counts.xs("train", level="split")) == {10}
            assert set(counts.xs("test", level="split")) == {10}
            assert manifest.query("split == 'test'")["path"].str.startswith("test/").all()
        else:
            assert set(counts.xs("train", level="split")) == {9} and set(counts.xs("test", level="split")) == {3}
        assert sorted(manifest["class"].unique()) == sorted(p.name for p in (SAMPLE / "images").iterdir())
        dataset = read_validation(config)["dataset"]
        assert dataset["source"] == "imagefolder" and dataset["classes"] == 5
        assert dataset["split_rule"].startswith(layout)
        preprocess.fn(config)
        assert open_cache(config).classes == sorted(manifest["class"].unique())
        assert train.fn(config, MODEL)["status"] == "ok"
        values = ev.evaluate.fn(config, MODEL)
        assert values["n_test"] == int((manifest["split"] == "test").sum())
        published = report.fn(config, [MODEL])
    text = Path(published["report_md"]).read_text()
    assert "Dataset: `imagefolder`" in text and "Apple pie" in text
    assert ("data.test_fraction" in text) == (layout == "class-folders")


def test_a_test_photo_copied_into_train_is_caught_as_leakage(tmp_path):
    data = split_folders(tmp_path / "photos")
    leaked = sample_ids("test")[0]
    shutil.copyfile(data / "test" / f"{leaked}.jpg", data / "train" / leaked.split("/")[0] / "copy.jpg")
    config = make_config(tmp_path / "out", data__source="imagefolder", data__local_path=str(data))
    download.fn(config)
    result = validate.fn(config)
    manifest = read_manifest(config).set_index("path")
    row = manifest.loc[f"test/{leaked}.jpg"]
    assert row["status"] == "quarantined"
    assert row["error"] == f"duplicate of train image train/{leaked.split('/')[0]}/copy.jpg"
    assert result["quarantined"] == 1
    warnings = [e for e in read_validation(config)["expectations"]
                if "leakage found before quarantine" in str(e["details"].get("description", ""))]
    assert len(warnings) == 1 and not warnings[0]["success"]
    assert warnings[0]["details"]["rows"] == [f"test/{leaked}.jpg"]


def test_the_split_is_stratified_and_seeded(tmp_path):
    data = class_folders(tmp_path / "photos", per_class=20)
    first, again = scan(data, 0.3, 7), scan(data, 0.3, 7)
    assert first.listed == again.listed and first.layout == "class-folders"
    other = scan(data, 0.3, 8)
    assert other.listed["test"] != first.listed["test"]
    for listing in (first, other):
        per_class = {name: sum(i.startswith(f"{name}/") for i, _ in listing.listed["test"])
                     for name in listing.classes}
        assert set(per_class.values()) == {6}  # round(20 * 0.3) of every class
        train_ids = {i for i, _ in listing.listed["train"]}
        assert not train_ids & {i for i, _ in listing.listed["test"]}
        assert len(train_ids) == 5 * 14
    # Adding a class leaves the other classes' splits alone.
    shutil.copytree(data / "apple_pie", data / "zzz_extra")
    grown = scan(data, 0.3, 7)
    assert [e for e in grown.listed["test"] if not e[0].startswith("zzz_extra/")] == first.listed["test"]


def test_a_folder_without_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no class folders with images"):
        scan(tmp_path / "empty", 0.25, 0)
    with pytest.raises(ImageFolderError, match="is not a folder"):
        scan(tmp_path / "missing", 0.25, 0)
