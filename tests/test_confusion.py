"""confusion: planted confusions give the expected pairs, groups and tests; the real chain runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from food101 import metrics
from food101.tracking import client_for, experiment_id
from tasks import confusion as cf
from tasks import evaluate as ev
from tasks.preprocess import open_cache
from tests.conftest import make_config, single_torch_thread
from tests.test_evaluate import FAST, TINY_MODELS, build_sample_cache, write_trained_model

# (true class, predicted class, how many of the true class's 10 test photos): planted mistakes.
PLANTED = {
    "a": [(0, 1, 4), (1, 0, 3), (2, 3, 2)],
    "b": [(0, 1, 3), (2, 3, 5), (4, 2, 1)],
}


def write_planted_evaluation(config, model: str, mistakes: list[tuple[int, int, int]]) -> np.ndarray:
    """An evaluation in the evaluate stage's format whose predictions carry the planted mistakes."""
    cache = open_cache(config)
    labels = np.asarray(cache.labels("test"))
    preds = labels.copy()
    for true, predicted, n in mistakes:
        preds[np.flatnonzero(labels == true)[:n]] = predicted
    probs = np.full((len(labels), 5), 0.05)
    probs[np.arange(len(labels)), preds] = 0.8
    scores = ev.score(probs, labels, config.evaluate)
    paths = cache.index.query("split == 'test'").sort_values("position")["path"].tolist()
    values = {key: None for key in ev.METRIC_KEYS} | {"model": model, **scores.metrics}
    ev.write_evaluation(ev.eval_dir(config, model), values, scores, paths, labels, cache.classes,
                        cache.display, model)
    return preds == labels


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One workspace for the module (one MLflow database): a cache of the real sample photos, the
    planted evaluations "a" and "b", and the real evaluations of two tiny untrained models."""
    with single_torch_thread():
        config = make_config(tmp_path_factory.mktemp("confusion"), **FAST, confusion__top_pairs=2,
                             confusion__group_threshold=0.8, confusion__examples_per_pair=3)
        build_sample_cache(config, train_per_class=1, val_per_class=1)
        correct = {model: write_planted_evaluation(config, model, mistakes) for model, mistakes in PLANTED.items()}
        for seed, model in enumerate(TINY_MODELS):
            write_trained_model(config, model, seed)
            ev.evaluate.fn(config, model)
        yield config, correct


def test_planted_confusions_give_pairs_groups_and_tests(planted):
    config, correct = planted
    result = cf.confusion.fn(config, models=["a", "b"])
    found = cf.read_confusion(config)
    classes = open_cache(config).classes

    pairs_a = found["pairs"]["a"]
    assert list(pairs_a.columns) == cf.PAIR_COLUMNS
    assert pairs_a[["true", "predicted", "count"]].values.tolist() == [
        [classes[0], classes[1], 4], [classes[1], classes[0], 3]]
    assert pairs_a["rate"].tolist() == [0.4, 0.3]
    assert pairs_a["true_display"].iloc[0] == "Apple pie"
    assert found["pairs"]["b"][["true", "count"]].values.tolist() == [[classes[2], 5], [classes[0], 3]]

    shared = found["shared_pairs"]
    assert shared[["true", "predicted", "count_a", "count_b"]].values.tolist() == [[classes[0], classes[1], 4, 3]]
    assert shared["mean_rate"].iloc[0] == pytest.approx(0.35)
    assert result["shared_pairs"] == 1

    # Summed: 0<->1 confused at a mean rate (7/20 + 3/20)/2 = 0.25 >= 1 - 0.8; 2->3 only 0.175.
    groups = {name: [sorted(group) for group in found_groups] for name, found_groups in found["groups"].items()}
    assert groups == {
        "combined": [[classes[0], classes[1]]],
        "a": [[classes[0], classes[1]]],  # (0.4 + 0.3)/2 = 0.35
        "b": [[classes[2], classes[3]]],  # (0.5 + 0)/2 = 0.25; 0<->1 only 0.15
    }

    [test] = found["significance"]
    expected = metrics.mcnemar_exact(correct["a"], correct["b"])
    assert (test["a"], test["b"]) == ("a", "b")
    assert (test["n_a_only"], test["n_b_only"]) == (4, 4) == (expected.n_a_only, expected.n_b_only)
    assert test["p_value"] == pytest.approx(1.0)
    assert test["sentence"] == ("a is right on 4 photos b gets wrong, and wrong on 4 it gets right; "
                                "p = 1.00: the difference could well be chance.")

    summary = found["summary"]
    assert summary["models"] == ["a", "b"] and summary["n_classes"] == 5 and summary["n_test"] == 50
    assert summary["groups"] == {"combined": 1, "a": 1, "b": 1}
    assert summary["significant_differences"] == 0
    for name, path in found["figures"].items():
        head = path.read_bytes()[:64]
        assert head.startswith(b"\x89PNG") or (name.endswith("_svg") and b"<?xml" in head), name
    # The matrix PNG is large enough to read; the SVG keeps the class names as text.
    from PIL import Image

    with Image.open(found["figures"]["a_matrix"]) as image:
        assert min(image.size) >= 400
    assert "Baby back ribs" in found["figures"]["a_matrix_svg"].read_text()


def test_examples_are_the_planted_mistakes(planted):
    config, _ = planted
    cache = open_cache(config)
    predictions = ev.read_predictions(config, "a")
    pairs = cf.pairs_frame(ev.read_confusion_counts(config, "a"), 2, cache.classes, cache.display)
    chosen = cf.pick_examples(predictions, pairs, cache.classes, per_pair=3)
    assert [len(found) for _, found in chosen] == [3, 3]
    for pair, found in chosen:
        assert (found["label"] == cache.classes.index(pair["true"])).all()
        assert (found["pred"] == cache.classes.index(pair["predicted"])).all()


def test_models_evaluated_on_different_photos_are_refused(planted):
    config, _ = planted
    predictions = {m: ev.read_predictions(config, m) for m in ("a", "b")}
    predictions["b"] = predictions["b"].iloc[:-1]
    with pytest.raises(cf.ConfusionInputError, match="different test photos"):
        cf.significance(predictions)
    with pytest.raises(ev.EvaluationMissing, match="food101 stage evaluate --model missing"):
        cf.confusion.fn(config, models=["a", "missing"])
    assert not [p.name for p in config.paths.confusion.parent.iterdir() if p.name.startswith(".")]  # no debris


def test_single_model_and_frames_without_shared_pairs():
    a = pd.DataFrame({"true": ["x"], "predicted": ["y"], "count": [2], "rate": [0.2],
                      "true_display": ["X"], "predicted_display": ["Y"]})
    b = a.assign(true=["y"], predicted=["x"])
    assert cf.shared_pairs_frame({"a": a, "b": b}).empty
    assert cf.shared_pairs_frame({"a": a})["count_a"].tolist() == [2]
    assert cf.significance({"a": pd.DataFrame({"path": ["p"], "correct": [True]})}) == []


def test_confusion_after_the_real_evaluate(planted):
    """The chain as the flow runs it: trained models -> evaluate -> confusion, on real photos."""
    config, _ = planted
    result = cf.confusion.fn(config)
    found = cf.read_confusion(config)
    assert found["summary"]["models"] == TINY_MODELS == result["models"]
    assert set(found["groups"]) == {"combined", *TINY_MODELS}
    [test] = found["significance"]
    a, b = (ev.read_predictions(config, m)["correct"].to_numpy() for m in TINY_MODELS)
    assert test["n_a_only"] == int((a & ~b).sum()) and test["n_b_only"] == int((b & ~a).sum())
    for model in TINY_MODELS:
        pairs = found["pairs"][model]
        assert len(pairs) <= config.confusion.top_pairs
        assert (pairs["count"] > 0).all() and (pairs["true"] != pairs["predicted"]).all()
        assert found["figures"][f"{model}_examples"].stat().st_size > 10_000
    client = client_for(config)
    run = client.search_runs([experiment_id(config, client)], "tags.stage = 'confusion'",
                             order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "FINISHED" and run.data.params["models"] == str(TINY_MODELS)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "confusion")} >= {
        "confusion/significance.json", "confusion/dendrogram.png", "confusion/shared_pairs.csv"}
