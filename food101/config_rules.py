"""The range and consistency rules a configuration must pass once built (`_check_ranges`).

Separate from food101/config.py, which reads, merges and types the parameters: this module holds
only the table of allowed values per parameter and the checks that tie parameters together.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from food101.config import (
    CORRUPTIONS,
    ENSEMBLE_METHODS,
    SEVERITIES,
    Config,
    ConfigError,
    EnsembleConfig,
    ExportConfig,
    Paths,
    RobustnessConfig,
    ScheduleConfig,
    _suggest,
)

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
    "color_jitter": _FRACTION_OPEN_TOP,  # 0: no colour jitter
    "ema_half_life_epochs": _at_least(0),  # 0: no moving average of the weights
    "backbone_lr_scale": _FRACTION_OPEN_BOTTOM,  # the backbone's LR / the head's
    "backbone_lr_decay": _FRACTION_OPEN_BOTTOM,  # the backbone's first layers' LR / its last layers'
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
    "evaluate.latency_threads": _at_least(0),
    "evaluate.settle_s": _at_least(0),
    "evaluate.settle_cpu_share": _FRACTION_OPEN_BOTTOM,
    "evaluate.timing_processes": _at_least(1),
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
