"""Preprocess: the uint8 cache from real sample photos; splits, keys, kill-and-resume, odd inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from food101.cache import (
    CacheChangedError,
    CacheNotReadyError,
    PreprocessError,
    build_cache,
    load_cache,
    load_image,
    open_cache,
    plan_cache,
    staging_path,
)
from tests.conftest import REPO, SAMPLE, make_config, sample_classes, sample_manifest


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory):
    return make_config(tmp_path_factory.mktemp("params")).preprocess  # demo: resize 72, crop 64, val 0.2


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_cache_from_sample_has_right_splits_shapes_and_labels(tmp_path: Path, params) -> None:
    manifest = sample_manifest()
    out = tmp_path / "cache"
    summary = build_cache(manifest, SAMPLE, sample_classes(), params, out, chunk_size=32, workers=2)
    assert summary["rebuilt"] and summary["counts"] == {"train": 120, "val": 30, "test": 50}

    cache = load_cache(out)
    assert cache.classes == sample_classes()["names"] and cache.display[0] == "Apple pie"
    for split, n in summary["counts"].items():
        images, labels = cache.images(split), cache.labels(split)
        assert images.shape == (n, params.crop, params.crop, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert not images.flags.writeable
        rows = cache.index[cache.index["split"] == split].sort_values("position")
        assert rows["position"].tolist() == list(range(n))
        np.testing.assert_array_equal(rows["label"].to_numpy(), labels)
        # Every row holds its own photo, decoded the same way (spot-check first and last).
        for position in (0, n - 1):
            expected = load_image(SAMPLE / rows["path"].iloc[position], params.resize, params.crop)
            np.testing.assert_array_equal(images[position], expected)
        assert images[:].std() > 10  # real photos, not zeros

    train_paths = set(manifest.loc[manifest["split"] == "train", "path"])
    index = cache.index
    val_paths = set(index.loc[index["split"] == "val", "path"])
    assert val_paths <= train_paths  # carved from train
    assert not val_paths & set(index.loc[index["split"] == "train", "path"])
    assert index.loc[index["split"] == "test", "path"].tolist() == sorted(
        manifest.loc[manifest["split"] == "test", "path"])  # test untouched
    # Stratified: 30 train photos per class x 0.2 = 6 per class in val.
    assert np.bincount(cache.labels("val")).tolist() == [6] * 5
    meta = json.loads((out / "meta.json").read_text())
    assert meta["key"] == summary["key"] and meta["crop"] == params.crop and meta["counts"]["val"] == 30


def test_same_seed_reproduces_rerun_is_noop_and_changed_param_rebuilds(tmp_path: Path, params) -> None:
    manifest = sample_manifest()
    first = build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "a", workers=1)
    again = build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "b", workers=1)
    assert again["key"] == first["key"]
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")

    stamp = (tmp_path / "a" / "train_images.npy").stat().st_mtime_ns
    noop = build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "a", workers=1)
    assert not noop["rebuilt"] and noop["key"] == first["key"] and noop["images"] == 0
    assert (tmp_path / "a" / "train_images.npy").stat().st_mtime_ns == stamp

    other_seed = dataclasses.replace(params, seed=params.seed + 1)
    assert set(plan_cache(manifest, 0.2, params.seed).query("split == 'val'")["path"]) != set(
        plan_cache(manifest, 0.2, other_seed.seed).query("split == 'val'")["path"])

    smaller = dataclasses.replace(params, crop=48)
    rebuilt = build_cache(manifest, SAMPLE, sample_classes(), smaller, tmp_path / "a", workers=1)
    assert rebuilt["rebuilt"] and rebuilt["key"] != first["key"]
    assert load_cache(tmp_path / "a").images("test").shape == (50, 48, 48, 3)

    changed = manifest.copy()
    changed.loc[0, "sha256"] = "0" * 64  # the same path with other bytes is other input
    assert build_cache(changed, SAMPLE, sample_classes(), smaller, tmp_path / "a", workers=1)["rebuilt"]


def test_quarantined_rows_are_left_out(tmp_path: Path, params) -> None:
    manifest = sample_manifest()
    quarantined = manifest.index[manifest["split"] == "test"][:3]
    manifest.loc[quarantined, "status"] = "quarantined"
    manifest.loc[quarantined, "path"] = "images/apple_pie/does-not-exist.jpg"
    summary = build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "cache", workers=1)
    assert summary["counts"]["test"] == 47
    assert "images/apple_pie/does-not-exist.jpg" not in set(load_cache(tmp_path / "cache").index["path"])


def test_greyscale_cmyk_and_png_inputs_come_out_rgb(tmp_path: Path, params) -> None:
    root = tmp_path / "odd"
    (root / "images" / "apple_pie").mkdir(parents=True)
    source = Image.open(SAMPLE / "images" / "apple_pie" / "1005649.jpg")
    source.convert("L").save(root / "images" / "apple_pie" / "grey.jpg")
    source.convert("CMYK").save(root / "images" / "apple_pie" / "cmyk.jpg")
    source.save(root / "images" / "apple_pie" / "photo.png")
    source.convert("P").save(root / "images" / "apple_pie" / "palette.png")
    names = ["grey.jpg", "cmyk.jpg", "photo.png", "palette.png"]
    manifest = pd.DataFrame({
        "path": [f"images/apple_pie/{n}" for n in names], "image_id": [f"apple_pie/{n}" for n in names],
        "class": "apple_pie", "label": 0, "split": "test", "sha256": "x", "status": "converted",
    })
    build_cache(manifest, root, {"names": ["apple_pie"], "display": ["Apple pie"]}, params,
                tmp_path / "cache", workers=1)
    cache = load_cache(tmp_path / "cache")
    images = cache.images("test")
    order = cache.index.query("split == 'test'").sort_values("position")["path"].str.split("/").str[-1].tolist()
    assert images.shape == (4, params.crop, params.crop, 3)
    grey = images[order.index("grey.jpg")].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    colour = images[order.index("photo.png")].astype(int)
    assert np.abs(colour[..., 0] - colour[..., 2]).mean() > 5  # a real colour photo stays in colour
    cmyk = images[order.index("cmyk.jpg")].astype(int)
    assert np.abs(cmyk - colour).mean() < 40  # CMYK converted back to about the same colours


def test_reader_says_to_run_the_stage(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(CacheNotReadyError, match="food101 stage preprocess"):
        open_cache(config)
    staging_path(config.paths.cache).mkdir(parents=True)
    with pytest.raises(CacheNotReadyError, match="unfinished"):
        open_cache(config)


def test_open_cache_checks_the_configuration(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, config.paths.cache, workers=1)
    assert open_cache(config).images("train").shape[1:] == (64, 64, 3)
    with pytest.raises(CacheNotReadyError, match="crop"):
        open_cache(make_config(tmp_path, preprocess__crop=48))


def test_a_tampered_cache_is_refused_by_the_reader_and_rebuilt_by_the_stage(tmp_path: Path, params, caplog) -> None:
    """Half the test photos zeroed on disk (sizes unchanged): a reader stops with a clear error
    instead of evaluating on them, and the next preprocess rebuilds the same bytes as before."""
    manifest, out = sample_manifest(), tmp_path / "cache"
    build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)
    original = folder_bytes(out)
    test_images = np.load(out / "test_images.npy", mmap_mode="r+")
    test_images[: len(test_images) // 2] = 0
    test_images.flush()
    del test_images

    cache = load_cache(out)  # sizes match: opening is allowed, reading the changed split is not
    assert cache.images("train").shape[0] == 120
    with pytest.raises(CacheChangedError, match="test_images.npy has changed.*food101 stage preprocess"):
        cache.images("test")

    with caplog.at_level("WARNING", logger="food101.cache"):
        summary = build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)
    assert summary["rebuilt"] and "does not match what was written" in caplog.text
    assert "test_images.npy has changed" in caplog.text
    assert folder_bytes(out) == original
    assert load_cache(out).images("test").std() > 10


def test_a_truncated_cache_is_refused_and_rebuilt(tmp_path: Path, params, caplog) -> None:
    manifest, out = sample_manifest(), tmp_path / "cache"
    build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)
    original = folder_bytes(out)
    with open(out / "train_images.npy", "r+b") as handle:
        handle.truncate((out / "train_images.npy").stat().st_size // 2)
    with pytest.raises(CacheChangedError, match="train_images.npy is .* bytes"):
        load_cache(out)
    with caplog.at_level("WARNING", logger="food101.cache"):
        assert build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)["rebuilt"]
    assert "train_images.npy is" in caplog.text and folder_bytes(out) == original


def test_a_cache_without_recorded_hashes_is_rebuilt(tmp_path: Path, params) -> None:
    manifest, out = sample_manifest(), tmp_path / "cache"
    build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)
    original = folder_bytes(out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["files"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheChangedError, match="no sizes or hashes were recorded"):
        load_cache(out)
    assert build_cache(manifest, SAMPLE, sample_classes(), params, out, workers=1)["rebuilt"]
    assert folder_bytes(out) == original


KILLED_RUN = """
import json, sys
from pathlib import Path
import pandas as pd
from food101.config import PreprocessConfig
import food101.cache
from food101.cache import build_cache
args = json.loads(sys.argv[1])
# Records every 50 ms: however fast this machine decodes, some appear before the run could end.
food101.cache.SYNC_INTERVAL_S = 0.05
build_cache(pd.read_parquet(args["manifest"]), Path(args["root"]), args["classes"],
            PreprocessConfig(**args["params"]), Path(args["out"]), chunk_size=args["chunk_size"],
            workers=2, progress_bar=False)
"""


def test_sigkill_midway_then_rerun_gives_the_same_bytes(tmp_path: Path, params) -> None:
    manifest = sample_manifest(repeat=8)  # 1,600 rows in 200 chunks of 8
    manifest.to_parquet(tmp_path / "manifest.parquet")
    out = tmp_path / "cache"
    args = {"manifest": str(tmp_path / "manifest.parquet"), "root": str(SAMPLE), "classes": sample_classes(),
            "params": dataclasses.asdict(params), "out": str(out), "chunk_size": 8}
    progress = staging_path(out) / "progress.json"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(args)], cwd=REPO,
                               start_new_session=True, stderr=subprocess.PIPE)
    done_at_kill = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if progress.is_file():
                try:
                    done_at_kill = len(json.loads(progress.read_text())["done"])
                except (json.JSONDecodeError, FileNotFoundError):  # replaced between the two calls
                    done_at_kill = 0
                if done_at_kill >= 5:
                    break
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its worker processes, mid-write
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 5 <= done_at_kill < 200 and not out.exists()

    # Asking for another chunk size must not matter: the record's size (8) is kept.
    resumed = build_cache(manifest, SAMPLE, sample_classes(), params, out, chunk_size=32, workers=2)
    assert resumed["chunks_resumed"] >= done_at_kill and resumed["images"] < len(manifest)
    assert not staging_path(out).exists() and not (out / "progress.json").exists()

    clean = build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "clean", chunk_size=8, workers=1)
    assert clean["key"] == resumed["key"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_a_photo_broken_after_validation_stops_the_build_and_keeps_the_finished_chunks(
        tmp_path: Path, params) -> None:
    """A photo that no longer decodes: a clear error naming it, the chunks before it recorded as
    done, and once the file is back the re-run decodes only what is missing, to the same bytes."""
    root = tmp_path / "sample"
    (root / "images").mkdir(parents=True)
    manifest = sample_manifest()
    plan = plan_cache(manifest, params.val_fraction, params.seed)
    broken = plan.iloc[-1]["path"]  # the last row of the last split: every chunk before it can finish
    for rel in manifest["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == broken:
            (root / rel).write_bytes(b"not a jpeg")
        else:
            os.link(SAMPLE / rel, root / rel)
    out = tmp_path / "cache"
    with pytest.raises(PreprocessError, match=f"cannot decode .*{Path(broken).name}.*validate"):
        build_cache(manifest, root, sample_classes(), params, out, chunk_size=8, workers=1)
    record = json.loads((staging_path(out) / "progress.json").read_text())
    n_chunks = sum(-(-n // 8) for n in plan["split"].value_counts())
    assert len(record["done"]) == n_chunks - 1 and not out.exists()

    (root / broken).unlink()
    os.link(SAMPLE / broken, root / broken)
    resumed = build_cache(manifest, root, sample_classes(), params, out, chunk_size=8, workers=1)
    assert resumed["chunks_resumed"] == n_chunks - 1 and resumed["images"] <= 8
    build_cache(manifest, SAMPLE, sample_classes(), params, tmp_path / "clean", chunk_size=8, workers=1)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_stage_entry_on_the_sample(tmp_path: Path) -> None:
    """The whole stage through download and validate, when those stages are in the tree."""
    from tasks import download, validate
    from tasks.preprocess import preprocess

    config = make_config(tmp_path)
    download.download.fn(config)
    validate.validate.fn(config)
    result = preprocess.fn(config)
    kept = validate.read_manifest(config).query("status != 'quarantined'")
    assert result["rebuilt"] and sum(result["counts"].values()) == len(kept)
    assert not preprocess.fn(config)["rebuilt"]
    assert open_cache(config).labels("train").dtype == np.int64
