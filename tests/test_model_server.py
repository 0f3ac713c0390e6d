"""serve-model: the real server (uvicorn on loopback) on a real exported model and real photos."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from food101 import registry
from food101.model_server import ServedModel, build_app
from food101.onnx_inference import run_batches
from tasks import export as ex
from tasks.preprocess import open_cache
from tests.conftest import REPO, SAMPLE, make_config, sample_classes, single_torch_thread
from tests.test_evaluate import build_sample_cache, write_trained_model
from tests.test_registry import onnx_champion  # noqa: F401 - a fixture

MODEL = "mobilenet_v3_small"
LIMIT = 2 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    config = make_config(root, models=[MODEL], export__latency_warmup=0, export__latency_runs=1,
                         export__throughput_batch=2, export__throughput_runs=1, export__calibration_size=4,
                         export__min_top1_agreement=0.9)
    build_sample_cache(config)
    with single_torch_thread():
        write_trained_model(config, MODEL)
        ex.export.fn(config, MODEL)
    folder = ex.export_dir(config, MODEL)
    served = ServedModel.from_files(folder / ex.INT8_FILE, folder / ex.PREPROCESS_FILE, f"{MODEL} int8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(served, LIMIT), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield config, served, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


def _photo(index: int = 0):
    test_ids = (SAMPLE / "meta" / "test.txt").read_text().split()
    return SAMPLE / "images" / f"{test_ids[index]}.jpg"


def test_a_real_photo_returns_the_five_dishes_the_evaluation_gives(server):
    config, served, url = server
    photo = _photo(0)
    answer = httpx.post(f"{url}/predict", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200
    top = answer.json()["top"]
    assert {t["dish"] for t in top} == set(sample_classes()["display"])  # the sample's five dishes
    probabilities = [t["probability"] for t in top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1.0)
    # the same decode as the cache: the server's best dish is the one the int8 model gives the cached photo
    cached = open_cache(config).images("test")[:1]
    expected = int(run_batches(served.session, cached, 1).argmax(1)[0])
    assert top[0]["class"] == served.preprocess["classes"][expected]
    multipart = httpx.post(f"{url}/predict", files={"file": ("dish.jpg", photo.read_bytes(), "image/jpeg")})
    assert multipart.status_code == 200 and multipart.json()["top"] == top


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144 Mpixel of zeros: a few kB compressed
    return buffer.getvalue()


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"Just some text, not a photo.\n", 415, "not an image"),
    (b"", 400, "empty"),
    (b"\xff" * (50 * 2**20), 413, "limit"),
    (None, 413, "pixels"),
])
def test_bad_bodies_get_a_clear_4xx_and_the_server_keeps_answering(server, body, status, words):
    _, _, url = server
    data = _bomb_png() if body is None else body
    answer = httpx.post(f"{url}/predict", content=data, headers={"content-type": "application/octet-stream"},
                        timeout=60)
    assert answer.status_code == status and words in answer.json()["error"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    again = httpx.post(f"{url}/predict", content=_photo(1).read_bytes())
    assert again.status_code == 200 and len(again.json()["top"]) == 5


def test_a_big_multipart_upload_is_refused(server):
    _, _, url = server
    answer = httpx.post(f"{url}/predict", files={"file": ("big.jpg", np.zeros(3 * 2**20, np.uint8).tobytes())})
    assert answer.status_code == 413


# --- `food101 serve-model` through the CLI, on the registered champion ----------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_model_cli_serves_the_champion_and_stops_on_sigterm(onnx_champion):  # noqa: F811
    config, promoted = onnx_champion
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{config.paths.tracking_db}"}
    process = subprocess.Popen([sys.executable, "-m", "food101", "serve-model", "--profile", "demo", "--port",
                                str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = None
        deadline = time.monotonic() + 120
        while health is None and time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None, process.communicate(timeout=10)
        serving = registry.champion_serving(config)
        precision = serving["precision"] if serving["runtime"] == "onnxruntime" else "fp32"
        assert health["status"] == "ok" and f"onnxruntime {precision}" in health["model"]
        assert f"version {promoted['champion']['version']}" in health["model"]
        answer = httpx.post(f"{url}/predict", content=_photo(0).read_bytes(), timeout=30)
        assert answer.status_code == 200
        assert {t["dish"] for t in answer.json()["top"]} == set(sample_classes()["display"])
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err[-3000:]  # a graceful stop, not a death by signal
    assert f"http://127.0.0.1:{port}" in out and "stopped on SIGTERM" in err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
def test_serve_model_refuses_a_non_loopback_host_without_allow_remote(host, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "food101", "serve-model", "--host", host], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and host in errors[0] and "--allow-remote" in errors[0] and "authentication" in errors[0]
