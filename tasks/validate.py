"""Validate stage: a manifest of every selected image, checked by a Great Expectations suite.

The manifest is built from meta/classes.txt, labels.txt, train.txt and test.txt of the dataset
root the download stage recorded. The subset (`data.classes`: a list of names, or N for the
first N of classes.txt; `data.train_per_class` / `data.test_per_class`: the first K images of each
class in meta order) is applied here, by selecting rows: no image is copied. Labels follow the
order of classes.txt whatever order `data.classes` lists them in, so one set of classes always
gets the same labels.
Reading the meta files and selecting the rows is food101/dataset.py, which imports without
Prefect or Great Expectations.

Every listed file is read once in worker processes: SHA-256 streamed over its bytes, then PIL
reads its header (format, mode, width, height) and decodes it fully. The decode uses JPEG draft
mode (DCT scaling to 1/8), which still parses every byte of the entropy-coded data, so a
truncated file fails exactly as a full decode does (checked on real files cut short) at about
twice the speed.

Bad inputs, decided per kind (`status`, and `error` holds the reason or the conversion note):

| input | status | `error` says | why |
| --- | --- | --- | --- |
| corrupt bytes | quarantined | "corrupt image data: ..." | no pixels to learn from |
| truncated JPEG (cut short) | quarantined | "truncated image: ..." | PIL would pad it with grey |
| zero-byte file | quarantined | "empty file (0 bytes)" | nothing to read |
| not an image (text, unknown) | quarantined | "not an image: ..." | nothing to read |
| PNG/GIF/... bytes under .jpg | converted | "PNG file with a .jpg name: ..." | PIL decodes it |
| CMYK JPEG | converted | "mode CMYK: converted to RGB ..." | preprocessing converts |
| greyscale (L) or palette JPEG | converted | "mode L: converted to RGB ..." | preprocessing converts |
| listed in meta, absent | quarantined | "missing file: listed in meta/<split>.txt" | nothing to read |
| test copy of a train image | quarantined | "duplicate of train image <path>" | leakage inflates accuracy |
| duplicates within one split | kept | (warning expectation) | no leakage; reported |
| size outside [min_side, max_side], odd mode | kept | (warning expectation) | resized/converted anyway |

Quarantined rows stay in the manifest (with width/height 0 when undecodable); later stages skip
them and the report lists them. If more than `validate.max_quarantine_fraction` of the rows are
quarantined, the stage fails and names them.

The Great Expectations suite runs on the manifest (plus three derived columns: rows in the row's
class and split, the count expected there, and the number of splits sharing the row's SHA-256).
Critical expectations (severity "critical"): the row count and the counts per class and split
(official 750/250 per class for the whole dataset; for a subset or the bundled sample, the counts
its meta files give), the set of classes, labels within range, split in {train, test}, unique
paths, status values, every non-quarantined row decodable, no SHA-256 shared by train and test
among non-quarantined rows (a guard on the quarantine), and the quarantine fraction. Warnings:
train/test leakage found before the quarantine (fails, naming the test copies, whenever there was
any: they are quarantined, not silently passed), sizes, modes, duplicates within a split. A
critical failure writes validation.json, the manifest and the Data Docs (so it can be inspected),
then raises ManifestValidationError naming the rows; `read_manifest` refuses a manifest
whose validation failed.

`data_hash` in validation.json is the SHA-256 of the lines "<path>\\t<sha256>\\n" over all manifest
rows sorted by path: the same files give the same hash on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import stat
import tempfile
import time
import warnings
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd
from PIL import Image, UnidentifiedImageError
from prefect import task
from prefect.cache_policies import NONE
from tqdm import tqdm

from food101.config import Config
from food101.dataset import (  # noqa: F401
    SPLITS,
    DatasetMeta,
    ManifestValidationError,
    dataset_meta,
    read_meta,
    select_classes,
    select_rows,
)
from food101.errors import StageOutputMissing
from food101.io import read_json, replace_dir, staging_dir, write_json, write_parquet
from food101.processes import process_pool
from tasks.download import read_dataset

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "image_id", "class", "label", "split", "bytes", "sha256", "width", "height",
                    "mode", "format", "decodable", "error", "status"]
STATUSES = ("ok", "converted", "quarantined")
# Modes PIL converts to RGB without surprises; anything else is reported.
ALLOWED_MODES = ("RGB", "L", "CMYK", "P", "RGBA", "LA", "YCbCr")
CHUNK_IMAGES = 256
ROWS_NAMED = 10
SUITE_NAME = "food101_manifest"
DOCS_SITE = "food101_manifest_docs"
LEAKED = "duplicate of train image "


@dataclass(frozen=True)
class Expected:
    """What the suite checks the manifest against."""

    classes: list[str]
    counts: dict[tuple[str, str], int]  # (class, split) -> rows
    min_side: int
    max_side: int
    max_quarantine_fraction: float


# --- what to expect --------------------------------------------------------------------------


def expected_counts(listing: pd.DataFrame, classes: list[str], official: dict[str, int] | None
                    ) -> dict[tuple[str, str], int]:
    """Rows expected per (class, split): the official numbers, or what the meta files select."""
    if official is not None:
        return {(name, split): official[split] for name in classes for split in SPLITS}
    counts = listing.groupby(["class", "split"]).size()
    return {(name, split): int(counts.get((name, split), 0)) for name in classes for split in SPLITS}


# --- reading images -------------------------------------------------------------------------


class NotRegularFile(Exception):
    """A dataset path that is not a regular file inside the dataset; the message is the reason."""


def open_regular(path: Path, root: Path | None = None) -> IO[bytes]:
    """Open `path` for reading only if it is a regular file (inside `root`, when given).

    Reading a link to /dev/zero or a FIFO never ends, and a link out of the dataset reads a file
    that is not part of it: those raise NotRegularFile before a byte is read. The type is checked
    again on the opened descriptor, so a swap after the first check is caught too.
    """
    real = Path(os.path.realpath(path))
    _require_regular(os.stat(real).st_mode)
    if root is not None and not real.is_relative_to(os.path.realpath(root)):
        raise NotRegularFile(f"link to {real}, outside the dataset folder: not read")
    descriptor = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(os.fstat(descriptor).st_mode)
    except NotRegularFile:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb")


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                 (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
        kind = next((name for test, name in kinds if test(mode)), "not a plain file")
        raise NotRegularFile(f"not a regular file ({kind}): not read")


def inspect_image(path: Path, root: Path | None = None) -> dict[str, Any]:
    """Bytes, SHA-256, header fields and a full decode of one file; never raises for bad data."""
    row: dict[str, Any] = {"bytes": 0, "sha256": "", "width": 0, "height": 0, "mode": "", "format": "",
                           "decodable": False, "error": None, "status": "quarantined"}
    try:
        handle = open_regular(path, root)
    except FileNotFoundError:
        row["error"] = "missing file"
        return row
    except NotRegularFile as exc:
        row["error"] = str(exc)
        return row
    except OSError as exc:
        row["error"] = f"unreadable file: {exc.strerror or exc}"
        return row
    with handle:
        return _inspect_open(handle, row)


def _inspect_open(handle: IO[bytes], row: dict[str, Any]) -> dict[str, Any]:
    try:
        row["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
        row["bytes"] = handle.tell()
    except OSError as exc:
        row["error"] = f"unreadable file: {exc.strerror or exc}"
        return row
    if row["bytes"] == 0:
        row["error"] = "empty file (0 bytes)"
        return row
    handle.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's warnings about odd EXIF are not our verdict
            with Image.open(handle) as image:
                row["format"], row["mode"] = image.format or "", image.mode
                width, height = image.size
                # DCT scaling: still parses every byte, so truncation is caught like a full decode.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except UnidentifiedImageError:
        row["error"] = "not an image: PIL recognises no image format in these bytes"
        return row
    except Image.DecompressionBombError as exc:
        row["error"] = f"too large to decode safely: {exc}"
        return row
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated image" if "truncated" in str(exc) else "corrupt image data"
        row["error"] = f"{kind}: {exc}"
        return row
    row.update(width=width, height=height, decodable=True, status="ok")
    if row["format"] != "JPEG":
        row.update(status="converted", error=f"{row['format']} file with a .jpg name: decoded by PIL, "
                                             "converted to RGB at preprocessing")
    elif row["mode"] != "RGB":
        row.update(status="converted", error=f"mode {row['mode']}: converted to RGB at preprocessing")
    return row


def _inspect_chunk(root: str, paths: list[str]) -> list[dict[str, Any]]:
    return [inspect_image(Path(root) / path, Path(root)) for path in paths]


def inspect_files(root: Path, paths: list[str], workers: int, chunk_images: int = CHUNK_IMAGES
                  ) -> list[dict[str, Any]]:
    """inspect_image over many files, in chunks over `workers` processes, with a progress bar."""
    chunks = [paths[start:start + chunk_images] for start in range(0, len(paths), chunk_images)]
    results: list[list[dict[str, Any]] | None] = [None] * len(chunks)
    with tqdm(total=len(paths), unit="img", desc="validate: read images", disable=None) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for index, chunk in enumerate(chunks):
                results[index] = _inspect_chunk(str(root), chunk)
                bar.update(len(chunk))
        else:
            with process_pool(workers) as pool:
                futures = {pool.submit(_inspect_chunk, str(root), chunk): index
                           for index, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    index = futures[future]
                    results[index] = future.result()
                    bar.update(len(chunks[index]))
    return [row for chunk in results if chunk is not None for row in chunk]


def build_manifest(listing: pd.DataFrame, inspections: list[dict[str, Any]]) -> pd.DataFrame:
    """Join the listing with what was read from each file; quarantine test copies of train images."""
    frame = pd.concat([listing.reset_index(drop=True), pd.DataFrame.from_records(inspections)], axis=1)
    missing = frame["error"].eq("missing file")
    frame.loc[missing, "error"] = "missing file: listed in meta/" + frame.loc[missing, "split"] + ".txt"
    frame = quarantine_leakage(frame)
    frame = frame.astype({"label": "int64", "bytes": "int64", "width": "int64", "height": "int64",
                          "decodable": "bool"})
    return frame[MANIFEST_COLUMNS]


def quarantine_leakage(frame: pd.DataFrame) -> pd.DataFrame:
    """Test rows byte-identical to a train row become quarantined: 'duplicate of train image X'."""
    frame = frame.copy()
    usable = frame["status"].ne("quarantined")
    train_first = (frame[usable & frame["split"].eq("train")]
                   .drop_duplicates("sha256").set_index("sha256")["path"])
    leaked = usable & frame["split"].eq("test") & frame["sha256"].isin(train_first.index)
    frame.loc[leaked, "error"] = LEAKED + frame.loc[leaked, "sha256"].map(train_first)
    frame.loc[leaked, "status"] = "quarantined"
    return frame


def data_hash(manifest: pd.DataFrame) -> str:
    """SHA-256 over '<path>\\t<sha256>\\n' of every row, sorted by path."""
    digest = hashlib.sha256()
    for path, sha in sorted(zip(manifest["path"], manifest["sha256"], strict=True)):
        digest.update(f"{path}\t{sha}\n".encode())
    return digest.hexdigest()


# --- the Great Expectations suite -------------------------------------------------------------


def suite_frame(manifest: pd.DataFrame, expected: Expected) -> pd.DataFrame:
    """The manifest plus the derived columns the suite checks (counts per group, leakage)."""
    frame = manifest.copy()
    frame["rows_in_class_split"] = frame.groupby(["class", "split"])["path"].transform("size").astype("int64")
    keys = pd.MultiIndex.from_frame(frame[["class", "split"]])
    frame["expected_in_class_split"] = pd.Series(
        [expected.counts.get(key, 0) for key in keys], index=frame.index, dtype="int64")
    usable = frame["status"].ne("quarantined")
    splits_per_hash = frame[usable].groupby("sha256")["split"].nunique()
    frame["splits_sharing_sha256"] = frame["sha256"].map(splits_per_hash).fillna(0).astype("int64")
    # The same count before the quarantine: rows quarantined only as test copies of train photos count.
    readable = usable | frame["error"].fillna("").str.startswith(LEAKED)
    found_per_hash = frame[readable].groupby("sha256")["split"].nunique()
    frame["splits_sharing_sha256_found"] = (frame["sha256"].where(readable).map(found_per_hash)
                                            .fillna(0).astype("int64"))
    return frame


def build_suite(expected: Expected) -> Any:
    """The expectations, each tagged critical (the stage fails) or warning (reported)."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    usable = Column("status") != "quarantined"
    test_rows = Column("split") == "test"
    e = gx.expectations
    n_classes = len(expected.classes)
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in [
        e.ExpectTableRowCountToEqual(value=sum(expected.counts.values())),
        e.ExpectColumnDistinctValuesToEqualSet(column="class", value_set=expected.classes),
        e.ExpectColumnPairValuesToBeEqual(column_A="rows_in_class_split", column_B="expected_in_class_split"),
        e.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=n_classes - 1),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        e.ExpectColumnValuesToBeUnique(column="path"),
        e.ExpectColumnValuesToBeInSet(column="status", value_set=list(STATUSES)),
        e.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], row_condition=usable),
        e.ExpectColumnValuesToBeBetween(column="splits_sharing_sha256", max_value=1, row_condition=usable,
                                        description="no train/test leakage left among the photos used: no "
                                        "image bytes in both splits once test copies are quarantined"),
        e.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "converted"],
                                      mostly=1.0 - expected.max_quarantine_fraction,
                                      description="at most validate.max_quarantine_fraction quarantined"),
        e.ExpectColumnValuesToBeBetween(column="splits_sharing_sha256_found", max_value=1, row_condition=test_rows,
                                        severity="warning",
                                        description="train/test leakage found before quarantine: the test "
                                        "photos named are byte copies of train photos and were quarantined"),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=expected.min_side,
                                        max_value=expected.max_side, row_condition=usable, severity="warning"),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=expected.min_side,
                                        max_value=expected.max_side, row_condition=usable, severity="warning"),
        e.ExpectColumnValuesToBeInSet(column="mode", value_set=list(ALLOWED_MODES), row_condition=usable,
                                      severity="warning"),
        e.ExpectCompoundColumnsToBeUnique(column_list=["split", "sha256"], row_condition=usable,
                                          severity="warning",
                                          description="duplicates within a split (reported, not leakage)"),
    ]:
        suite.add_expectation(expectation)
    return suite


def run_expectations(manifest: pd.DataFrame, expected: Expected, docs_dir: Path | None = None
                     ) -> list[dict[str, Any]]:
    """Run the suite on the manifest (ephemeral GX context); optionally build Data Docs into docs_dir.

    Returns one entry per expectation: {"expectation", "success", "details"} where details carry
    the severity, the unexpected count and the first offending paths.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = suite_frame(manifest, expected)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (context.data_sources.add_pandas("manifest").add_dataframe_asset("manifest")
             .add_batch_definition_whole_dataframe("manifest"))
    suite = context.suites.add(build_suite(expected))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite))
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": ROWS_NAMED,
                     "unexpected_index_column_names": ["path"]}
    if docs_dir is None:
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        results = result.results
    else:
        # The site is built straight into a staging folder beside docs_dir and swapped in whole.
        stage = staging_dir(docs_dir, stage="validate")
        try:
            context.add_data_docs_site(DOCS_SITE, {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(stage)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
            checkpoint = context.checkpoints.add(gx.Checkpoint(
                name="manifest", validation_definitions=[definition], result_format=result_format,
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])]))
            outcome = checkpoint.run(batch_parameters={"dataframe": frame})
            results = next(iter(outcome.run_results.values())).results
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        replace_dir(docs_dir, stage)
    _remove_default_site(context)
    return [_summarise(r, frame, expected) for r in results]


def _remove_default_site(context: Any) -> None:
    """The ephemeral context makes a temporary folder for its default docs site: do not leak it."""
    for name, site in (context.get_config().data_docs_sites or {}).items():
        folder = Path(str(site.get("store_backend", {}).get("base_directory", "")))
        if name != DOCS_SITE and folder.is_absolute() and folder.is_relative_to(tempfile.gettempdir()):
            shutil.rmtree(folder, ignore_errors=True)


def _summarise(result: Any, frame: pd.DataFrame, expected: Expected) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "row_condition", "result_format")}
    details: dict[str, Any] = {"severity": str(getattr(config.severity, "value", config.severity)),
                               "kwargs": _plain(kwargs)}
    if config.description:
        details["description"] = config.description
    observed = result.result or {}
    if "observed_value" in observed:
        details["observed_value"] = _plain(observed["observed_value"])
    if "unexpected_count" in observed:
        details["unexpected_count"] = int(observed["unexpected_count"])
        details["rows"] = [row["path"] if isinstance(row, dict) else row
                           for row in observed.get("partial_unexpected_index_list") or []]
    if result.exception_info and result.exception_info.get("raised_exception"):
        details["exception"] = str(result.exception_info.get("exception_message"))
    if config.type == "expect_column_pair_values_to_be_equal" and not result.success:
        details["mismatched_counts"] = _count_mismatches(frame, expected)
    return {"expectation": config.type, "success": bool(result.success), "details": details}


def _count_mismatches(frame: pd.DataFrame, expected: Expected) -> list[dict[str, Any]]:
    found = frame.groupby(["class", "split"]).size()
    return [{"class": name, "split": split, "found": int(found.get((name, split), 0)), "expected": want}
            for (name, split), want in expected.counts.items() if int(found.get((name, split), 0)) != want]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def critical_failures(expectations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in expectations if not e["success"] and e["details"]["severity"] == "critical"]


def failure_message(failures: list[dict[str, Any]], manifest: pd.DataFrame, where: Path) -> str:
    """One paragraph per failed critical expectation, naming rows (first ten and the count)."""
    parts = []
    for failure in failures:
        details = failure["details"]
        text = f"{failure['expectation']} {details.get('description') or details['kwargs']}"
        if failure["expectation"] == "expect_column_values_to_be_in_set" and details.get("kwargs", {}).get(
                "mostly", 1) < 1:
            quarantined = manifest[manifest["status"].eq("quarantined")]
            named = [f"{p} ({e})" for p, e in zip(quarantined["path"][:ROWS_NAMED],
                                                    quarantined["error"][:ROWS_NAMED], strict=True)]
            text = (f"{len(quarantined)} of {len(manifest)} images quarantined, more than "
                    f"validate.max_quarantine_fraction allows: {'; '.join(named)}")
            more = len(quarantined) - len(named)
        else:
            named = details.get("rows") or []
            more = max(details.get("unexpected_count", len(named)) - len(named), 0)
            if details.get("mismatched_counts"):
                named = [f"{m['class']}/{m['split']}: {m['found']} rows, expected {m['expected']}"
                         for m in details["mismatched_counts"][:ROWS_NAMED]]
                more = len(details["mismatched_counts"]) - len(named)
            elif "observed_value" in details and not named:
                named = [f"observed {details['observed_value']}"]
            text += ": " + "; ".join(map(str, named)) if named else ""
        if more > 0:
            text += f" ... and {more} more"
        parts.append(text)
    return (f"validation failed ({len(failures)} critical expectation(s)):\n- " + "\n- ".join(parts)
            + f"\nDetails: {where / 'validation.json'} and the Data Docs in {where / 'data_docs'}. "
            "Fix or remove the named files (or restore them from the original archive) and run again.")


# --- readers ----------------------------------------------------------------------------------


def read_validation(config: Config) -> dict[str, Any]:
    path = config.paths.manifest / "validation.json"
    if not path.is_file():
        raise StageOutputMissing(f"{path} does not exist; run the validate stage first (food101 stage validate)")
    return read_json(path)


def read_manifest(config: Config) -> pd.DataFrame:
    """The manifest of the last successful validation (quarantined rows included: filter on status)."""
    validation = read_validation(config)
    if not validation["success"]:
        raise ManifestValidationError(
            f"the last validation failed; see {config.paths.manifest / 'validation.json'} and run the "
            "validate stage again after fixing the data"
        )
    return pd.read_parquet(config.paths.manifest / "manifest.parquet")


def read_classes(config: Config) -> dict[str, list[str]]:
    path = config.paths.manifest / "classes.json"
    if not path.is_file():
        raise StageOutputMissing(f"{path} does not exist; run the validate stage first (food101 stage validate)")
    return read_json(path)


# --- the stage --------------------------------------------------------------------------------


def expected_for(config: Config, listing: pd.DataFrame, classes: list[str]) -> Expected:
    # The bundled sample is itself a subset: its meta files, not the official counts, say what to
    # expect; so does an image folder (the official counts are Food-101's).
    whole = config.data.source not in ("sample", "imagefolder") and not config.data.is_subset
    official = ({"train": config.validate.official_train_per_class,
                 "test": config.validate.official_test_per_class} if whole else None)
    return Expected(classes=classes, counts=expected_counts(listing, classes, official),
                    min_side=config.validate.min_side, max_side=config.validate.max_side,
                    max_quarantine_fraction=config.validate.max_quarantine_fraction)


def manifest_for(config: Config, root: Path, workers: int | None = None) -> tuple[pd.DataFrame, DatasetMeta,
                                                                                   list[str]]:
    """Select the configured rows under `root` and read every file: the manifest, meta, classes."""
    meta = dataset_meta(config, root)
    classes = select_classes(meta.classes, config.data.classes)
    listing = select_rows(meta, classes, config.data.train_per_class, config.data.test_per_class)
    if workers is None:
        chunks = math.ceil(len(listing) / CHUNK_IMAGES)
        workers = max(1, min(os.cpu_count() or 1, chunks))
    inspections = inspect_files(root, listing["path"].tolist(), workers)
    return build_manifest(listing, inspections), meta, classes


@task(name="validate", cache_policy=NONE)
def validate(config: Config, parent_run_id: str | None = None) -> dict:
    """Build the manifest of the selected images and check it with Great Expectations."""
    from food101.tracking import stage_run  # here: the image readers' processes preload this module, not MLflow

    params = {"classes": config.data.classes, "train_per_class": config.data.train_per_class,
              "test_per_class": config.data.test_per_class, **dataclasses.asdict(config.validate),
              **({"test_fraction": config.data.test_fraction, "split_seed": config.data.split_seed}
                 if config.data.source == "imagefolder" else {})}
    with stage_run(config, "validate", parent_run_id, params=params) as run:
        root = Path(read_dataset(config)["root"])
        start = time.perf_counter()
        manifest, meta, classes = manifest_for(config, root)
        read_s = time.perf_counter() - start
        expected = expected_for(config, manifest, classes)
        out = config.paths.manifest
        start = time.perf_counter()
        expectations = run_expectations(manifest, expected, docs_dir=out / "data_docs")
        suite_s = time.perf_counter() - start
        failures = critical_failures(expectations)
        quarantined = manifest[manifest["status"].eq("quarantined")]
        digest = data_hash(manifest)
        validation = {
            "success": not failures,
            "images": len(manifest),
            "quarantined": [{"path": p, "reason": r} for p, r in zip(quarantined["path"], quarantined["error"],
                                                                   strict=True)],
            "expectations": expectations,
            "data_hash": digest,
            "dataset_root": str(root),
            "dataset": {"source": config.data.source, "root": str(root), "classes": len(classes),
                        "split_rule": meta.split_rule},
        }
        display_of = dict(zip(meta.classes, meta.display, strict=True))
        write_parquet(out / "manifest.parquet", manifest)
        write_json(out / "classes.json", {"names": classes, "display": [display_of[c] for c in classes]})
        write_json(out / "validation.json", validation)
        counts = manifest["status"].value_counts()
        run.set_tags({"data_hash": digest})
        run.log_metrics({
            "images": len(manifest), "quarantined": int(counts.get("quarantined", 0)),
            "converted": int(counts.get("converted", 0)),
            "expectations_failed": sum(not e["success"] for e in expectations),
            "critical_failed": len(failures), "read_seconds": read_s, "suite_seconds": suite_s,
            "images_per_s": len(manifest) / read_s if read_s > 0 else 0.0,
        })
        run.log_artifacts(out, artifact_path="manifest")
        for warning in (e for e in expectations if not e["success"] and e not in failures):
            log.warning("validation warning: %s %s", warning["expectation"], warning["details"].get("rows"))
        if failures:
            raise ManifestValidationError(failure_message(failures, manifest, out))
        log.info("validated %d images (%d quarantined, %d converted) in %.1f s + suite %.1f s",
                 len(manifest), counts.get("quarantined", 0), counts.get("converted", 0), read_s, suite_s)
        return {"images": len(manifest), "quarantined": int(counts.get("quarantined", 0)),
                "converted": int(counts.get("converted", 0)), "success": True, "data_hash": digest,
                "manifest": str(out / "manifest.parquet"), "data_docs": str(out / "data_docs" / "index.html")}
