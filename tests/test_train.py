"""Training: the engine learns real photos, resumes exactly, fails loudly; the stage writes its files."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.models import get_model

from food101.config import ConfigError
from food101.devices import resolve_device, slot_devices, training_slot
from food101.engine import (
    EpochEnd,
    TrainingDiverged,
    checkpoint_best_state,
    evaluate_batches,
    fit,
    lr_factor,
    make_trainer,
    train_step,
)
from food101.feed import BatchFeed
from food101.models import build_model, classifier_head, expected_weights_path, normalization, pretrained_weights
from food101.tracking import client_for, experiment_id
from tasks.preprocess import build_cache, open_cache
from tasks.train import (
    DamagedCheckpoint,
    load_checkpoint,
    load_trained_model,
    read_history,
    read_train_summary,
    save_checkpoint,
    train,
    training_hash,
)
from tests.conftest import SAMPLE, assert_overfits_one_batch, make_config, sample_classes, sample_manifest

MODELS = ["resnet50", "efficientnet_b0", "mobilenet_v3_large"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here: one torch thread (the stage would otherwise take every core)."""


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real preprocess cache of the sample at the demo profile's 64 px, built once."""
    root = tmp_path_factory.mktemp("train")
    config = make_config(root)
    build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, config.paths.cache,
                workers=1, progress_bar=False)
    return root


@pytest.fixture
def demo(cache_root: Path, tmp_path: Path):
    """A demo config whose cache is the shared one and whose other outputs are this test's own."""
    def configure(**overrides):
        # No per-model recipe changes unless a test asks: they would override the test's own settings.
        overrides = {"train__overrides": {}} | overrides
        return make_config(tmp_path, paths__cache=str(cache_root / "data" / "cache"), **overrides)
    return configure


def feed(cache, split: str, *, train: bool, batch_size: int = 32, rows: slice = slice(None), seed: int = 0):
    mean, std = normalization("any", pretrained=False)
    images, labels = cache.images(split)[rows], cache.labels(split)[rows]
    return BatchFeed(np.ascontiguousarray(images), labels, batch_size=batch_size, device=CPU, train=train,
                     image_size=images.shape[1], mean=mean, std=std, min_scale=0.35, seed=seed, prefetch=0)


# --- the engine on real photos -----------------------------------------------------------------


@pytest.mark.parametrize("arch", MODELS)
def test_each_model_overfits_one_batch_of_real_photos(demo, arch: str) -> None:
    """The guard against the old system's 12%: the whole pipeline can fit ten real photos."""
    config = demo()
    cache = open_cache(config)
    per_class = [np.flatnonzero(cache.labels("train") == c)[:2] for c in range(len(cache.classes))]
    rows = np.sort(np.concatenate(per_class))
    x, y = next(iter(feed(cache, "train", train=False, batch_size=len(rows), rows=rows)))
    # The demo recipe without label smoothing (its floor is above 10% of the first loss).
    recipe = dataclasses.replace(config.train.for_model(arch), label_smoothing=0.0, warmup_epochs=0.0)
    torch.manual_seed(0)
    trainer = make_trainer(build_model(arch, len(cache.classes), pretrained=False), recipe, CPU,
                           steps_per_epoch=1000, label=arch)
    assert_overfits_one_batch(trainer, x, y)


def test_resume_after_a_kill_reaches_the_same_state_as_an_uninterrupted_run(demo, tmp_path: Path) -> None:
    config = demo()
    cache = open_cache(config)
    recipe = dataclasses.replace(config.train.for_model("mobilenet_v3_large"), epochs=2)

    def start(seed: int):
        model = build_model("mobilenet_v3_large", len(cache.classes), pretrained=False, seed=seed)
        source = feed(cache, "train", train=True)
        return make_trainer(model, recipe, CPU, len(source), label="m"), source, feed(cache, "val", train=False)

    def next_step_loss(trainer, source) -> float:
        source.set_epoch(3)
        x, y = next(iter(source))
        return float(train_step(trainer, x, y)[0])

    torch.manual_seed(0)
    trainer, source, val = start(0)
    whole = fit(trainer, source, val, recipe, steps_per_epoch=len(source))
    whole_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    whole_next = next_step_loss(trainer, source)

    class Killed(Exception):
        pass

    def save_then_die(end: EpochEnd) -> None:
        save_checkpoint(tmp_path / "checkpoint.pt", end.checkpoint)
        raise Killed

    torch.manual_seed(0)
    trainer, source, val = start(0)
    with pytest.raises(Killed):
        fit(trainer, source, val, recipe, steps_per_epoch=len(source), on_epoch_end=save_then_die)

    # A new process: other random weights, other RNG state; everything comes from the checkpoint.
    trainer, source, val = start(99)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    assert checkpoint["epoch"] == 1
    resumed = fit(trainer, source, val, recipe, steps_per_epoch=len(source), resume=checkpoint)

    assert resumed.start_epoch == 2 and [r["epoch"] for r in resumed.history] == [1, 2]
    assert _same_losses(resumed.history, whole.history)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, whole_state[key], rtol=1e-5, atol=1e-6, msg=key)
    assert next_step_loss(trainer, source) == pytest.approx(whole_next, rel=1e-5)


def _same_losses(a: list[dict], b: list[dict]) -> bool:
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "lr")
    return all(math.isclose(x[k], y[k], rel_tol=1e-5) for x, y in zip(a, b, strict=True) for k in keys)


class NaNAfterFirstStep(nn.Module):
    """A model whose output turns NaN after its first forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls > 1 else out


def test_a_nan_loss_raises_training_diverged(demo) -> None:
    recipe = dataclasses.replace(demo().train, epochs=2)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(3)]
    trainer = make_trainer(NaNAfterFirstStep(), recipe, CPU, steps_per_epoch=3, label="nan_model")
    with pytest.raises(TrainingDiverged, match="nan_model: the training loss became nan at epoch 1"):
        fit(trainer, batches, batches, recipe, steps_per_epoch=3)


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine() -> None:
    factors = [lr_factor(step, warmup_steps=4, total_steps=12) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(12, 4, 12) == 0.0
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)


def test_early_stopping_keeps_the_best_validation_epoch(demo) -> None:
    """Validation that never improves after epoch 1: patience 2 stops after epoch 3, best is 1."""
    recipe = dataclasses.replace(demo().train, epochs=10, early_stopping_patience=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    trainer = make_trainer(model, recipe, CPU, steps_per_epoch=2)

    class ScoresOnce:
        """Validation data every example of which the model gets right once, then never."""

        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            x = torch.randn(8, 3, 8, 8)
            with torch.no_grad():
                predicted = trainer.model(x).argmax(1)
            yield x, predicted if self.epoch == 1 else (predicted + 1) % 5

    checkpoints: list[dict] = []
    result = fit(trainer, batches, ScoresOnce(), recipe, steps_per_epoch=2,
                 on_epoch_end=lambda end: checkpoints.append(copy.deepcopy(end.checkpoint)))
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1 and result.best_val_top1 == 1.0
    # Each checkpoint carries the best epoch's weights, a copy only once they differ from its own.
    assert checkpoints[0]["best_state"] is None
    for checkpoint in checkpoints:
        best = checkpoint_best_state(checkpoint)
        assert all(torch.equal(best[k], checkpoints[0]["model"][k]) for k in best)
    assert not torch.equal(checkpoints[2]["model"]["1.weight"], checkpoints[0]["model"]["1.weight"])


# --- the stage ---------------------------------------------------------------------------------


def test_every_model_trained_from_scratch_beats_chance_and_is_not_trained_twice(demo) -> None:
    # The demo recipe takes 18 steps, too few to learn 120 photos from scratch: batch 16 and ten
    # epochs (70 steps), twenty for MobileNetV3, the slowest starter (its SE/hardswish blocks),
    # and for EfficientNet-B0, whose dropout and stochastic depth slow it down (at ten epochs two
    # seeds in eight stayed at chance, with the global generator or its own).
    config = demo(train__batch_size=16, train__epochs=10, train__lr=0.005,
                  train__overrides={"mobilenet_v3_large": {"epochs": 20, "lr": 0.002},
                                    "efficientnet_b0": {"epochs": 20}})
    cache = open_cache(config)
    chance = 1 / len(cache.classes)
    scores = {}
    for arch in config.models:
        summary = train.fn(config, arch)
        epochs = config.train.for_model(arch).epochs
        on_disk = read_train_summary(config, arch)
        # Every epoch, or up to early stopping (train.early_stopping_patience epochs without progress).
        assert summary["status"] == "ok" and (summary["epochs_run"] == epochs or on_disk["stopped_early"])
        model, meta = load_trained_model(config, arch)
        assert meta["classes"] == cache.classes and meta["image_size"] == 64
        test_feed = feed(cache, "test", train=False, batch_size=64)
        trainer = make_trainer(model, config.train, CPU, 1, label=arch)
        scores[arch] = evaluate_batches(trainer, test_feed)["val_top1"]

        history = read_history(config, arch)
        assert list(history["epoch"]) == list(range(1, summary["epochs_run"] + 1))
        assert on_disk["best_val_top1"] == history["val_top1"].max()
        assert on_disk["best_epoch"] == int(history.loc[history["val_top1"].idxmax(), "epoch"])

    assert all(score > chance for score in scores.values()), scores

    # Done with the same configuration: returned from train.json, nothing retrained.
    arch = config.models[-1]
    stamp = (config.paths.models / arch / "history.csv").stat().st_mtime_ns
    again = train.fn(config, arch)
    assert again["best_val_top1"] == read_train_summary(config, arch)["best_val_top1"]
    assert (config.paths.models / arch / "history.csv").stat().st_mtime_ns == stamp


def test_stage_resumes_from_its_checkpoint_only_when_the_configuration_matches(demo) -> None:
    arch = "mobilenet_v3_large"
    config = demo(train__epochs=2, models=[arch])
    out = config.paths.models / arch
    train.fn(config, arch)
    full = read_history(config, arch)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    # Killed after the last checkpoint, before train.json: the re-run resumes and trains nothing.
    (out / "train.json").unlink()
    summary = train.fn(config, arch)
    assert summary["epochs_run"] == 2 and read_train_summary(config, arch)["resumed_from_epoch"] == 2
    pd.testing.assert_frame_equal(read_history(config, arch), full)
    # Another recipe does not resume a checkpoint that is not its own.
    other = demo(train__epochs=1, models=[arch])
    assert train.fn(other, arch)["epochs_run"] == 1
    assert read_train_summary(other, arch)["resumed_from_epoch"] == 0


def _short_training(demo, epochs: int = 3):
    arch = "mobilenet_v3_large"
    config = demo(train__epochs=epochs, train__batch_size=16, train__max_steps_per_epoch=3, models=[arch])
    train.fn(config, arch)
    return config, arch, config.paths.models / arch


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_best_pt_left_by_a_kill_between_the_two_writes_is_rebuilt_from_the_checkpoint(
    demo, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after best.pt was written and before the checkpoint naming it: best.pt holds other
    weights than the checkpoint's best epoch. The re-run puts the checkpoint's best back."""
    config, arch, out = _short_training(demo)
    right = (out / "best.pt").read_bytes()
    payload = load_checkpoint(out / "best.pt")
    other = {k: v + 1 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    save_checkpoint(out / "best.pt", {**payload, "state_dict": other, "epoch": 1})  # a whole, recorded file
    (out / "train.json").unlink()
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        train.fn(config, arch)
    assert "rebuilt it from the checkpoint" in caplog.text
    assert (out / "best.pt").read_bytes() == right
    net, meta = load_trained_model(config, arch)  # what evaluate and the registry load
    assert _same(net.state_dict(), payload["state_dict"]) and meta["epoch"] == payload["epoch"]


def test_a_damaged_best_pt_is_refused_by_readers_and_rebuilt_by_the_next_training(
    demo, caplog: pytest.LogCaptureFixture
) -> None:
    config, arch, out = _short_training(demo)
    right = _state(out / "best.pt")
    data = bytearray((out / "best.pt").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    (out / "best.pt").write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="food101 stage train --model mobilenet_v3_large"):
        load_trained_model(config, arch)
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        train.fn(config, arch)  # train.json says done; best.pt does not match its record
    assert "rebuilt it from the checkpoint" in caplog.text
    assert _same(load_trained_model(config, arch)[0].state_dict(), right)


def test_a_truncated_checkpoint_is_detected_and_the_model_trained_again(
    demo, caplog: pytest.LogCaptureFixture
) -> None:
    config, arch, out = _short_training(demo, epochs=2)
    history, best = read_history(config, arch), _state(out / "best.pt")
    (out / "train.json").unlink()  # killed before the end, then the checkpoint got damaged
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        summary = train.fn(config, arch)
    assert "training from the start" in caplog.text
    assert summary["epochs_run"] == 2 and read_train_summary(config, arch)["resumed_from_epoch"] == 0
    pd.testing.assert_frame_equal(read_history(config, arch).drop(columns=["images_per_s", "epoch_time_s"]),
                                  history.drop(columns=["images_per_s", "epoch_time_s"]))
    assert _same(_state(out / "best.pt"), best)


def run_artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    """Every artifact file of a run, as paths relative to the run's artifact root."""
    found = []
    for item in client.list_artifacts(run_id, folder):
        found.extend(run_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def mlmodel_flavours(client: MlflowClient, run_id: str, dst: Path) -> dict[str, dict]:
    """{artifact folder: flavours} of every MLflow model (an `MLmodel` file) among the run's artifacts."""
    dst.mkdir(parents=True, exist_ok=True)
    found = {}
    for path in run_artifacts(client, run_id):
        if Path(path).name == "MLmodel":
            local = Path(client.download_artifacts(run_id, path, str(dst)))
            found[str(Path(path).parent)] = yaml.safe_load(local.read_text())["flavors"]
    return found


def test_mlflow_gets_the_best_weights_as_a_state_dict_and_no_pickled_model(demo, tmp_path: Path) -> None:
    """Loading what the train run logged runs no code: best.pt as a plain artifact (a state dict,
    read with weights_only=True), and no pytorch-flavour MLflow model to unpickle."""
    arch = "mobilenet_v3_large"
    config = demo(train__epochs=1, train__batch_size=16, train__max_steps_per_epoch=2, models=[arch])
    train.fn(config, arch)
    client = client_for(config)
    [run] = client.search_runs([experiment_id(config, client)], "tags.stage = 'train'")
    run_id = run.info.run_id
    models = mlmodel_flavours(client, run_id, tmp_path / "mlmodel")
    assert all("pytorch" not in flavours for flavours in models.values()), models
    assert "best.pt" in run_artifacts(client, run_id)
    logged = Path(client.download_artifacts(run_id, "best.pt", str(tmp_path)))
    assert logged.read_bytes() == (config.paths.models / arch / "best.pt").read_bytes()
    best = torch.load(logged, map_location="cpu", weights_only=True)
    assert best["arch"] == arch and best["epoch"] == read_train_summary(config, arch)["best_epoch"]
    assert _same(best["state_dict"], load_trained_model(config, arch)[0].state_dict())


def test_system_metrics_go_to_the_projects_store_from_any_working_directory(
        demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: MLflow's system-metrics monitor was started without the project's tracking URI, so it
    wrote to MLflow's default store (mlflow.db in the working directory). Run from anywhere but the
    project root, a train run got no system/ metrics, and a stray mlflow.db appeared there."""
    arch = "mobilenet_v3_large"
    config = demo(train__epochs=1, train__batch_size=16, train__max_steps_per_epoch=2, models=[arch])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # samples within a short stage
    train.fn(config, arch)
    client = client_for(config)
    [run] = client.search_runs([experiment_id(config, client)], "tags.stage = 'train'")
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    assert list(elsewhere.iterdir()) == []

def test_the_training_hash_counts_only_what_changes_the_model(tmp_path: Path) -> None:
    def hashed(**overrides) -> str:
        return training_hash(make_config(tmp_path, **overrides), "resnet50")

    base = hashed()
    assert hashed(preprocess__workers=3) == base
    assert hashed(data__download_retries=9) == base
    assert hashed(train__gpu_cache="off") == base
    assert hashed(train__lr=0.123) != base
    assert hashed(preprocess__crop=48) != base
    assert hashed(train__overrides={"resnet50": {"epochs": 7}}) != base
    assert hashed(train__overrides={"efficientnet_b0": {"epochs": 7}}) == base


def test_head_only_first_epoch_leaves_the_backbone_untouched(demo) -> None:
    """train.freeze_backbone_epochs: 1 trains the new head alone first, then the whole network."""
    config = demo()
    cache = open_cache(config)
    recipe = dataclasses.replace(config.train.for_model("mobilenet_v3_large"), epochs=2, freeze_backbone_epochs=1,
                                 early_stopping_patience=0)
    torch.manual_seed(0)
    source = feed(cache, "train", train=True, rows=slice(0, 64))
    trainer = make_trainer(build_model("mobilenet_v3_large", len(cache.classes), pretrained=False), recipe, CPU,
                           len(source), label="m")
    head_name = classifier_head(trainer.model)[0]
    start = {k: v.clone() for k, v in trainer.model.named_parameters()}
    after: list[dict[str, torch.Tensor]] = []
    fit(trainer, source, feed(cache, "val", train=False), recipe, steps_per_epoch=len(source),
        on_epoch_end=lambda end: after.append({k: v.clone() for k, v in end.checkpoint["model"].items()}))

    def moved(state: dict[str, torch.Tensor], head: bool) -> list[str]:
        return [k for k in start if k.startswith(head_name + ".") == head and not torch.equal(state[k], start[k])]

    assert moved(after[0], head=True) and not moved(after[0], head=False)  # epoch 1: the head alone
    assert moved(after[1], head=False)  # epoch 2: the backbone trains too
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_stage_fine_tunes_the_weights_in_torch_home(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.pretrained: the stage starts from the file torch.hub would use, normalised as its
    weights ask, and a few small steps later the backbone is still that file's."""
    arch = "mobilenet_v3_large"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(7)
    saved = get_model(arch).state_dict()
    path = expected_weights_path(pretrained_weights(arch))
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    config = demo(models=[arch], train__pretrained=True, train__epochs=1, train__max_steps_per_epoch=2,
                  train__optimizer="sgd", train__lr=0.001)
    train.fn(config, arch)
    net, meta = load_trained_model(config, arch)
    assert (tuple(meta["mean"]), tuple(meta["std"])) == normalization(arch, pretrained=True)
    first_conv = "features.0.0.weight"
    tuned, fresh = net.state_dict()[first_conv], get_model(arch).state_dict()[first_conv]
    assert torch.allclose(tuned, saved[first_conv], atol=1e-2)  # two steps at lr 0.001 barely move it
    assert not torch.allclose(fresh, saved[first_conv], atol=1e-2)  # and random weights are far from it


def test_stage_starts_the_head_from_a_linear_probe_when_asked(demo) -> None:
    """train.head_init=probe through the stage: train.json records the probe that started the
    head (its penalty, chosen on the validation split), and a resumed run does not fit it again."""
    arch = "mobilenet_v3_large"
    config = demo(models=[arch], train__head_init="probe", train__epochs=1, train__max_steps_per_epoch=2,
                  train__batch_size=16)
    summary = train.fn(config, arch)
    probe = read_train_summary(config, arch)["head_probe"]
    assert summary["status"] == "ok" and probe["probe_penalty"] > 0 and 0 <= probe["probe_train_top1"] <= 1
    (config.paths.models / arch / "train.json").unlink()  # killed after the last checkpoint
    train.fn(config, arch)
    assert read_train_summary(config, arch)["head_probe"] is None  # resumed: the head came from the checkpoint


def test_a_diverging_model_is_marked_failed_in_train_json(demo) -> None:
    # An absurd learning rate: the weights overflow and the loss goes NaN within a few steps.
    config = demo(train__optimizer="sgd", train__lr=1.0e30, train__epochs=1, models=["mobilenet_v3_large"])
    with pytest.raises(TrainingDiverged, match="loss became nan.*Lower train.lr"):
        train.fn(config, "mobilenet_v3_large")
    summary = read_train_summary(config, "mobilenet_v3_large")
    assert summary["status"] == "failed" and "loss became" in summary["error"]


# --- devices -----------------------------------------------------------------------------------


def test_cpu_trains_one_model_at_a_time(demo) -> None:
    config = demo()
    assert slot_devices(config) == [CPU]
    inside, most = [0], [0]
    lock = threading.Lock()

    def work(model: str) -> None:
        with training_slot(config, model):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(m,)) for m in config.models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU
