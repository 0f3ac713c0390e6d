"""The one configuration: params.yaml, a profile over it, `--set key=value` over that.

Everything is loaded once into frozen dataclasses and checked on the way in, so a typo or a
wrong type is a clear error at start-up, not a traceback an hour into training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
PROFILES_DIR = "profiles"


class ConfigError(ValueError):
    """A parameter the user gave is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class Paths:
    sample: Path
    raw: Path
    dataset: Path
    manifest: Path
    cache: Path
    models: Path
    eval: Path
    export: Path
    confusion: Path
    robustness: Path
    reports: Path
    tracking_db: Path
    tracking_artifacts: Path


@dataclass(frozen=True)
class DataConfig:
    source: Literal["food101", "local", "sample", "imagefolder"]
    url: str
    md5: str
    local_path: str | None
    classes: list[str] | int | None
    train_per_class: int | None
    test_per_class: int | None
    download_retries: int
    min_free_gb: float
    # source=imagefolder with one folder per class and no train/test folders: the seeded,
    # stratified share of each class held out as the test split.
    test_fraction: float = 0.25
    split_seed: int = 0

    @property
    def is_subset(self) -> bool:
        return any(v is not None for v in (self.classes, self.train_per_class, self.test_per_class))


@dataclass(frozen=True)
class ValidateConfig:
    official_train_per_class: int
    official_test_per_class: int
    min_side: int
    max_side: int
    max_quarantine_fraction: float


@dataclass(frozen=True)
class PreprocessConfig:
    resize: int
    crop: int
    val_fraction: float
    seed: int
    workers: int

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


@dataclass(frozen=True)
class TrainConfig:
    device: Literal["auto", "cpu", "cuda"]
    pretrained: bool
    epochs: int
    batch_size: int
    image_size: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    label_smoothing: float
    warmup_epochs: float
    freeze_backbone_epochs: int
    backbone_lr_scale: float
    frozen_batchnorm: bool
    head_init: Literal["zero", "probe"]
    min_scale: float
    early_stopping_patience: int
    seed: int
    seeds: int
    compile: bool
    channels_last: bool
    gpu_cache: Literal["auto", "on", "off"]
    max_steps_per_epoch: int | None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_model(self, model: str) -> TrainConfig:
        """The recipe for one model: the shared recipe with that model's overrides applied."""
        changes = dict(self.overrides.get(model, {}))
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)} | ({"overrides"} & set(changes))
        if unknown:
            raise ConfigError(f"train.overrides.{model}: unknown keys {sorted(unknown)}")
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes
        merged["overrides"] = {}
        return _build(TrainConfig, merged, f"train.overrides.{model}")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    latency_warmup: int
    latency_runs: int
    throughput_batch: int
    bootstrap_samples: int
    ece_bins: int
    seed: int


EXPORT_RULES = ("max_accuracy_under_p95", "max_accuracy_under_size", "max_throughput")


@dataclass(frozen=True)
class TargetConfig:
    """A deployment target and the rule that picks its model, runtime and precision."""

    label: str  # how the report names it: "CPU server"
    rule: Literal["max_accuracy_under_p95", "max_accuracy_under_size", "max_throughput"]
    max_p95_ms: float | None = None  # max_accuracy_under_p95: batch-1 p95 latency budget
    max_size_mb: float | None = None  # max_accuracy_under_size: file size budget


@dataclass(frozen=True)
class ExportConfig:
    opset: int  # ONNX opset of torch.onnx.export (dynamo)
    max_abs_logit_diff: float  # parity with PyTorch on the test split, or the export fails
    min_top1_agreement: float
    calibration_size: int  # train photos (seeded) that calibrate the int8 activations
    calibration_batch: int
    reduce_range: bool  # 7-bit weights: safe on CPUs without VNNI
    batch_size: int  # batch of the accuracy and parity passes
    threads: int  # intra-op threads of every runtime while timing
    latency_warmup: int
    latency_runs: int
    throughput_batch: int
    throughput_runs: int
    bootstrap_samples: int
    significance: float  # McNemar p below this: the int8 drop is real, not chance
    serve_target: str  # the target whose choice tags the champion and is served
    targets: dict[str, TargetConfig]
    seed: int


@dataclass(frozen=True)
class ConfusionConfig:
    top_pairs: int
    group_threshold: float
    examples_per_pair: int


# The corruptions the robustness stage knows (tasks/robustness.py implements each), and the
# severities every one of them lists in robustness.levels, mildest first.
CORRUPTIONS = (
    "brightness_dark", "brightness_bright", "contrast", "gaussian_noise", "gaussian_blur", "motion_blur",
    "jpeg", "low_resolution", "rotation", "occlusion", "off_centre_crop",
)
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class RobustnessConfig:
    corruptions: list[str]  # the subset of CORRUPTIONS to run
    severities: list[int]  # the subset of SEVERITIES to run
    levels: dict[str, list[float]]  # per corruption, its strength at severities 1-5
    baseline_model: str  # the denominator of the corruption error (mCE), as AlexNet is in ImageNet-C
    within_points: float  # "most robust model within N clean top-1 points of the best"
    batch_size: int
    bootstrap_samples: int
    most_hurt_classes: int
    seed: int


ENSEMBLE_METHODS = ("mean", "weighted")


@dataclass(frozen=True)
class EnsembleConfig:
    """Models of this run combined by their probabilities (food101/ensembles.py): no training."""

    name: str
    members: list[str]
    method: str = "mean"  # one of ENSEMBLE_METHODS; weighted: weights fit on the validation split


@dataclass(frozen=True)
class ReportConfig:
    title: str
    latency_budget_ms: float
    within_points: float


@dataclass(frozen=True)
class OrchestrationConfig:
    task_runner: Literal["thread", "dask"]
    dask_address: str | None
    parallel_training: Literal["auto", "sequential", "concurrent"]


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str
    timezone: str


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str


@dataclass(frozen=True)
class AlertsConfig:
    fail_on_regression: bool
    min_timing_effect: float  # relative change of a timing median below which nothing changed
    max_load_per_core: float  # above this load average per core, timings are inconclusive
    max_other_cpu_share: float  # above this CPU share of other processes, timings are inconclusive
    notify_url: str | None  # a webhook that hears of regressions and failures; null: off
    notify_block: str | None  # or the name of a saved Prefect notification block


@dataclass(frozen=True)
class Config:
    profile: str
    paths: Paths
    data: DataConfig
    validate: ValidateConfig
    preprocess: PreprocessConfig
    models: list[str]
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    confusion: ConfusionConfig
    robustness: RobustnessConfig
    report: ReportConfig
    orchestration: OrchestrationConfig
    schedule: ScheduleConfig
    tracking: TrackingConfig
    alerts: AlertsConfig
    ensembles: list[EnsembleConfig] = field(default_factory=list)
    # Where params.yaml lives; relative paths were resolved against it.
    project_dir: Path = Path(".")
    # The merged parameters as plain data (what MLflow logs and what `food101 params` writes).
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # True when this is params.yaml exactly (no profile, no overrides): DVC may record it.
    is_default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def digest(self, *sections: str) -> str:
        """A short stable hash of some sections of the configuration (all when none given)."""
        data = self.raw if not sections else {s: self.raw[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def find_params_file(start: Path | None = None) -> Path:
    """params.yaml from $FOOD101_PARAMS, else the nearest one at or above `start` (default: cwd)."""
    env = os.environ.get("FOOD101_PARAMS")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"FOOD101_PARAMS points at {path}, which does not exist")
        return path
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder / PARAMS_FILE
    raise ConfigError(
        f"no {PARAMS_FILE} found in {here} or any folder above it; run from the project folder "
        "or pass --params PATH (or set FOOD101_PARAMS)"
    )


def load_config(
    params_file: Path | None = None,
    profile: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Load params.yaml, apply a profile from profiles/<name>.yaml, then key=value overrides."""
    params_file = (params_file or find_params_file()).resolve()
    base = _read_yaml(params_file)
    merged = copy.deepcopy(base)
    if profile:
        profile_file = params_file.parent / PROFILES_DIR / f"{profile}.yaml"
        if not profile_file.is_file():
            known = sorted(p.stem for p in (params_file.parent / PROFILES_DIR).glob("*.yaml"))
            raise ConfigError(f"unknown profile {profile!r}: no {profile_file}; profiles here: {known}")
        # A profile's per-model map replaces params.yaml's whole: recipes do not mix across profiles.
        for key, value in flatten(_read_yaml(profile_file), leaves=("train.overrides",)).items():
            _set_dotted(merged, key, value, schema=base)
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
        for key, value in items:
            _set_dotted(merged, key, value, schema=base)
    config = config_from_dict(merged, project_dir=params_file.parent)
    return dataclasses.replace(config, is_default=(merged == base))


def config_from_dict(data: dict[str, Any], project_dir: Path) -> Config:
    """Build and check a Config from merged plain data; paths are resolved against project_dir."""
    data = copy.deepcopy(data)
    paths = data.get("paths")
    if not isinstance(paths, dict):
        raise ConfigError("params: 'paths' must be a mapping")
    resolved = {k: str((project_dir / Path(str(v)).expanduser()).resolve()) for k, v in paths.items()}
    built = _build(Config, {**data, "paths": resolved}, "")
    config = dataclasses.replace(built, project_dir=project_dir, raw=data)
    _check_ranges(config)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (for example train.epochs=3)")
    if not value.strip():
        return key.strip(), None
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and _FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads '1e-3' as text; a user means the number
    return key.strip(), parsed


def dump_params(config: Config) -> str:
    """The merged configuration as params.yaml text (for `dvc repro` of a profile)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "", leaves: tuple[str, ...] = ()) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists, and the dotted keys in `leaves`, stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in leaves:
            out.update(flatten(value, f"{name}.", leaves))
        else:
            out[name] = value
    return out


# --- internals -------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of parameters")
    return data


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _set_dotted(target: dict, dotted: str, value: Any, schema: dict) -> None:
    """Set target[a][b][c] for 'a.b.c', refusing keys that params.yaml does not have."""
    parts = dotted.split(".")
    node, ref = target, schema
    free_form = dotted.startswith("train.overrides.")  # per-model maps are checked when built
    if free_form and len(parts) > 4:  # a model name with dots (package.module:function): the key is last
        parts = [*parts[:2], ".".join(parts[2:-1]), parts[-1]]
    for depth, part in enumerate(parts):
        if not free_form and isinstance(ref, dict) and part not in ref:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown parameter {dotted!r} (no {part!r} in {where}){_suggest(part, ref)}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"parameter {'.'.join(parts[:depth + 1])!r} is not a section")
        ref = ref.get(part, {}) if isinstance(ref, dict) else {}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'params'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    internal = {"project_dir", "raw", "is_default"} if cls is Config else set()
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown parameter {_join(where, key)!r}{_suggest(key, fields)}")
    values = {}
    for name, fld in fields.items():
        if name in internal:
            continue
        if name not in data:
            if fld.default is not dataclasses.MISSING or fld.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"missing parameter {_join(where, name)!r}")
        values[name] = _coerce(hints[name], data[name], _join(where, name))
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported parameter type {hint}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "")


# A range rule: (parameter, test, what the value must be); a test sees only non-None values.
_Rule = tuple[str, typing.Callable[[Any], bool], str]
_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]+")
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"}


def _at_least(n: int) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v >= n), f"at least {n}"


_POSITIVE = ((lambda v: v > 0), "positive")
_FRACTION_OPEN_TOP = ((lambda v: 0.0 <= v < 1.0), "in [0, 1)")
_FRACTION_OPEN_BOTTOM = ((lambda v: 0.0 < v <= 1.0), "in (0, 1]")
_FRACTION_OPEN = ((lambda v: 0.0 < v < 1.0), "in (0, 1)")

_TRAIN_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "epochs": _at_least(1),
    "batch_size": _at_least(1),
    "image_size": _at_least(16),
    "lr": _POSITIVE,
    "momentum": _FRACTION_OPEN_TOP,
    "weight_decay": _at_least(0),
    "label_smoothing": _FRACTION_OPEN_TOP,
    "warmup_epochs": _at_least(0),
    "freeze_backbone_epochs": _at_least(0),
    "min_scale": _FRACTION_OPEN_BOTTOM,
    "backbone_lr_scale": _FRACTION_OPEN_BOTTOM,  # the backbone's LR / the head's
    "early_stopping_patience": _at_least(0),  # 0 turns early stopping off (engine.fit)
    "seed": _at_least(0),
    "seeds": _at_least(1),
    "max_steps_per_epoch": _at_least(1),
}

_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.train_per_class": _at_least(1),
    "data.test_per_class": _at_least(1),
    "data.download_retries": _at_least(0),
    "data.min_free_gb": _at_least(0),
    "data.test_fraction": _FRACTION_OPEN,
    "data.split_seed": _at_least(0),
    "validate.official_train_per_class": _at_least(1),
    "validate.official_test_per_class": _at_least(1),
    "validate.min_side": _at_least(1),
    "validate.max_quarantine_fraction": _FRACTION_OPEN_TOP,
    "preprocess.resize": _at_least(16),
    "preprocess.crop": _at_least(16),
    "preprocess.val_fraction": _FRACTION_OPEN,
    "preprocess.seed": _at_least(0),
    "preprocess.workers": _at_least(0),
    "evaluate.batch_size": _at_least(1),
    "evaluate.latency_warmup": _at_least(0),
    "evaluate.latency_runs": _at_least(1),
    "evaluate.throughput_batch": _at_least(1),
    "evaluate.bootstrap_samples": _at_least(1),
    "evaluate.ece_bins": _at_least(1),
    "evaluate.seed": _at_least(0),
    "export.opset": _at_least(17),
    "export.max_abs_logit_diff": _POSITIVE,
    "export.min_top1_agreement": _FRACTION_OPEN_BOTTOM,
    "export.calibration_size": _at_least(1),
    "export.calibration_batch": _at_least(1),
    "export.batch_size": _at_least(1),
    "export.threads": _at_least(1),
    "export.latency_warmup": _at_least(0),
    "export.latency_runs": _at_least(1),
    "export.throughput_batch": _at_least(1),
    "export.throughput_runs": _at_least(1),
    "export.bootstrap_samples": _at_least(1),
    "export.significance": _FRACTION_OPEN,
    "export.seed": _at_least(0),
    "confusion.top_pairs": _at_least(1),
    "confusion.group_threshold": _FRACTION_OPEN_BOTTOM,
    "confusion.examples_per_pair": _at_least(0),
    "robustness.within_points": _at_least(0),
    "robustness.batch_size": _at_least(1),
    "robustness.bootstrap_samples": _at_least(1),
    "robustness.most_hurt_classes": _at_least(1),
    "robustness.seed": _at_least(0),
    "report.latency_budget_ms": _POSITIVE,
    "report.within_points": _at_least(0),
    "alerts.min_timing_effect": _FRACTION_OPEN,
    "alerts.max_load_per_core": _POSITIVE,
    "alerts.max_other_cpu_share": _FRACTION_OPEN_BOTTOM,
    **{f"train.{name}": rule for name, rule in _TRAIN_RULES.items()},
}


def _check_ranges(config: Config) -> None:
    """Every value against its range, then the rules that tie values together, then the paths."""
    for name, (test, requirement) in _RULES.items():
        _check_value(name, _get_dotted(config, name), test, requirement)
    data = config.data
    checks = [
        (config.preprocess.crop <= config.preprocess.resize, "preprocess.crop must be <= preprocess.resize"),
        (config.validate.max_side >= config.validate.min_side,
         "validate.max_side must be at least validate.min_side"),
        (len(config.models) >= 1, "models must list at least one model"),
        (len(set(config.models)) == len(config.models), "models must not repeat a name"),
        (data.source != "local" or bool(data.local_path),
         "data.source=local needs data.local_path (an extracted Food-101 folder or the .tar.gz)"),
        (data.source != "imagefolder" or bool(data.local_path),
         "data.source=imagefolder needs data.local_path (a folder of <class>/ folders, or of train/ and test/)"),
        # Verification of the official archive cannot be switched off by an empty checksum.
        (data.source != "food101" or bool(_MD5.fullmatch(data.md5)),
         f"data.md5 must be the archive's 32-character MD5 (got {data.md5!r}); the official one is "
         "85eeb15f3717b99a5da872d97d918f87"),
        (data.source != "food101" or data.url.startswith(("http://", "https://")),
         f"data.url must start with http:// or https:// (got {data.url!r}); for a file on this machine "
         "use data.source=local with data.local_path"),
        (not isinstance(data.classes, int) or data.classes >= 1,
         f"data.classes must be at least 1 (got {data.classes!r}), a list of class names, or null for all"),
        (not isinstance(data.classes, list) or len(data.classes) >= 1,
         "data.classes must name at least one class (or be null for all)"),
        (not isinstance(data.classes, list) or len(set(data.classes)) == len(data.classes),
         "data.classes must not repeat a class"),
        (config.orchestration.task_runner != "dask" or bool(config.orchestration.dask_address),
         "orchestration.task_runner=dask needs orchestration.dask_address (tcp://host:8786)"),
        (bool(config.tracking.experiment.strip()), "tracking.experiment must not be empty"),
        (not config.alerts.notify_url or config.alerts.notify_url.startswith(("http://", "https://")),
         f"alerts.notify_url must start with http:// or https:// (got {config.alerts.notify_url!r}), or be null"),
        (bool(config.report.title.strip()), "report.title must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_schedule(config.schedule)
    _check_export(config.export)
    _check_model_names(config.models)
    _check_robustness(config.robustness)
    _check_ensembles(config.ensembles, config.models)
    # Overrides may name models that are not benchmarked this time (`--set models=[...]`), but
    # each must be a real model and a valid recipe: a typo is an error, not a silently unused key.
    _check_model_names(list(config.train.overrides), where="train.overrides")
    for model, changes in config.train.overrides.items():
        recipe = config.train.for_model(model)
        for name, (test, requirement) in _TRAIN_RULES.items():
            where = f"train.overrides.{model}.{name}" if name in changes else f"train.{name}"
            _check_value(where, getattr(recipe, name), test, requirement)
    _check_paths(config)


def _get_dotted(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_value(name: str, value: Any, test: typing.Callable[[Any], bool], requirement: str) -> None:
    if value is not None and not test(value):
        raise ConfigError(f"{name} must be {requirement} (got {value!r})")


def _check_schedule(schedule: ScheduleConfig) -> None:
    fields = schedule.cron.split()
    if not (schedule.cron.strip() in _CRON_MACROS
            or (len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields))):
        raise ConfigError(f"schedule.cron {schedule.cron!r} is not a cron expression of five fields "
                          "(minute hour day month weekday, for example '0 3 * * 1')")
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(schedule.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"schedule.timezone {schedule.timezone!r} is not a known time zone "
                          "(for example UTC or Europe/Zurich)") from exc


def _check_robustness(settings: RobustnessConfig) -> None:
    """Known corruptions with one strength per severity, severities among SEVERITIES."""
    if not settings.corruptions or not settings.severities:
        raise ConfigError("robustness.corruptions and robustness.severities must each list at least one entry")
    for where, names in (("robustness.corruptions", settings.corruptions), ("robustness.levels", settings.levels)):
        for name in names:
            if name not in CORRUPTIONS:
                raise ConfigError(f"{where}: unknown corruption {name!r}{_suggest(name, CORRUPTIONS)} "
                                  f"(known: {', '.join(CORRUPTIONS)})")
    if len(set(settings.corruptions)) != len(settings.corruptions):
        raise ConfigError("robustness.corruptions must not repeat a corruption")
    for name in settings.corruptions:
        levels = settings.levels.get(name)
        if levels is None or len(levels) != len(SEVERITIES):
            raise ConfigError(f"robustness.levels.{name} must list {len(SEVERITIES)} strengths, one per severity "
                              f"{SEVERITIES[0]}-{SEVERITIES[-1]} (got {levels!r})")
    for severity in settings.severities:
        if severity not in SEVERITIES:
            nearest = min(SEVERITIES, key=lambda s: abs(s - severity))
            raise ConfigError(f"robustness.severities: {severity!r} is not a severity; robustness.levels lists "
                              f"severities {SEVERITIES[0]}-{SEVERITIES[-1]}; did you mean {nearest}?")
    if len(set(settings.severities)) != len(settings.severities):
        raise ConfigError("robustness.severities must not repeat a severity")
    _check_model_names([settings.baseline_model], where="robustness.baseline_model")


def _check_ensembles(ensembles: list[EnsembleConfig], models: list[str]) -> None:
    """Unique names that are not model names, members among this run's models, two at least."""
    seen: set[str] = set()
    for ensemble in ensembles:
        where = f"ensembles: {ensemble.name!r}"
        if not ensemble.name.strip() or "/" in ensemble.name:
            raise ConfigError(f"ensembles: name {ensemble.name!r} must be a non-empty name without '/'")
        if ensemble.name in models:
            raise ConfigError(f"{where} is also a model name; give the ensemble a name of its own")
        if ensemble.name in seen:
            raise ConfigError(f"{where} appears twice; ensemble names must be unique")
        seen.add(ensemble.name)
        if ensemble.method not in ENSEMBLE_METHODS:
            raise ConfigError(f"{where}: method {ensemble.method!r} is not one of {', '.join(ENSEMBLE_METHODS)}"
                              f"{_suggest(ensemble.method, ENSEMBLE_METHODS)}")
        for member in ensemble.members:
            if member not in models:
                raise ConfigError(f"{where}: member {member!r} is not in models ({', '.join(models)})"
                                  f"{_suggest(member, models)}")
        if len(set(ensemble.members)) != len(ensemble.members) or len(ensemble.members) < 2:
            raise ConfigError(f"{where} needs at least two different members (got {ensemble.members})")


def _check_export(settings: ExportConfig) -> None:
    """Each target has the budget its rule needs, and serve_target names a target."""
    needs = {"max_accuracy_under_p95": "max_p95_ms", "max_accuracy_under_size": "max_size_mb"}
    if settings.serve_target not in settings.targets:
        raise ConfigError(f"export.serve_target {settings.serve_target!r} is not one of export.targets "
                          f"({', '.join(settings.targets)}){_suggest(settings.serve_target, settings.targets)}")
    for name, target in settings.targets.items():
        budget = needs.get(target.rule)
        if budget and (getattr(target, budget) is None or getattr(target, budget) <= 0):
            raise ConfigError(f"export.targets.{name}.{budget} must be a positive number for rule {target.rule}")


def _check_paths(config: Config) -> None:
    """Refuse paths that would make an output replace the project, the sample or another output.

    Stages replace their output folders whole; a path parameter pointing at the project, the
    home folder or a folder holding another path would delete far more than the stage wrote.
    """
    project, home = config.project_dir.resolve(), Path.home().resolve()
    paths = {f.name: Path(getattr(config.paths, f.name)).resolve() for f in dataclasses.fields(Paths)}
    sample = paths["sample"]
    for name, path in paths.items():
        where = f"paths.{name}"
        if project.is_relative_to(path):
            raise ConfigError(f"{where} is {path}, which holds the whole project {project}; "
                              "point it at a folder of its own inside the project")
        if home.is_relative_to(path):
            raise ConfigError(f"{where} is {path}, which holds the home folder {home}; "
                              "point it at a folder of its own")
        if name != "sample" and path.is_relative_to(sample):
            raise ConfigError(f"{where} is {path}, inside paths.sample ({sample}), the bundled photos; "
                              "point it at a folder outside the sample")
    for name, path in paths.items():
        if name == "sample":
            continue
        for other, other_path in paths.items():
            if other != name and other_path.is_relative_to(path):
                raise ConfigError(f"paths.{name} ({path}) contains paths.{other} ({other_path}); every "
                                  "path needs a folder of its own (an output folder is replaced whole)")


def _check_model_names(models: list[str], where: str = "models") -> None:
    """Each name resolves to a model (torchvision, timm:NAME or package.module:function)."""
    # Imported lazily: config loading must stay fast for `--help` and tests.
    from food101.models import UnknownModel, resolve_model

    for name in models:
        try:
            resolve_model(name)
        except UnknownModel as exc:
            raise ConfigError(f"{where}: {exc}") from exc
