"""params.yaml, profiles and overrides: loaded once, checked on the way in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from food101.config import ConfigError, dump_params, load_config, parse_override
from tests.conftest import REPO


def test_params_yaml_is_the_full_benchmark_and_default():
    config = load_config(REPO / "params.yaml")
    assert config.profile == "full"
    assert config.is_default
    assert config.models == ["resnet50", "efficientnet_b0", "mobilenet_v3_large"]
    assert config.paths.cache == REPO / "data" / "cache"  # relative to params.yaml, not the cwd


def test_profiles_override_and_are_not_default():
    demo = load_config(REPO / "params.yaml", profile="demo")
    assert demo.profile == "demo" and not demo.is_default
    assert demo.data.source == "sample" and demo.train.pretrained is False
    assert set(demo.train.overrides) == {"mobilenet_v3_large"}  # the profile's map replaces the full one
    quick = load_config(REPO / "params.yaml", profile="quick")
    assert quick.data.is_subset and quick.train.epochs == 3


def test_per_model_overrides_merge_into_the_recipe():
    config = load_config(REPO / "params.yaml")
    assert config.train.for_model("mobilenet_v3_large").weight_decay == 1e-5
    assert config.train.for_model("resnet50").weight_decay == config.train.weight_decay


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "did you mean 'epochs'"),
        ("train.epochs=three", "expected a whole number"),
        ("train.device=tpu", "is not one of"),
        ("models=[resnet5]", "not a torchvision classification model"),
        ("preprocess.crop=512", "crop must be <="),
        ("data.source=local", "needs data.local_path"),
        ("train.pretrained=maybe", "expected true or false"),
        ("train.overrides={resnet5: {lr: 1}}", "train.overrides: 'resnet5' is not a torchvision"),
        ("train.overrides={resnet50: {lr_max: 1}}", "unknown keys"),
    ],
)
def test_bad_parameters_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "params.yaml", overrides=[override])


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"profiles here: \['demo', 'full', 'quick'\]"):
        load_config(REPO / "params.yaml", profile="fast")


def test_override_values_are_yaml():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("data.classes=[apple_pie, bibimbap]") == ("data.classes", ["apple_pie", "bibimbap"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_dumped_profile_reloads_identically(tmp_path: Path):
    demo = load_config(REPO / "params.yaml", profile="demo")
    (tmp_path / "params.yaml").write_text(dump_params(demo))
    again = load_config(tmp_path / "params.yaml")
    assert again.to_dict() == demo.to_dict()
    assert again.is_default  # as params.yaml it is the default, so DVC may record it
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["profile"] == "demo"


def test_cli_reports_a_bad_parameter_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "food101", "params", "--set", "train.epoch=2"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 2
    assert "did you mean 'epochs'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_reports_a_missing_earlier_stage_without_a_traceback(tmp_path: Path):
    """A stage run before the one it reads from: one line naming the stage to run, exit code 2."""
    (tmp_path / "params.yaml").write_text(dump_params(load_config(REPO / "params.yaml", profile="demo")))
    done = subprocess.run(
        [sys.executable, "-m", "food101", "stage", "validate", "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "run the download stage first" in done.stderr
    assert "Traceback" not in done.stderr
