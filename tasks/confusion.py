"""confusion: where the models fail, which foods look alike, and whether the models really differ.

Reads every model's evaluation (`confusion_counts.npy`, `predictions.parquet`) and the cache's
test photos, and writes into `config.paths.confusion/`:
- per model: the row-normalised confusion matrix with classes ordered by hierarchical clustering
  (similar foods side by side) as a large PNG and a zoomable SVG, the most-confused pairs, and a
  grid of misclassified photos for those pairs;
- across models: the pairs every model confuses, groups of similar foods (clustering of the
  summed symmetrised confusion) with a dendrogram, and McNemar's exact test for every pair of
  models on the same test photos.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from food101 import metrics
from food101.config import Config
from food101.errors import Food101Error
from food101.io import atomic_path, read_json, replace_dir, staging_dir, write_json, write_text
from food101.tracking import stage_run
from tasks.evaluate import read_confusion_counts, read_per_class, read_predictions
from tasks.preprocess import open_cache

log = logging.getLogger(__name__)

# The usual 5% level for "unlikely to be chance"; the p-value itself is always reported.
SIGNIFICANCE_LEVEL = 0.05
PAIR_COLUMNS = ["true", "predicted", "count", "rate", "true_display", "predicted_display"]


class ConfusionInputError(Food101Error):
    """The evaluations cannot be compared (different classes or test photos)."""


# --- pure parts -----------------------------------------------------------------------------------


def pairs_frame(counts: np.ndarray, top_n: int, classes: list[str], display: list[str]) -> pd.DataFrame:
    """The top_n most-confused (true, predicted) pairs with count and rate, most frequent first."""
    rows = [
        {"true": classes[p.true], "predicted": classes[p.predicted], "count": p.count, "rate": p.rate,
         "true_display": display[p.true], "predicted_display": display[p.predicted]}
        for p in metrics.most_confused_pairs(counts, top_n)
    ]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def shared_pairs_frame(pairs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Pairs in every model's top list: true, predicted, displays, count_<m>, rate_<m>, mean_rate."""
    keys = None
    for frame in pairs.values():
        found = set(zip(frame["true"], frame["predicted"], strict=True))
        keys = found if keys is None else keys & found
    columns = ["true", "predicted", "true_display", "predicted_display"]
    columns += [f"{kind}_{model}" for model in pairs for kind in ("count", "rate")] + ["mean_rate"]
    if not keys:
        return pd.DataFrame(columns=columns)
    rows = []
    for true, predicted in keys:
        row: dict[str, Any] = {"true": true, "predicted": predicted}
        rates = []
        for model, frame in pairs.items():
            match = frame[(frame["true"] == true) & (frame["predicted"] == predicted)].iloc[0]
            row["true_display"], row["predicted_display"] = match["true_display"], match["predicted_display"]
            row[f"count_{model}"], row[f"rate_{model}"] = int(match["count"]), float(match["rate"])
            rates.append(float(match["rate"]))
        row["mean_rate"] = float(np.mean(rates))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["mean_rate", "true", "predicted"], ascending=[False, True, True], ignore_index=True)


def significance(predictions: dict[str, pd.DataFrame], alpha: float = SIGNIFICANCE_LEVEL) -> list[dict[str, Any]]:
    """McNemar's exact test for every pair of models, matched photo by photo on `path`."""
    results = []
    for a, b in itertools.combinations(predictions, 2):
        left = predictions[a][["path", "correct"]]
        right = predictions[b][["path", "correct"]]
        if len(left) != len(right) or set(left["path"]) != set(right["path"]):
            raise ConfusionInputError(
                f"{a} and {b} were evaluated on different test photos ({len(left)} vs {len(right)}); "
                "re-run evaluate for both on the current cache"
            )
        merged = left.merge(right, on="path", suffixes=("_a", "_b"), validate="one_to_one")
        result = metrics.mcnemar_exact(merged["correct_a"].to_numpy(), merged["correct_b"].to_numpy())
        results.append({
            "a": a, "b": b, "n_a_only": result.n_a_only, "n_b_only": result.n_b_only,
            "p_value": result.p_value, "sentence": metrics.mcnemar_sentence(a, b, result, alpha),
        })
    return results


def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    return Figure(figsize=(width, height), dpi=dpi)


def plot_matrix(counts: np.ndarray, order: list[int], labels: list[str], title: str):
    """The row-normalised matrix in `order`, sized so that 101 class names stay legible.

    A square-root colour scale: the diagonal (often 0.6-0.9) would otherwise wash out the
    off-diagonal rates of a few percent that the plot is for.
    """
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm

    rates = metrics.row_normalise(counts)[np.ix_(order, order)]
    shown = np.ma.masked_equal(rates, 0.0)  # never-confused cells stay white
    names = [labels[i] for i in order]
    n = len(order)
    # Inches: a cell of 0.2 in with 7 pt labels keeps 101 names legible (about 2.6k px square at
    # 110 dpi); small matrices get bigger cells and their values written in.
    font = 7 if n > 30 else 10
    cell = 0.2 if n > 30 else max(0.45, 5.0 / max(n, 1))
    side = n * cell
    longest = max((len(s) for s in names), default=1)
    margin = 0.7 + longest * font / 72 * 0.62  # tick labels (about 0.6 em a character) + axis label
    width, height = margin + side + 1.5, margin + side + 0.8
    fig = _figure(width, height, dpi=110)
    ax = fig.add_axes((margin / width, margin / height, side / width, side / height))
    cax = fig.add_axes(((margin + side + 0.15) / width, margin / height, 0.2 / width, side / height))
    cmap = colormaps["magma_r"].with_extremes(bad="white")
    image = ax.imshow(shown, cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="none")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted", fontsize=font + 3)
    ax.set_ylabel("true", fontsize=font + 3)
    fig.suptitle(title, fontsize=font + 5, y=1 - 0.3 / height)
    if n <= 25:
        for i, j in zip(*np.nonzero(rates), strict=True):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=font - 1,
                    color="white" if rates[i, j] > 0.25 else "black")
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("fraction of the true class's test photos (square-root scale)", fontsize=font + 1)
    bar.ax.tick_params(labelsize=font)
    return fig


def plot_dendrogram(linkage: np.ndarray, labels: list[str], threshold: float, title: str):
    """Classes as leaves, merge height = 1 - confusion similarity; the group cut marked."""
    from scipy.cluster import hierarchy

    n = len(labels)
    fig = _figure(9, max(4.0, 0.17 * n + 1.5), dpi=110)
    ax = fig.add_subplot()
    if n >= 2:
        hierarchy.dendrogram(linkage, labels=labels, orientation="left", color_threshold=threshold,
                             above_threshold_color="#999999", leaf_font_size=8 if n > 30 else 10, ax=ax)
    ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"group cut ({threshold:g})")
    if n >= 2:
        # Zoom on where the merges are: on a good model they all sit between 0.8 and 1.
        lowest = min(threshold, float(linkage[:, 2].min()))
        ax.set_xlim(1.0 + 0.01, max(0.0, lowest - 0.05))
    ax.set_xlabel("distance = 1 - mean confusion rate between the two (average linkage)")
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def pick_examples(
    predictions: pd.DataFrame, pairs: pd.DataFrame, classes: list[str], per_pair: int,
) -> list[tuple[pd.Series, pd.DataFrame]]:
    """For each pair, up to `per_pair` of its misclassified photos, the most confident first."""
    label_of = {name: i for i, name in enumerate(classes)}
    confidence = predictions["top5_probs"].map(lambda probs: float(probs[0]))
    chosen = []
    for _, pair in pairs.iterrows():
        mask = (predictions["label"] == label_of[pair["true"]]) & (predictions["pred"] == label_of[pair["predicted"]])
        rows = predictions[mask].assign(confidence=confidence[mask])
        chosen.append((pair, rows.sort_values(["confidence", "path"], ascending=[False, True]).head(per_pair)))
    return chosen


def plot_examples(chosen: list[tuple[pd.Series, pd.DataFrame]], images: np.ndarray,
                  position_of: dict[str, int], per_pair: int, title: str):
    """One row per confused pair: its misclassified photos, each titled 'true -> predicted'."""
    rows = [(pair, found) for pair, found in chosen if len(found)]
    columns = max(1, per_pair)
    fig = _figure(columns * 1.9, max(1, len(rows)) * 2.15 + 0.6, dpi=100)
    fig.suptitle(title, fontsize=12)
    if not rows:
        fig.text(0.5, 0.5, "no misclassified test photos", ha="center", va="center", fontsize=12)
        return fig
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (pair, found) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(found):
                continue
            photo = found.iloc[c]
            ax.imshow(np.asarray(images[position_of[photo["path"]]]))
            ax.set_title(f"{pair['true_display']} -> {pair['predicted_display']}\n"
                         f"p = {photo['confidence']:.2f}", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (len(rows) * 2.15 + 0.6)))
    return fig


def _save(fig, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)


# --- the stage ------------------------------------------------------------------------------------


def _model_inputs(config: Config, model: str, classes: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    per_class = read_per_class(config, model)
    if per_class["class"].tolist() != classes:
        raise ConfusionInputError(f"{model} was evaluated on other classes than the cache holds; "
                                  f"re-run evaluate (food101 stage evaluate --model {model})")
    return read_confusion_counts(config, model), read_predictions(config, model)


def _write_outputs(
    config: Config, models: list[str], classes: list[str], display: list[str], position_of: dict[str, int],
    images: np.ndarray, staged: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compute and write every output into the folder `staged`; returns (summary, significance)."""
    settings = config.confusion
    counts, predictions, pairs, groups = {}, {}, {}, {}
    for model in models:
        counts[model], predictions[model] = _model_inputs(config, model, classes)
        clustering = metrics.cluster_confusion(counts[model], settings.group_threshold)
        groups[model] = [[classes[i] for i in group] for group in clustering.groups]
        pairs[model] = pairs_frame(counts[model], settings.top_pairs, classes, display)
        write_text(staged / f"{model}_pairs.csv", pairs[model].to_csv(index=False))
        title = f"{model}: confusion on {int(counts[model].sum())} test photos (rows sum to 1)"
        matrix = plot_matrix(counts[model], clustering.order, display, title)
        _save(matrix, staged / f"{model}_matrix.png", "png")
        _save(matrix, staged / f"{model}_matrix.svg", "svg")
        chosen = pick_examples(predictions[model], pairs[model], classes, settings.examples_per_pair)
        examples = plot_examples(chosen, images, position_of, settings.examples_per_pair,
                                 f"{model}: misclassified test photos, most confused pairs first")
        _save(examples, staged / f"{model}_examples.png", "png")
        if len(pairs[model]):
            top = pairs[model].iloc[0]
            log.info("confusion[%s]: %d groups; most confused: %s taken for %s %d times", model,
                     len(groups[model]), top["true"], top["predicted"], int(top["count"]))

    combined = metrics.cluster_confusion(sum(counts.values()), settings.group_threshold)
    groups = {"combined": [[classes[i] for i in group] for group in combined.groups], **groups}
    write_json(staged / "groups.json", groups)
    _save(plot_dendrogram(combined.linkage, display, settings.group_threshold,
                          f"Similar foods: confusion summed over {', '.join(models)}"),
          staged / "dendrogram.png", "png")
    shared = shared_pairs_frame(pairs)
    write_text(staged / "shared_pairs.csv", shared.to_csv(index=False))
    tests = significance(predictions)
    write_json(staged / "significance.json", tests)
    summary = {
        "models": models,
        "n_classes": len(classes),
        "n_test": len(position_of),
        "top_pairs": settings.top_pairs,
        "group_threshold": settings.group_threshold,
        "group_rule": (f"foods in a group are confused for each other at a mean rate of at least "
                       f"{1 - settings.group_threshold:.0%} (average linkage on 1 - symmetric rate)"),
        "groups": {name: len(found) for name, found in groups.items()},
        "shared_pairs": int(len(shared)),
        "significance_level": SIGNIFICANCE_LEVEL,
        "significant_differences": sum(t["p_value"] < SIGNIFICANCE_LEVEL for t in tests),
        "most_confused": {model: (pairs[model].iloc[0][["true", "predicted", "count", "rate"]].to_dict()
                                  if len(pairs[model]) else None) for model in models},
    }
    write_json(staged / "summary.json", summary)

    return summary, tests


@task(name="confusion", cache_policy=NONE)
def confusion(config: Config, models: list[str] | None = None, parent_run_id: str | None = None) -> dict:
    """Confusion matrices, confused pairs, food groups, example photos and model-vs-model tests."""
    models = list(models if models is not None else [*config.models, *(e.name for e in config.ensembles)])
    if not models:
        raise ConfusionInputError("confusion needs at least one evaluated model")
    settings = config.confusion
    params = {"confusion": dataclasses.asdict(settings), "models": models}
    with stage_run(config, "confusion", parent_run_id, params=params) as run:
        cache = open_cache(config)
        classes, display = list(cache.classes), list(cache.display) or list(cache.classes)
        index = cache.index
        test_rows = index[index["split"] == "test"]
        position_of = dict(zip(test_rows["path"].astype(str), test_rows["position"].astype(int), strict=True))
        images = cache.images("test")

        final = Path(config.paths.confusion)
        staged = staging_dir(final, stage="confusion")
        try:
            summary, tests = _write_outputs(config, models, classes, display, position_of, images, staged)
            replace_dir(final, staged)
        finally:
            if staged.exists():  # a failure leaves the previous outputs as they were, and no debris
                shutil.rmtree(staged)

        run.log_metrics({"shared_pairs": summary["shared_pairs"], "groups_combined": summary["groups"]["combined"],
                         "significant_differences": summary["significant_differences"]})
        run.log_artifacts(final, "confusion")
        for test in tests:
            log.info("%s", test["sentence"])
        return {"confusion_dir": str(final), "models": models, "shared_pairs": summary["shared_pairs"],
                "groups": summary["groups"]["combined"],
                "significant_differences": summary["significant_differences"]}


# --- reader ---------------------------------------------------------------------------------------


def read_confusion(config: Config) -> dict[str, Any]:
    """Everything the confusion stage wrote: summary, groups, significance, pairs and figure paths."""
    folder = Path(config.paths.confusion)
    if not (folder / "summary.json").is_file():
        raise ConfusionInputError(f"{folder / 'summary.json'} does not exist: run the confusion stage first "
                                  "(food101 stage confusion)")
    summary = read_json(folder / "summary.json")
    models = summary["models"]
    return {
        "summary": summary,
        "groups": read_json(folder / "groups.json"),
        "significance": read_json(folder / "significance.json"),
        "shared_pairs": pd.read_csv(folder / "shared_pairs.csv"),
        "pairs": {m: pd.read_csv(folder / f"{m}_pairs.csv") for m in models},
        "figures": {
            "dendrogram": folder / "dendrogram.png",
            **{f"{m}_matrix": folder / f"{m}_matrix.png" for m in models},
            **{f"{m}_matrix_svg": folder / f"{m}_matrix.svg" for m in models},
            **{f"{m}_examples": folder / f"{m}_examples.png" for m in models},
        },
    }
