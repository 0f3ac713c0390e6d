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
    config = load_config(REPO / "params.yaml",
                         overrides={"train.overrides": {"mobilenet_v3_large": {"weight_decay": 1e-5}}})
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
        ("train.color_jitter=1.0", r"train.color_jitter .*in \[0, 1\)"),
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("evaluate.bootstrap_samples=0", "evaluate.bootstrap_samples must be at least 1"),
        ("evaluate.ece_bins=0", "evaluate.ece_bins must be at least 1"),
        ("evaluate.batch_size=0", "evaluate.batch_size must be at least 1"),
        ("evaluate.latency_runs=0", "evaluate.latency_runs must be at least 1"),
        ("evaluate.latency_warmup=-1", "evaluate.latency_warmup must be at least 0"),
        ("evaluate.throughput_batch=0", "evaluate.throughput_batch must be at least 1"),
        ("evaluate.seed=-1", "evaluate.seed must be at least 0"),
        ("train.label_smoothing=5", r"train.label_smoothing must be in \[0, 1\)"),
        ("train.weight_decay=-0.1", "train.weight_decay must be at least 0"),
        ("train.momentum=1", r"train.momentum must be in \[0, 1\)"),
        ("train.momentum=-0.5", r"train.momentum must be in \[0, 1\)"),
        ("train.warmup_epochs=-1", "train.warmup_epochs must be at least 0"),
        ("train.freeze_backbone_epochs=-1", "train.freeze_backbone_epochs must be at least 0"),
        ("train.early_stopping_patience=-1", "train.early_stopping_patience must be at least 0"),
        ("train.image_size=8", "train.image_size must be at least 16"),
        ("train.seed=-3", "train.seed must be at least 0"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be at least 1"),
        ("train.overrides={resnet50: {label_smoothing: 2}}", r"train.overrides.resnet50.label_smoothing must be in"),
        ("confusion.top_pairs=0", "confusion.top_pairs must be at least 1"),
        ("confusion.group_threshold=0", r"confusion.group_threshold must be in \(0, 1\]"),
        ("confusion.group_threshold=1.5", r"confusion.group_threshold must be in \(0, 1\]"),
        ("confusion.examples_per_pair=-1", "confusion.examples_per_pair must be at least 0"),
        ("report.latency_budget_ms=0", "report.latency_budget_ms must be positive"),
        ("report.within_points=-1", "report.within_points must be at least 0"),
        ("data.download_retries=-1", "data.download_retries must be at least 0"),
        ("data.min_free_gb=-1", "data.min_free_gb must be at least 0"),
        ("data.md5=''", "data.md5 must be the archive's 32-character MD5"),
        ("data.md5=xyz", "data.md5 must be the archive's 32-character MD5"),
        ("data.url=ftp://example.org/food-101.tar.gz", "data.url must start with http"),
        ("data.classes=0", "data.classes must be at least 1"),
        ("data.classes=[]", "data.classes must name at least one class"),
        ("data.classes=[a, a]", "data.classes must not repeat"),
        ("data.train_per_class=0", "data.train_per_class must be at least 1"),
        ("data.test_per_class=0", "data.test_per_class must be at least 1"),
        ("validate.min_side=0", "validate.min_side must be at least 1"),
        ("validate.max_side=16", "validate.max_side must be at least validate.min_side"),
        ("validate.official_train_per_class=0", "validate.official_train_per_class must be at least 1"),
        ("validate.official_test_per_class=0", "validate.official_test_per_class must be at least 1"),
        ("preprocess.workers=-1", "preprocess.workers must be at least 0"),
        ("preprocess.seed=-1", "preprocess.seed must be at least 0"),
        ("alerts.min_timing_effect=0", r"alerts.min_timing_effect must be in \(0, 1\)"),
        ("schedule.cron='every monday'", "schedule.cron"),
        ("schedule.timezone=Mars/Base", "schedule.timezone"),
        ("tracking.experiment=''", "tracking.experiment must not be empty"),
    ],
)
def test_impossible_values_are_refused_with_the_parameter_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "params.yaml", overrides=[override])


@pytest.mark.parametrize(
    "override",
    ["data.md5=''", "data.md5=xyz"],
)
def test_md5_is_free_only_for_sources_without_the_official_archive(override):
    load_config(REPO / "params.yaml", profile="demo", overrides=[override])  # source: sample


def test_patience_zero_is_accepted_and_means_no_early_stopping():
    from food101.engine import _patience_ran_out

    recipe = load_config(REPO / "params.yaml", overrides=["train.early_stopping_patience=0"]).train
    assert recipe.early_stopping_patience == 0
    assert not _patience_ran_out(recipe, last_epoch=9, best_epoch=1)


def test_every_profile_passes_the_range_checks():
    for profile in (None, "demo", "quick", "full"):
        load_config(REPO / "params.yaml", profile=profile)
