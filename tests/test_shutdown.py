"""A stopped `food101 run` leaves nothing running and nothing half-written that a later run trusts.

SIGTERM is handled: children stopped, MLflow runs KILLED, temporary files removed, one line said.
SIGKILL cannot be handled: the children exit on their own, and the next run cleans up the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, generated_overrides

START_TIMEOUT_S = 600  # until training starts: the Prefect server, then three stages on 2 busy cores
EXIT_TIMEOUT_S = 60


def _env() -> dict[str, str]:
    # A fresh PREFECT_HOME migrates its database first: slower than Prefect's 20 s on busy cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


def _food101(root: Path, *args: str) -> list[str]:
    sets = [arg for key, value in generated_overrides(root).items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "food101", *args, "--profile", "demo", *sets]


def _start_and_wait_for_training(root: Path) -> tuple[subprocess.Popen, dict[int, psutil.Process]]:
    """Start a demo run and return once a model has written a checkpoint, with every descendant
    process seen so far (tracked from the start: a killed parent's children lose their link to it)."""
    process = subprocess.Popen(_food101(root, "run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env(), cwd=REPO, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    models = root / "artifacts" / "models"
    while not any(models.glob("*/checkpoint.pt")):
        if process.poll() is not None:
            pytest.fail(f"the run ended before training: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not start in time")
        for child in psutil.Process(process.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
        time.sleep(0.2)
    for child in psutil.Process(process.pid).children(recursive=True):
        seen.setdefault(child.pid, child)
    return process, seen


def _alive(processes: dict[int, psutil.Process]) -> list[str]:
    """The tracked processes still running (is_running also checks the PID was not reused)."""
    alive = []
    for proc in processes.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_until_gone(processes: dict[int, psutil.Process], timeout_s: float = EXIT_TIMEOUT_S) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (alive := _alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _running_runs(root: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'RUNNING'")
    return [run.info.run_name for run in runs]


def _temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*.tmp-*") if ".state" not in path.parts]


def test_sigterm_stops_children_marks_runs_killed_and_removes_temp_files(tmp_path):
    process, seen = _start_and_wait_for_training(tmp_path)
    assert seen, "a demo run starts helper processes (Prefect's server, the forkserver)"
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        process.kill()

    assert process.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert _wait_until_gone(seen, timeout_s=10) == []
    assert _running_runs(tmp_path) == []
    assert _temp_files(tmp_path) == []


def test_sigkill_leaves_no_process_and_the_next_run_cleans_up(tmp_path):
    process, seen = _start_and_wait_for_training(tmp_path)
    assert seen
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=EXIT_TIMEOUT_S)
    assert _wait_until_gone(seen) == []
    assert _running_runs(tmp_path), "a killed run leaves its MLflow runs RUNNING until someone notices"

    # What a kill between a temporary write and its rename leaves behind.
    planted = tmp_path / "artifacts" / "models" / ".best.pt.tmp-k1ll3d00"
    planted.write_bytes(b"half a checkpoint")
    following = subprocess.run(_food101(tmp_path, "stage", "validate"), capture_output=True, text=True,
                               env=_env(), cwd=REPO, timeout=300)
    assert following.returncode == 0, following.stderr[-3000:]
    assert "killed run" in following.stderr
    assert _temp_files(tmp_path) == []
    assert _running_runs(tmp_path) == []
