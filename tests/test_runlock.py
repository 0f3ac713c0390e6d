"""One run per outputs folder: a second `food101 run`/`stage`/flow is refused while one holds the
lock, the kernel frees the lock of a killed holder, and the next holder cleans up after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, generated_overrides, make_config

HOLDER = """
import json, sys, time
from pathlib import Path
from food101.config import load_config
from food101.runlock import run_lock
config = load_config(Path(sys.argv[1]), profile="demo", overrides=json.loads(sys.argv[2]))
with run_lock(config):
    print("held", flush=True)
    time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _set_args(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture
def holder(tmp_path: Path):
    """A second process holding the run lock of the outputs under tmp_path."""
    overrides = generated_overrides(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(REPO / "params.yaml"), json.dumps(overrides)],
        stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
    )
    try:
        assert process.stdout.readline().strip() == "held", "the holder did not take the lock"
        yield process, overrides
    finally:
        process.kill()
        process.wait(timeout=30)


def test_second_stage_exits_2_naming_the_holder_and_the_lock_frees_when_the_holder_is_killed(holder, tmp_path):
    from food101.runlock import run_lock

    process, overrides = holder
    second = subprocess.run(
        [sys.executable, "-m", "food101", "stage", "validate", "--profile", "demo", *_set_args(overrides)],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()[-1]
    assert f"PID {process.pid}" in message
    assert "--wait" in message
    assert not (tmp_path / "data" / "manifest").exists(), "the refused stage wrote its outputs anyway"

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    with run_lock(make_config(tmp_path)):  # no stale lock: the kernel released it with the process
        pass


def test_flow_refuses_to_start_while_another_process_holds_the_lock(holder, prefect_harness):
    from flows.benchmark import benchmark
    from food101.runlock import RunLocked

    process, overrides = holder
    with pytest.raises(RunLocked, match=f"PID {process.pid}"):
        benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))


def test_lock_is_keyed_on_the_outputs_folder_and_reentrant(tmp_path):
    from food101.config import load_config
    from food101.runlock import lock_path, run_lock

    first, second = make_config(tmp_path / "a"), make_config(tmp_path / "b")
    assert lock_path(first) == tmp_path / "a" / ".state" / "run.lock"
    assert lock_path(load_config(REPO / "params.yaml")) == REPO / ".state" / "run.lock"
    with run_lock(first), run_lock(second), run_lock(first):  # the flow inside `food101 run` re-enters
        assert str(os.getpid()) in lock_path(first).read_text()


def test_scattered_outputs_fall_back_to_the_project_folder(tmp_path):
    from food101.runlock import lock_path

    config = make_config(tmp_path, **{"paths__cache": "/var/tmp/food101-cache-elsewhere"})
    assert lock_path(config) == REPO / ".state" / "run.lock"


def test_next_holder_cleans_up_after_a_killed_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from food101.runlock import run_lock
    from food101.tracking import base_tags, client_for, experiment_id

    config = make_config(tmp_path)
    client = client_for(config)
    exp = experiment_id(config, client)
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_tags = {**base_tags(config), "pid": str(dead.pid), "process_started": "1.0"}
    dead_run = client.create_run(exp, tags=dead_tags).info.run_id
    live_run = client.create_run(exp, tags=base_tags(config)).info.run_id  # this process: alive
    stale_file = tmp_path / "artifacts" / "models" / "m" / ".checkpoint.pt.tmp-abcd1234"
    stale_dir = tmp_path / "data" / ".raw.tmp-k2j3h4g5"
    stale_sibling = tmp_path / "data" / ".dataset.json.tmp-zzzz9999"
    # Every stage's folder counts, the later stages' too (a killed export left these once).
    stale_export = tmp_path / "artifacts" / "export" / ".resnet50.tmp-p4jk3fpn"
    stale_robustness = tmp_path / "artifacts" / "robustness" / ".resnet50.tmp-q8w7e6r5"
    kept = tmp_path / "data" / "raw" / "food-101.tar.gz.part"
    for path in (stale_file, stale_sibling, kept, stale_export, stale_robustness):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (stale_dir / "images").mkdir(parents=True)

    with run_lock(config):
        pass

    assert not stale_file.exists() and not stale_dir.exists() and not stale_sibling.exists()
    assert not stale_export.exists() and not stale_robustness.exists()
    assert kept.exists(), "a resumable partial download is not a temporary file"
    fresh = MlflowClient(f"sqlite:///{config.paths.tracking_db}")
    assert fresh.get_run(dead_run).info.status == "KILLED"
    assert fresh.get_run(live_run).info.status == "RUNNING"
    assert psutil.pid_exists(os.getpid())


def test_wait_queues_behind_the_holder(holder, tmp_path):
    import threading

    from food101.runlock import run_lock

    process, _ = holder
    acquired = threading.Event()

    def second() -> None:
        with run_lock(make_config(tmp_path), wait=True):
            acquired.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    assert not acquired.wait(2), "--wait took a lock that another process holds"
    process.send_signal(signal.SIGKILL)
    assert acquired.wait(60), "--wait did not get the lock after its holder died"
