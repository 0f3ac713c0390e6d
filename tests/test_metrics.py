"""food101.metrics against scikit-learn, hand-computed cases and planted structure."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from food101 import metrics


def random_predictions(seed: int, n: int = 500, classes: int = 12, never_predicted: int = 2):
    """Noisy predictions where the last `never_predicted` classes are never predicted."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 1.5
    logits[:, classes - never_predicted :] -= 100.0
    return labels, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_topk_match_sklearn(seed):
    labels, logits = random_predictions(seed)
    probs = metrics.softmax(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    classes = np.arange(logits.shape[1])
    assert metrics.topk_accuracy(probs, labels, 1) == skm.accuracy_score(labels, probs.argmax(1))
    for k in (1, 3, 5):
        expected = skm.top_k_accuracy_score(labels, probs, k=k, labels=classes)
        assert metrics.topk_accuracy(probs, labels, k) == pytest.approx(expected, abs=0)
        # Logits give the same answer: the order is what counts.
        assert metrics.topk_accuracy(logits, labels, k) == pytest.approx(expected, abs=0)
    assert metrics.topk_accuracy(probs, labels, 5) > metrics.topk_accuracy(probs, labels, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_class_metrics_match_sklearn(seed):
    labels, logits = random_predictions(seed)
    preds = logits.argmax(1)
    classes = logits.shape[1]
    label_set = np.arange(classes)
    assert set(np.unique(preds)) < set(label_set)  # some classes never predicted

    counts = metrics.confusion_counts(labels, preds, classes)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, skm.confusion_matrix(labels, preds, labels=label_set))

    per_class = metrics.per_class_metrics(labels, preds, classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, preds, labels=label_set, average=None, zero_division=0
    )
    np.testing.assert_allclose(per_class.precision, precision)
    np.testing.assert_allclose(per_class.recall, recall)
    np.testing.assert_allclose(per_class.f1, f1)
    np.testing.assert_array_equal(per_class.support, support)
    assert (per_class.precision[-2:] == 0).all()

    macro = metrics.macro_metrics(labels, preds, classes)
    with pytest.warns(skm._classification.UndefinedMetricWarning):  # sklearn's default: warn, use 0
        expected_precision = skm.precision_score(labels, preds, labels=label_set, average="macro")
    assert macro["macro_precision"] == pytest.approx(expected_precision, rel=1e-12)
    assert macro["macro_recall"] == pytest.approx(
        skm.recall_score(labels, preds, labels=label_set, average="macro"), rel=1e-12
    )
    assert macro["macro_f1"] == pytest.approx(
        skm.f1_score(labels, preds, labels=label_set, average="macro"), rel=1e-12
    )


def test_class_absent_from_labels_and_predictions_scores_zero_like_sklearn():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    per_class = metrics.per_class_metrics(labels, preds, 4)  # class 3: no support, never predicted
    expected = skm.precision_recall_fscore_support(labels, preds, labels=[0, 1, 2, 3], zero_division=0)
    for ours, theirs in zip((per_class.precision, per_class.recall, per_class.f1), expected[:3], strict=True):
        np.testing.assert_allclose(ours, theirs)
    assert per_class.f1[3] == 0 and per_class.support[3] == 0


def test_mcnemar_matches_hand_computed_case():
    correct_a = np.array([True] * 10 + [False] * 2 + [True] * 30 + [False] * 5)
    correct_b = np.array([False] * 10 + [True] * 2 + [True] * 30 + [False] * 5)
    result = metrics.mcnemar_exact(correct_a, correct_b)
    assert (result.n_a_only, result.n_b_only) == (10, 2)
    expected = 2 * (1 + 12 + 66) / 4096  # two-sided binomial on the 12 discordant pairs, by hand
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    # Swapping the models swaps the counts, not the p-value.
    swapped = metrics.mcnemar_exact(correct_b, correct_a)
    assert (swapped.n_a_only, swapped.n_b_only) == (2, 10)
    assert swapped.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_sentence_in_plain_words():
    strong = metrics.McNemar(312, 198, 0.0003)
    sentence = metrics.mcnemar_sentence("ResNet-50", "EfficientNet-B0", strong)
    assert sentence == (
        "ResNet-50 is right on 312 photos EfficientNet-B0 gets wrong, and wrong on 198 it gets right; "
        "p = 0.0003: the difference is unlikely to be chance."
    )
    weak = metrics.mcnemar_sentence("a", "b", metrics.McNemar(5, 4, 1.0))
    assert weak.endswith("p = 1.00: the difference could well be chance.")
    assert "nothing to tell apart" in metrics.mcnemar_sentence("a", "b", metrics.mcnemar_exact([1, 0], [1, 0]))
    assert metrics.format_p(1e-9) == "p < 0.0001"


def test_bootstrap_interval_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10000):
        correct = rng.random(n) < 0.7
        interval = metrics.bootstrap_ci(correct, n_resamples=500, seed=0)
        assert interval.estimate == pytest.approx(correct.mean())
        assert interval.low < interval.estimate < interval.high
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    # Roughly the normal-approximation width, 2 * 1.96 * sqrt(p(1-p)/n), for n = 10000.
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 10000), rel=0.15)
    # Seeded: the same interval twice; chunking does not change it.
    values = rng.random(300) < 0.5
    first = metrics.bootstrap_ci(values, n_resamples=200, seed=3)
    assert first == metrics.bootstrap_ci(values, n_resamples=200, seed=3, chunk_elements=1000)
    assert first != metrics.bootstrap_ci(values, n_resamples=200, seed=4)


def test_ece_is_zero_when_calibrated_and_exact_when_not():
    rng = np.random.default_rng(0)
    n = 200_000
    confidence = rng.uniform(0.05, 1.0, size=n)
    correct = rng.random(n) < confidence  # right exactly as often as it claims
    assert metrics.reliability(confidence, correct, bins=15).ece < 0.01

    # Always 90% sure, right 60% of the time: ECE = |0.6 - 0.9| = 0.3, all in the last bin.
    confidence = np.full(1000, 0.9)
    correct = np.arange(1000) < 600
    result = metrics.reliability(confidence, correct, bins=10)
    assert result.ece == pytest.approx(0.3)
    assert result.count.tolist() == [0] * 8 + [1000, 0]  # 0.9 is in (0.8, 0.9]: bins are right-closed
    assert np.isnan(result.accuracy[0]) and result.accuracy[8] == pytest.approx(0.6)

    # Two bins with different gaps: weights by bin size.
    confidence = np.array([0.25] * 4 + [0.95] * 6)
    correct = np.array([1, 0, 0, 0] + [1, 1, 1, 1, 1, 1], dtype=bool)
    expected = 0.4 * abs(0.25 - 0.25) + 0.6 * abs(1.0 - 0.95)
    assert metrics.reliability(confidence, correct, bins=10).ece == pytest.approx(expected)

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 1, 1])
    # bins (0.8,0.9]: conf .9 right; (0.7,0.8]: .8 wrong; (0.6,0.7]: .7 right.
    assert metrics.expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.1 + 0.8 + 0.3) / 3)


def block_confusion(seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """12 classes in 3 planted blocks of 4, shuffled: confused within a block, rarely across."""
    rng = np.random.default_rng(seed)
    blocks = np.repeat(np.arange(3), 4)
    counts = np.zeros((12, 12), dtype=np.int64)
    for i in range(12):
        for j in range(12):
            if i == j:
                counts[i, j] = 60
            elif blocks[i] == blocks[j]:
                counts[i, j] = rng.integers(8, 14)
            else:
                counts[i, j] = rng.integers(0, 2)
    perm = rng.permutation(12)
    shuffled = counts[np.ix_(perm, perm)]
    # Class k of the shuffled matrix is class perm[k] of the planted one.
    planted = [{k for k in range(12) if blocks[perm[k]] == b} for b in range(3)]
    return shuffled, planted


def test_clustering_recovers_planted_groups():
    counts, planted = block_confusion()
    # Within-block similarity is about 11/100; across, under 1/100: cut between them.
    result = metrics.cluster_confusion(counts, threshold=0.95)
    assert sorted(map(sorted, result.groups)) == sorted(map(sorted, planted))
    assert sorted(result.order) == list(range(12))
    # The leaf order puts each planted block in one contiguous run.
    position = {leaf: rank for rank, leaf in enumerate(result.order)}
    for block in planted:
        ranks = sorted(position[k] for k in block)
        assert ranks[-1] - ranks[0] == len(block) - 1
    # A strict threshold leaves only singletons, which are not groups.
    assert metrics.cluster_confusion(counts, threshold=0.5).groups == []
    assert metrics.cluster_confusion(counts[:1, :1], threshold=0.9).groups == []


def test_most_confused_pairs():
    counts = np.array([[8, 2, 0], [5, 5, 0], [0, 1, 19]])
    pairs = metrics.most_confused_pairs(counts, top_n=2)
    assert pairs == [metrics.ConfusedPair(1, 0, 5, 0.5), metrics.ConfusedPair(0, 1, 2, 0.2)]
    assert len(metrics.most_confused_pairs(counts, top_n=10)) == 3  # zero cells left out
    similarity = metrics.confusion_similarity(counts)
    np.testing.assert_allclose(similarity, similarity.T)
    assert similarity[0, 1] == pytest.approx((0.2 + 0.5) / 2)
