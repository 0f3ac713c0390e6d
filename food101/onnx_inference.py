"""Running an exported model: ONNX Runtime sessions, the graph's input format, and timing probes.

The exported graph takes what the preprocess stage stores: uint8 RGB pixels, NHWC, already
resized (shorter side) and centre-cropped; the normalisation is inside the graph. So a client
needs the decode recipe in preprocess.json and nothing from this repository.

`python -m food101.onnx_inference SPEC.json` is the timing probe: a fresh process that loads one
runtime's model, times it and prints one JSON line, so its peak memory is the inference's own
(this module imports neither torch nor Prefect unless the probe asks for PyTorch).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
INPUT_LAYOUT = "NHWC uint8 RGB"


def session(path: Path | str, threads: int) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads and no inter-op parallelism."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_batches(session_: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, C) float32 of uint8 images (N, H, W, 3) through an ONNX Runtime session."""
    out = [session_.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch_size])})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def with_preprocessing(network: Any, mean: list[float], std: list[float], image_size: int, crop: int) -> Any:
    """`network` behind the cache's input format: uint8 NHWC in, the feed's eval transform
    (resize to `image_size` when it differs from `crop`, then normalise) inside the module."""
    import torch
    import torch.nn.functional as F

    class Preprocessed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            std_t = torch.tensor(std, dtype=torch.float32)
            self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
            self.register_buffer("shift", (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2).float()
            if image_size != crop:
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            return self.network(x * self.scale + self.shift)

    return Preprocessed().eval()


def preprocess_record(meta: dict[str, Any], resize: int, crop: int) -> dict[str, Any]:
    """preprocess.json: everything a client needs to turn a photo into the graph's input."""
    return {
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_layout": INPUT_LAYOUT,
        "decode": "RGB (greyscale, CMYK, palette converted); PIL bilinear resize of the centre square "
                  f"so that the shorter side is {resize} px, then the centre {crop}x{crop} crop",
        "resize": resize, "crop": crop, "image_size": int(meta["image_size"]),
        "mean": [float(v) for v in meta["mean"]], "std": [float(v) for v in meta["std"]],
        "normalisation_in_graph": True,
        "output": "logits; softmax gives the probabilities",
        "classes": list(meta["classes"]),
        "display": list(meta.get("display") or meta["classes"]),
    }


# --- the timing probe ------------------------------------------------------------------------------


def _percentiles(times_ms: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(times_ms, [50, 95])
    return float(p50), float(p95)


def _timed(run: Any, single: np.ndarray, batch: np.ndarray, spec: dict[str, Any]) -> dict[str, Any]:
    for _ in range(spec["warmup"]):
        run(single)
    times = []
    for _ in range(spec["runs"]):
        start = time.perf_counter()
        run(single)
        times.append((time.perf_counter() - start) * 1000.0)
    run(batch)
    elapsed = []
    for _ in range(spec["throughput_runs"]):
        start = time.perf_counter()
        run(batch)
        elapsed.append(time.perf_counter() - start)
    p50, p95 = _percentiles(times)
    return {"latency_p50_ms": p50, "latency_p95_ms": p95, "latency_samples_ms": times,
            "throughput_ips": len(batch) * len(elapsed) / sum(elapsed)}


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one runtime on random uint8 inputs of the graph's shape; peak RSS of this process."""
    rng = np.random.default_rng(spec["seed"])
    crop = spec["crop"]
    single = rng.integers(0, 256, (1, crop, crop, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (spec["throughput_batch"], crop, crop, 3), dtype=np.uint8)
    if spec["runtime"] == "onnxruntime":
        sess = session(spec["path"], spec["threads"])

        def run(x: np.ndarray) -> Any:
            return sess.run([OUTPUT_NAME], {INPUT_NAME: x})

        result = _timed(run, single, batch, spec)
    else:
        import torch

        from food101.models import model_from_state

        torch.set_num_threads(spec["threads"])
        state = torch.load(spec["path"], map_location="cpu", weights_only=True)
        network = model_from_state(state["arch"], state["num_classes"], state["state_dict"]).eval()
        module = with_preprocessing(network, state["mean"], state["std"], int(state["image_size"]), crop)

        def run(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return module(torch.from_numpy(x))

        result = _timed(run, single, batch, spec)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This program's peak resident memory in MiB: VmHWM, the high-water mark of the address space
    exec gave it. Not getrusage's ru_maxrss: Linux keeps in it the peak of the address space that
    exec replaced, so a probe started by a 3 GB flow process reported the flow's 3 GB for every
    runtime. Where /proc is missing (not Linux), ru_maxrss (KiB on Linux, bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # "VmHWM:   10988 kB"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    sys.stdout.write(json.dumps(probe(spec)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
