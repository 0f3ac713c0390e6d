"""Serving load: `food101.model_server` on loopback under N concurrent clients vs the same model in-process.

The model (random weights, `--model` at `--size` px, 5 classes named after the sample's dishes) is
exported with the export stage's exporter (int8 with its quantization when asked) and served by a
server process of its own (uvicorn, as `food101 serve-model` runs it). Clients post real sample
photos (data/sample test photos, JPEG bytes, cycled) over keep-alive connections, N at a time for
N in `--clients`; each N stops after `--requests` answers or `--max-seconds`, whichever first.
The baseline is the same decode + ONNX Runtime run in this process, one photo at a time, taking
turns with the one-client load in blocks.

    .venv/bin/python benchmarks/serving_load.py [--model mobilenet_v3_large] [--size 224]
        [--precision fp32] [--threads 1] [--requests 200] [--max-seconds 60] [--clients 1 2 4]

Prints one JSON line per N (requests/s, p50/p95/p99 ms, errors), then one line with the
serving overhead at one client: `ratio` = server p50 / in-process p50, and the target (issue 13)
server p50 <= 1.5 x in-process p50 + 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from food101 import env  # noqa: E402

env.configure(REPO)

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from food101.io import write_json  # noqa: E402
from food101.model_server import ServedModel  # noqa: E402

SAMPLE = REPO / "data" / "sample"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
START_TIMEOUT_S = 120
ROUNDS = 4


def sample_photos() -> list[bytes]:
    ids = (SAMPLE / "meta" / "test.txt").read_text().split()
    return [(SAMPLE / "images" / f"{photo_id}.jpg").read_bytes() for photo_id in ids]


def build_export(folder: Path, model: str, size: int, precision: str) -> tuple[Path, Path]:
    """The model's ONNX file (fp32, or int8 calibrated on sample train photos) and its preprocess.json."""
    import torch

    from food101.config import load_config
    from food101.models import build_model
    from food101.onnx_inference import preprocess_record, with_preprocessing
    from tasks.export import CacheCalibration, export_onnx, quantize
    from tasks.preprocess import load_image
    from tests.conftest import sample_classes

    torch.set_num_threads(1)
    settings = load_config(REPO / "params.yaml").export
    classes = sample_classes()
    network = build_model(model, len(classes["names"]), pretrained=False).eval()
    fp32 = folder / "model.onnx"
    export_onnx(with_preprocessing(network, MEAN, STD, size, size), size, fp32, settings.opset)
    resize = round(size * 256 / 224)
    meta = {"image_size": size, "mean": MEAN, "std": STD, "classes": classes["names"], "display": classes["display"]}
    preprocess = folder / "preprocess.json"
    write_json(preprocess, preprocess_record(meta, resize, size))
    if precision == "fp32":
        return fp32, preprocess
    train_ids = (SAMPLE / "meta" / "train.txt").read_text().split()[::10][:16]
    photos = np.stack([load_image(SAMPLE / "images" / f"{p}.jpg", resize, size) for p in train_ids])
    int8 = folder / "model.int8.onnx"
    quantize(fp32, int8, CacheCalibration(photos, np.arange(len(photos)), settings.calibration_batch), settings)
    return int8, preprocess


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentiles(times_ms: list[float]) -> dict[str, float | None]:
    if not times_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(times_ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3)}


def in_process_latency(served: ServedModel, photos: list[bytes], count: int, warmup: int = 5) -> list[float]:
    """What one request costs without HTTP: decode + ONNX Runtime + top-5, one photo at a time."""
    for data in photos[:warmup]:
        served.predict(served.decode(data))  # warm caches after the other side's turn
    times = []
    for i in range(count):
        start = time.perf_counter()
        served.predict(served.decode(photos[i % len(photos)]))
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def load(url: str, photos: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` threads, each on its own keep-alive connection, until `requests` answers or the deadline."""
    lock = threading.Lock()
    issued = [0]
    times: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(timeout=30) as session:
            session.get(f"{url}/health")  # the connection opens outside the timing
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= requests:
                        return
                    index = issued[0]
                    issued[0] += 1
                start = time.perf_counter()
                try:
                    answer = session.post(f"{url}/predict", content=photos[index % len(photos)],
                                          headers={"content-type": "image/jpeg"})
                except httpx.HTTPError as exc:  # counted, and this client stops: the server is in trouble
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
                elapsed = (time.perf_counter() - start) * 1000.0
                with lock:
                    if answer.status_code == 200 and len(answer.json()["top"]) == 5:
                        times.append(elapsed)
                    else:
                        errors.append(f"{answer.status_code}: {answer.text[:100]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max_seconds + 60)
    wall = time.perf_counter() - started
    return {"clients": clients, "answers": len(times), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": wall, "times": times}


def summary(runs: list[dict]) -> dict:
    """One line for a client count measured in one or more blocks."""
    times = [t for run in runs for t in run["times"]]
    wall = sum(run["wall_s"] for run in runs)
    return {"clients": runs[0]["clients"], "answers": len(times), "errors": sum(run["errors"] for run in runs),
            "first_error": next((run["first_error"] for run in runs if run["first_error"]), None),
            "wall_s": round(wall, 2), "requests_per_s": round(len(times) / wall, 2), **percentiles(times)}


def serve_main(onnx_path: str, preprocess: str, port: str, threads: str) -> None:
    """The server process: what `food101 serve-model` runs, on a given file."""
    from food101.model_server import serve

    serve(ServedModel.from_files(Path(onnx_path), Path(preprocess), Path(onnx_path).name, int(threads)),
          "127.0.0.1", int(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (export.threads)")
    parser.add_argument("--requests", type=int, default=200, help="answers per client count")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    photos = sample_photos()
    common = {"benchmark": "serving_load", "model": args.model, "size": args.size, "precision": args.precision,
              "threads": args.threads, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="food101-serving-load-") as tmp:
        onnx_path, preprocess = build_export(Path(tmp), args.model, args.size, args.precision)
        served = ServedModel.from_files(onnx_path, preprocess, args.model, args.threads)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(onnx_path), str(preprocess), str(port),
                                   str(args.threads)], env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=2).raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start on {url} (exit code {server.poll()})") from None
                    time.sleep(0.2)
            # The baseline and one client take turns in blocks, so that load on this shared machine that
            # comes and goes falls on both sides of the overhead ratio.
            baseline: list[float] = []
            blocks: list[dict] = []
            per_block = max(1, args.requests // ROUNDS)
            for _ in range(ROUNDS):
                baseline += in_process_latency(served, photos, per_block)
                blocks.append(load(url, photos, 1, per_block, args.max_seconds / ROUNDS))
            results = {}
            for clients in args.clients:
                runs = blocks if clients == 1 else [load(url, photos, clients, args.requests, args.max_seconds)]
                results[clients] = summary(runs)
                print(json.dumps({**common, **results[clients],
                                  "load_average_1min": round(os.getloadavg()[0], 2)}), flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    inproc = percentiles(baseline)
    one = summary(blocks)
    allowed = 1.5 * inproc["p50_ms"] + 5.0
    print(json.dumps({**common, "comparison": f"server p50 at {one['clients']} client(s) vs in-process p50",
                      "in_process_p50_ms": inproc["p50_ms"], "in_process_p95_ms": inproc["p95_ms"],
                      "server_p50_ms": one["p50_ms"], "ratio": round(one["p50_ms"] / inproc["p50_ms"], 3),
                      "overhead_ms": round(one["p50_ms"] - inproc["p50_ms"], 3), "allowed_p50_ms": round(allowed, 3),
                      "meets_target": one["p50_ms"] <= allowed, "load_average_1min": round(os.getloadavg()[0], 2)}),
          flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve_main(*sys.argv[2:])
    else:
        main()
