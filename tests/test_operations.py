"""Operations: a real MLflow server, a Dask cluster, and DVC after a flow run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.benchmark import PER_MODEL_STAGES, benchmark, flow_for
from tests.conftest import REPO, generated_overrides, make_config
from tests.test_deployment import call, free_port, healthy, make_server, process, wait_until
from tests.test_dvc import project_copy, run

pytestmark = pytest.mark.slow

FAST = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "train.overrides": {}, "evaluate.latency_runs": 3,
        "evaluate.bootstrap_samples": 50, "evaluate.settle_s": 0}


def child_structure(client: MlflowClient, parent_run_id: str) -> set[tuple[str, str | None]]:
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {(r.data.tags["stage"], r.data.tags.get("model")) for r in children}


def test_flow_logs_to_a_real_mlflow_server(tmp_path: Path, prefect_harness, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts")]
    with process(cmd, env, tmp_path / "mlflow.log") as server:
        wait_until(lambda: healthy(f"{uri}/health"), 90, "the MLflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        # Two models: per-model stages still fan out, for one export (the slowest stage) fewer.
        result = benchmark(profile="demo", overrides=generated_overrides(tmp_path / "out") | FAST | {
            "models": ["efficientnet_b0", "mobilenet_v3_large"]}, params_file=str(REPO / "params.yaml"))
        client = MlflowClient(uri)
        assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
        assert len(child_structure(client, result["parent_run_id"])) >= 9
        local = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
        assert local.get_experiment_by_name("food101") is None  # nothing went to the local fallback
        assert any((tmp_path / "server-artifacts").rglob("report.html"))
    assert server.poll() is not None


def stage_pids(client: MlflowClient, parent_run_id: str) -> dict[tuple[str, str | None], int]:
    """(stage, model) -> the PID of the process that ran the stage (each stage run's `pid` tag)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {(r.data.tags["stage"], r.data.tags.get("model")): int(r.data.tags["pid"]) for r in children}


def test_mlflow_server_from_make_refuses_other_hosts_and_origins(tmp_path: Path):
    """`make mlflow-server` answers on loopback only, and only to its own Host and Origin names."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = make_server("mlflow-server", tmp_path, MLFLOW_PORT=port, MLFLOW_DB=tmp_path / "server.db",
                      MLFLOW_ARTIFACTS=tmp_path / "server-artifacts")
    with process(cmd, dict(os.environ), tmp_path / "mlflow.log") as server:
        wait_until(lambda: healthy(f"{uri}/health"), 90, "the MLflow server")
        create = f"{uri}/api/2.0/mlflow/experiments/create"

        def created(name: str, headers: dict[str, str]) -> int:
            body = f'{{"name": "{name}"}}'.encode()
            return call(create, "POST", {"Content-Type": "application/json", **headers}, body)[0]

        assert created("from-a-page", {"Origin": "http://evil.example"}) == 403
        assert created("rebound", {"Host": f"evil.example:{port}"}) == 403
        # A form post needs no preflight: refused all the same.
        assert created("form", {"Origin": "http://evil.example", "Content-Type": "text/plain"}) == 403
        assert created("own-client", {}) == 200
        client = MlflowClient(uri)
        names = {e.name for e in client.search_experiments()}
        assert "own-client" in names and not names & {"from-a-page", "rebound", "form"}
    assert server.poll() is not None


def test_dask_task_runner_leaves_the_same_mlflow_structure(tmp_path: Path, demo_run):
    """The Dask runner's MLflow runs against the shared demo run's (the thread runner, in this process)."""
    from distributed import Client, LocalCluster

    by_threads = demo_run["result"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as dask:
            worker_pids = set(dask.run(os.getpid).values())
        dask_overrides = generated_overrides(tmp_path / "dask") | FAST | {
            "orchestration.task_runner": "dask", "orchestration.dask_address": cluster.scheduler_address}
        config = make_config(tmp_path / "dask", **{k.replace(".", "__"): v for k, v in dask_overrides.items()
                                                   if not k.startswith("paths.")})
        by_dask = flow_for(config)(profile="demo", overrides=dask_overrides, params_file=str(REPO / "params.yaml"))
    threads_client = MlflowClient(f"sqlite:///{demo_run['config'].paths.tracking_db}")
    dask_client = MlflowClient(f"sqlite:///{tmp_path / 'dask' / 'mlflow.db'}")
    structure = child_structure(dask_client, by_dask["parent_run_id"])
    assert structure == child_structure(threads_client, by_threads["parent_run_id"])
    assert len(structure) >= 9
    # Per-model stages (train, evaluate, export, robustness) ran in the Dask workers, the rest here; with
    # the thread runner, everything ran here.
    assert os.getpid() not in worker_pids and len(worker_pids) == 2
    mapped = set(PER_MODEL_STAGES)
    by_worker = stage_pids(dask_client, by_dask["parent_run_id"])
    assert {key for key, pid in by_worker.items() if pid in worker_pids} == {k for k in by_worker if k[0] in mapped}
    assert {pid for key, pid in by_worker.items() if key[0] not in mapped} == {os.getpid()}
    assert set(stage_pids(threads_client, by_threads["parent_run_id"]).values()) == {os.getpid()}


def test_food101_run_with_default_params_leaves_dvc_status_clean(tmp_path: Path):
    root = project_copy(tmp_path / "project")
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
    env.pop("FOOD101_PARAMS", None)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a fresh Prefect home on busy cores
    run(["git", "init", "-q"], root, env)
    # Two models: dvc.yaml's per-model stages are recorded for each model in params, one or many.
    fast = [f"{k}={v}" for k, v in FAST.items()] + ["models=[efficientnet_b0,mobilenet_v3_large]"]
    run(["food101", "params", "--profile", "demo", *sum((["--set", s] for s in fast), []),
         "--write", "params.yaml"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo params"], root, env)
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], root, env)
    done = run(["food101", "run"], root, env)
    assert "Report:" in done.stdout
    assert any(p.is_file() for p in remote.rglob("*"))  # the outputs were pushed to the remote
    status = run(["dvc", "status"], root, env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    assert (root / "dvc.lock").is_file()
    with_override = run(["food101", "run", "--set", "report.within_points=2.0"], root, env)
    assert "Report:" in with_override.stdout
    lock_before = (root / "dvc.lock").read_text()
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=root, capture_output=True,
                          text=True, check=True).stdout == ""
    assert (root / "dvc.lock").read_text() == lock_before  # a run with overrides does not rewrite dvc.lock
