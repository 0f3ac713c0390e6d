"""A complete set of upstream outputs (validate, preprocess, train, evaluate, confusion) in the
contract formats, written without training anything, so the report can be tested in seconds.

The photos are the real sample (data/sample); the metrics are plausible numbers chosen so that
the report rules give different answers (best accuracy, fastest within 1 point, best under a
20 ms budget are three different models). Predictions are simulated per model with a seeded RNG,
the per-class tables and confusion counts are computed from them, and the confusion stage itself
(tasks.confusion) runs on those files. Other files follow the keys their writers produce (checked
against a real demo run); the validation entries are six of the suite's, one of them failed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from food101.config import Config
from food101.io import write_json, write_npy, write_parquet, write_text
from tasks import validate
from tasks.preprocess import CACHE_FORMAT, record_cache_files
from tasks.train import recipe_params
from tests.conftest import sample_classes

# Headline numbers per model (top-1 as fractions, latencies in ms, training time in seconds).
MODEL_SPECS: dict[str, dict[str, Any]] = {
    "resnet50": {
        "top1": 0.820, "top5": 0.952, "macro_f1": 0.817, "ece": 0.031,
        "latency_cpu_p50_ms": 48.0, "latency_cpu_p95_ms": 55.0, "throughput_cpu_ips": 31.0,
        "params": 23_714_981, "size_mb": 94.6, "gflops": 4.11, "train_time_s": 5400.0,
        "train_images_per_s": 412.0,
    },
    "efficientnet_b0": {
        "top1": 0.815, "top5": 0.948, "macro_f1": 0.811, "ece": 0.045,
        "latency_cpu_p50_ms": 21.0, "latency_cpu_p95_ms": 25.0, "throughput_cpu_ips": 68.0,
        "params": 4_136_929, "size_mb": 16.3, "gflops": 0.39, "train_time_s": 3100.0,
        "train_images_per_s": 690.0,
    },
    "mobilenet_v3_large": {
        "top1": 0.760, "top5": 0.921, "macro_f1": 0.752, "ece": 0.058,
        "latency_cpu_p50_ms": 9.0, "latency_cpu_p95_ms": 11.0, "throughput_cpu_ips": 224.0,
        "params": 4_331_493, "size_mb": 17.1, "gflops": 0.22, "train_time_s": 2000.0,
        "train_images_per_s": 1150.0,
    },
}
EPOCHS = 6


@dataclass
class Upstream:
    """What the fixture wrote, for the tests to compare the report against."""

    classes: list[str]
    display: list[str]
    metrics: dict[str, dict[str, Any]]
    failed: dict[str, str]
    n_test: int
    data_hash: str
    quarantined: list[dict[str, str]]
    significance: list[dict[str, Any]] = field(default_factory=list)
    shared_pairs: list[tuple[str, str]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)


def write_upstream_outputs(
    config: Config,
    specs: dict[str, dict[str, Any]] | None = None,
    failed: dict[str, str] | None = None,
    seed: int = 0,
) -> Upstream:
    """Write every upstream file the report reads under `config.paths`.

    `specs` maps model -> headline metrics (default MODEL_SPECS); models in `failed` get a failed
    train.json and no evaluation outputs.
    """
    specs = MODEL_SPECS if specs is None else specs
    failed = dict(failed or {})
    sample = Path(config.paths.sample)
    meta = sample_classes(sample)
    classes, display = meta["names"], meta["display"]

    write_json(config.paths.dataset, {"source": "sample", "root": str(sample), "archive": None, "archive_md5": None})
    manifest, quarantined, data_hash = _write_manifest(config, sample, classes, display)
    _, test_labels, test_paths = _write_cache(config, sample, manifest, classes, display)

    rng = np.random.default_rng(seed)
    predictions: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for index, (model, spec) in enumerate(specs.items()):
        _write_training(config, model, spec, failed.get(model), rng)
        if model in failed:
            continue
        pred = _simulate_predictions(test_labels, spec["top1"], len(classes), rng, shift=index)
        predictions[model] = pred
        metrics[model] = _write_evaluation(config, model, spec, test_labels, pred, test_paths, classes, display, rng)

    upstream = Upstream(classes, display, metrics, failed, len(test_labels), data_hash, quarantined)
    if predictions:
        _write_confusion(config, upstream, predictions)
    return upstream


# --- validate ---------------------------------------------------------------------------------


def _write_manifest(config: Config, sample: Path, classes: list[str], display: list[str]):
    rows = []
    for split in ("train", "test"):
        for image_id in (sample / "meta" / f"{split}.txt").read_text().split():
            cls = image_id.split("/")[0]
            if cls not in classes:
                continue
            path = f"images/{image_id}.jpg"
            blob = (sample / path).read_bytes()
            with Image.open(sample / path) as img:
                width, height, mode, fmt = img.width, img.height, img.mode, img.format
            rows.append({"path": path, "image_id": image_id, "class": cls, "label": classes.index(cls),
                         "split": split, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                         "width": width, "height": height, "mode": mode, "format": fmt, "decodable": True,
                         "error": None, "status": "ok"})
    # One unreadable file, quarantined, so the report has something to show.
    bad = {"path": f"images/{classes[2]}/9999999.jpg", "image_id": f"{classes[2]}/9999999", "class": classes[2],
           "label": 2, "split": "train", "bytes": 1024, "sha256": hashlib.sha256(b"broken").hexdigest(),
           "width": 0, "height": 0, "mode": "", "format": "", "decodable": False,
           "error": "cannot identify image file", "status": "quarantined"}
    rows.append(bad)
    manifest = pd.DataFrame(rows)
    data_hash = validate.data_hash(manifest)
    quarantined = [{"path": bad["path"], "reason": "undecodable: cannot identify image file"}]
    folder = config.paths.manifest
    write_parquet(folder / "manifest.parquet", manifest)
    write_json(folder / "classes.json", {"names": classes, "display": display})
    # Six of the suite's entries as tasks.validate._summarise writes them; one tolerable failure.
    def passed(column: str, severity: str = "critical", **kwargs: Any) -> dict[str, Any]:
        return {"severity": severity, "kwargs": {"column": column, **kwargs}, "unexpected_count": 0, "rows": []}

    expectations = [
        ("expect_column_values_to_be_in_set", True, passed("split", value_set=["train", "test"])),
        ("expect_column_values_to_be_unique", True, passed("path")),
        ("expect_column_values_to_be_between", True, passed("width", "warning", min_value=32, max_value=4096)),
        ("expect_column_values_to_be_in_set", True, passed("mode", "warning", value_set=["RGB", "L"])),
        ("expect_column_values_to_be_in_set", False,
         {**passed("status", value_set=["ok", "converted"], mostly=0.95), "unexpected_count": 1,
          "rows": [bad["path"]]}),
        ("expect_column_values_to_be_between", True,
         {**passed("splits_sharing_sha256", max_value=1), "description": "no train/test leakage left"}),
    ]
    write_json(folder / "validation.json", {
        "success": True,
        "images": len(manifest),
        "quarantined": quarantined,
        "expectations": [{"expectation": e, "success": s, "details": d} for e, s, d in expectations],
        "data_hash": data_hash,
        "dataset_root": str(sample),
    })
    write_text(folder / "data_docs" / "index.html", "<html><body>Data Docs (fixture)</body></html>\n")
    return manifest, quarantined, data_hash


# --- preprocess -------------------------------------------------------------------------------


def _load(sample: Path, path: str, resize: int, crop: int) -> np.ndarray:
    with Image.open(sample / path) as img:
        img = img.convert("RGB")
        scale = resize / min(img.size)
        img = img.resize((max(crop, round(img.width * scale)), max(crop, round(img.height * scale))))
        left, top = (img.width - crop) // 2, (img.height - crop) // 2
        return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _write_cache(config: Config, sample: Path, manifest: pd.DataFrame, classes: list[str], display: list[str]):
    crop, resize = config.preprocess.crop, config.preprocess.resize
    usable = manifest[manifest["status"] != "quarantined"]
    train = usable[usable["split"] == "train"].sample(frac=1.0, random_state=0)
    n_val = int(round(len(train) * config.preprocess.val_fraction))
    splits = {"train": train.iloc[n_val:], "val": train.iloc[:n_val], "test": usable[usable["split"] == "test"]}
    index_rows, counts = [], {}
    test = None
    for split, frame in splits.items():
        images = np.stack([_load(sample, p, resize, crop) for p in frame["path"]])
        labels = frame["label"].to_numpy(dtype=np.int64)
        write_npy(config.paths.cache / f"{split}_images.npy", images)
        write_npy(config.paths.cache / f"{split}_labels.npy", labels)
        counts[split] = len(frame)
        index_rows += [{"split": split, "position": i, "path": p, "label": int(y), "image_id": image_id}
                       for i, (p, y, image_id) in enumerate(zip(frame["path"], labels, frame["image_id"],
                                                                strict=True))]
        if split == "test":
            test = (images, labels, list(frame["path"]))
    write_parquet(config.paths.cache / "index.parquet", pd.DataFrame(index_rows))
    write_json(config.paths.cache / "meta.json", {"key": "fixture", "classes": classes, "display": display,
                                                  "resize": resize, "crop": crop, "counts": counts,
                                                  "val_fraction": config.preprocess.val_fraction,
                                                  "seed": config.preprocess.seed, "format": CACHE_FORMAT,
                                                  "files": record_cache_files(config.paths.cache)})
    return test


# --- train ------------------------------------------------------------------------------------


def _write_training(config: Config, model: str, spec: dict[str, Any], error: str | None, rng) -> None:
    folder = config.paths.models / model
    epochs = 2 if error else EPOCHS
    final = spec["top1"]
    t = np.arange(1, epochs + 1)
    val_top1 = final - (final - 0.2) * np.exp(-(t - 1) / 1.6) + rng.normal(0, 0.004, epochs)
    history = pd.DataFrame({
        "epoch": t,
        "train_loss": 2.2 * np.exp(-(t - 1) / 2.5) + 1.9 * (1 - final),
        "train_top1": np.minimum(0.99, val_top1 + 0.02 * t),
        "val_loss": 2.1 * np.exp(-(t - 1) / 2.2) + 2.6 * (1 - final) + 0.01 * t,
        "val_top1": val_top1,
        "lr": 0.002 * np.cos(np.pi * (t - 1) / (2 * epochs)),
        "images_per_s": spec["train_images_per_s"] * (1 + rng.normal(0, 0.02, epochs)),
        "epoch_time_s": spec["train_time_s"] / EPOCHS * np.ones(epochs),
    })
    if error:
        history.loc[history.index[-1], ["train_loss", "val_loss"]] = float("nan")
    write_text(folder / "history.csv", history.to_csv(index=False))
    best_epoch = int(history["val_top1"].idxmax()) + 1
    write_json(folder / "train.json", {
        "model": model, "status": "failed" if error else "ok", "error": error, "epochs_run": epochs,
        "best_epoch": best_epoch, "best_val_top1": float(history["val_top1"].max()),
        "train_time_s": spec["train_time_s"] * epochs / EPOCHS, "images_per_s": spec["train_images_per_s"],
        "device": "cpu", "params": recipe_params(config.train.for_model(model)), "pretrained": False,
        "config_hash": "fixture", "resumed_from_epoch": 0, "stopped_early": False,
    })


# --- evaluate ---------------------------------------------------------------------------------


def _simulate_predictions(labels: np.ndarray, accuracy: float, n_classes: int, rng, shift: int) -> np.ndarray:
    """Predictions with round(accuracy * n) correct; mistakes mostly go to a 'look-alike' class."""
    lookalike = {c: (n_classes - 1 - c) if c != n_classes // 2 else 0 for c in range(n_classes)}
    wrong = rng.choice(len(labels), size=len(labels) - int(round(accuracy * len(labels))), replace=False)
    pred = labels.copy()
    for i in wrong:
        if rng.random() < 0.7:
            pred[i] = lookalike[int(labels[i])]
        else:
            pred[i] = (labels[i] + 1 + (i + shift) % (n_classes - 1)) % n_classes
    return pred


def _write_evaluation(config, model, spec, labels, pred, paths, classes, display, rng) -> dict[str, Any]:
    folder = config.paths.eval / model
    n_classes, n = len(classes), len(labels)
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (labels, pred), 1)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    diag = np.diag(counts).astype(float)
    recall = np.divide(diag, support, out=np.zeros(n_classes), where=support > 0)
    precision = np.divide(diag, predicted, out=np.zeros(n_classes), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes),
                   where=(precision + recall) > 0)
    write_npy(folder / "confusion_counts.npy", counts)
    per_class = pd.DataFrame({"class": classes, "display": display, "accuracy": recall, "precision": precision,
                              "recall": recall, "f1": f1, "support": support})
    write_text(folder / "per_class.csv", per_class.to_csv(index=False))
    top5 = [[int(p)] + [c for c in range(n_classes) if c != p][:4] for p in pred]
    probs = [sorted(rng.dirichlet(np.ones(5) * 0.7), reverse=True) for _ in pred]
    write_parquet(folder / "predictions.parquet", pd.DataFrame({
        "path": paths, "label": labels, "pred": pred, "correct": labels == pred,
        "top5_labels": top5, "top5_probs": [[float(x) for x in p] for p in probs]}))

    top1 = spec["top1"]
    half = 1.96 * np.sqrt(top1 * (1 - top1) / n)
    half5 = 1.96 * np.sqrt(spec["top5"] * (1 - spec["top5"]) / n)
    metrics = {
        "model": model, "n_test": n,
        "top1": top1, "top1_ci_low": round(max(0.0, top1 - half), 4), "top1_ci_high": round(min(1.0, top1 + half), 4),
        "top5": spec["top5"], "top5_ci_low": round(max(0.0, spec["top5"] - half5), 4),
        "top5_ci_high": round(min(1.0, spec["top5"] + half5), 4),
        "macro_precision": spec["macro_f1"] + 0.004, "macro_recall": spec["macro_f1"] - 0.002,
        "macro_f1": spec["macro_f1"], "ece": spec["ece"],
        "latency_cpu_p50_ms": spec.get("latency_cpu_p50_ms"), "latency_cpu_p95_ms": spec.get("latency_cpu_p95_ms"),
        "latency_gpu_p50_ms": spec.get("latency_gpu_p50_ms"), "latency_gpu_p95_ms": spec.get("latency_gpu_p95_ms"),
        "throughput_cpu_ips": spec.get("throughput_cpu_ips"), "throughput_gpu_ips": spec.get("throughput_gpu_ips"),
        "params": spec["params"], "size_mb": spec["size_mb"], "gflops": spec["gflops"],
        "train_time_s": spec["train_time_s"], "train_images_per_s": spec["train_images_per_s"],
        "n_seeds": 1, "top1_seed_mean": top1, "top1_seed_sd": None,
        "machine_state": {"cores": 2, "seconds": 1.0, "other_cpu_share": 0.0, "steal_share": 0.0,
                          "load_1min": 0.5, "load_per_core": 0.25, "cpu_mhz": 2000.0},
    }
    write_json(folder / "metrics.json", metrics)
    _reliability_png(folder / "reliability.png", model, spec["ece"])
    return metrics


def _reliability_png(path: Path, model: str, ece: float) -> None:
    """A small reliability diagram drawn with PIL (matplotlib would make the fixture 5x slower)."""
    img = Image.new("RGB", (320, 300), "white")
    draw = ImageDraw.Draw(img)
    left, bottom, size = 40, 260, 240
    draw.rectangle((left, bottom - size, left + size, bottom), outline="black")
    for i in range(10):
        centre = (i + 0.5) / 10
        accuracy = max(0.0, centre - ece * (1 - centre))
        x0 = left + i * size // 10
        draw.rectangle((x0 + 2, bottom - int(accuracy * size), x0 + size // 10 - 2, bottom), fill=(70, 130, 180))
    draw.line((left, bottom, left + size, bottom - size), fill="black", width=2)
    draw.text((left, 10), f"{model}: reliability (ECE {ece:.3f})", fill="black")
    draw.text((left + 80, bottom + 15), "confidence", fill="black")
    _save(img, path)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


# --- confusion --------------------------------------------------------------------------------


def _write_confusion(config: Config, upstream: Upstream, predictions: dict[str, np.ndarray]) -> None:
    """The confusion stage itself on the evaluation files above: its outputs cannot drift from the writer's."""
    from tasks.confusion import confusion, read_confusion

    confusion.fn(config, list(predictions))
    written = read_confusion(config)
    upstream.shared_pairs = list(zip(written["shared_pairs"]["true"], written["shared_pairs"]["predicted"],
                                     strict=True))
    upstream.groups = written["groups"]["combined"]
    upstream.significance = written["significance"]
