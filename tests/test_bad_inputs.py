"""Each kind of bad input, as a real file in a copy of the sample, ends in its documented verdict."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tasks.download import DatasetLayoutError, download
from tasks.validate import ManifestValidationError, inspect_image, read_manifest, read_validation, validate
from tests.conftest import SAMPLE, make_config

KINDS = ("corrupt", "truncated", "zero_byte", "text", "png", "cmyk", "grey", "missing")


def _test_images(root: Path) -> list[str]:
    return [f"images/{i}.jpg" for i in (root / "meta" / "test.txt").read_text().split()]


def _pick(root: Path) -> dict[str, str]:
    """Distinct test images for each kind, chosen from the meta files so the test survives re-sampling."""
    by_class: dict[str, list[str]] = {}
    for path in _test_images(root):
        by_class.setdefault(path.split("/")[1], []).append(path)
    order = ["apple_pie", "apple_pie", "baby_back_ribs", "beet_salad", "bibimbap", "breakfast_burrito",
             "apple_pie", "baby_back_ribs"]
    taken: dict[str, int] = {}
    chosen = {}
    for kind, name in zip(KINDS, order, strict=True):
        chosen[kind] = by_class[name][taken.get(name, 0)]
        taken[name] = taken.get(name, 0) + 1
    return chosen


def break_files(root: Path) -> dict[str, str]:
    chosen = _pick(root)
    files = {kind: root / rel for kind, rel in chosen.items()}
    data = files["corrupt"].read_bytes()
    middle = len(data) // 2
    files["corrupt"].write_bytes(data[:middle] + bytes(range(256)) * 8 + data[middle + 2048:])
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["zero_byte"].write_bytes(b"")
    files["text"].write_text("this is not a photo of food\n")
    with Image.open(files["png"]) as image:
        image.load()
        image.save(files["png"], format="PNG")
    with Image.open(files["cmyk"]) as image:
        image.convert("CMYK").save(files["cmyk"], format="JPEG", quality=90)
    with Image.open(files["grey"]) as image:
        image.convert("L").save(files["grey"], format="JPEG", quality=90)
    files["missing"].unlink()
    return chosen


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """One validate run over a sample copy holding every kind of bad input."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    root = tmp / "sample"
    shutil.copytree(SAMPLE, root)
    chosen = break_files(root)
    config = make_config(tmp, paths__sample=str(root), validate__max_quarantine_fraction=0.05)
    download.fn(config)
    result = validate.fn(config)
    manifest = read_manifest(config).set_index("path")
    return chosen, result, manifest, read_validation(config)


@pytest.mark.parametrize(("kind", "status", "reason"), [
    ("corrupt", "quarantined", "corrupt image data: "),
    ("truncated", "quarantined", "truncated image: image file is truncated"),
    ("zero_byte", "quarantined", "empty file (0 bytes)"),
    ("text", "quarantined", "not an image: "),
    ("missing", "quarantined", "missing file: listed in meta/test.txt"),
    ("png", "converted", "PNG file with a .jpg name"),
    ("cmyk", "converted", "mode CMYK: converted to RGB at preprocessing"),
    ("grey", "converted", "mode L: converted to RGB at preprocessing"),
])
def test_each_bad_input_gets_its_documented_verdict(broken_run, kind, status, reason):
    chosen, _, manifest, validation = broken_run
    row = manifest.loc[chosen[kind]]
    assert row["status"] == status
    assert row["error"].startswith(reason)
    assert "Traceback" not in row["error"]
    if status == "quarantined":
        assert {"path": chosen[kind], "reason": row["error"]} in validation["quarantined"]
        assert not row["decodable"] or kind == "missing" or row["width"] == 0
    else:
        assert row["decodable"] and row["width"] > 0 and row["height"] > 0


def test_the_run_with_bad_inputs_succeeds_and_counts_them(broken_run):
    _, result, manifest, validation = broken_run
    assert result["success"] and validation["success"]
    assert result["quarantined"] == 5 and result["converted"] == 3
    assert len(manifest) == 200 and (manifest["status"] == "ok").sum() == 192


def test_truncation_is_caught_however_little_is_missing(tmp_path):
    photo = SAMPLE / "images" / "apple_pie" / "1005649.jpg"
    data = photo.read_bytes()
    for keep in (len(data) // 2, len(data) - 100, len(data) - 2):
        cut = tmp_path / f"cut-{keep}.jpg"
        cut.write_bytes(data[:keep])
        assert inspect_image(cut)["error"].startswith("truncated image"), keep
    assert inspect_image(photo)["status"] == "ok"


def test_missing_classes_txt_is_a_clear_error(tmp_path, sample_copy):
    (sample_copy / "meta" / "classes.txt").unlink()
    config = make_config(tmp_path, paths__sample=str(sample_copy))
    with pytest.raises(DatasetLayoutError) as failure:
        download.fn(config)
    message = str(failure.value)
    assert str(sample_copy / "meta" / "classes.txt") in message and "original archive" in message


def test_too_many_quarantined_fails_naming_the_rows(tmp_path, sample_copy):
    emptied = _test_images(sample_copy)[:12]
    for rel in emptied:
        (sample_copy / rel).write_bytes(b"")
    config = make_config(tmp_path, paths__sample=str(sample_copy))
    download.fn(config)
    with pytest.raises(ManifestValidationError) as failure:
        validate.fn(config)
    message = str(failure.value)
    assert "12 of 200 images quarantined" in message and "max_quarantine_fraction" in message
    assert all(rel in message for rel in emptied[:10]) and emptied[11] not in message
    assert "... and 2 more" in message
    assert len(read_validation(config)["quarantined"]) == 12
