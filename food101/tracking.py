"""MLflow: one parent run per benchmark, one nested run per stage (and per model).

Runs are driven through `MlflowClient` with explicit run ids rather than `mlflow.start_run`:
Prefect runs tasks in worker threads (or Dask processes) where MLflow's active-run stack is
not inherited, and an explicit id cannot land in the wrong run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from food101.config import Config, flatten

log = logging.getLogger(__name__)

_experiment_lock = threading.Lock()

PID_TAG = "pid"
STARTED_TAG = "process_started"


def tracking_uri(config: Config) -> str:
    """MLFLOW_TRACKING_URI when set (a shared server), else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{config.paths.tracking_db}"


def client_for(config: Config) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(config))


def experiment_id(config: Config, client: MlflowClient) -> str:
    """The benchmark's experiment, created on first use (artifacts under paths.tracking_artifacts)."""
    with _experiment_lock:
        found = client.get_experiment_by_name(config.tracking.experiment)
        if found is not None:
            return found.experiment_id
        # A server decides its own artifact store; a local SQLite backend keeps them in the project.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else config.paths.tracking_artifacts.as_uri()
        return client.create_experiment(config.tracking.experiment, artifact_location=location)


@dataclass
class Run:
    """A handle on one MLflow run, safe to use from any thread."""

    client: MlflowClient
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters and a batch at 100 params.
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    @property
    def info(self):
        return self.client.get_run(self.run_id).info


class ResourceMonitor:
    """Wall time, CPU time and peak resident memory of this process (and its children).

    Peak memory is sampled on a background thread; with stages running concurrently in one
    process the figures cover the whole process, which is what the machine had to provide.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="resource-monitor")

    def __enter__(self) -> ResourceMonitor:
        self.start_wall = time.perf_counter()
        self.start_cpu = self._cpu_seconds()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()
        self.wall_s = time.perf_counter() - self.start_wall
        self.cpu_s = self._cpu_seconds() - self.start_cpu

    def metrics(self) -> dict[str, float]:
        return {
            "stage_wall_time_s": self.wall_s,
            "stage_cpu_time_s": self.cpu_s,
            "stage_peak_rss_mb": self.peak_rss / 2**20,
        }

    def _cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def _sample_once(self) -> None:
        rss = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss += child.memory_info().rss  # a child may exit between listing and reading
        self.peak_rss = max(self.peak_rss, rss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_once()


def git_commit(project_dir: Path) -> str:
    """The project's git commit, with '+dirty' when the work tree has changes; 'none' outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "none"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def base_tags(config: Config) -> dict[str, str]:
    """Tags of every run; host, pid and process_started tell a later run whether its writer is alive."""
    return {
        "profile": config.profile,
        "git_commit": git_commit(config.project_dir),
        "config_hash": config.digest(),
        "host": platform.node(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: repr(psutil.Process().create_time()),
    }


def status_for(exc: BaseException) -> str:
    """The MLflow status of a run ended by `exc`: KILLED for a signal or Ctrl-C, else FAILED."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def _running_runs(config: Config) -> tuple[MlflowClient, list[Any]]:
    client = client_for(config)
    found = client.get_experiment_by_name(config.tracking.experiment)
    if found is None:
        return client, []
    runs = client.search_runs(
        [found.experiment_id], f"attributes.status = 'RUNNING' AND tags.host = '{platform.node()}'",
        max_results=10_000,
    )
    return client, list(runs)


def _writer_alive(tags: dict[str, str]) -> bool:
    """Whether the process that created a run still runs (the same PID and start time: no reuse)."""
    try:
        return abs(psutil.Process(int(tags[PID_TAG])).create_time() - float(tags[STARTED_TAG])) < 0.5
    except psutil.NoSuchProcess:
        return False


def mark_dead_runs_killed(config: Config) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (killed before it could say so).

    Runs without a pid tag (written before runs carried one) are left as they are.
    """
    client, runs = _running_runs(config)
    killed = []
    for run in runs:
        tags = run.data.tags
        if PID_TAG in tags and STARTED_TAG in tags and not _writer_alive(tags):
            client.set_tag(run.info.run_id, "error", f"process {tags[PID_TAG]} was killed")
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_name or run.info.run_id)
    return killed


def mark_runs_killed(config: Config, pid: int) -> list[str]:
    """Mark KILLED the RUNNING runs that process `pid` created on this host (it is being stopped)."""
    client, runs = _running_runs(config)
    killed = []
    for run in runs:
        if run.data.tags.get(PID_TAG) == str(pid):
            client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_name or run.info.run_id)
    return killed


def start_benchmark_run(config: Config, extra_tags: dict[str, Any] | None = None) -> Run:
    """Create the parent run of one benchmark and log the effective configuration."""
    client = client_for(config)
    exp = experiment_id(config, client)
    tags = {**base_tags(config), "kind": "benchmark", **{k: str(v) for k, v in (extra_tags or {}).items()}}
    run = client.create_run(exp, run_name=f"benchmark-{config.profile}", tags=tags)
    handle = Run(client, run.info.run_id)
    handle.log_params(config.to_dict())
    return handle


def finish_run(run: Run, status: str = "FINISHED") -> None:
    run.client.set_terminated(run.run_id, status)


@contextlib.contextmanager
def stage_run(
    config: Config,
    stage: str,
    parent_run_id: str | None,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    system_metrics: bool = False,
) -> Iterator[Run]:
    """A nested MLflow run for one stage: params in, resources and status out.

    Without a parent (a stage run by `dvc repro`) the run stands alone, tagged `kind=stage`.
    """
    client = client_for(config)
    exp = experiment_id(config, client)
    name = f"{stage}[{model}]" if model else stage
    tags = {**base_tags(config), "kind": "stage", "stage": stage, MLFLOW_RUN_NAME: name}
    if model:
        tags["model"] = model
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = Run(client, client.create_run(exp, run_name=name, tags=tags).info.run_id)
    if params:
        run.log_params(params)
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # The project's store, not MLflow's default (mlflow.db in whatever directory this runs in).
        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=5, samples_before_logging=1,
                                       tracking_uri=tracking_uri(config))
        monitor.start()
    status = "FAILED"
    try:
        with ResourceMonitor() as resources:
            yield run
        status = "FINISHED"
    except BaseException as exc:
        status = status_for(exc)
        run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if status == "FINISHED":
            run.log_metrics(resources.metrics())
        client.set_terminated(run.run_id, status)
