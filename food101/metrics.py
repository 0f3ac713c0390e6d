"""Classification metrics, calibration, paired statistics and confusion structure.

Pure numpy/scipy over arrays: labels are int class indices in [0, num_classes), scores are
(N, C) probabilities or logits. Every function here is checked against scikit-learn (where it has
an equivalent) in tests/test_metrics.py, so the numbers in the report mean what they say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from scipy.stats import binomtest

# --- accuracy ------------------------------------------------------------------------------------


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the max is subtracted before exponentiating)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices of the k highest scores per row, best first.

    Works on probabilities or logits alike (softmax keeps the order). Ties are broken towards
    the lower class index, as a stable sort of the negated scores does.
    """
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is the true label among the k highest scores (bool, shape (N,))."""
    labels = np.asarray(labels)
    return (topk_indices(scores, k) == labels[:, None]).any(axis=1)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose true label is among the k highest scores."""
    return float(topk_correct(scores, labels, k).mean())


# --- counts and per-class metrics --------------------------------------------------------------


def confusion_counts(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (scikit-learn's default)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


@dataclass(frozen=True)
class PerClass:
    """Per-class metrics over all classes 0..C-1, each an array of shape (C,).

    The "per-class accuracy" of Food-101 papers (the fraction of a class's images classified
    correctly) is the recall. Undefined ratios (a class never predicted,
    or absent from the labels) are 0, like scikit-learn's zero_division default.
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def per_class_from_counts(counts: np.ndarray) -> PerClass:
    """Per-class precision, recall, F1 and support from a confusion count matrix."""
    counts = np.asarray(counts, dtype=np.int64)
    true_pos = np.diag(counts)
    support = counts.sum(axis=1)
    predicted = counts.sum(axis=0)
    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, support)
    # F1 as 2tp / (2tp + fp + fn): equal to the harmonic mean where that is defined, and what
    # scikit-learn computes (0 when a class is neither present nor predicted).
    f1 = _safe_divide(2 * true_pos, support + predicted)
    return PerClass(precision=precision, recall=recall, f1=f1, support=support)


def per_class_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> PerClass:
    """Per-class accuracy, precision, recall, F1 and support for classes 0..num_classes-1."""
    return per_class_from_counts(confusion_counts(labels, preds, num_classes))


def macro_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, float]:
    """Unweighted means over all classes of precision, recall and F1 (scikit-learn 'macro')."""
    per_class = per_class_metrics(labels, preds, num_classes)
    return {
        "macro_precision": float(per_class.precision.mean()),
        "macro_recall": float(per_class.recall.mean()),
        "macro_f1": float(per_class.f1.mean()),
    }


# --- calibration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reliability:
    """Reliability-diagram data over equal-width confidence bins.

    lower/upper are the bin edges; count the samples in each bin; accuracy and confidence the
    mean correctness and mean confidence in each bin (NaN for an empty bin).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Reliability:
    """Bin predictions by confidence and compare mean confidence with accuracy per bin.

    Bins are equal-width and right-closed, ((m-1)/M, m/M], as in Guo et al. 2017 ("On
    Calibration of Modern Neural Networks"); a confidence of exactly 0 falls in the first bin.
    ECE = sum over bins of (bin size / N) * |accuracy - confidence|.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError("confidence and correct must be 1-D arrays of the same length")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, correct_sum / count, np.nan)
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
    n = max(len(confidence), 1)
    ece = float(np.abs(correct_sum - conf_sum).sum() / n)
    return Reliability(edges[:-1], edges[1:], count.astype(np.int64), accuracy, mean_conf, ece)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 prediction (confidence = highest probability) over equal-width bins."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    return reliability(confidence, correct, bins).ece


# --- bootstrap and paired tests -------------------------------------------------------------------


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float


def bootstrap_ci(
    values: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk_elements: int = 2**22,
) -> Interval:
    """Percentile bootstrap interval for a statistic of per-sample values (default: the mean).

    `values` holds one number per test image (for accuracy: 1 if right, 0 if wrong). Resamples
    are drawn with replacement from a seeded generator, many at a time (vectorised), in chunks
    of about `chunk_elements` indices so memory stays bounded on the full test set. A custom
    `statistic` receives a (resamples, N) array and returns one value per row.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    statistic = statistic or (lambda sample: sample.mean(axis=1))
    estimate = float(statistic(values[None, :])[0])
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_elements // n)
    stats = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, per_chunk):
        stop = min(start + per_chunk, n_resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = statistic(values[index])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high))


class McNemar(NamedTuple):
    """Discordant pairs of two classifiers on the same samples and the exact two-sided p-value."""

    n_a_only: int  # samples A gets right and B gets wrong
    n_b_only: int  # samples B gets right and A gets wrong
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's exact test: a two-sided binomial test (p = 0.5) on the discordant pairs.

    Under the null hypothesis that both classifiers have the same error rate, each photo that
    exactly one of them gets right is equally likely to favour either. With no discordant pairs
    there is no evidence either way and p = 1.
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError("McNemar's test needs both classifiers' results on the same samples")
    a_only = int((correct_a & ~correct_b).sum())
    b_only = int((correct_b & ~correct_a).sum())
    if a_only + b_only == 0:
        return McNemar(0, 0, 1.0)
    p_value = float(binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue)
    return McNemar(a_only, b_only, p_value)  # binomtest caps p at 1


def format_p(p_value: float) -> str:
    """'p = 0.039', 'p = 0.0003', 'p < 0.0001'."""
    if p_value < 1e-4:
        return "p < 0.0001"
    return f"p = {p_value:.2g}" if p_value < 0.1 else f"p = {p_value:.2f}"


def mcnemar_sentence(name_a: str, name_b: str, result: McNemar, alpha: float = 0.05) -> str:
    """The test's result in plain words, for the report."""
    a_only, b_only, p_value = result
    if a_only + b_only == 0:
        return f"{name_a} and {name_b} are right and wrong on exactly the same photos: nothing to tell apart."
    verdict = (
        "the difference is unlikely to be chance."
        if p_value < alpha
        else "the difference could well be chance."
    )
    return (
        f"{name_a} is right on {a_only} {_photos(a_only)} {name_b} gets wrong, and wrong on "
        f"{b_only} it gets right; {format_p(p_value)}: {verdict}"
    )


def _photos(n: int) -> str:
    return "photo" if n == 1 else "photos"


# --- confusion structure -----------------------------------------------------------------------


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum: entry (i, j) is the fraction of class i predicted as j."""
    counts = np.asarray(counts, dtype=np.float64)
    return _safe_divide(counts, counts.sum(axis=1, keepdims=True))


def confusion_similarity(counts: np.ndarray) -> np.ndarray:
    """Symmetric similarity between classes: the mean of the two confusion rates i->j and j->i.

    Rows are normalised first so a class with more test photos does not look more confusable.
    The diagonal is set to 1 (a class is identical to itself).
    """
    rates = row_normalise(counts)
    similarity = (rates + rates.T) / 2.0
    np.fill_diagonal(similarity, 1.0)
    return similarity


@dataclass(frozen=True)
class Clustering:
    """Hierarchical clustering of classes by confusion.

    order: a leaf order that puts similar classes next to each other (for plotting matrices).
    groups: clusters of two or more classes cut at the threshold, most confused first; each
    group lists its classes in leaf order. Singletons are not groups.
    linkage: scipy's (C-1, 4) linkage matrix (empty for fewer than two classes).
    """

    order: list[int]
    groups: list[list[int]]
    linkage: np.ndarray


def cluster_confusion(counts: np.ndarray, threshold: float) -> Clustering:
    """Average-linkage clustering on distance = 1 - symmetric confusion similarity.

    Two classes fall in one group when their (average-linkage) distance is at most `threshold`,
    i.e. when they are confused for each other at a mean rate of at least 1 - threshold.
    """
    counts = np.asarray(counts)
    n = counts.shape[0]
    if n < 2:
        return Clustering(order=list(range(n)), groups=[], linkage=np.empty((0, 4)))
    similarity = confusion_similarity(counts)
    distance = np.clip(1.0 - similarity, 0.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(distance, checks=False)
    linkage = hierarchy.linkage(condensed, method="average")
    # Optimal leaf ordering: among the orders the tree allows, the one where neighbours are
    # most similar, which is what makes the reordered matrix readable.
    linkage = hierarchy.optimal_leaf_ordering(linkage, condensed)
    order = [int(i) for i in hierarchy.leaves_list(linkage)]
    flat = hierarchy.fcluster(linkage, t=threshold, criterion="distance")
    position = {leaf: rank for rank, leaf in enumerate(order)}
    groups = []
    for cluster in np.unique(flat):
        members = sorted((int(i) for i in np.flatnonzero(flat == cluster)), key=position.__getitem__)
        if len(members) >= 2:
            groups.append(members)

    def cohesion(members: list[int]) -> float:
        block = similarity[np.ix_(members, members)]
        return float((block.sum() - len(members)) / (len(members) * (len(members) - 1)))

    groups.sort(key=lambda members: (-cohesion(members), position[members[0]]))
    return Clustering(order=order, groups=groups, linkage=linkage)


class ConfusedPair(NamedTuple):
    true: int
    predicted: int
    count: int
    rate: float  # fraction of the true class's samples predicted as `predicted`


def most_confused_pairs(counts: np.ndarray, top_n: int) -> list[ConfusedPair]:
    """The top_n off-diagonal cells by count (then rate), zero cells left out."""
    counts = np.asarray(counts, dtype=np.int64)
    rates = row_normalise(counts)
    true_idx, pred_idx = np.nonzero(counts * (1 - np.eye(len(counts), dtype=np.int64)))
    cells = sorted(
        zip(true_idx.tolist(), pred_idx.tolist(), strict=True),
        key=lambda cell: (-counts[cell], -rates[cell], cell),
    )
    return [ConfusedPair(t, p, int(counts[t, p]), float(rates[t, p])) for t, p in cells[:top_n]]
