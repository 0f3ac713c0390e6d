"""robustness[model]: accuracy on test photos corrupted the way phone photos are.

ImageNet-C's method (Hendrycks & Dietterich, 2019) on Food-101's test split: each corruption of
`robustness.corruptions` at each severity of `robustness.severities`, applied to the uint8 cache
on the model's device in batches, with seeded draws per photo, corruption and severity so two
benchmarks see the same corrupted photos. Outputs in `paths.robustness/<model>/`:
`robustness.json` (accuracy per corruption and severity with bootstrap CIs, mean corruption
accuracy, relative robustness, the classes hurt most) and `per_photo.parquet`.

The corruption error relative to `robustness.baseline_model` (CE, mCE) needs the baseline's
results too, which its own stage may write later; it is computed from both stages' files by
`headlines` when the report is written, and reaches summary.json there. The grid of example
photos is the same for every model, so the report draws it once (`section_plots`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as TF
from prefect import task
from prefect.cache_policies import NONE
from torch import nn
from tqdm import tqdm

from food101 import metrics
from food101.config import CORRUPTIONS, SEVERITIES, Config, RobustnessConfig
from food101.corruptions import OPERATIONS, Draws, corrupt, photo_uniforms  # noqa: F401 (re-exported)
from food101.devices import training_slots
from food101.errors import Food101Error
from food101.io import read_json, replace_dir, staging_dir, write_json, write_parquet
from food101.timing import QUIET
from food101.tracking import stage_run
from tasks.evaluate import read_predictions
from tasks.preprocess import Cache, open_cache
from tasks.train import load_trained_model

log = logging.getLogger(__name__)

RESULTS_FILE = "robustness.json"
PER_PHOTO_FILE = "per_photo.parquet"


class RobustnessMissing(Food101Error):
    """A model's robustness outputs are not there (the stage has not run for it)."""


class RobustnessInputError(Food101Error):
    """The cache and the model's evaluation do not describe the same test photos."""


# --- classification under a corruption -----------------------------------------------------------


@dataclass(frozen=True)
class SplitPhotos:
    """The test split as the cache holds it: uint8 photos, labels, paths and ids in cache order."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray
    paths: list[str]
    image_ids: list[str]


def load_test_photos(cache: Cache) -> SplitPhotos:
    """Only the test split's rows: corruptions never see train or validation photos."""
    index = cache.index
    rows = index[index["split"] == "test"].sort_values("position")
    labels = np.asarray(cache.labels("test"))
    if len(rows) != len(labels):
        raise RobustnessInputError(f"the cache index lists {len(rows)} test photos but the cache holds "
                                   f"{len(labels)}; run preprocess again (food101 stage preprocess)")
    return SplitPhotos(cache.images("test"), labels, rows["path"].astype(str).tolist(),
                      rows["image_id"].astype(str).tolist())


def classify(
    network: nn.Module, photos: SplitPhotos, corruption: str, severity: int, settings: RobustnessConfig,
    device: torch.device, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
) -> np.ndarray:
    """Top-1 predictions (N,) of `network` on the test photos under one corruption and severity."""
    n = len(photos.labels)
    uniforms = photo_uniforms(settings.seed, corruption, severity, n).to(device)
    # As BatchFeed's evaluation path, so that severity 0 reproduces evaluate's predictions exactly.
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1).to(device)
    preds = []
    with torch.inference_mode():
        for start in range(0, n, settings.batch_size):
            stop = min(n, start + settings.batch_size)
            pixels = torch.from_numpy(np.array(photos.images[start:stop])).to(device)  # a copy: the memmap is read-only
            x = corrupt(pixels.permute(0, 3, 1, 2), corruption, severity, settings,
                        Draws(uniforms[start:stop])).float()
            if x.shape[-2:] != (image_size, image_size):
                x = TF.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False)
            x = x.mul_(scale).add_(shift).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = network(x)
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            preds.append(metrics.topk_indices(probs, 1)[:, 0])
    return np.concatenate(preds).astype(np.int64)


# --- scores (pure) --------------------------------------------------------------------------------


def score(
    preds: dict[tuple[str, int], np.ndarray], clean_correct: np.ndarray, labels: np.ndarray,
    classes: list[str], display: list[str], settings: RobustnessConfig, model: str,
) -> dict[str, Any]:
    """robustness.json: accuracy per corruption and severity (bootstrap CIs), their mean, the mean
    relative to clean accuracy, and per corruption the classes whose accuracy falls most."""
    clean_top1 = float(clean_correct.mean())
    correct = {key: p == labels for key, p in preds.items()}
    per_photo = np.mean(np.stack(list(correct.values())), axis=0)  # share of conditions right, per photo
    mca = metrics.bootstrap_ci(per_photo, settings.bootstrap_samples, settings.seed)
    clean_per_class = _per_class_accuracy(clean_correct, labels, len(classes))
    corruptions: dict[str, Any] = {}
    for name in settings.corruptions:
        rows = []
        for severity in settings.severities:
            hit = correct[(name, severity)]
            ci = metrics.bootstrap_ci(hit, settings.bootstrap_samples, settings.seed)
            rows.append({"severity": severity, "level": settings.levels[name][severity - 1],
                         "accuracy": ci.estimate, "ci_low": ci.low, "ci_high": ci.high})
        under = np.mean([_per_class_accuracy(correct[(name, s)], labels, len(classes)) for s in settings.severities],
                        axis=0)
        drop = clean_per_class - under
        order = sorted(range(len(classes)), key=lambda i: (-drop[i], classes[i]))[:settings.most_hurt_classes]
        corruptions[name] = {
            "mean_accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "severities": rows,
            "most_hurt": [{"class": classes[i], "display": display[i], "clean": float(clean_per_class[i]),
                           "corrupted": float(under[i]), "drop": float(drop[i])} for i in order],
        }
    return {
        "model": model, "n_test": int(len(labels)), "clean_top1": clean_top1,
        "mean_corruption_accuracy": mca.estimate, "mean_corruption_accuracy_ci_low": mca.low,
        "mean_corruption_accuracy_ci_high": mca.high,
        "relative_robustness": mca.estimate / clean_top1 if clean_top1 > 0 else None,
        "baseline_model": settings.baseline_model, "seed": settings.seed, "batch_size": settings.batch_size,
        "corruptions": corruptions,
    }


def _per_class_accuracy(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    support = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=n_classes)
    return np.divide(hits, support, out=np.zeros(n_classes), where=support > 0)


def per_photo_frame(photos: SplitPhotos, preds: dict[tuple[str, int], np.ndarray]) -> pd.DataFrame:
    """per_photo.parquet: one row per test photo, corruption and severity."""
    parts = [pd.DataFrame({"path": photos.paths, "image_id": photos.image_ids, "label": photos.labels.astype(np.int64),
                           "corruption": name, "severity": np.int64(severity), "pred": p,
                           "correct": p == photos.labels})
             for (name, severity), p in preds.items()]
    return pd.concat(parts, ignore_index=True)


def corruption_errors(
    model_errors: np.ndarray, baseline_errors: np.ndarray, samples: int, seed: int,
) -> tuple[np.ndarray, metrics.Interval]:
    """CE per corruption and mCE with a paired bootstrap CI over photos (ImageNet-C's definition):
    CE_c = sum_s err(model, c, s) / sum_s err(baseline, c, s); mCE = mean over c, both x 100.

    Inputs are (N photos, C corruptions) counts of wrong severities; a resample weighs photos by
    multinomial counts, so a 25,000-photo test set costs one matrix product per chunk.
    """
    n = len(model_errors)
    base_total = baseline_errors.sum(axis=0)
    usable = base_total > 0  # a corruption the baseline never gets wrong has no CE
    ce = np.full(model_errors.shape[1], np.nan)
    ce[usable] = 100.0 * model_errors.sum(axis=0)[usable] / base_total[usable]
    rng, chunks = np.random.default_rng(seed), []
    for first in range(0, samples, 100):  # 100 resamples of 25,250 photos: 20 MB of weights at a time
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(100, samples - first)).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            chunks.append(100.0 * (weights @ model_errors[:, usable]) / (weights @ baseline_errors[:, usable]))
    resampled = np.concatenate(chunks)
    mce_samples = np.nanmean(np.where(np.isfinite(resampled), resampled, np.nan), axis=1)
    low, high = np.nanpercentile(mce_samples, [2.5, 97.5]) if usable.any() else (np.nan, np.nan)
    return ce, metrics.Interval(float(np.nanmean(ce)) if usable.any() else math.nan, float(low), float(high))


def error_counts(frame: pd.DataFrame, corruptions: list[str]) -> tuple[list[str], np.ndarray]:
    """(paths, (N, C) wrong severities per photo and corruption) from a per_photo.parquet."""
    wrong = frame.assign(wrong=~frame["correct"]).pivot_table(
        index="path", columns="corruption", values="wrong", aggfunc="sum", fill_value=0)
    wrong = wrong.reindex(columns=corruptions, fill_value=0).sort_index()
    return wrong.index.astype(str).tolist(), wrong.to_numpy(dtype=np.float64)


# --- the stage ------------------------------------------------------------------------------------


def robustness_dir(config: Config, model: str) -> Path:
    return Path(config.paths.robustness) / model


def plot_examples(photo: np.ndarray, settings: RobustnessConfig, title: str):
    """One test photo under every corruption (rows) at every severity (columns), clean first: all
    of them, whatever subset the benchmark ran, so the grid says what each severity means."""
    from matplotlib.figure import Figure  # no pyplot: safe in worker threads

    names = [c for c in CORRUPTIONS if len(settings.levels.get(c, ())) == len(SEVERITIES)]
    severities = list(SEVERITIES)
    fig = Figure(figsize=(1.3 * (len(severities) + 1), 1.35 * len(names) + 0.4), dpi=120, layout="constrained")
    axes = fig.subplots(len(names), len(severities) + 1, squeeze=False)
    x = torch.from_numpy(np.array(photo))[None].permute(0, 3, 1, 2)
    for row, name in enumerate(names):
        for col, severity in enumerate([0, *severities]):
            draws = Draws(photo_uniforms(settings.seed, name, severity, 1))
            image = corrupt(x, name, severity, settings, draws)[0].permute(1, 2, 0).numpy()
            ax = axes[row][col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("clean" if severity == 0 else f"severity {severity}", fontsize=8)
            if col == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def write_robustness(folder: Path, results: dict[str, Any], frame: pd.DataFrame) -> Path:
    """Write the stage's files into `folder`, replaced as a whole."""
    staged = staging_dir(folder)
    try:
        write_json(staged / RESULTS_FILE, results)
        write_parquet(staged / PER_PHOTO_FILE, frame)
        return replace_dir(folder, staged)
    finally:
        if staged.exists():  # only after a failure
            shutil.rmtree(staged)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: top1_<corruption>_s<severity>, the mean per corruption, and the headline."""
    out = {key: results[key] for key in ("clean_top1", "mean_corruption_accuracy", "relative_robustness")
           if results.get(key) is not None}
    for name, entry in results["corruptions"].items():
        out[f"top1_{name}_mean"] = entry["mean_accuracy"]
        for row in entry["severities"]:
            out[f"top1_{name}_s{row['severity']}"] = row["accuracy"]
    return out


@task(name="robustness", cache_policy=NONE)
def robustness(config: Config, model: str, parent_run_id: str | None = None) -> dict:
    """Score a trained model on corrupted test photos; write robustness.json, per-photo results, examples."""
    settings = config.robustness
    with stage_run(config, "robustness", parent_run_id, model=model,
                   params={"robustness": dataclasses.asdict(settings)}) as run:
        # Untimed work outside the slot: never while another model is timed (food101.timing).
        with QUIET.heavy():
            clean = read_predictions(config, model)  # evaluate's: the clean accuracy on the same photos
            network, meta = load_trained_model(config, model, "cpu")
            cache = open_cache(config)
            photos = load_test_photos(cache)
            if clean["path"].astype(str).tolist() != photos.paths:
                raise RobustnessInputError(f"{model}'s evaluation describes other test photos than the cache; "
                                           f"evaluate it again (food101 stage evaluate --model {model})")
            conditions = [(name, s) for name in settings.corruptions for s in settings.severities]
            image_size, mean, std = int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"])
        # Holding a slot keeps this off a device where another model's latency is being timed.
        with training_slots(config).acquire(f"robustness[{model}]") as device:
            network = network.to(device).eval().to(memory_format=torch.channels_last)
            preds = {cond: classify(network, photos, *cond, settings, device, image_size, mean, std)
                     for cond in tqdm(conditions, desc=f"robustness[{model}]", unit="condition", disable=None)}
        with QUIET.heavy():
            classes, display = list(cache.classes), list(cache.display) or list(cache.classes)
            results = score(preds, clean["correct"].to_numpy(dtype=bool), photos.labels, classes, display, settings,
                            model)
            final = write_robustness(robustness_dir(config, model), results, per_photo_frame(photos, preds))
            run.set_tags({"robustness_device": str(device)})
            run.log_metrics(flat_metrics(results))
            run.log_artifacts(final, "robustness")
        log.info("%s: mean corruption accuracy %.4f (clean %.4f, relative %.3f) over %d conditions", model,
                 results["mean_corruption_accuracy"], results["clean_top1"], results["relative_robustness"] or 0.0,
                 len(conditions))
        return {"model": model, "robustness_dir": str(final),
                "mean_corruption_accuracy": results["mean_corruption_accuracy"],
                "relative_robustness": results["relative_robustness"]}


# --- readers --------------------------------------------------------------------------------------


def _existing(config: Config, model: str, name: str) -> Path:
    path = robustness_dir(config, model) / name
    if not path.is_file():
        raise RobustnessMissing(f"{path} does not exist: run the robustness stage for {model} "
                                f"(food101 stage robustness --model {model})")
    return path


def read_results(config: Config, model: str) -> dict[str, Any]:
    return read_json(_existing(config, model, RESULTS_FILE))


def read_per_photo(config: Config, model: str) -> pd.DataFrame:
    return pd.read_parquet(_existing(config, model, PER_PHOTO_FILE))


def available(config: Config, models: list[str]) -> list[str]:
    """The models whose robustness.json exists, in the given order."""
    return [m for m in models if (robustness_dir(config, m) / RESULTS_FILE).is_file()]


def headlines(config: Config, models: list[str]) -> dict[str, dict[str, Any]]:
    """Per model with results: mean corruption accuracy, relative robustness and, where the
    baseline's results exist on the same photos and corruptions, CE per corruption and mCE (CI)."""
    settings = config.robustness
    found = available(config, models)
    results = {m: read_results(config, m) for m in found}
    base = settings.baseline_model
    base_counts = None
    if base in found or (robustness_dir(config, base) / RESULTS_FILE).is_file():
        base_counts = error_counts(read_per_photo(config, base), settings.corruptions)
    out: dict[str, dict[str, Any]] = {}
    for model, entry in results.items():
        values: dict[str, Any] = {
            "mean_corruption_accuracy": entry["mean_corruption_accuracy"],
            "mean_corruption_accuracy_ci_low": entry["mean_corruption_accuracy_ci_low"],
            "mean_corruption_accuracy_ci_high": entry["mean_corruption_accuracy_ci_high"],
            "relative_robustness": entry["relative_robustness"], "mce": None, "mce_ci_low": None,
            "mce_ci_high": None, "ce": {},
        }
        if base_counts is not None:
            paths, counts = error_counts(read_per_photo(config, model), settings.corruptions)
            if paths == base_counts[0]:
                ce, mce = corruption_errors(counts, base_counts[1], settings.bootstrap_samples, settings.seed)
                values.update(mce=_finite(mce.estimate), mce_ci_low=_finite(mce.low), mce_ci_high=_finite(mce.high),
                              ce={c: _finite(v) for c, v in zip(settings.corruptions, ce, strict=True)})
            else:
                log.warning("robustness: %s and the baseline %s were corrupted on different test photos; "
                            "no mCE for %s", model, base, model)
        out[model] = values
    return out


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


# --- the report's section -------------------------------------------------------------------------


def most_robust_within(metrics: dict[str, dict[str, Any]], within_points: float) -> tuple[str | None, str]:
    """The rule "most robust model within N clean top-1 points of the best": the highest mean
    corruption accuracy among the models that close to the best clean top-1 (ties: more accurate)."""
    from food101.formatting import pct, plural

    scored = [m for m, v in metrics.items()
              if v.get("mean_corruption_accuracy") is not None and v.get("top1") is not None]
    if not scored:
        return None, "No model has robustness results, so this rule cannot choose."
    best = max(metrics[m]["top1"] for m in scored)
    eligible = [m for m in scored if best - metrics[m]["top1"] <= within_points / 100 + 1e-12]
    chosen = max(eligible, key=lambda m: (metrics[m]["mean_corruption_accuracy"], metrics[m]["top1"]))
    count = plural(len(eligible), "model")
    mca = metrics[chosen]["mean_corruption_accuracy"]
    return chosen, (f"Of the {count} within {plural(within_points, 'point')} of the best clean top-1 ({pct(best)}), "
                    f"{chosen} has the highest mean corruption accuracy ({pct(mca)}).")


def section_plots(config: Config, models: list[str], folder: Path) -> dict[str, Path]:
    """The heatmap (models x corruptions), accuracy-vs-severity curves and the example grid, in `folder`."""
    from matplotlib.figure import Figure

    found = available(config, models)
    if not found:
        return {}
    results = {m: read_results(config, m) for m in found}
    names = [c for c in config.robustness.corruptions if all(c in r["corruptions"] for r in results.values())]
    plots: dict[str, Path] = {}
    grid = np.array([[100 * results[m]["corruptions"][c]["mean_accuracy"] for c in names] for m in found])
    fig = Figure(figsize=(1.0 + 0.75 * len(names), 1.2 + 0.45 * len(found)), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(names)), [c.replace("_", " ") for c in names], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(found)), found, fontsize=8)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    fig.colorbar(image, ax=ax, label="top-1 % (mean over severities)")
    plots["robustness_heatmap"] = _save(fig, folder / "robustness_heatmap.png")

    columns = min(4, len(names))
    fig = Figure(figsize=(3.0 * columns, 2.4 * math.ceil(len(names) / columns)), dpi=120, layout="constrained")
    axes = fig.subplots(math.ceil(len(names) / columns), columns, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names, strict=False):
        for model, entry in results.items():
            rows = entry["corruptions"][name]["severities"]
            accuracy = [100 * entry["clean_top1"]] + [100 * r["accuracy"] for r in rows]
            ax.plot([0] + [r["severity"] for r in rows], accuracy, marker=".", label=model)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("severity (0 = clean)", fontsize=9)
    fig.supylabel("top-1 %", fontsize=9)
    plots["robustness_curves"] = _save(fig, folder / "robustness_curves.png")

    photos = load_test_photos(open_cache(config))
    fig = plot_examples(photos.images[0], config.robustness, f"{photos.paths[0]}: what each severity looks like")
    plots["robustness_examples"] = _save(fig, folder / "robustness_examples.png")
    return plots


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, facecolor="white")
    return path


def section(config: Config, metrics: dict[str, dict[str, Any]], plots: dict[str, Path]) -> Any:
    """The report's robustness section; `metrics` carry `headlines`' values merged in."""
    from food101.document import DASH, Bullets, Figure, Heading, Para, Section, Table
    from food101.formatting import ci_cell, num, pct, plural

    settings = config.robustness
    found = available(config, list(metrics))
    if not found:
        return Section("robustness", "Robustness", [Para(
            "No robustness results were found: the robustness stage did not run or failed for every model "
            "(food101 stage robustness --model M).")])
    results = {m: read_results(config, m) for m in found}
    rows = []
    for model in found:
        m, entry = metrics[model], results[model]
        worst = min(entry["corruptions"], key=lambda c: entry["corruptions"][c]["mean_accuracy"])
        rows.append([model, pct(entry["clean_top1"]), ci_cell(m, "mean_corruption_accuracy"),
                     num(m.get("relative_robustness"), 2),
                     DASH if m.get("mce") is None else f"{m['mce']:.1f} ({m['mce_ci_low']:.1f}–{m['mce_ci_high']:.1f})",
                     f"{worst.replace('_', ' ')} ({pct(entry['corruptions'][worst]['mean_accuracy'])})"])
    chosen, reason = most_robust_within(metrics, settings.within_points)
    blocks: list[Any] = [
        Para(f"Test photos under {len(settings.corruptions)} corruptions at severities "
             f"{', '.join(map(str, settings.severities))} (levels in `params.yaml`, `robustness:`), the same "
             "corrupted photos for every model and every benchmark."),
        Table(["model", "clean top-1", "mean corruption accuracy (95% CI)", "relative robustness",
               f"mCE vs {settings.baseline_model} (95% CI)", "worst corruption"], rows),
        Heading(f"Most robust within {plural(settings.within_points, 'clean top-1 point')} of the best: "
                f"{chosen or 'none'}"),
        Para(reason),
    ]
    captions = {
        "robustness_heatmap": "Top-1 accuracy per model and corruption, the mean over severities.",
        "robustness_curves": "Top-1 accuracy against severity per corruption (severity 0: the clean test set).",
        "robustness_examples": "One test photo under every corruption at every severity: what the severities mean.",
    }
    blocks += [Figure(plots[key], caption) for key, caption in captions.items() if key in plots]
    blocks.append(Heading("Classes hurt most"))
    hurt_rows = [[name.replace("_", " ")] + [_hurt_cell(results[m]["corruptions"].get(name)) for m in found]
                 for name in settings.corruptions]
    blocks.append(Table(["corruption"] + found, hurt_rows,
                        "Per corruption, the classes whose accuracy falls most (mean over severities)."))
    blocks.append(Bullets([
        "**mean corruption accuracy**: top-1 averaged over every corruption and severity; the CI bootstraps photos.",
        "**relative robustness**: mean corruption accuracy / clean top-1 (1 = unaffected).",
        f"**mCE**: ImageNet-C's mean corruption error, CE = the model's errors summed over severities / "
        f"{settings.baseline_model}'s, times 100, averaged over corruptions; below 100 is more robust than "
        f"{settings.baseline_model}. The CI bootstraps photos, both models on the same resample.",
    ]))
    return Section("robustness", "Robustness", blocks)


def _hurt_cell(entry: dict[str, Any] | None) -> str:
    """'Apple pie (−40 pts), Ramen (−20 pts)'; only classes that lost accuracy."""
    hurt = [h for h in (entry or {}).get("most_hurt", []) if h["drop"] > 0]
    if entry is None:
        return "—"
    return ", ".join(f"{h['display']} (−{100 * h['drop']:.0f} pts)" for h in hurt) or "none lost accuracy"
