"""A complete set of upstream outputs (validate, preprocess, train, evaluate, confusion) in the
contract formats, written without training anything, so the report can be tested in seconds.

The photos are the real sample (data/sample); the metrics are plausible numbers chosen so that
the report rules give different answers (best accuracy, fastest within 1 point, best under a
20 ms budget are three different models). Predictions are simulated per model with a seeded RNG
and the per-class tables, confusion counts, pairs and McNemar tests are computed from them.
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
from tasks.preprocess import record_cache_files
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
    test_images, test_labels, test_paths = _write_cache(config, sample, manifest, classes, display)

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
        _write_confusion(config, upstream, test_images, test_labels, predictions)
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
    expectations = [
        ("expect_column_values_to_be_in_set(class)", True, {"unexpected_count": 0}),
        ("expect_column_values_to_be_unique(path)", True, {"unexpected_count": 0}),
        ("expect_column_values_to_be_between(width, 32, 512)", True, {"unexpected_count": 0}),
        ("expect_column_values_to_be_in_set(mode, [RGB, L])", True, {"unexpected_count": 0}),
        ("expect_column_values_to_be_in_set(decodable, [True])", False,
         {"unexpected_count": 1, "partial_unexpected_list": [bad["path"]]}),
        ("no_train_test_duplicates(sha256)", True, {"duplicates": 0}),
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
        index_rows += [{"split": split, "position": i, "path": p, "label": int(y)}
                       for i, (p, y) in enumerate(zip(frame["path"], labels, strict=True))]
        if split == "test":
            test = (images, labels, list(frame["path"]))
    write_parquet(config.paths.cache / "index.parquet", pd.DataFrame(index_rows))
    write_json(config.paths.cache / "meta.json", {"key": "fixture", "classes": classes, "display": display,
                                                  "resize": resize, "crop": crop, "counts": counts,
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
        "device": "cpu", "params": spec["params"], "pretrained": False,
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


def _heatmap_png(path: Path, title: str, rates: np.ndarray, labels: list[str]) -> None:
    cell, margin = 48, 130
    n = len(labels)
    img = Image.new("RGB", (margin + n * cell + 20, margin + n * cell + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    for i in range(n):
        draw.text((10, margin + i * cell + cell // 2 - 5), labels[i][:18], fill="black")
        draw.text((margin + i * cell + 2, margin - 20 - 12 * (i % 2)), labels[i][:9], fill="black")
        for j in range(n):
            shade = int(255 * (1 - rates[i, j]))
            draw.rectangle((margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1,
                            margin + (i + 1) * cell - 1), fill=(shade, shade, 255))
            draw.text((margin + j * cell + 12, margin + i * cell + 18), f"{rates[i, j]:.1f}",
                      fill="black" if rates[i, j] < 0.6 else "white")
    _save(img, path)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


# --- confusion --------------------------------------------------------------------------------


def _write_confusion(config: Config, upstream: Upstream, images: np.ndarray, labels: np.ndarray,
                     predictions: dict[str, np.ndarray]) -> None:
    from scipy.cluster.hierarchy import dendrogram, fcluster, linkage
    from scipy.spatial.distance import squareform
    from scipy.stats import binomtest

    folder = config.paths.confusion
    classes, display = upstream.classes, upstream.display
    n_classes = len(classes)
    top_n = config.confusion.top_pairs
    pair_sets, combined = [], np.zeros((n_classes, n_classes))
    for model, pred in predictions.items():
        counts = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(counts, (labels, pred), 1)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        combined += rates
        off = [(int(counts[i, j]), float(rates[i, j]), i, j) for i in range(n_classes) for j in range(n_classes)
               if i != j and counts[i, j] > 0]
        off.sort(key=lambda x: (-x[0], -x[1], x[2], x[3]))
        off = off[:top_n]
        pairs = pd.DataFrame({"true": [classes[i] for *_, i, _ in off], "predicted": [classes[j] for *_, j in off],
                              "count": [c for c, *_ in off], "rate": [r for _, r, *_ in off],
                              "true_display": [display[i] for *_, i, _ in off],
                              "predicted_display": [display[j] for *_, j in off]})
        write_text(folder / f"{model}_pairs.csv", pairs.to_csv(index=False))
        pair_sets.append({(classes[i], classes[j]) for *_, i, j in off})

        _heatmap_png(folder / f"{model}_matrix.png", f"{model}: normalised confusion", rates, display)
        write_text(folder / f"{model}_matrix.svg", _svg_matrix(rates, display))

        wrong = np.flatnonzero(pred != labels)[: 2 * config.confusion.examples_per_pair]
        tile = images.shape[1] * 2
        grid = Image.new("RGB", (max(len(wrong), 1) * (tile + 8) + 8, tile + 40), "white")
        draw = ImageDraw.Draw(grid)
        for k, i in enumerate(wrong):
            photo = Image.fromarray(images[i]).resize((tile, tile))
            grid.paste(photo, (8 + k * (tile + 8), 8))
            draw.text((8 + k * (tile + 8), tile + 12), f"{display[labels[i]][:14]}", fill="black")
            draw.text((8 + k * (tile + 8), tile + 24), f"-> {display[pred[i]][:14]}", fill=(180, 0, 0))
        _save(grid, folder / f"{model}_examples.png")

    shared = set.intersection(*pair_sets) if pair_sets else set()
    upstream.shared_pairs = sorted(shared)
    shared_rows = [(t, p, display[classes.index(t)], display[classes.index(p)]) for t, p in upstream.shared_pairs]
    write_text(folder / "shared_pairs.csv", pd.DataFrame(
        shared_rows, columns=["true", "predicted", "true_display", "predicted_display"]).to_csv(index=False))

    similarity = (combined + combined.T) / (2 * len(predictions))
    np.fill_diagonal(similarity, 1.0)
    distance = 1.0 - similarity / similarity.max()
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    cluster = fcluster(tree, t=0.95, criterion="distance")
    groups = [[classes[i] for i in np.flatnonzero(cluster == c)] for c in np.unique(cluster)]
    upstream.groups = [g for g in groups if len(g) > 1]
    write_json(folder / "groups.json", {"combined": upstream.groups, **{m: upstream.groups for m in predictions}})
    order = dendrogram(tree, no_plot=True)["leaves"]
    img = Image.new("RGB", (520, 220), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "Classes by mutual confusion (leaf order)", fill="black")
    for k, leaf in enumerate(order):
        x = 40 + k * 100
        draw.line((x, 60, x, 170), fill=(40, 90, 160), width=3)
        draw.text((x - 30, 180), display[leaf][:16], fill="black")
    draw.line((40, 60, 40 + (len(order) - 1) * 100, 60), fill=(40, 90, 160), width=3)
    _save(img, folder / "dendrogram.png")

    significance = []
    models = list(predictions)
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            right_a, right_b = predictions[a] == labels, predictions[b] == labels
            only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
            p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            verdict = "a real difference" if p < 0.05 else "not a significant difference"
            sentence = (f"On the same {len(labels)} test photos, {a} alone was right {only_a} times and {b} alone "
                        f"{only_b} times: McNemar's exact test gives p = {p:.3g}, {verdict}.")
            significance.append({"a": a, "b": b, "n_a_only": only_a, "n_b_only": only_b, "p_value": float(p),
                                 "sentence": sentence})
    upstream.significance = significance
    write_json(folder / "significance.json", significance)
    write_json(folder / "summary.json", {
        "models": models, "n_classes": n_classes, "n_test": len(labels), "shared_pairs": len(shared),
        "groups": {"combined": len(upstream.groups)},
        "group_rule": "foods in a group are confused for each other at a mean rate of at least 5%"})


def _svg_matrix(rates: np.ndarray, labels: list[str]) -> str:
    cell, margin = 40, 140
    n = len(labels)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{margin + n * cell}" height="{margin + n * cell}">']
    for i in range(n):
        parts.append(f'<text x="4" y="{margin + i * cell + 24}" font-size="12">{labels[i]}</text>')
        for j in range(n):
            shade = int(255 * (1 - rates[i, j]))
            parts.append(f'<rect x="{margin + j * cell}" y="{margin + i * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb({shade},{shade},255)"/>')
    return "\n".join([*parts, "</svg>"]) + "\n"
