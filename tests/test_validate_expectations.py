"""The GX suite's leakage expectations on manifests built to break them (real Great Expectations).

The pipeline quarantines test copies of train photos before the suite runs, so the suite's
leakage checks are tested here on a manifest where the quarantine has not run, and on the
pipeline's own validation.json, where leakage that was found must show as found.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tasks.download import download
from tasks.validate import (
    critical_failures,
    expected_for,
    failure_message,
    manifest_for,
    quarantine_leakage,
    read_validation,
    run_expectations,
    validate,
)
from tests.conftest import SAMPLE, make_config

TRAIN_PHOTO = "images/apple_pie/1005649.jpg"
TEST_PHOTO = "images/apple_pie/1011328.jpg"
GUARD = "splits_sharing_sha256"  # critical: no leakage among the rows later stages use
FOUND = "splits_sharing_sha256_found"  # warning: leakage the quarantine had to remove


def by_column(expectations: list[dict], column: str) -> dict:
    [found] = [e for e in expectations if e["details"]["kwargs"].get("column") == column]
    return found


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[pd.DataFrame, object]:
    """The sample's real manifest (no leakage) and what the suite expects of it."""
    config = make_config(tmp_path_factory.mktemp("expectations"))
    manifest, _, classes = manifest_for(config, SAMPLE, workers=1)
    return manifest, expected_for(config, manifest, classes)


def leaky(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with one test photo's bytes equal to a train photo's, the quarantine not run."""
    frame = manifest.copy()
    train_sha = frame.loc[frame["path"].eq(TRAIN_PHOTO), "sha256"].item()
    frame.loc[frame["path"].eq(TEST_PHOTO), "sha256"] = train_sha
    assert frame.loc[frame["path"].eq(TEST_PHOTO), "split"].item() == "test"
    return frame


def test_clean_manifest_passes_both_leakage_expectations(clean):
    manifest, expected = clean
    results = run_expectations(manifest, expected)
    assert by_column(results, GUARD)["success"] and by_column(results, FOUND)["success"]
    assert critical_failures(results) == []


def test_leaky_manifest_without_quarantine_fails_the_critical_leakage_expectation(clean, tmp_path):
    manifest, expected = clean
    results = run_expectations(leaky(manifest), expected)
    guard = by_column(results, GUARD)
    assert guard["success"] is False and guard["details"]["severity"] == "critical"
    assert set(guard["details"]["rows"]) == {TRAIN_PHOTO, TEST_PHOTO}
    assert guard in critical_failures(results)
    message = failure_message(critical_failures(results), leaky(manifest), tmp_path)
    assert "no train/test leakage" in message and TEST_PHOTO in message
    found = by_column(results, FOUND)
    assert found["success"] is False and found["details"]["rows"] == [TEST_PHOTO]


def test_quarantined_leakage_is_reported_as_found_not_as_a_pass(clean):
    manifest, expected = clean
    quarantined = quarantine_leakage(leaky(manifest))
    assert quarantined.loc[quarantined["path"].eq(TEST_PHOTO), "status"].item() == "quarantined"
    results = run_expectations(quarantined, expected)
    assert critical_failures(results) == []  # the quarantine removed the leak: the run goes on
    assert by_column(results, GUARD)["success"] is True
    found = by_column(results, FOUND)
    assert found["success"] is False and found["details"]["severity"] == "warning"
    assert found["details"]["rows"] == [TEST_PHOTO] and "quarantined" in found["details"]["description"]


def test_validate_stage_reports_the_leak_it_quarantined(tmp_path, sample_copy):
    shutil.copyfile(sample_copy / TRAIN_PHOTO, sample_copy / TEST_PHOTO)
    config = make_config(tmp_path, paths__sample=str(sample_copy))
    download.fn(config)
    assert validate.fn(config)["quarantined"] == 1
    validation = read_validation(config)
    assert validation["success"] is True
    found = by_column(validation["expectations"], FOUND)
    assert found["success"] is False and found["details"]["rows"] == [TEST_PHOTO]
    assert by_column(validation["expectations"], GUARD)["success"] is True
