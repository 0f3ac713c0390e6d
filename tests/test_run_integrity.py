"""A benchmark's numbers do not depend on how it ran: twice, killed and resumed, or through `dvc repro`.

These drive the real command line in subprocesses, as a user would, and compare every model's
per-photo test predictions between an uninterrupted run and one killed and resumed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, assert_same_predictions, generated_overrides, make_config

pytestmark = pytest.mark.slow

FOOD101 = str(Path(sys.executable).parent / "food101")
KILLS = 5
# Each attempt is killed this many seconds after it finishes an epoch: inside the training that
# follows (seeded, so a failure can be replayed). Waiting for an epoch, rather than for a fixed time
# from the start, puts every kill in training however fast the machine or the Prefect start-up.
_RNG = random.Random(0)
KILL_AFTER_EPOCH_S = [_RNG.uniform(0.0, 1.5) for _ in range(KILLS)]
RUN_TIMEOUT_S = 900
# The demo profile's models with a shorter recipe: 3 models x 4 epochs = 12 epoch ends, more than
# twice what the five attempts use up (one epoch each, two at most), so each kill lands in training.
EPOCHS = 4
RECIPE = {"train.epochs": EPOCHS, "train.overrides": {}}


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FOOD101_PARAMS", None)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a fresh Prefect home on busy cores
    # Two runs go on at once (the uninterrupted one beside the killed ones): one thread each, as
    # food101.devices advises for processes sharing cores; both runs use the same count.
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_command(root: Path) -> list[str]:
    sets = sum((["--set", f"{k}={v}"] for k, v in (generated_overrides(root) | RECIPE).items()), [])
    return [FOOD101, "run", "--profile", "demo", "--params", str(REPO / "params.yaml"), *sets]


def accuracy_numbers(summary_path: Path) -> dict[str, dict[str, float]]:
    """The accuracy figures of reports/summary.json (timings vary from run to run by nature)."""
    summary = json.loads(summary_path.read_text())
    keep = ("top1", "top1_ci_low", "top1_ci_high", "top5", "macro_f1", "ece", "n_test")
    return {model: {k: v for k, v in row.items() if k in keep} for model, row in summary["models"].items()}


def epochs_done(root: Path) -> int:
    """Epochs finished so far over every model (history.csv is rewritten, atomically, at each epoch's end)."""
    return sum(len(path.read_text().splitlines()) - 1 for path in (root / "artifacts" / "models").glob("*/history.csv"))


def running_mlflow_runs(tracking_db: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{tracking_db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    return [r.info.run_id for r in runs]


def leftover_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_killed_five_times_then_resumed_equals_an_uninterrupted_run(tmp_path: Path):
    """`food101 run --profile demo` twice, the second killed (SIGKILL) in training at five seeded
    points and resumed each time: the same per-photo predictions and accuracy, nothing left behind."""
    env = cli_env()  # TMPDIR: the test run's state folder (conftest), where killed runs leave pymp-*
    # The uninterrupted run, in its own Prefect home, runs while the other is killed and resumed.
    whole_log = tmp_path / "whole.log"
    with open(whole_log, "w") as log:
        uninterrupted_run = subprocess.Popen(
            run_command(tmp_path / "whole"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "PREFECT_HOME": str(tmp_path / "prefect-whole")})
    try:
        descendants = kill_and_resume(run_command(tmp_path / "killed"), env, tmp_path / "killed")
        returncode = uninterrupted_run.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if uninterrupted_run.poll() is None:  # this test failed: stop its server too
            os.killpg(uninterrupted_run.pid, signal.SIGKILL)
            uninterrupted_run.wait(timeout=30)
    assert returncode == 0, whole_log.read_text()[-4000:]

    root = tmp_path / "killed"
    whole = tmp_path / "whole"
    models = sorted(json.loads((whole / "reports" / "summary.json").read_text())["models"])
    assert len(models) >= 3
    assert epochs_done(whole) == epochs_done(root) == EPOCHS * len(models)  # no early stop: every kill was in training
    assert_same_predictions(whole / "artifacts" / "eval", root / "artifacts" / "eval", models)
    resumed, uninterrupted = (accuracy_numbers(r / "reports" / "summary.json") for r in (root, whole))
    assert resumed.keys() == uninterrupted.keys()
    for model, figures in uninterrupted.items():  # ECE sums probabilities: equal to float32 rounding
        assert resumed[model] == pytest.approx(figures, rel=1e-6), model
    assert leftover_temp_files(root) == []
    assert running_mlflow_runs(root / "mlflow.db") == []
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in descendants if psutil.pid_exists(pid) and _not_zombie(pid)]) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive == [], f"processes of killed runs still alive: {[_describe(p) for p in alive]}"


def kill_and_resume(command: list[str], env: dict[str, str], root: Path) -> set[int]:
    """Run `command` writing under `root`, SIGKILL it KILL_AFTER_EPOCH_S after each attempt's first
    finished epoch, then run it to the end; the PIDs of the killed attempts' processes come back."""
    descendants: set[int] = set()
    total = EPOCHS * len(make_config(root).models)
    for attempt, delay in enumerate(KILL_AFTER_EPOCH_S, 1):
        before = epochs_done(root)
        log = root.parent / f"attempt-{attempt}.log"  # a file, not a pipe: a full pipe would stall the run
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=out)
        deadline, kill_at = time.monotonic() + RUN_TIMEOUT_S, None
        while proc.poll() is None and time.monotonic() < (kill_at or deadline):
            descendants |= {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}
            if kill_at is None and epochs_done(root) > before:
                kill_at = time.monotonic() + delay
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.fail(f"attempt {attempt} ended by itself before its kill ({epochs_done(root)} epochs done): "
                        f"{log.read_text()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert kill_at is not None, f"attempt {attempt} finished no epoch in {RUN_TIMEOUT_S} s"
        assert before < epochs_done(root) < total, f"attempt {attempt} was not killed in training"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return descendants


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(pid: int) -> str:
    try:
        return f"{pid} {' '.join(psutil.Process(pid).cmdline())[:200]}"
    except psutil.NoSuchProcess:
        return f"{pid} (gone)"
