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
    backbone_lr_decay: float
    frozen_batchnorm: bool
    head_init: Literal["zero", "probe"]
    min_scale: float
    color_jitter: float
    ema_half_life_epochs: float
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
    latency_threads: int = 1  # intra-op CPU threads for batch-1 latency (0 = all cores); throughput uses all
    settle_s: float = 30.0  # before timing, wait at most this long for other processes to quieten (0 = no wait)
    settle_cpu_share: float = 0.1  # ... until they use at most this share of all cores
    timing_processes: int = 5  # CPU timings: this many fresh probe processes, the runs shared out


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
    # Imported here: the rules module imports this module's dataclasses.
    from food101.config_rules import _check_ranges

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
