"""A real Prefect server, `food101 serve`, and `prefect deployment run food101/benchmark`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, generated_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Small enough to finish in about a minute: the point here is the deployment path, not accuracy.
FAST = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.overrides={}", "evaluate.latency_runs=3",
        "evaluate.bootstrap_samples=50"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path):
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # children already gone is the good case
            os.killpg(proc.pid, signal.SIGKILL)


def prefect(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_served_deployment_runs_on_a_real_server(tmp_path: Path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    sets = [f"{k}={v}" for k, v in generated_overrides(tmp_path / "out").items()] + FAST
    serve_cmd = [str(BIN / "food101"), "serve", "--params", str(REPO / "params.yaml"), "--profile", "demo"]
    for item in sets:
        serve_cmd += ["--set", item]

    with process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 server_env, tmp_path / "server.log") as server:
        wait_until(lambda: healthy(f"{api}/health"), 120, "the Prefect server")
        with process(serve_cmd, env, tmp_path / "serve.log") as serving:
            def deployment():
                assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                found = prefect(["deployment", "inspect", "food101/benchmark", "-o", "json"], env)
                return json.loads(found.stdout) if found.returncode == 0 else None

            spec = wait_until(deployment, 120, "deployment food101/benchmark")
            crons = [s["schedule"].get("cron") for s in spec["schedules"]]
            assert crons == ["0 3 * * 1"]
            assert spec["parameters"]["profile"] == "demo"

            started = prefect(["deployment", "run", "food101/benchmark", "--watch", "--watch-timeout", "480"],
                              env, timeout=540)
            assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
            run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
            state = json.loads(prefect(["flow-run", "inspect", run_id, "-o", "json"], env).stdout)
            assert state["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
            assert (tmp_path / "out" / "reports" / "report.html").is_file()
        assert serving.poll() is not None
    assert server.poll() is not None
