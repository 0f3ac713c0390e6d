"""export[model]: the deployable artefacts of a model, and what each costs and loses.

From the best checkpoint: `model.onnx` (torch.onnx's dynamo exporter, dynamic batch axis, the
uint8-to-normalised step inside the graph, checked with onnx.checker), `model.int8.onnx` (ONNX
Runtime static quantization, QDQ, per-channel weights, calibrated on a seeded slice of the train
split), `preprocess.json` (how a client turns a photo into the graph's input) and `export.json`:
parity with PyTorch on the test split, accuracy per runtime and precision with bootstrap CIs,
McNemar fp32 vs int8, and per runtime the batch-1 latency, throughput, peak memory (each timed in
a process of its own) and file size. A parity below `export.*` thresholds fails this model's
export, naming the numbers; the other models go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from food101 import metrics
from food101.config import Config, ExportConfig
from food101.devices import training_slots
from food101.document import Figure, Para, Section, Table
from food101.errors import Food101Error
from food101.formatting import ci_cell, num, pct
from food101.io import read_json, replace_dir, staging_dir, write_json, write_parquet
from food101.models import TORCH_TRACING_LOCK
from food101.onnx_inference import (
    INPUT_NAME,
    OUTPUT_NAME,
    preprocess_record,
    run_batches,
    session,
    with_preprocessing,
)
from food101.timing import QUIET, noise_reasons, settled_window
from food101.tracking import Run, stage_run

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
PREPROCESS_FILE = "preprocess.json"
EXPORT_FILE = "export.json"
CALIBRATION_FILE = "calibration_rows.parquet"  # the train rows (cache positions, manifest paths) used
MLFLOW_MODEL_DIR = "model"  # the fp32 graph as an MLflow model (onnx flavour) on the export run
VARIANTS = (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
PROBE_TIMEOUT_S = 900


class ExportError(Food101Error):
    """A model could not be exported, or its export does not match the PyTorch model."""


class ExportMissing(Food101Error):
    """A model's export outputs are not there (export has not run for it)."""


# --- pure parts -----------------------------------------------------------------------------------


def export_onnx(module: Any, crop: int, path: Path, opset: int) -> int:
    """Export `module` (uint8 NHWC in, logits out) with a dynamic batch axis; returns the opset.

    The export runs in a child process: while torch.export traces it sets process-wide state
    (torch.compiler.is_compiling() true, oneDNN and cuDNN off), which changed AdamW's arithmetic
    in trainings on the flow's other threads. The module reaches the child by cloudpickle, as
    multiprocessing passes arguments; the file lives only as long as this call.
    """
    import cloudpickle

    with tempfile.TemporaryDirectory(prefix="food101-export-") as tmp:
        job = Path(tmp) / "export.pkl"
        job.write_bytes(cloudpickle.dumps((module, crop, str(path), opset)))
        done = subprocess.run([sys.executable, "-m", "tasks.export", str(job)], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=False)
    replies = [line for line in done.stdout.splitlines() if line.startswith("{")]
    outcome = json.loads(replies[-1]) if done.returncode in (0, 1) and replies else None
    if outcome is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"ONNX export failed in its child process (exit code {done.returncode}): {tail}")
    if "error" in outcome:
        raise ExportError(outcome["error"])
    return int(outcome["opset"])


def _export_in_this_process(module: Any, crop: int, path: Path, opset: int) -> int:
    """What export_onnx's child process runs."""
    import onnx
    import torch

    example = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    try:
        with TORCH_TRACING_LOCK:  # torch.export is not thread-safe (see food101.models)
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
        program.save(str(path), external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - any exporter failure becomes this model's one-line error
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def torch_logits(module: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, C) float32 of the PyTorch module on uint8 images (N, H, W, 3)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(module(torch.from_numpy(np.array(images[start:start + batch_size]))).float().numpy())
    return np.concatenate(out)


def parity(reference: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    """Largest absolute logit difference and the share of photos with the same top-1."""
    return {"max_abs_logit_diff": float(np.abs(reference - exported).max()),
            "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).mean())}


def check_parity(model: str, values: dict[str, float], settings: ExportConfig) -> None:
    too_far = values["max_abs_logit_diff"] > settings.max_abs_logit_diff
    if too_far or values["top1_agreement"] < settings.min_top1_agreement:
        raise ExportError(
            f"{model}: the ONNX model does not match PyTorch on the test split: max |logit diff| "
            f"{values['max_abs_logit_diff']:.3g} (allowed {settings.max_abs_logit_diff:g}), top-1 agreement "
            f"{values['top1_agreement']:.4f} (needed {settings.min_top1_agreement:g}); the exporter changed the "
            "model: check the exporter's warnings, or raise export.max_abs_logit_diff / export.min_top1_agreement")


def calibration_rows(n_train: int, size: int, seed: int) -> np.ndarray:
    """Sorted cache positions of a seeded slice of the train split (all of it when smaller)."""
    rng = np.random.default_rng([seed, 13])
    return np.sort(rng.permutation(n_train)[:min(size, n_train)])


class CacheCalibration:
    """ONNX Runtime's CalibrationDataReader over rows of the train split, `batch` photos at a time."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, batch: int) -> None:
        self.images, self.rows, self.batch, self.start = images, rows, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.rows):
            return None
        chunk = self.rows[self.start:self.start + self.batch]
        self.start += self.batch
        return {INPUT_NAME: np.ascontiguousarray(self.images[chunk])}

    def rewind(self) -> None:
        self.start = 0


def quantize(fp32: Path, int8: Path, reader: CacheCalibration, settings: ExportConfig) -> None:
    """Static int8 quantization: QDQ format, per-channel int8 weights, uint8 activations (MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(CacheCalibration)
    with tempfile.TemporaryDirectory(prefix="food101-quant-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)


def accuracy(logits: np.ndarray, labels: np.ndarray, settings: ExportConfig) -> dict[str, float]:
    correct = logits.argmax(1) == labels
    interval = metrics.bootstrap_ci(correct, settings.bootstrap_samples, settings.seed)
    return {"top1": interval.estimate, "top1_ci_low": interval.low, "top1_ci_high": interval.high}


def int8_comparison(correct_fp32: np.ndarray, correct_int8: np.ndarray, alpha: float) -> dict[str, Any]:
    """McNemar fp32 vs int8 on the same photos; `significant_drop` only when int8 is the worse."""
    result = metrics.mcnemar_exact(correct_fp32, correct_int8)
    drop = float(correct_fp32.mean() - correct_int8.mean())
    return {"top1_drop": drop, "fp32_only": result.n_a_only, "int8_only": result.n_b_only,
            "p_value": result.p_value, "significant_drop": bool(result.p_value < alpha and drop > 0),
            "sentence": metrics.mcnemar_sentence("fp32", "int8", result, alpha)}


def probe_runtime(runtime: str, path: Path, crop: int, settings: ExportConfig) -> dict[str, Any]:
    """Time one runtime in a fresh process (food101.onnx_inference's probe): its peak memory is its own."""
    spec = {"runtime": runtime, "path": str(path), "crop": crop, "threads": settings.threads,
            "warmup": settings.latency_warmup, "runs": settings.latency_runs,
            "throughput_batch": settings.throughput_batch, "throughput_runs": settings.throughput_runs,
            "seed": settings.seed}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="food101-probe-", delete=False) as handle:
        json.dump(spec, handle)
    env_threads = str(settings.threads)
    import os

    env = {**os.environ, "OMP_NUM_THREADS": env_threads, "MKL_NUM_THREADS": env_threads}
    try:
        done = subprocess.run([sys.executable, "-m", "food101.onnx_inference", handle.name], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"timing {runtime} on {path.name} failed in its probe process: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the stage ------------------------------------------------------------------------------------


def export_dir(config: Config, model: str) -> Path:
    return Path(config.paths.export) / model


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _write_failure(folder: Path, model: str, error: str) -> None:
    staged = staging_dir(folder)
    write_json(staged / EXPORT_FILE, {"model": model, "status": "failed", "error": error})
    replace_dir(folder, staged)


def build_exports(config: Config, model: str, staged: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Export, check, quantize, score and time one model into `staged`; export.json's content."""
    from tasks.preprocess import open_cache
    from tasks.train import load_trained_model, model_dir

    settings = config.export
    # Conversion, scoring and quantization run beside other models' evaluations (the flow starts
    # export[m] when evaluate[m] ends), but never while one of them times: food101.timing.QuietLock.
    with QUIET.heavy():
        network, meta = load_trained_model(config, model, "cpu")
        crop = config.preprocess.crop
        module = with_preprocessing(network, meta["mean"], meta["std"], int(meta["image_size"]), crop)
        cache = open_cache(config)
        test_images, labels = cache.images("test"), np.asarray(cache.labels("test"), dtype=np.int64)
        fp32_path, int8_path = staged / ONNX_FILE, staged / INT8_FILE

        opset = export_onnx(module, crop, fp32_path, settings.opset)
        reference = torch_logits(module, test_images, settings.batch_size)
        fp32_logits = run_batches(session(fp32_path, settings.threads), test_images, settings.batch_size)
        matched = parity(reference, fp32_logits)
        check_parity(model, matched, settings)

        train_images = cache.images("train")
        rows = calibration_rows(len(train_images), settings.calibration_size, settings.seed)
        quantize(fp32_path, int8_path, CacheCalibration(train_images, rows, settings.calibration_batch), settings)
        int8_logits = run_batches(session(int8_path, settings.threads), test_images, settings.batch_size)

    index = cache.index
    train_index = index[index["split"] == "train"].sort_values("position")
    calibration = pd.DataFrame({"position": rows.astype(np.int64),
                                "path": train_index["path"].astype(str).to_numpy()[rows]})
    write_json(staged / PREPROCESS_FILE, preprocess_record(meta, config.preprocess.resize, crop))

    logits = {("pytorch", "fp32"): reference, ("onnxruntime", "fp32"): fp32_logits,
              ("onnxruntime", "int8"): int8_logits}
    files = {("pytorch", "fp32"): model_dir(config, model) / "best.pt", ("onnxruntime", "fp32"): fp32_path,
             ("onnxruntime", "int8"): int8_path}
    # export[m] runs beside robustness[m] and later models' training and evaluation. The probes hold a
    # training slot (the CPU's only one on a CPU machine) and the timing side of QUIET, in evaluate's
    # order, so none of those computes or times while a runtime is timed; the slot is held only here.
    # Before timing, the same settle wait as evaluate's (evaluate.settle_s); the machine's state over
    # the probes is recorded (each probe is a waited-for child, so its CPU counts as the timing's own).
    with training_slots(config).acquire(f"export[{model}]"), QUIET.timing():
        with settled_window(config.evaluate.settle_cpu_share, config.evaluate.settle_s) as state:
            timings = {key: probe_runtime(key[0], files[key], crop, settings) for key in VARIANTS}
    variants = []
    for runtime, precision in VARIANTS:
        key = (runtime, precision)
        timing = timings[key]
        variants.append({"runtime": runtime, "precision": precision, **accuracy(logits[key], labels, settings),
                         "latency_p50_ms": timing["latency_p50_ms"], "latency_p95_ms": timing["latency_p95_ms"],
                         "throughput_ips": timing["throughput_ips"], "peak_rss_mb": timing["peak_rss_mb"],
                         "size_mb": _file_mb(files[key]), "file": files[key].name})
        log.info("%s %s %s: p50 %.2f ms, p95 %.2f ms, %.1f images/s, peak RSS %.0f MB", model, runtime, precision,
                 timing["latency_p50_ms"], timing["latency_p95_ms"], timing["throughput_ips"], timing["peak_rss_mb"])
    comparison = int8_comparison(fp32_logits.argmax(1) == labels, int8_logits.argmax(1) == labels,
                                 settings.significance)
    summary = {"model": model, "status": "ok", "opset": opset, "n_test": int(len(labels)),
               "parity": matched, "int8": comparison, "threads": settings.threads,
               "calibration": {"split": "train", "rows": int(len(rows)), "seed": settings.seed},
               "machine_state": state, "variants": variants}
    return summary, calibration


@task(name="export", cache_policy=NONE)
def export(config: Config, model: str, parent_run_id: str | None = None) -> dict:
    """Export a model to ONNX fp32 and int8, check parity, score and time every runtime."""
    settings = config.export
    params = {"export": dataclasses.asdict(settings)}
    folder = export_dir(config, model)
    with stage_run(config, "export", parent_run_id, model=model, params=params) as run:
        staged = staging_dir(folder)
        try:
            summary, calibration = build_exports(config, model, staged)
            write_parquet(staged / CALIBRATION_FILE, calibration)
            write_json(staged / EXPORT_FILE, summary)
            final = replace_dir(folder, staged)
        except Exception as exc:
            # Recorded so that the report marks this model's export; the error still fails the task.
            _write_failure(folder, model, str(exc))
            run.set_tags({"export_status": "failed"})
            raise
        finally:
            if staged.exists():
                shutil.rmtree(staged)
        run.set_tags({"export_status": "ok", "onnx_opset": summary["opset"]})
        run.log_metrics({**{k: float(v) for k, v in summary["parity"].items()},
                         "int8_top1_drop": summary["int8"]["top1_drop"], "int8_mcnemar_p": summary["int8"]["p_value"],
                         **{f"{v['runtime']}_{v['precision']}_{k}": float(v[k]) for v in summary["variants"]
                            for k in ("top1", "latency_p50_ms", "latency_p95_ms", "throughput_ips", "size_mb",
                                      "peak_rss_mb")}})
        run.log_artifacts(final, "export")
        log_onnx_model(run, final, model)
        log.info("%s: exported (opset %d); parity max |diff| %.2g, top-1 agreement %.4f; int8 drop %s (%s)",
                 model, summary["opset"], summary["parity"]["max_abs_logit_diff"],
                 summary["parity"]["top1_agreement"], pct(summary["int8"]["top1_drop"]),
                 metrics.format_p(summary["int8"]["p_value"]))
        return {"model": model, "export_dir": str(final), "opset": summary["opset"], "status": "ok"}


def log_onnx_model(run: Run, folder: Path, model: str) -> None:
    """Log the fp32 graph in `folder` as an MLflow model (onnx flavour) under `model/` of `run`.

    What the MLflow UI offers to load and serve: an ONNX graph is data, so loading it runs no
    code from the artifact store (a pickled model would). `save_model` + `log_artifacts` keeps to
    the explicit run id; explicit pip requirements skip their inference.
    """
    import mlflow.onnx
    import onnx
    import onnxruntime

    preprocess = read_json(folder / PREPROCESS_FILE)
    requirements = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    with tempfile.TemporaryDirectory(prefix="mlflow-onnx-") as tmp:
        target = Path(tmp) / MLFLOW_MODEL_DIR
        mlflow.onnx.save_model(onnx.load(str(folder / ONNX_FILE)), target, pip_requirements=requirements,
                               save_as_external_data=False,
                               metadata={"model": model, "precision": "fp32", "input": preprocess["input_layout"]})
        run.log_artifacts(target, MLFLOW_MODEL_DIR)


# --- readers --------------------------------------------------------------------------------------


def read_export(config: Config, model: str) -> dict[str, Any]:
    path = export_dir(config, model) / EXPORT_FILE
    if not path.is_file():
        raise ExportMissing(f"{path} does not exist: export {model} first (food101 stage export --model {model})")
    return read_json(path)


def read_calibration_rows(config: Config, model: str) -> pd.DataFrame:
    return pd.read_parquet(export_dir(config, model) / CALIBRATION_FILE)


def exported_files(config: Config, model: str) -> dict[str, Path]:
    """{"fp32": model.onnx, "int8": model.int8.onnx, "preprocess": preprocess.json} of a finished export."""
    folder = export_dir(config, model)
    summary = read_export(config, model)
    if summary.get("status") != "ok":
        raise ExportMissing(f"the export of {model} failed ({summary.get('error')}); fix it and run "
                            f"food101 stage export --model {model}")
    return {"fp32": folder / ONNX_FILE, "int8": folder / INT8_FILE, "preprocess": folder / PREPROCESS_FILE}


def load_exports(config: Config, models: list[str]) -> dict[str, dict[str, Any]]:
    """export.json of every model that has one (ok or failed); models never exported are absent."""
    return {m: read_export(config, m) for m in models if (export_dir(config, m) / EXPORT_FILE).is_file()}


# --- the report's deployment section ---------------------------------------------------------------


def deployment_rows(exports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per model x runtime x precision of the finished exports."""
    rows = []
    for model, summary in exports.items():
        if summary.get("status") != "ok":
            continue
        for variant in summary["variants"]:
            row = {"model": model, **variant}
            if variant["precision"] == "int8":
                row["significant_drop"] = summary["int8"]["significant_drop"]
            rows.append(row)
    return rows


DEPLOYMENT_PLOT = "deployment_accuracy_vs_latency.png"


def plot_deployment(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test top-1 against batch-1 p50 latency for every model x runtime x precision."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    markers = {("pytorch", "fp32"): "o", ("onnxruntime", "fp32"): "s", ("onnxruntime", "int8"): "^"}
    models = sorted({r["model"] for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    for row in rows:
        x, y = row["latency_p50_ms"], 100 * row["top1"]
        ax.errorbar(x, y, yerr=[[y - 100 * row["top1_ci_low"]], [100 * row["top1_ci_high"] - y]],
                    fmt=markers[(row["runtime"], row["precision"])], color=colours[row["model"]], capsize=3)
    for model in models:
        ax.plot([], [], "o", color=colours[model], label=model)
    for (runtime, precision), marker in markers.items():
        ax.plot([], [], marker, color="gray", label=f"{runtime} {precision}")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
    ax.set_ylabel("test top-1 (%) with 95% CI")
    ax.set_title("Accuracy vs latency per runtime and precision")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    from food101.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def busy_exports(config: Config, exports: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The exported models whose runtimes were timed on a busy machine, and why (the alerts'
    thresholds, as for evaluate's timings). An export.json from before machine states were
    recorded has none, and is not flagged."""
    busy = {}
    for model, summary in exports.items():
        state = summary.get("machine_state")
        if summary.get("status") == "ok" and state:
            reasons = noise_reasons(state, config.alerts.max_load_per_core, config.alerts.max_other_cpu_share, "")
            if reasons:
                busy[model] = reasons
    return busy


def deployment_section(config: Config, exports: dict[str, dict[str, Any]], plot: Path | None) -> Section:
    """The report's deployment section: the table, the plot, the per-target choices, failed exports."""
    from food101.deploy_targets import recommend_targets

    rows = deployment_rows(exports)
    blocks: list[Any] = []
    failed = {m: s.get("error") for m, s in exports.items() if s.get("status") != "ok"}
    if not rows and not failed:
        return Section("deployment", "Deployment", [Para("No model was exported (the export stage did not run).")])
    if rows:
        threads = next(iter(exports.values())).get("threads", config.export.threads)
        blocks.append(Para(f"Every model as it would be shipped: PyTorch eager, ONNX Runtime fp32 and int8 (static, "
                           f"calibrated on train photos). Timed on this machine's CPU with {threads} intra-op "
                           "thread(s), each runtime in a process of its own; accuracy on the whole test split."))
        blocks.append(Table(
            ["Model", "Runtime", "Precision", "Top-1 (95% CI)", "p50 ms", "p95 ms", "Images/s", "Size MB",
             "Peak memory MB"],
            [[r["model"], r["runtime"], r["precision"] + (" (significant drop)" if r.get("significant_drop") else ""),
              ci_cell(r), num(r["latency_p50_ms"], 2), num(r["latency_p95_ms"], 2), num(r["throughput_ips"], 1),
              num(r["size_mb"], 1), num(r["peak_rss_mb"], 0)] for r in rows]))
        if plot is not None:
            blocks.append(Figure(plot, "Test top-1 against batch-1 latency, per model, runtime and precision."))
        busy = busy_exports(config, exports)
        if busy:
            blocks.append(Para("**Timed on a busy machine** (`alerts` sets the limits): " + "; ".join(
                f"{m}'s runtimes ({', '.join(reasons)})" for m, reasons in busy.items())
                + ". Their latencies and throughputs may not hold on a quiet machine, nor the choices below "
                "that rest on them."))
        notes = [f"For {m}, {s['int8']['sentence']}"
                 for m, s in exports.items() if s.get("status") == "ok"]
        blocks.append(Para("int8 against fp32 on the same test photos (McNemar): " + " ".join(notes)))
        choices = recommend_targets(rows, config.export)
        blocks.append(Table(["Target", "Choice", "Why"],
                            [[c.label, c.choice or "none", c.reason] for c in choices]))
    for model, error in failed.items():
        blocks.append(Para(f"**{model}: export failed.** {error}"))
    return Section("deployment", "Deployment", blocks)


def _export_main(argv: list[str]) -> int:
    """The child of export_onnx: unpickle its job, export, print {"opset": n} or {"error": message}."""
    import cloudpickle

    module, crop, path, opset = cloudpickle.loads(Path(argv[1]).read_bytes())
    try:
        result: dict[str, Any] = {"opset": _export_in_this_process(module, crop, Path(path), opset)}
    except ExportError as exc:
        result = {"error": str(exc)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if "opset" in result else 1


if __name__ == "__main__":
    sys.exit(_export_main(sys.argv))
