"""Validate stage on the bundled sample: the manifest, the GX suite, Data Docs, subsets, leakage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from food101.config import ConfigError
from food101.tracking import client_for, experiment_id
from tasks.download import download
from tasks.validate import (
    MANIFEST_COLUMNS,
    ManifestValidationError,
    data_hash,
    inspect_files,
    manifest_for,
    read_classes,
    read_manifest,
    read_validation,
    validate,
)
from tests.conftest import REPO, SAMPLE, make_config


def run_stages(config) -> dict:
    download.fn(config)
    return validate.fn(config)


def test_sample_validates_clean(tmp_path):
    config = make_config(tmp_path)
    result = run_stages(config)
    manifest = read_manifest(config)
    validation = read_validation(config)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 200 and set(manifest["status"]) == {"ok"}
    assert manifest.groupby("split").size().to_dict() == {"test": 50, "train": 150}
    assert manifest["decodable"].all() and manifest["error"].isna().all()
    assert manifest.loc[0, "path"] == "images/apple_pie/1005649.jpg"
    assert manifest.loc[0, "image_id"] == "apple_pie/1005649"
    assert validation["success"] is True and validation["images"] == 200
    assert validation["quarantined"] == []
    assert all(e["success"] for e in validation["expectations"]) and len(validation["expectations"]) >= 12
    assert validation["data_hash"] == result["data_hash"] == data_hash(manifest)
    assert validation["dataset_root"] == str(SAMPLE.resolve())
    classes = read_classes(config)
    assert classes["names"][0] == "apple_pie" and classes["display"][0] == "Apple pie"
    docs = config.paths.manifest / "data_docs" / "index.html"
    assert docs.is_file() and "Great Expectations" in docs.read_text()
    assert list((config.paths.manifest / "data_docs" / "validations").rglob("*.html"))
    assert (config.paths.manifest / "data_docs").stat().st_mode & 0o777 == 0o755  # readable by a web server
    # The same files give the same hash, whatever order they are read in.
    again, _, _ = manifest_for(config, SAMPLE)
    assert data_hash(again.sample(frac=1.0, random_state=0)) == validation["data_hash"]
    # Everything went to MLflow.
    client = client_for(config)
    runs = client.search_runs([experiment_id(config, client)], "tags.stage = 'validate'")
    assert runs[0].data.tags["data_hash"] == validation["data_hash"]
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "manifest")}
    assert {"manifest/validation.json", "manifest/manifest.parquet", "manifest/data_docs"} <= logged


def test_subset_selects_rows_without_copying(tmp_path):
    config = make_config(tmp_path, data__classes=["beet_salad", "apple_pie"], data__train_per_class=5,
                         data__test_per_class=2)
    result = run_stages(config)
    manifest = read_manifest(config)
    assert result["images"] == 14
    # Labels follow classes.txt order; the first K of each class in meta order are taken.
    assert read_classes(config)["names"] == ["apple_pie", "beet_salad"]
    assert manifest.groupby("class")["label"].first().to_dict() == {"apple_pie": 0, "beet_salad": 1}
    train_ids = (SAMPLE / "meta" / "train.txt").read_text().split()
    first_five = [i for i in train_ids if i.startswith("apple_pie/")][:5]
    assert manifest[(manifest["class"] == "apple_pie") & (manifest["split"] == "train")]["image_id"].tolist() \
        == first_five
    assert not (config.paths.raw / "food-101").exists()


def test_first_n_classes_and_unknown_names(tmp_path):
    manifest, _, classes = manifest_for(make_config(tmp_path, data__classes=2), SAMPLE)
    assert classes == ["apple_pie", "baby_back_ribs"] and len(manifest) == 80
    with pytest.raises(ConfigError, match="unknown classes.*pizza.*valid names.*apple_pie"):
        manifest_for(make_config(tmp_path, data__classes=["apple_pie", "pizza"]), SAMPLE)


def test_parallel_reading_matches_serial():
    paths = [f"images/{i}.jpg" for i in (SAMPLE / "meta" / "test.txt").read_text().split()]
    serial = inspect_files(SAMPLE, paths, workers=1)
    parallel = inspect_files(SAMPLE, paths, workers=2, chunk_images=7)
    assert pd.DataFrame(parallel).equals(pd.DataFrame(serial))


def test_whole_dataset_counts_are_the_official_ones(tmp_path):
    # The sample used as a "local" folder claims to be the whole dataset: 30 is not 750.
    config = make_config(tmp_path, data__source="local", data__local_path=str(SAMPLE))
    with pytest.raises(ManifestValidationError) as failure:
        run_stages(config)
    message = str(failure.value)
    assert "apple_pie/train: 30 rows, expected 750" in message and "validation.json" in message
    assert read_validation(config)["success"] is False
    with pytest.raises(ManifestValidationError, match="last validation failed"):
        read_manifest(config)


def test_test_copy_of_a_train_image_is_quarantined(tmp_path, sample_copy):
    train_image = sample_copy / "images" / "apple_pie" / "1005649.jpg"
    test_image = sample_copy / "images" / "apple_pie" / "1011328.jpg"
    shutil.copyfile(train_image, test_image)
    config = make_config(tmp_path, paths__sample=str(sample_copy))
    result = run_stages(config)
    manifest = read_manifest(config).set_index("path")
    row = manifest.loc["images/apple_pie/1011328.jpg"]
    assert row["status"] == "quarantined"
    assert row["error"] == "duplicate of train image images/apple_pie/1005649.jpg"
    assert manifest.loc["images/apple_pie/1005649.jpg", "status"] == "ok"
    assert result["quarantined"] == 1
    assert read_validation(config)["quarantined"] == [
        {"path": "images/apple_pie/1011328.jpg", "reason": row["error"]}]


def test_links_devices_and_fifos_are_quarantined_without_being_read(tmp_path, sample_copy):
    images = sample_copy / "images" / "apple_pie"
    zero, escaping, fifo, inside = (images / f"{i}.jpg" for i in ("1005649", "1014775", "1026328", "1028787"))
    zero.unlink()
    zero.symlink_to("/dev/zero")
    shutil.move(escaping, tmp_path / "outside.jpg")
    escaping.symlink_to(tmp_path / "outside.jpg")
    fifo.unlink()
    os.mkfifo(fifo)
    (sample_copy / "store").mkdir()
    shutil.move(inside, sample_copy / "store" / inside.name)
    inside.symlink_to(sample_copy / "store" / inside.name)  # a link that stays inside the dataset is fine
    paths = [f"images/apple_pie/{p.name}" for p in (zero, escaping, fifo, inside)]
    # Reading /dev/zero or a FIFO never ends: run the reader where a hang can be stopped.
    code = ("import json, sys; from pathlib import Path; from tasks.validate import inspect_files; "
            "print(json.dumps(inspect_files(Path(sys.argv[1]), sys.argv[2:], workers=1)))")
    done = subprocess.run([sys.executable, "-c", code, str(sample_copy), *paths], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = dict(zip(paths, json.loads(done.stdout.splitlines()[-1]), strict=True))
    assert rows[paths[0]]["error"] == "not a regular file (a character device): not read"
    assert rows[paths[1]]["error"] == f"link to {tmp_path / 'outside.jpg'}, outside the dataset folder: not read"
    assert rows[paths[2]]["error"] == "not a regular file (a FIFO): not read"
    assert rows[paths[3]]["status"] == "ok"
    assert all(rows[p]["status"] == "quarantined" and rows[p]["sha256"] == "" for p in paths[:3])
    # The stage records them as quarantined, with the reason, and goes on.
    config = make_config(tmp_path, paths__sample=str(sample_copy), validate__max_quarantine_fraction=0.05)
    result = run_stages(config)
    assert result["quarantined"] == 3
    reasons = {q["path"]: q["reason"] for q in read_validation(config)["quarantined"]}
    assert reasons == {p: rows[p]["error"] for p in paths[:3]}
