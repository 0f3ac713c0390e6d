"""Registry: real MLflow on SQLite, tiny real torchvision models in the training checkpoint format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from food101 import registry
from food101.tracking import client_for, finish_run, start_benchmark_run
from tests.conftest import SAMPLE, make_config, single_torch_thread

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MODELS = ["resnet50", "efficientnet_b0", "mobilenet_v3_large"]  # the demo profile's names


def write_best(config, model: str, seed: int) -> Path:
    """A best.pt in train's format: a tiny mobilenet_v3_small over the sample's 5 classes, 64 px."""
    torch.manual_seed(seed)
    network = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=5)
    classes = (SAMPLE / "meta" / "classes.txt").read_text().split()
    display = (SAMPLE / "meta" / "labels.txt").read_text().splitlines()[: len(classes)]
    path = config.paths.models / model / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": network.state_dict(), "arch": "mobilenet_v3_small", "num_classes": 5,
                "image_size": 64, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "classes": classes,
                "display": display, "epoch": 3, "val_top1": 0.4 + seed / 100}, path)
    return path


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Two benchmarks registering the three models: efficientnet_b0 then resnet50 recommended."""
    with single_torch_thread():
        config = make_config(tmp_path_factory.mktemp("registry"))
        for seed, model in enumerate(MODELS):
            write_best(config, model, seed)
        first_run = start_benchmark_run(config)
        first = registry.register_models(config, first_run.run_id, MODELS, recommended="efficientnet_b0")
        finish_run(first_run)
        second_run = start_benchmark_run(config)
        second = registry.register_models(config, second_run.run_id, MODELS, recommended="resnet50")
        finish_run(second_run)
        yield config, first, second


def test_every_model_registered_and_champion_on_the_recommended(registered):
    config, first, _ = registered
    client = client_for(config)
    name = registry.registered_model_name(config)
    assert first["name"] == name == "food101-classifier-demo"
    assert set(first["versions"]) == set(MODELS)
    assert first["previous"] is None and first["skipped"] == {}
    tags = {client.get_model_version(name, v).tags["model"] for v in first["versions"].values()}
    assert tags == set(MODELS)
    assert first["champion"] == {"model": "efficientnet_b0", "version": first["versions"]["efficientnet_b0"]}


def test_second_registration_moves_old_champion_to_previous(registered):
    config, first, second = registered
    client = client_for(config)
    name = registry.registered_model_name(config)
    assert len(client.search_model_versions(f"name = '{name}'")) == 6
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    previous = client.get_model_version_by_alias(name, registry.PREVIOUS)
    assert str(champion.version) == second["versions"]["resnet50"] and champion.tags["model"] == "resnet50"
    assert str(previous.version) == first["versions"]["efficientnet_b0"]
    assert second["previous"] == {"model": "efficientnet_b0", "version": str(previous.version)}


def test_predict_returns_top5_dishes_from_the_champion(registered):
    config, _, second = registered
    photos = [SAMPLE / "images" / "apple_pie" / "1011328.jpg", SAMPLE / "images" / "bibimbap" / "1014434.jpg"]
    photos = [p if p.is_file() else next((SAMPLE / "images" / p.parent.name).glob("*.jpg")) for p in photos]
    dishes = set((SAMPLE / "meta" / "labels.txt").read_text().splitlines())
    results = registry.predict(config, photos, top_k=5)
    assert [r["photo"] for r in results] == [str(p) for p in photos]
    for result in results:
        assert result["model"] == "resnet50" and result["version"] == second["versions"]["resnet50"]
        probabilities = [p["probability"] for p in result["top"]]
        assert len(probabilities) == 5
        assert {p["dish"] for p in result["top"]} <= dishes
        assert len({p["dish"] for p in result["top"]}) == 5
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities) and sum(probabilities) <= 1.0 + 1e-5
        assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-4)  # 5 classes: top-5 is everything


def test_predict_matches_the_checkpoint_network(registered):
    """The registered model is the checkpoint's network: same logits on the same input."""
    config, _, _ = registered
    network, meta = registry.load_checkpoint(config.paths.models / "resnet50" / "best.pt")
    photo = next((SAMPLE / "images" / "beet_salad").glob("*.jpg"))
    x = registry.photo_tensor(photo, config.preprocess.resize, config.preprocess.crop, meta["image_size"],
                              meta["mean"], meta["std"])
    assert tuple(x.shape) == (3, 64, 64)
    with torch.inference_mode():
        expected = torch.softmax(network(x[None]), dim=1)[0].max().item()
    top = registry.predict(config, [photo], top_k=1)[0]["top"]
    assert len(top) == 1 and math.isclose(top[0]["probability"], expected, rel_tol=1e-5)


def test_missing_and_unreadable_photos_name_the_file(registered, tmp_path):
    config, _, _ = registered
    missing = tmp_path / "no-such-dish.jpg"
    with pytest.raises(registry.PhotoError, match="no-such-dish.jpg"):
        registry.predict(config, [SAMPLE / "images" / "apple_pie" / "1005649.jpg", missing])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(registry.PhotoError, match="broken.jpg"):
        registry.predict(config, [broken])


def test_no_champion_says_run_a_benchmark_first(tmp_path):
    config = make_config(tmp_path)
    photo = next((SAMPLE / "images" / "apple_pie").glob("*.jpg"))
    with pytest.raises(registry.NoChampionError, match="food101 run --profile demo"):
        registry.predict(config, [photo])
    # A registry that exists but has no champion for this profile says the same.
    finish_run(start_benchmark_run(config))
    with pytest.raises(registry.NoChampionError, match="run a benchmark first"):
        registry.predict(config, [photo])


def test_failed_model_skipped_but_recommended_required(tmp_path):
    config = make_config(tmp_path)
    write_best(config, "resnet50", 0)
    run = start_benchmark_run(config)
    with pytest.raises(registry.RegistryError, match="efficientnet_b0"):
        registry.register_models(config, run.run_id, ["resnet50", "efficientnet_b0"], recommended="efficientnet_b0")
    result = registry.register_models(config, run.run_id, ["resnet50", "efficientnet_b0"], recommended="resnet50")
    assert set(result["versions"]) == {"resnet50"} and "efficientnet_b0" in result["skipped"]


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    photo = next((SAMPLE / "images" / "apple_pie").glob("*.jpg"))
    with pytest.raises(registry.RegistryUnavailable, match="127.0.0.1:9"):
        registry.predict(config, [photo])


def test_other_profile_points_at_the_profiles_that_have_a_champion(registered, tmp_path):
    config, _, _ = registered
    full = make_config(tmp_path, profile=None, paths__tracking_db=str(config.paths.tracking_db),
                       paths__tracking_artifacts=str(config.paths.tracking_artifacts))
    photo = next((SAMPLE / "images" / "apple_pie").glob("*.jpg"))
    with pytest.raises(registry.NoChampionError, match=r"food101 run --profile full.*\['demo'\]"):
        registry.predict(full, [photo])
    # The champion carries its own preprocessing, so loading it needs no profile's resize/crop.
    meta = registry.load_champion(config).meta
    assert (meta["resize"], meta["crop"], meta["image_size"], meta["model"]) == (72, 64, 64, "resnet50")


def test_mlflow_pickle_advice_is_dropped_and_other_warnings_still_show(tmp_path: Path, capfd) -> None:
    """The CLI's filter removes MLflow's per-save pickle advice, and only that."""
    import logging

    import mlflow.pytorch

    from food101.cli import PickleAdvisoryFilter

    logger = logging.getLogger("mlflow.pytorch")
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), tmp_path / "plain", pip_requirements=["torch"],
                              serialization_format="pickle")
    assert "by Pickle" in capfd.readouterr().err  # MLflow does print it, so the check below can fail
    advisory = PickleAdvisoryFilter()
    logger.addFilter(advisory)
    try:
        mlflow.pytorch.save_model(torch.nn.Linear(2, 2), tmp_path / "filtered", pip_requirements=["torch"],
                                  serialization_format="pickle")
        logger.warning("another mlflow.pytorch warning")
        err = capfd.readouterr().err
    finally:
        logger.removeFilter(advisory)
    assert "by Pickle" not in err and "another mlflow.pytorch warning" in err
