"""Export speed: ONNX Runtime fp32 vs PyTorch eager per model, and int8 vs fp32 for ResNet-50, on the CPU.

Each model (random weights: speed does not depend on them) is wrapped exactly as the export stage
wraps it (uint8 NHWC in, normalisation inside; eager is timed as the stage's probe runs it, and
again with channels_last weights as evaluate times it) and exported with the stage's own exporter; the
int8 file is the stage's static QDQ quantization, calibrated on real sample photos (data/sample,
decoded as the cache decodes them). Batch 1, the same uint8 photo, intra-op threads pinned for
both runtimes. Runtimes alternate in rounds so that a burst of load on this shared machine falls
on both; the p50 over all rounds counts.

    .venv/bin/python benchmarks/export_speed.py [--threads 1] [--size 224] [--runs 40] [--rounds 4]

Prints one JSON line per comparison; `ratio` is baseline p50 over candidate p50 (above 1: the
candidate is faster), `size_ratio` the int8 file over the fp32 file. Targets (issue 13): ONNX
Runtime fp32 at least 1.3x eager for each model; int8 at least 1.8x fp32 for ResNet-50, its file
at most 0.3x. The load average of the machine is printed beside each line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from food101 import env  # noqa: E402

env.configure(REPO)

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from food101.config import load_config  # noqa: E402
from food101.models import build_model  # noqa: E402
from food101.onnx_inference import INPUT_NAME, OUTPUT_NAME, session, with_preprocessing  # noqa: E402
from tasks.export import CacheCalibration, export_onnx, quantize  # noqa: E402
from tasks.preprocess import load_image  # noqa: E402

SAMPLE = REPO / "data" / "sample"
MODELS = ("resnet50", "efficientnet_b0", "mobilenet_v3_large")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = 101


def sample_photos(count: int, size: int) -> np.ndarray:
    """`count` real train photos, one per class in turn, as the cache holds them (uint8 NHWC)."""
    ids = (SAMPLE / "meta" / "train.txt").read_text().split()
    by_class: dict[str, list[str]] = {}
    for photo_id in ids:
        by_class.setdefault(photo_id.split("/")[0], []).append(photo_id)
    chosen = [photos[i] for i in range(count) for photos in by_class.values() if i < len(photos)][:count]
    resize = round(size * 256 / 224)
    return np.stack([load_image(SAMPLE / "images" / f"{p}.jpg", resize, size) for p in chosen])


def p50_alternating(runners: dict[str, Callable[[], object]], runs: int, rounds: int, warmup: int = 5) -> dict:
    """Batch-1 latency p50 (ms) per runner, the runners taking turns in `rounds` blocks of `runs`."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(runs):
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(values)) for name, values in samples.items()}


def machine() -> dict:
    return {"load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per runtime per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calibration-photos", type=int, default=16)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_config(REPO / "params.yaml").export
    photos = sample_photos(args.calibration_photos, args.size)
    single = np.ascontiguousarray(photos[:1])
    with tempfile.TemporaryDirectory(prefix="food101-export-speed-") as tmp:
        for arch in args.models:
            network = build_model(arch, CLASSES, pretrained=False).eval()
            module = with_preprocessing(network, MEAN, STD, args.size, args.size)
            fp32 = Path(tmp) / f"{arch}.onnx"
            export_onnx(module, args.size, fp32, settings.opset)
            ort_fp32 = session(fp32, args.threads)
            pixels = torch.from_numpy(single)

            def eager(module=module, pixels=pixels) -> object:
                with torch.inference_mode():
                    return module(pixels)

            # evaluate's eager timing converts the weights to channels_last; the export probe does not
            channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)

            def eager_cl(module=channels_last, pixels=pixels) -> object:
                with torch.inference_mode():
                    return module(pixels)

            runners = {"pytorch_eager": eager, "pytorch_eager_channels_last": eager_cl,
                       "onnxruntime_fp32": lambda s=ort_fp32: s.run([OUTPUT_NAME], {INPUT_NAME: single})}
            int8 = None
            if arch == "resnet50":
                int8 = Path(tmp) / f"{arch}.int8.onnx"
                rows = np.arange(len(photos))
                quantize(fp32, int8, CacheCalibration(photos, rows, settings.calibration_batch), settings)
                ort_int8 = session(int8, args.threads)
                runners["onnxruntime_int8"] = lambda s=ort_int8: s.run([OUTPUT_NAME], {INPUT_NAME: single})
            p50 = p50_alternating(runners, args.runs, args.rounds)
            common = {"benchmark": "export_speed", "model": arch, "size": args.size, "batch": 1,
                      "threads": args.threads, "runs": args.runs * args.rounds, **machine()}
            ratio = p50["pytorch_eager"] / p50["onnxruntime_fp32"]
            print(json.dumps({**common, "comparison": "onnxruntime fp32 vs pytorch eager",
                              "baseline_p50_ms": round(p50["pytorch_eager"], 3),
                              "candidate_p50_ms": round(p50["onnxruntime_fp32"], 3), "ratio": round(ratio, 3),
                              "target": 1.3, "meets_target": ratio >= 1.3}), flush=True)
            ratio = p50["pytorch_eager_channels_last"] / p50["onnxruntime_fp32"]
            print(json.dumps({**common, "comparison": "onnxruntime fp32 vs pytorch eager channels_last",
                              "baseline_p50_ms": round(p50["pytorch_eager_channels_last"], 3),
                              "candidate_p50_ms": round(p50["onnxruntime_fp32"], 3), "ratio": round(ratio, 3),
                              "target": 1.3, "meets_target": ratio >= 1.3}), flush=True)
            if int8 is not None:
                ratio = p50["onnxruntime_fp32"] / p50["onnxruntime_int8"]
                size_ratio = int8.stat().st_size / fp32.stat().st_size
                print(json.dumps({**common, "comparison": "onnxruntime int8 vs onnxruntime fp32",
                                  "baseline_p50_ms": round(p50["onnxruntime_fp32"], 3),
                                  "candidate_p50_ms": round(p50["onnxruntime_int8"], 3), "ratio": round(ratio, 3),
                                  "target": 1.8, "meets_target": ratio >= 1.8,
                                  "fp32_mb": round(fp32.stat().st_size / 2**20, 2),
                                  "int8_mb": round(int8.stat().st_size / 2**20, 2),
                                  "size_ratio": round(size_ratio, 3), "size_target": 0.3,
                                  "meets_size_target": size_ratio <= 0.3,
                                  "calibration_photos": len(photos), "reduce_range": settings.reduce_range}),
                      flush=True)


if __name__ == "__main__":
    main()
