"""The benchmark DAG as one Prefect flow, `food101`.

    download -> validate -> preprocess -> train[m] -> evaluate[m] (per model, in parallel)
                                                                  -> export[m] (per model)
                                                                  -> robustness[m] (per model)
                                                                  -> ensemble -> confusion -> report

Each stage is a task in tasks/ that reads its inputs from files and writes its outputs to files
(the same functions `dvc repro` runs through `food101 stage`). The flow adds what only an
orchestrator can: the fan-out over models, isolation of one model's failure from the others,
one MLflow parent run around everything, and the comparison with the previous benchmark.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from food101 import history, notify, registry, serving
from food101.config import Config, load_config
from food101.runlock import run_lock
from food101.timing import QUIET
from food101.tracking import Run, client_for, finish_run, start_benchmark_run, status_for
from food101.versioning import record_outputs
from tasks.confusion import confusion
from tasks.download import download
from tasks.ensemble import ensemble
from tasks.evaluate import evaluate, read_metrics
from tasks.export import export
from tasks.preprocess import preprocess
from tasks.report import report
from tasks.robustness import headlines as robustness_headlines
from tasks.robustness import robustness
from tasks.train import train
from tasks.validate import validate

log = logging.getLogger(__name__)

FLOW_NAME = "food101"
DEPLOYMENT_NAME = "benchmark"

# The DAG's stages in order; dvc.yaml lists the same names (tests/test_dag.py checks it).
STAGES = {
    "download": download,
    "validate": validate,
    "preprocess": preprocess,
    "train": train,
    "evaluate": evaluate,
    "export": export,
    "robustness": robustness,
    "ensemble": ensemble,  # from the members' saved probabilities: no training
    "confusion": confusion,
    "report": report,
}
PER_MODEL_STAGES = ("train", "evaluate", "export", "robustness")


class AllModelsFailed(RuntimeError):
    """No model could be trained and evaluated, so there is nothing to compare."""


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True,
      on_failure=[notify.failure_hook])  # alerts.notify_url / notify_block: off by default
def benchmark(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str | None = None,
) -> dict[str, Any]:
    """Benchmark every model in params.yaml on Food-101 and publish the report."""
    if deployment.id:  # parameters from the Prefect API: only what a run may change
        profile, overrides, params_file = serving.deployment_run_parameters(profile, overrides, params_file)
    config = load_config(Path(params_file) if params_file else None, profile, overrides)
    with run_lock(config):  # one run per outputs folder; re-entered when `food101 run` holds it
        log.info("benchmark %s: profile %s, models %s", FLOW_NAME, config.profile, ", ".join(config.models))
        parent = start_benchmark_run(config, {"prefect_flow_run_id": flow_run.id or "none"})
        status = "FAILED"
        try:
            result = run_stages(config, parent.run_id)
            status = "FINISHED"
            return result
        except BaseException as exc:
            status = status_for(exc)
            raise
        finally:
            finish_run(parent, status)


def run_stages(config: Config, parent_run_id: str) -> dict[str, Any]:
    """The DAG itself: call each stage in order, fanning out per model."""
    stage = STAGES
    stage["download"](config, parent_run_id)
    data = stage["validate"](config, parent_run_id)
    stage["preprocess"](config, parent_run_id)

    # Train every model at once; the train task itself serialises models that share a device.
    # As each training finishes, its evaluation starts, so evaluation overlaps later trainings.
    trainings = {
        stage["train"].submit(config, model, parent_run_id): model for model in config.models
    }
    evaluations = {}
    failures: dict[str, str] = {}
    for future in as_completed(list(trainings)):
        model = trainings[future]
        future.wait()  # as_completed can yield before the future's state is final
        if future.state.is_completed():
            evaluations[model] = stage["evaluate"].submit(config, model, parent_run_id)
        else:
            failures[model] = f"training failed: {_state_error(future.state)}"
    evaluated: dict[str, dict[str, Any]] = {}
    robust: dict[str, Any] = {}  # robustness[model] runs beside confusion; a failure leaves the model in
    exports: dict[str, Any] = {}  # export[model] likewise: a failed export is marked in the report
    for model, future in evaluations.items():
        future.wait()
        if future.state.is_completed():
            evaluated[model] = future.result()
            robust[model] = stage["robustness"].submit(config, model, parent_run_id)
            exports[model] = stage["export"].submit(config, model, parent_run_id)
        else:
            failures[model] = f"evaluation failed: {_state_error(future.state)}"
    for model, reason in failures.items():
        log.error("model %s is out of this benchmark: %s", model, reason)

    models = [m for m in config.models if m in evaluated]  # keep params.yaml's order
    if not models:
        stage["report"](config, [], failures, parent_run_id)
        raise AllModelsFailed(f"every model failed: {failures}")
    with QUIET.heavy():  # beside robustness and export, but not while export times a runtime
        ensembles = stage["ensemble"](config, models, parent_run_id)
        failures.update({name: reason for name, reason in ensembles["skipped"].items()})
        compared = models + list(ensembles["ensembles"])  # ensembles appear wherever a model does
        stage["confusion"](config, compared, parent_run_id)
    # Robustness before the comparison: its figures are compared with the last benchmark's.
    robustness_failures = _wait_per_model(robust, "robustness", "robustness results")
    comparison = compare_with_previous(config, parent_run_id, compared)
    export_failures = _wait_per_model(exports, "export", "deployable export")
    published = stage["report"](config, compared, failures, parent_run_id)  # renders the comparison too
    dvc = record_outputs(config) if not failures and not robustness_failures and not export_failures else None
    if dvc is not None:
        log.info("DVC: %s", dvc.reason)
    # Last, so that a regression still leaves a complete report, registry and DVC record behind.
    registered = register_and_gate(config, parent_run_id, models, published["recommended"], comparison,
                                   list(ensembles["ensembles"]))
    return {
        "profile": config.profile,
        "parent_run_id": parent_run_id,
        "models": {m: evaluated[m] for m in models},
        "ensembles": ensembles["ensembles"],
        "failures": failures,
        "robustness_failures": robustness_failures,
        "export_failures": export_failures,
        "data": data,
        "report": published,
        "registry": registered,
        "comparison": {"previous": comparison["previous"], "regressions": comparison["regressions"]},
    }


def register_and_gate(
    config: Config, parent_run_id: str, models: list[str], recommended: str, comparison: dict[str, Any],
    ensembles: list[str] | None = None,
) -> dict[str, Any]:
    """Register every model, then pass the regression gate, then move `champion`: a benchmark
    that raises RegressionDetected leaves its versions registered and the alias where it was."""
    registered = registry.register_models(config, parent_run_id, models, recommended, ensembles)
    history.raise_if_regressed(config, comparison)
    return registry.promote_champion(config, registered)


def compare_with_previous(config: Config, parent_run_id: str, models: list[str]) -> dict[str, Any]:
    """Record this benchmark on its MLflow run, compare it with the last one on the same data and
    evaluation settings (or say what differs from the latest), and notify of regressions."""
    parent = Run(client_for(config), parent_run_id)
    metrics = {m: read_metrics(config, m) for m in models}
    for model, figures in robustness_headlines(config, models).items():
        metrics[model].update({k: v for k, v in figures.items() if k != "ce"})
    record = history.record_benchmark(config, parent, metrics, history.hardware_description())
    previous = history.find_previous(config, parent.client, parent_run_id, record.key)
    latest = None if previous else history.find_latest(config, parent.client, parent_run_id)
    comparison = history.compare(record, previous, config.alerts, latest)
    trend = history.trend_frame(config, parent.client, include_run_id=parent_run_id)
    history.plot_trends(trend, history.trends_path(config))
    history.write_history(config, comparison, trend)
    regressions = history.flag_regressions(parent, comparison)
    for regression in regressions:
        log.warning("regression: %s", regression.get("message") or regression["reason"])
    if comparison["not_comparable"]:
        log.info("%s", comparison["not_comparable"]["message"])
    notify.notify_regressions(config, comparison)
    return comparison


def _wait_per_model(futures: dict[str, Any], stage: str, missing: str) -> dict[str, str]:
    """Wait for every `stage`[model] beside the main line (export, robustness); a failed one is
    logged and returned, and the others stand (its own output file records it for the report)."""
    failed = {}
    for model, future in futures.items():
        future.wait()
        if not future.state.is_completed():
            failed[model] = f"{stage} failed: {_state_error(future.state)}"
            log.error("model %s has no %s in this benchmark: %s", model, missing, failed[model])
    return failed


def _state_error(state: Any) -> str:
    """The exception message behind a failed task state (Prefect keeps it in the state's result)."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return state.message or state.name


def flow_for(config: Config, base: Any = benchmark) -> Any:
    """The flow with the task runner that `orchestration` asks for (threads, or a Dask cluster)."""
    if config.orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        _make_torch_classes_picklable()

        return base.with_options(task_runner=DaskTaskRunner(address=config.orchestration.dask_address))
    return base


def serve_deployment(
    config: Config, params_file: Path, profile: str | None, overrides: dict[str, Any] | None
) -> None:
    """Register deployment food101/benchmark with its weekly schedule and execute its runs.

    One benchmark at a time (global_limit=1): two would fight over the same GPUs and files.
    The params file and --set overrides reach the runs through the environment (food101.serving),
    so a run started through the API cannot replace them.
    """
    import os

    from prefect.schedules import Cron

    os.environ.update(serving.served_environment(str(params_file), overrides))
    flow_for(config).serve(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(config.schedule.cron, timezone=config.schedule.timezone)],
        parameters={"profile": profile, "overrides": None},
        global_limit=1,
        description=f"Weekly Food-101 re-benchmark ({config.profile}): {', '.join(config.models)}",
        tags=["food101", config.profile],
    )


def _make_torch_classes_picklable() -> None:
    """Let cloudpickle ship our task functions to Dask workers.

    A task function is pickled by value (its module name points at the Task, not the function),
    and cloudpickle then also pickles submodules whose names appear in the code: `cache.classes`
    drags in `torch.classes`, a module object that cannot be pickled. Send it by reference.
    """
    import copyreg

    import torch

    copyreg.pickle(type(torch.classes), _torch_classes_reference)


def _torch_classes_reference(_: object) -> tuple[Any, tuple[Any, str]]:
    import torch

    return getattr, (torch, "classes")
