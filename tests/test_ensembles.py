"""Ensembles: scored from two tiny evaluated models' saved probabilities, no retraining."""

from __future__ import annotations

import numpy as np
import pytest

from food101 import ensembles
from food101.config import ConfigError
from food101.io import read_json, write_npy
from tasks import evaluate as ev
from tasks.confusion import confusion, read_confusion
from tasks.ensemble import ensemble, read_ensemble, record_path
from tasks.preprocess import open_cache
from tests.conftest import make_config, single_torch_thread
from tests.test_evaluate import FAST, TINY_MODELS, build_sample_cache, write_trained_model

MEAN, WEIGHTED = "duo", "duo_weighted"
ENSEMBLES = [{"name": MEAN, "members": TINY_MODELS},
             {"name": WEIGHTED, "members": TINY_MODELS, "method": "weighted"}]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two tiny models evaluated by the real stage, then both ensembles over them."""
    with single_torch_thread():
        config = make_config(tmp_path_factory.mktemp("ensembles"), ensembles=ENSEMBLES, **FAST)
        build_sample_cache(config, train_per_class=2, val_per_class=3)
        for seed, model in enumerate(TINY_MODELS):
            write_trained_model(config, model, seed)
            ev.evaluate.fn(config, model)
        result = ensemble.fn(config)
        yield config, result


def test_mean_ensemble_probabilities_are_the_mean_of_the_members_saved_ones(scored):
    config, result = scored
    assert set(result["ensembles"]) == {MEAN, WEIGHTED} and result["skipped"] == {}
    assert set(read_json(record_path(config))["ensembles"]) == {MEAN, WEIGHTED}
    members = [ev.read_probs(config, m) for m in TINY_MODELS]
    expected = (members[0].astype(np.float64) + members[1]) / 2
    np.testing.assert_allclose(ev.read_probs(config, MEAN), expected, atol=1e-6)
    # The members' saved probabilities are the ones their predictions came from.
    for model, probs in zip(TINY_MODELS, members, strict=True):
        predictions = ev.read_predictions(config, model)
        np.testing.assert_array_equal(predictions["pred"], probs.argmax(axis=1))
    predictions = ev.read_predictions(config, MEAN)
    np.testing.assert_array_equal(predictions["pred"], expected.argmax(axis=1))
    np.testing.assert_allclose(np.stack(predictions["top5_probs"].to_numpy())[:, 0], expected.max(axis=1), atol=1e-6)


def test_ensemble_metrics_have_a_models_keys_a_ci_and_summed_latency(scored):
    config, _ = scored
    values = ev.read_metrics(config, MEAN)
    assert list(values) == list(ev.METRIC_KEYS) and values["model"] == MEAN
    labels = ev.read_predictions(config, MEAN)["label"].to_numpy()
    assert values["n_test"] == len(labels) == 50
    assert values["top1"] == pytest.approx(float((ev.read_probs(config, MEAN).argmax(1) == labels).mean()))
    assert values["top1_ci_low"] <= values["top1"] <= values["top1_ci_high"]
    assert values["top1_ci_low"] < values["top1_ci_high"]
    members = [ev.read_metrics(config, m) for m in TINY_MODELS]
    for key in ("latency_cpu_p50_ms", "latency_cpu_p95_ms", "params", "size_mb"):
        assert values[key] == pytest.approx(sum(m[key] for m in members))
    # The members' latencies were timed on the same thread count, and the sum says which.
    assert values["latency_cpu_threads"] == members[0]["latency_cpu_threads"] == members[1]["latency_cpu_threads"]
    assert values["latency_cpu_threads"] is not None
    assert ev.read_per_class(config, MEAN)["support"].sum() == 50
    assert ev.read_confusion_counts(config, MEAN).sum() == 50


def test_mcnemar_compares_the_ensemble_with_each_member(scored):
    config, _ = scored
    with single_torch_thread():
        confusion.fn(config)  # its default: the models and the ensembles of params
    tests = read_confusion(config)["significance"]
    pairs = {frozenset((t["a"], t["b"])) for t in tests}
    for member in TINY_MODELS:
        assert frozenset((MEAN, member)) in pairs
    mine = [t for t in tests if MEAN in (t["a"], t["b"])]
    assert all(0.0 <= t["p_value"] <= 1.0 for t in mine)


def test_weighted_weights_are_fit_on_validation_rows_only(scored, tmp_path):
    config, result = scored
    record = read_ensemble(config, WEIGHTED)
    val_labels = np.asarray(open_cache(config).labels("val"))
    assert record["weights_fit_on"] == "val" and record["weights_fit_rows"] == len(val_labels) == 15
    fit = ensembles.fit_weights([ev.read_probs(config, m, "val") for m in TINY_MODELS], val_labels)
    assert record["weights"] == pytest.approx(fit.weights.tolist())
    assert sum(record["weights"]) == pytest.approx(1.0)
    np.testing.assert_allclose(ev.read_probs(config, WEIGHTED),
                               ensembles.combine([ev.read_probs(config, m) for m in TINY_MODELS], fit.weights),
                               atol=1e-6)
    # Changing the members' test probabilities changes nothing in the weights.
    for model in TINY_MODELS:
        probs = ev.read_probs(config, model)
        write_npy(ev.eval_dir(config, model) / ev.PROBS_FILE, probs[:, ::-1].copy())
    try:
        again = ensemble.fn(config)
        assert again["ensembles"][WEIGHTED]["weights"] == pytest.approx(record["weights"])
    finally:
        for model in TINY_MODELS:
            probs = ev.read_probs(config, model)
            write_npy(ev.eval_dir(config, model) / ev.PROBS_FILE, probs[:, ::-1].copy())
        ensemble.fn(config)


def test_fit_weights_prefers_the_member_that_is_right_on_validation():
    labels = np.array([0, 1, 2, 0])
    right = np.eye(3)[labels] * 0.9 + 0.1 / 3
    wrong = np.eye(3)[(labels + 1) % 3] * 0.9 + 0.1 / 3
    fit = ensembles.fit_weights([wrong, right], labels)
    assert fit.weights[1] > 0.9 and fit.rows == 4 and fit.split == "val"
    with pytest.raises(ValueError, match="differ in length"):
        ensembles.fit_weights([wrong, right[:3]], labels)


def test_ensemble_with_a_failed_member_is_skipped(scored):
    config, _ = scored
    result = ensemble.fn(config, [TINY_MODELS[0]])
    assert result["ensembles"] == {} and set(result["skipped"]) == {MEAN, WEIGHTED}
    assert TINY_MODELS[1] in result["skipped"][MEAN]


@pytest.mark.parametrize("spec, message", [
    ({"name": "x", "members": ["mobilenet_v3_smal", "shufflenet_v2_x0_5"]}, "did you mean 'mobilenet_v3_small'"),
    ({"name": "x", "members": TINY_MODELS, "method": "weigthed"}, "did you mean 'weighted'"),
    ({"name": "shufflenet_v2_x0_5", "members": TINY_MODELS}, "also a model name"),
    ({"name": "x", "members": TINY_MODELS[:1]}, "at least two different members"),
])
def test_config_refuses_bad_ensembles(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, ensembles=[spec], **FAST)
    with pytest.raises(ConfigError, match="appears twice"):
        make_config(tmp_path, ensembles=[ENSEMBLES[0], ENSEMBLES[0]], **FAST)


def test_registered_ensemble_predicts_the_weighted_mean_of_its_member_versions(scored):
    from food101 import registry
    from food101.ensemble_registry import ENSEMBLE_FORMAT
    from food101.tracking import client_for, finish_run, start_benchmark_run
    from tests.conftest import SAMPLE

    config, _ = scored
    photo = SAMPLE / "images" / "apple_pie" / "1005649.jpg"
    with single_torch_thread():
        run = start_benchmark_run(config)
        registered = registry.promote_champion(config, registry.register_models(
            config, run.run_id, TINY_MODELS, recommended=WEIGHTED, ensembles=[MEAN, WEIGHTED]))
        finish_run(run)
        assert set(registered["versions"]) == {*TINY_MODELS, MEAN, WEIGHTED}
        client = client_for(config)
        version = client.get_model_version(registered["name"], registered["versions"][WEIGHTED])
        assert version.tags["food101_format"] == ENSEMBLE_FORMAT
        [result] = registry.predict(config, [photo])
        weights = read_ensemble(config, WEIGHTED)["weights"]
        members = []
        for model in TINY_MODELS:  # each member version alone, through the same trusted loader
            client.set_registered_model_alias(registered["name"], "probe", registered["versions"][model])
            [alone] = registry.predict(config, [photo], top_k=5, alias="probe")
            members.append({t["class"]: t["probability"] for t in alone["top"]})
    assert result["model"] == WEIGHTED and result["version"] == registered["versions"][WEIGHTED]
    for entry in result["top"]:
        expected = sum(w * m[entry["class"]] for w, m in zip(weights, members, strict=True))
        assert entry["probability"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(registry.RegistryError, match="is the ensemble"):
        registry.load_champion(config)
    with pytest.raises(registry.RegistryError, match="has no ONNX graph"):
        registry.predict(config, [photo], runtime="onnx")


def test_an_ensemble_in_the_demo_flow_appears_wherever_a_model_does(tmp_path, prefect_harness):
    """The whole demo flow once, on two of its models and their ensemble (short training): a model
    outside the ensemble would add its own training, evaluation, export and robustness, and no check."""
    from flows.benchmark import benchmark
    from tasks.report import read_summary
    from tests.conftest import REPO, generated_overrides

    name, members = "effnet_plus_mobilenet", ["efficientnet_b0", "mobilenet_v3_large"]
    overrides = generated_overrides(tmp_path) | {
        "models": members, "ensembles": [{"name": name, "members": members}], "train.epochs": 2,
        "train.overrides": {}}
    with single_torch_thread():
        result = benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))
    config = make_config(tmp_path, models=members, ensembles=overrides["ensembles"], train__epochs=2,
                         train__overrides={})
    assert set(result["ensembles"]) == {name} and result["failures"] == {}
    summary = read_summary(config)
    row = summary["models"][name]
    assert row["top1_ci_low"] <= row["top1"] <= row["top1_ci_high"]
    latencies = [summary["models"][m]["latency_cpu_p50_ms"] for m in members]
    assert row["latency_cpu_p50_ms"] == pytest.approx(sum(latencies))
    text = (config.paths.reports / "report.md").read_text()
    assert f"`{name}` = mean of {' + '.join(members)}" in text
    assert "sum of its members' batch-1 latencies" in text
    tests = read_confusion(config)["significance"]
    assert {frozenset((name, m)) for m in members} <= {frozenset((t["a"], t["b"])) for t in tests}
    assert (config.paths.confusion / f"{name}_matrix.png").is_file()
    assert name in result["registry"]["versions"]


def test_dvc_orders_confusion_and_report_after_the_ensemble_stage():
    """confusion and report read ensembles' folders: in dvc.yaml they depend on the stage's output."""
    import yaml

    from tests.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    [output] = [next(iter(o)) if isinstance(o, dict) else o for o in stages["ensemble"]["outs"]]
    assert output == "${paths.eval}-ensembles.json"
    for later in ("confusion", "report"):
        assert output in stages[later]["deps"] and "ensembles" in stages[later]["params"]
