"""A real Prefect server, `food101 serve`, and `prefect deployment run food101/benchmark`."""

from __future__ import annotations

import base64
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

from food101 import serving
from tests.conftest import REPO, generated_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Small enough to finish in about a minute: the point here is the deployment path, not accuracy.
# Two models (each one its own evaluation, export and robustness) still fan the flow out.
FAST = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.overrides={}", "evaluate.latency_runs=3",
        "evaluate.bootstrap_samples=50", "models=[efficientnet_b0,mobilenet_v3_large]"]


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


def make_server(target: str, tmp_path: Path, **variables: object) -> list[str]:
    """`make <target>` of the project's Makefile, its state under tmp_path (the venv taken as is)."""
    settings = [f"{k}={v}" for k, v in {"STATE": tmp_path / "state", **variables}.items()]
    return ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", target, *settings]


def prefect_server(tmp_path: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """`make prefect-server` on `port`, and the environment of its clients (API URL and token)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = make_server("prefect-server", tmp_path, PREFECT_PORT=port, PREFECT_HOME=tmp_path / "prefect")
    return cmd, env


def client_env(tmp_path: Path, port: int, env: dict[str, str]) -> dict[str, str]:
    token = (tmp_path / "state" / "prefect.secret").read_text().strip()
    return {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_API_AUTH_STRING": f"food101:{token}"}


def call(url: str, method: str = "GET", headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, error statuses included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def test_prefect_server_wants_the_token_csrf_and_its_own_origin(tmp_path: Path):
    """Finding 6: `make prefect-server` took cross-origin POSTs and any Host header, with no token."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    cmd, env = prefect_server(tmp_path, port)
    with process(cmd, env, tmp_path / "server.log") as server:
        wait_until(lambda: healthy(f"{api}/health"), 120, "the Prefect server")
        secret = tmp_path / "state" / "prefect.secret"
        assert secret.stat().st_mode & 0o077 == 0  # readable by its owner only
        token = base64.b64encode(f"food101:{secret.read_text().strip()}".encode()).decode()
        auth = {"Authorization": f"Basic {token}"}
        json_body = {"Content-Type": "application/json"}
        endpoint, body = f"{api}/flows/filter", b"{}"

        # What a web page can send: another Origin, or our port under its own (DNS-rebound) name.
        for page in ({"Origin": "http://evil.example"}, {"Host": f"evil.example:{port}"}):
            status, headers, _ = call(endpoint, "POST", {**page, **json_body}, body)
            assert status in (401, 403), (page, status)
            assert headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
        # A browser asks first for a JSON POST from another origin; the answer is no.
        status, headers, _ = call(endpoint, "OPTIONS", {"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
        assert status == 400 and "access-control-allow-origin" not in headers
        # The token alone is not enough (CSRF tokens are on), and a CSRF token needs the token.
        assert call(endpoint, "POST", {**auth, **json_body}, body)[0] == 403
        assert call(f"{api}/csrf-token?client=test", "GET")[0] == 401
        status, _, payload = call(f"{api}/csrf-token?client=test", "GET", auth)
        assert status == 200
        csrf = {"Prefect-Csrf-Token": json.loads(payload)["token"], "Prefect-Csrf-Client": "test"}
        assert call(endpoint, "POST", {**csrf, **json_body}, body)[0] == 401  # no token
        assert call(endpoint, "POST", {**auth, **csrf, **json_body}, body)[0] == 200  # what the client sends
    assert server.poll() is not None


@pytest.mark.parametrize(("user_setting", "expected"), [(None, 180.0), ("45", 45.0)])
def test_a_fresh_ephemeral_server_gets_time_to_migrate_its_database(tmp_path: Path, user_setting, expected):
    """Found: a fresh checkout's `make demo` stopped with "Timed out while attempting to connect to
    ephemeral Prefect API server": the first start migrates a new database (22 s on a quiet 2-core
    machine), past Prefect's 20 s default. food101.env allows 180 s; a user's own setting is kept."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # a fresh shell's
    if user_setting is not None:
        environment["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_setting
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from food101 import env; "
            f"env.configure({str(tmp_path)!r}); from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) == expected


@pytest.mark.parametrize("overrides", [
    {"paths.cache": "/tmp/anywhere"}, {"paths": {"cache": "/tmp/anywhere"}},
    {"orchestration.dask_address": "tcp://203.0.113.9:8786"}, {"data.local_path": "/etc"},
])
def test_a_deployment_run_cannot_override_what_serve_fixed(overrides, monkeypatch):
    monkeypatch.setenv(serving.SERVED_ENV, json.dumps({"params_file": "/srv/params.yaml", "overrides": {}}))
    with pytest.raises(serving.ServedRunRefused, match="fixed by whoever runs `food101 serve`"):
        serving.deployment_run_parameters("demo", overrides, None)


def test_a_deployment_run_keeps_the_served_settings_and_adds_its_own(monkeypatch):
    served = {"paths.cache": "/srv/cache", "train.epochs": 3}
    monkeypatch.setenv(serving.SERVED_ENV, json.dumps({"params_file": "/srv/params.yaml", "overrides": served}))
    assert serving.deployment_run_parameters("quick", {"train.epochs": 1}, None) == (
        "quick", {"paths.cache": "/srv/cache", "train.epochs": 1}, "/srv/params.yaml")
    with pytest.raises(serving.ServedRunRefused, match="params_file"):
        serving.deployment_run_parameters(None, None, "/tmp/evil/params.yaml")
    with pytest.raises(serving.ServedRunRefused, match="profile"):
        serving.deployment_run_parameters("../../tmp/evil", None, None)


def test_served_deployment_runs_on_a_real_server(tmp_path: Path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_cmd, server_env = prefect_server(tmp_path, port)
    sets = [f"{k}={v}" for k, v in generated_overrides(tmp_path / "out").items()] + FAST
    serve_cmd = [str(BIN / "food101"), "serve", "--params", str(REPO / "params.yaml"), "--profile", "demo"]
    for item in sets:
        serve_cmd += ["--set", item]

    with process(server_cmd, server_env, tmp_path / "server.log") as server:
        wait_until(lambda: healthy(f"{api}/health"), 120, "the Prefect server")
        env = {**client_env(tmp_path, port, server_env), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        with process(serve_cmd, env, tmp_path / "serve.log") as serving:
            def deployment():
                assert serving.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                found = prefect(["deployment", "inspect", "food101/benchmark", "-o", "json"], env)
                return json.loads(found.stdout) if found.returncode == 0 else None

            spec = wait_until(deployment, 120, "deployment food101/benchmark")
            crons = [s["schedule"].get("cron") for s in spec["schedules"]]
            assert crons == ["0 3 * * 1"]
            assert spec["parameters"]["profile"] == "demo"
            assert "paths" not in json.dumps(spec["parameters"])  # serve's paths are not the API's to change

            # A run started through the API that names a path fails before anything is written.
            target = tmp_path / "victim"
            refused = prefect(["deployment", "run", "food101/benchmark", "--params",
                               json.dumps({"overrides": {"paths.cache": str(target)}}),
                               "--watch", "--watch-timeout", "120"], env, timeout=180)
            assert refused.returncode != 0, refused.stdout[-3000:]
            assert "cannot override 'paths.cache'" in (tmp_path / "serve.log").read_text()
            assert not target.exists()

            started = prefect(["deployment", "run", "food101/benchmark", "--watch", "--watch-timeout", "480"],
                              env, timeout=540)
            assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
            run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
            state = json.loads(prefect(["flow-run", "inspect", run_id, "-o", "json"], env).stdout)
            assert state["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
            assert (tmp_path / "out" / "reports" / "report.html").is_file()
        assert serving.poll() is not None
    assert server.poll() is not None
