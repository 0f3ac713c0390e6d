"""Registry: real MLflow on SQLite, tiny real torchvision models in the training checkpoint format."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from food101 import registry
from food101.tracking import client_for, finish_run, start_benchmark_run
from tests.conftest import REPO, SAMPLE, make_config, single_torch_thread

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
        first = registry.promote_champion(
            config, registry.register_models(config, first_run.run_id, MODELS, recommended="efficientnet_b0"))
        finish_run(first_run)
        second_run = start_benchmark_run(config)
        second = registry.promote_champion(
            config, registry.register_models(config, second_run.run_id, MODELS, recommended="resnet50"))
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
    # Each version is data: a state dict and its JSON, no pickled model (no MLmodel flavour).
    version = client.get_model_version(name, first["versions"]["resnet50"])
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(version.run_id, "registry/resnet50")}
    assert files == {registry.WEIGHTS_FILE, registry.META_FILE}
    assert version.tags[registry.FORMAT_TAG] == registry.FORMAT and len(version.tags[registry.SHA_TAG]) == 64


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


class _RunsACommandWhenUnpickled(torch.nn.Module):
    """A valid nn.Module for MLflow whose pickle runs a shell command on load (touches `sentinel`)."""

    def __init__(self, sentinel: Path) -> None:
        super().__init__()
        self.sentinel = sentinel
        self.linear = torch.nn.Linear(3, 5)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.sentinel}",)


def test_a_pickled_champion_registered_by_someone_else_is_refused_not_loaded(tmp_path: Path) -> None:
    """Finding 5: whoever can write the store registers a pickled model and points `champion` at it."""
    import mlflow.pytorch

    config = make_config(tmp_path)
    sentinel = tmp_path / "PWNED"
    client = client_for(config)
    name = registry.registered_model_name(config)
    run = start_benchmark_run(config)
    local = tmp_path / "evil-model"
    mlflow.pytorch.save_model(_RunsACommandWhenUnpickled(sentinel), local, serialization_format="pickle",
                              pip_requirements=["torch"])
    client.log_artifacts(run.run_id, str(local), "evil")
    finish_run(run)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/evil", run_id=run.run_id,
                                          tags={"model": "resnet50"})
    client.set_registered_model_alias(name, registry.CHAMPION, version.version)

    photo = next((SAMPLE / "images" / "apple_pie").glob("*.jpg"))
    with pytest.raises(registry.UntrustedModel, match=rf"version {version.version} of {name}"):
        registry.predict(config, [photo])
    assert not sentinel.exists()
    done = subprocess.run([sys.executable, "-m", "food101", "predict", "--profile", "demo", str(photo)],
                          cwd=REPO, env=_env_for(config), capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    assert f"version {version.version} of {name}" in done.stderr and "Traceback" not in done.stderr
    assert not sentinel.exists()


def test_weights_changed_after_registration_are_refused(tmp_path: Path) -> None:
    """The sha256 recorded at registration is checked before the weights are read."""
    with single_torch_thread():
        config = make_config(tmp_path)
        write_best(config, "resnet50", 0)
        run = start_benchmark_run(config)
        registry.promote_champion(config, registry.register_models(config, run.run_id, ["resnet50"], "resnet50"))
        finish_run(run)
        weights = next(config.paths.tracking_artifacts.rglob(registry.WEIGHTS_FILE))
        state = torch.load(weights, weights_only=True)
        state[next(iter(state))].zero_()
        torch.save(state, weights)
        photo = next((SAMPLE / "images" / "apple_pie").glob("*.jpg"))
        with pytest.raises(registry.UntrustedModel, match="sha256"):
            registry.predict(config, [photo])


def test_champion_stays_when_the_regression_gate_fails(tmp_path: Path) -> None:
    """Finding 5b: a benchmark that raises RegressionDetected registers its versions but leaves
    `champion` on the model it had."""
    from flows.benchmark import register_and_gate
    from food101.history import RegressionDetected

    with single_torch_thread():
        config = make_config(tmp_path, alerts__fail_on_regression=True)
        for seed, model in enumerate(MODELS[:2]):
            write_best(config, model, seed)
        name = registry.registered_model_name(config)
        client = client_for(config)
        clean = {"previous": None, "regressions": []}
        first = start_benchmark_run(config)
        kept = register_and_gate(config, first.run_id, MODELS[:2], "resnet50", clean)
        finish_run(first)
        regressed = {"previous": {"run_id": first.run_id},
                     "regressions": [{"model": "efficientnet_b0", "metric": "top1", "reason": "fell 20 points"}]}
        second = start_benchmark_run(config)
        with pytest.raises(RegressionDetected):
            register_and_gate(config, second.run_id, MODELS[:2], "efficientnet_b0", regressed)
        finish_run(second, "FAILED")
        assert len(client.search_model_versions(f"name = '{name}'")) == 4  # registered, for the record
        champion = client.get_model_version_by_alias(name, registry.CHAMPION)
        assert str(champion.version) == kept["champion"]["version"] and champion.tags["model"] == "resnet50"
        # With the gate passing, the same call moves it.
        third = start_benchmark_run(config)
        moved = register_and_gate(config, third.run_id, MODELS[:2], "efficientnet_b0", clean)
        finish_run(third)
        assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == moved["champion"]["version"]


def _env_for(config) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{config.paths.tracking_db}"}


def test_predict_without_profile_uses_the_latest_champion_and_names_it(registered) -> None:
    """Issue 12: after a demo benchmark, `food101 predict photo.jpg` works and says it used demo."""
    config, _, _ = registered
    photo = next((SAMPLE / "images" / "bibimbap").glob("*.jpg"))
    done = subprocess.run([sys.executable, "-m", "food101", "predict", str(photo)], cwd=REPO, env=_env_for(config),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "profile demo" in done.stdout
    dishes = set((SAMPLE / "meta" / "labels.txt").read_text().splitlines())
    ranked = [line.split("%", 1)[1].strip() for line in done.stdout.splitlines() if "%" in line]
    assert len(ranked) == 5 and set(ranked) <= dishes


def test_predict_refuses_a_decompression_bomb_and_a_non_image_in_one_line(registered, tmp_path: Path) -> None:
    from PIL import Image

    config, _, _ = registered
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels, a few kB on disk
    assert bomb.stat().st_size < 1_000_000
    text = tmp_path / "notes.jpg"
    text.write_text("a shopping list, not a photo\n")
    for photo, expected in ((bomb, "too large"), (text, "not an image")):
        done = subprocess.run([sys.executable, "-m", "food101", "predict", "--profile", "demo", str(photo)],
                              cwd=REPO, env=_env_for(config), capture_output=True, text=True, check=False)
        assert done.returncode == 2, done.stdout + done.stderr[-3000:]
        assert "Traceback" not in done.stderr and str(photo) in done.stderr and expected in done.stderr
        assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1


def test_latest_champion_profile_is_the_one_registered_last(registered, tmp_path: Path) -> None:
    config, _, _ = registered
    assert registry.latest_champion_profile(config) == "demo"
    quick = make_config(tmp_path, profile="quick", paths__tracking_db=str(config.paths.tracking_db),
                        paths__tracking_artifacts=str(config.paths.tracking_artifacts))
    with single_torch_thread():
        write_best(quick, "resnet50", 7)
        run = start_benchmark_run(quick)
        registry.promote_champion(quick, registry.register_models(quick, run.run_id, ["resnet50"], "resnet50"))
        finish_run(run)
    assert registry.latest_champion_profile(config) == "quick"
    assert registry.latest_champion_profile(quick) == "quick"


# --- ONNX beside the state dict (issue 13) ----------------------------------------------------------

ONNX_MODEL = "shufflenet_v2_x0_5"  # BatchNorm-light enough that a few steps rank dishes decisively
FAST_EXPORT = {"models": [ONNX_MODEL], "export__latency_warmup": 0, "export__latency_runs": 1,
               "export__throughput_batch": 2, "export__throughput_runs": 1, "export__calibration_size": 4,
               "export__min_top1_agreement": 0.9}


@pytest.fixture(scope="module")
def onnx_champion(tmp_path_factory):
    """A tiny model in train's checkpoint format, its real export, registered and promoted by a benchmark."""
    from tasks import export as ex
    from tests.test_evaluate import build_sample_cache, write_trained_model

    config = make_config(tmp_path_factory.mktemp("onnx-registry"), **FAST_EXPORT)
    build_sample_cache(config)
    with single_torch_thread():
        write_trained_model(config, ONNX_MODEL)
        train_briefly(config, ONNX_MODEL)
        ex.export.fn(config, ONNX_MODEL)
        run = start_benchmark_run(config)
        promoted = registry.promote_champion(
            config, registry.register_models(config, run.run_id, [ONNX_MODEL], ONNX_MODEL))
        finish_run(run)
    return config, promoted


def train_briefly(config, model: str, steps: int = 30) -> None:
    """A few SGD steps on the cache's real train photos, so the checkpoint ranks dishes decisively
    (an untrained network gives five near-equal probabilities whose order is rounding noise)."""
    from tasks.preprocess import open_cache
    from tasks.train import model_dir, save_checkpoint

    path = model_dir(config, model) / "best.pt"
    payload = torch.load(path, weights_only=True)
    network = torchvision.models.get_model(payload["arch"], weights=None, num_classes=payload["num_classes"])
    network.load_state_dict(payload["state_dict"])
    cache = open_cache(config)
    images = torch.from_numpy(np.array(cache.images("train"))).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(payload["mean"])[:, None, None], torch.tensor(payload["std"])[:, None, None]
    x, y = (images - mean) / std, torch.from_numpy(np.asarray(cache.labels("train"), dtype=np.int64))
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    network.train()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(network(x), y).backward()
        optimiser.step()
    save_checkpoint(path, {**payload, "state_dict": network.eval().state_dict()})


def _registered_file(config, precision: str) -> Path:
    return next(config.paths.tracking_artifacts.rglob(f"registry/{ONNX_MODEL}/onnx-{precision}/model.onnx"))


def test_onnx_fp32_and_int8_are_registered_in_the_onnx_flavour_beside_the_weights(onnx_champion):
    import yaml

    from food101.onnx_inference import run_batches, session
    from tasks import export as ex
    from tasks.preprocess import open_cache

    config, promoted = onnx_champion
    client = client_for(config)
    version = client.get_model_version(promoted["name"], promoted["versions"][ONNX_MODEL])
    listed = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(version.run_id, f"registry/{ONNX_MODEL}")}
    assert listed == {registry.WEIGHTS_FILE, registry.META_FILE, registry.PREPROCESS_FILE, "onnx-fp32", "onnx-int8"}
    images = open_cache(config).images("test")[:8]
    for precision, exported in (("fp32", ex.ONNX_FILE), ("int8", ex.INT8_FILE)):
        graph = _registered_file(config, precision)
        mlmodel = yaml.safe_load((graph.parent / "MLmodel").read_text())
        assert "onnx" in mlmodel["flavors"] and mlmodel["metadata"]["precision"] == precision
        assert "onnxruntime==" in (graph.parent / "requirements.txt").read_text()
        assert version.tags[registry.onnx_sha_tag(precision)] == registry._sha256(graph)
        # the registered graph is the export's: the same logits on the same photos
        expected = run_batches(session(ex.export_dir(config, ONNX_MODEL) / exported, 1), images, 8)
        assert np.array_equal(run_batches(session(graph, 1), images, 8), expected)


def test_the_champion_is_tagged_with_the_runtime_and_precision_the_report_recommends(onnx_champion):
    from food101.deploy_targets import serving_variant
    from tasks.export import deployment_rows, load_exports

    config, promoted = onnx_champion
    client = client_for(config)
    champion = client.get_model_version_by_alias(promoted["name"], registry.CHAMPION)
    row = serving_variant(deployment_rows(load_exports(config, [ONNX_MODEL])), config.export, ONNX_MODEL)
    assert (champion.tags[registry.RUNTIME_TAG], champion.tags[registry.PRECISION_TAG]) == \
        (row["runtime"], row["precision"])
    assert registry.champion_serving(config) == {"runtime": row["runtime"], "precision": row["precision"]}
    described = client.get_registered_model(promoted["name"]).tags["champion_serving"]
    assert f"{row['runtime']} {row['precision']}" in described and ONNX_MODEL in described


def test_a_champion_without_an_export_is_tagged_pytorch_and_has_no_onnx(registered):
    config, _, second = registered
    champion = client_for(config).get_model_version_by_alias(second["name"], registry.CHAMPION)
    assert (champion.tags[registry.RUNTIME_TAG], champion.tags[registry.PRECISION_TAG]) == ("pytorch", "fp32")
    with pytest.raises(registry.NoChampionError, match="no registered ONNX fp32 model.*--runtime torch"):
        registry.load_champion_onnx(config)


def test_an_onnx_file_changed_after_registration_is_refused(onnx_champion):
    config, _ = onnx_champion
    graph = _registered_file(config, "int8")
    original = graph.read_bytes()
    try:
        graph.write_bytes(original[:-16] + bytes(16))
        with pytest.raises(registry.UntrustedModel, match="sha256"):
            registry.load_champion_onnx(config, "int8")
        assert registry.load_champion_onnx(config, "fp32").session is not None  # the other file is intact
    finally:
        graph.write_bytes(original)


def test_predict_runtime_onnx_names_five_dishes_and_agrees_with_torch(onnx_champion) -> None:
    config, _ = onnx_champion
    photo = next((SAMPLE / "images" / "bibimbap").glob("*.jpg"))
    dishes = set((SAMPLE / "meta" / "labels.txt").read_text().splitlines())
    ranked = {}
    for runtime in ("onnx", "torch"):
        precision = ["--precision", "fp32"] if runtime == "onnx" else []
        done = subprocess.run([sys.executable, "-m", "food101", "predict", "--profile", "demo", "--runtime", runtime,
                               *precision, str(photo)], cwd=REPO, env=_env_for(config), capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("onnxruntime fp32" if runtime == "onnx" else "pytorch fp32") in done.stdout
        ranked[runtime] = [line.split("%", 1)[1].strip() for line in done.stdout.splitlines() if "%" in line]
        assert len(ranked[runtime]) == 5 and set(ranked[runtime]) <= dishes
    assert ranked["onnx"][0] == ranked["torch"][0]
    best = float(next(line for line in done.stdout.splitlines() if "%" in line).split("%")[0])
    assert best > 25.0, done.stdout  # a decisive ranking, not five dishes tied at 20%


def test_an_export_older_than_the_checkpoint_is_not_registered(onnx_champion):
    """A best.pt retrained after the export: its old ONNX graph is not this model, so it is left out."""
    from tasks.train import model_dir

    config, promoted = onnx_champion
    best = model_dir(config, ONNX_MODEL) / "best.pt"
    stat = best.stat()
    os.utime(best, (stat.st_atime, stat.st_mtime + 3600))
    try:
        run = start_benchmark_run(config)
        again = registry.register_models(config, run.run_id, [ONNX_MODEL], ONNX_MODEL)
        finish_run(run)
    finally:
        os.utime(best, (stat.st_atime, stat.st_mtime))
    tags = client_for(config).get_model_version(again["name"], again["versions"][ONNX_MODEL]).tags
    assert not any(key.startswith("onnx_") for key in tags) and registry.PREPROCESS_SHA_TAG not in tags
    assert again["serving"]["runtime"] == "pytorch"
    champion = client_for(config).get_model_version_by_alias(promoted["name"], registry.CHAMPION)
    assert str(champion.version) == promoted["champion"]["version"]  # registering alone moves nothing
