"""evaluate[model]: test-set accuracy with confidence intervals, calibration, speed and size.

The official test split is touched here and nowhere else. Everything the report says about a
model's quality comes from `metrics.json`, `per_class.csv`, `confusion_counts.npy` and
`predictions.parquet` in `config.paths.eval/<model>/`.

Speed is measured honestly, timm-style (food101.speed): warm-up runs first, then batch-1 latency
(p50, p95 over `latency_runs` single-image forwards) and throughput at `throughput_batch`, on the
CPU always, in a process of its own, and on the GPU when there is one, with
`torch.cuda.synchronize()` around every timed call.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import shutil
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NONE
from torch import nn
from tqdm import tqdm

from food101 import metrics
from food101.config import Config, EvaluateConfig
from food101.devices import training_slots
from food101.errors import Food101Error
from food101.feed import BatchFeed
from food101.io import (
    atomic_path,
    read_json,
    replace_dir,
    staging_dir,
    write_json,
    write_npy,
    write_parquet,
    write_text,
)
from food101.speed import autocast, prepare_cpu_probe, time_model, time_on_cpu_in_processes
from food101.timing import QUIET, WORKER_CPU_KEY, settled_window
from food101.tracking import stage_run
from tasks.preprocess import open_cache
from tasks.train import load_best, load_trained_model, read_train_summary, replica_dir, replica_seeds

log = logging.getLogger(__name__)

TOP_K = 5
METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
COUNTS_FILE = "confusion_counts.npy"
PREDICTIONS_FILE = "predictions.parquet"
# Full softmax outputs, float32, rows in cache order: ensembles are scored from these without
# running their members again (test), and their weights are fit on the validation ones.
PROBS_FILE = "probs.npy"  # (n_test, classes)
VAL_PROBS_FILE = "val_probs.npy"  # (n_val, classes); the labels are the cache's val labels
RELIABILITY_FILE = "reliability.png"
SEEDS_FILE = "seeds.json"  # only with train.seeds > 1: top-1, top-5, macro-F1 of every seed's training
TIMING_FILE = "timing_samples.parquet"  # every timed forward: metric, device, sample_index, value, process
TIMING_COLUMNS = ("metric", "device", "sample_index", "value", "process")
METRIC_KEYS = (
    "model", "n_test", "top1", "top1_ci_low", "top1_ci_high", "top5", "top5_ci_low", "top5_ci_high",
    "macro_precision", "macro_recall", "macro_f1", "ece",
    "latency_cpu_p50_ms", "latency_cpu_p95_ms", "latency_cpu_threads", "latency_gpu_p50_ms", "latency_gpu_p95_ms",
    "throughput_cpu_ips", "throughput_gpu_ips", "params", "size_mb", "gflops",
    "train_time_s", "train_images_per_s",
    "n_seeds", "top1_seed_mean", "top1_seed_sd", "machine_state",
)
SEED_KEYS = ("top1", "top5", "macro_f1")


class EvaluationMissing(Food101Error):
    """A model's evaluation outputs are not there (evaluate has not run for it)."""


class EvaluationInputError(Food101Error):
    """The trained model and the cache do not fit together."""


# --- pure parts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """Everything computed from the test predictions (no timing, no files)."""

    metrics: dict[str, float | int]
    per_class: metrics.PerClass
    counts: np.ndarray
    reliability: metrics.Reliability
    topk_labels: np.ndarray  # (N, k) best first
    topk_probs: np.ndarray  # (N, k)


def predict(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    total: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) float32 and labels (N,) int64 over batches of (x, y)."""
    model.eval()
    probs, labels = [], []
    with torch.inference_mode(), tqdm(total=total, desc="evaluate", unit="img", disable=None) as bar:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            with autocast(device):
                logits = model(x)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(y.cpu().numpy().astype(np.int64))
            bar.update(len(y))
    if not probs:
        raise EvaluationInputError("the test split is empty: nothing to evaluate; check the preprocess stage")
    return np.concatenate(probs), np.concatenate(labels)


def score(probs: np.ndarray, labels: np.ndarray, settings: EvaluateConfig, top_k: int = TOP_K) -> Scores:
    """Accuracy with bootstrap CIs, macro and per-class metrics, ECE and confusion counts."""
    num_classes = probs.shape[1]
    topk_labels = metrics.topk_indices(probs, top_k)
    topk_probs = np.take_along_axis(probs, topk_labels, axis=1)
    preds = topk_labels[:, 0]
    top1_correct = preds == labels
    topk_correct = (topk_labels == labels[:, None]).any(axis=1)
    top1 = metrics.bootstrap_ci(top1_correct, settings.bootstrap_samples, settings.seed)
    top5 = metrics.bootstrap_ci(topk_correct, settings.bootstrap_samples, settings.seed)
    counts = metrics.confusion_counts(labels, preds, num_classes)
    per_class = metrics.per_class_from_counts(counts)
    reliability = metrics.reliability(topk_probs[:, 0], top1_correct, settings.ece_bins)
    values: dict[str, float | int] = {
        "n_test": len(labels),
        "top1": top1.estimate, "top1_ci_low": top1.low, "top1_ci_high": top1.high,
        "top5": top5.estimate, "top5_ci_low": top5.low, "top5_ci_high": top5.high,
        "macro_precision": float(per_class.precision.mean()),
        "macro_recall": float(per_class.recall.mean()),
        "macro_f1": float(per_class.f1.mean()),
        "ece": reliability.ece,
    }
    return Scores(values, per_class, counts, reliability, topk_labels, topk_probs)


def seed_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """n_seeds, and the mean and sample standard deviation (ddof=1) of top-1 over the seeds."""
    top1 = [entry["top1"] for entry in per_seed]
    return {"n_seeds": len(top1), "top1_seed_mean": statistics.fmean(top1),
            "top1_seed_sd": statistics.stdev(top1) if len(top1) > 1 else None}


def per_class_frame(per_class: metrics.PerClass, classes: list[str], display: list[str]) -> pd.DataFrame:
    """per_class.csv: class, display, accuracy, precision, recall, f1, support."""
    return pd.DataFrame({
        "class": classes, "display": display,
        "accuracy": per_class.recall, "precision": per_class.precision, "recall": per_class.recall,
        "f1": per_class.f1, "support": per_class.support.astype(np.int64),
    })


def predictions_frame(paths: list[str], labels: np.ndarray, scores: Scores) -> pd.DataFrame:
    """predictions.parquet: path, label, pred, correct, top5_labels, top5_probs (best first)."""
    preds = scores.topk_labels[:, 0].astype(np.int64)
    return pd.DataFrame({
        "path": paths,
        "label": labels.astype(np.int64),
        "pred": preds,
        "correct": preds == labels,
        "top5_labels": [row.astype(np.int64).tolist() for row in scores.topk_labels],
        "top5_probs": [row.astype(np.float64).tolist() for row in scores.topk_probs],
    })


def throughput_schedule(settings: EvaluateConfig) -> tuple[int, int]:
    """(warm-up, timed) batches for throughput: a fifth of the latency counts, at least 1 and 3.

    A large batch takes seconds on the CPU; as many batches as single-image latency runs would
    make evaluation on the CPU dominated by timing.
    """
    return max(1, math.ceil(settings.latency_warmup / 5)), max(3, math.ceil(settings.latency_runs / 5))


def model_footprint(model: nn.Module, image_size: int) -> dict[str, float | int]:
    """Parameters, state-dict size in MB (2**20 bytes, as torchvision's model docs count) and
    GFLOPs per image counted by torch.utils.flop_counter (a multiply-add counts as 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return {
        "params": int(params),
        "size_mb": buffer.getbuffer().nbytes / 2**20,
        "gflops": counter.get_total_flops() / 1e9,
    }


def measure_speed(
    model: nn.Module, image_size: int, settings: EvaluateConfig, devices: list[torch.device],
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Latency p50/p95 at batch 1 and throughput at `throughput_batch` on each device ("cpu", "cuda"),
    and `machine_state` (food101.timing) during the timing; raw samples appended to `samples` as
    timing_samples.parquet rows when given."""
    generator = torch.Generator().manual_seed(settings.seed)
    single = torch.randn(1, 3, image_size, image_size, generator=generator)
    batch = torch.randn(settings.throughput_batch, 3, image_size, image_size, generator=generator)
    # Batch-1 latency on few threads: a request's own cost, and on a shared machine two threads
    # wait on whichever core another process holds (the demo's small networks: 15 ms at 2 threads
    # beside the flow's other evaluations, against 3-4 ms alone).
    latency_threads = settings.latency_threads or torch.get_num_threads()
    out: dict[str, Any] = {"latency_cpu_threads": latency_threads}
    for kind in ("cpu", "gpu"):
        for key in ("latency_{}_p50_ms", "latency_{}_p95_ms", "throughput_{}_ips"):
            out[key.format(kind)] = None
    with QUIET.timing():  # no other timing or export's heavy work beside it
        if any(device.type == "cpu" for device in devices):
            prepare_cpu_probe()  # the forkserver's first start is not another process's work to wait out
        with settled_window(settings.settle_cpu_share, settings.settle_s) as state:
            out.update(_time_devices(model, single, batch, devices, settings, latency_threads, state, samples))
    out["machine_state"] = state
    return out


def _time_devices(model: nn.Module, single: torch.Tensor, batch: torch.Tensor, devices: list[torch.device],
                  settings: EvaluateConfig, latency_threads: int, state: dict[str, Any],
                  samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """measure_speed's timings on each device, the worker's CPU time added to `state`."""
    out: dict[str, Any] = {}
    tp_warmup, tp_runs = throughput_schedule(settings)
    schedule = (settings.latency_warmup, settings.latency_runs), (tp_warmup, tp_runs)
    for device in devices:
        kind = "gpu" if device.type == "cuda" else "cpu"
        if device.type == "cpu":  # in processes of their own: see food101.speed
            timed = time_on_cpu_in_processes(model, single, batch, *schedule, threads=torch.get_num_threads(),
                                             latency_threads=latency_threads, processes=settings.timing_processes)
        else:
            on_device = model if next(model.parameters()).device == device else copy.deepcopy(model).to(device)
            timed = time_model(on_device, single, batch, device, *schedule)
        out[f"latency_{kind}_p50_ms"], out[f"latency_{kind}_p95_ms"] = timed.latency_p50_ms, timed.latency_p95_ms
        out[f"throughput_{kind}_ips"] = timed.throughput_ips
        state[WORKER_CPU_KEY] = state.get(WORKER_CPU_KEY, 0.0) + timed.worker_cpu_s
        if samples is not None:
            for metric, values, processes in (("latency_ms", timed.latency_samples_ms, timed.latency_process),
                                              ("throughput_ips", timed.throughput_samples_ips,
                                               timed.throughput_process)):
                processes = processes or [0] * len(values)  # one process (the GPU's: this one)
                samples.extend({"metric": metric, "device": kind, "sample_index": i, "value": float(v),
                                "process": int(k)} for i, (v, k) in enumerate(zip(values, processes, strict=True)))
        log.info("%s: batch-1 latency p50 %.2f ms, p95 %.2f ms; %.1f images/s at batch %d",
                 device, timed.latency_p50_ms, timed.latency_p95_ms, timed.throughput_ips, len(batch))
    return out


def plot_reliability(reliability: metrics.Reliability, title: str):
    """A reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    fig = Figure(figsize=(6, 7), dpi=120)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = (reliability.lower + reliability.upper) / 2
    width = reliability.upper - reliability.lower
    filled = reliability.count > 0
    top.bar(centres[filled], reliability.accuracy[filled], width=width[filled], color="#4C72B0",
            edgecolor="white", label="accuracy")
    gap = reliability.confidence[filled] - reliability.accuracy[filled]
    top.bar(centres[filled], gap, bottom=reliability.accuracy[filled], width=width[filled],
            color="#DD8452", alpha=0.5, edgecolor="#DD8452", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE = {reliability.ece:.3f} ({len(reliability.count)} bins)")
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centres, reliability.count, width=width, color="#55A868", edgecolor="white")
    bottom.set_xlabel("confidence (highest softmax probability)")
    bottom.set_ylabel("test photos")
    fig.tight_layout()
    return fig


def _save_figure(fig, path: Path, fmt: str = "png") -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)


# --- the stage ------------------------------------------------------------------------------------


def eval_dir(config: Config, model: str) -> Path:
    return Path(config.paths.eval) / model


def write_evaluation(
    folder: Path, values: dict[str, Any], scores: Scores, paths: list[str], labels: np.ndarray,
    classes: list[str], display: list[str], title: str, per_seed: list[dict[str, Any]] | None = None,
    timing: list[dict[str, Any]] | None = None, arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the evaluation files into `folder`, replaced as a whole (never half old, half new);
    seeds.json only when more than one seed was trained, timing_samples.parquet when given, and
    `arrays` (file name -> array: the probabilities) beside them."""
    staged = staging_dir(folder)
    try:
        write_json(staged / METRICS_FILE, values)
        for name, array in (arrays or {}).items():
            write_npy(staged / name, array)
        if per_seed is not None and len(per_seed) > 1:
            write_json(staged / SEEDS_FILE, per_seed)
        write_text(staged / PER_CLASS_FILE, per_class_frame(scores.per_class, classes, display).to_csv(index=False))
        write_npy(staged / COUNTS_FILE, scores.counts)
        write_parquet(staged / PREDICTIONS_FILE, predictions_frame(paths, labels, scores))
        if timing is not None:
            write_parquet(staged / TIMING_FILE, pd.DataFrame(timing, columns=list(TIMING_COLUMNS)))
        _save_figure(plot_reliability(scores.reliability, title), staged / RELIABILITY_FILE)
        return replace_dir(folder, staged)
    finally:
        if staged.exists():  # only after a failure: no half-written folder left behind
            shutil.rmtree(staged)


@task(name="evaluate", cache_policy=NONE)
def evaluate(config: Config, model: str, parent_run_id: str | None = None) -> dict:
    """Score a trained model on the test split; write metrics, predictions and plots."""
    settings = config.evaluate
    params = {"evaluate": dataclasses.asdict(settings)}
    with stage_run(config, "evaluate", parent_run_id, model=model, params=params) as run:
        # Untimed work runs beside other models' stages, never while one of them is timed.
        with QUIET.heavy():
            train_summary = read_train_summary(config, model)
            if train_summary.get("status") != "ok":
                raise EvaluationInputError(
                    f"{model} did not finish training ({train_summary.get('error')}); fix that and train it "
                    f"again (food101 stage train --model {model}) before evaluating"
                )
            network, meta = load_trained_model(config, model, "cpu")
            cache = open_cache(config)
            classes, display = list(cache.classes), list(cache.display) or list(cache.classes)
            _check_classes(model, meta, classes)
            recipe = config.train.for_model(model)
            replicas = trained_replicas(config, model)
            image_size = int(meta["image_size"])
            network = network.eval().to(memory_format=torch.channels_last)
            images, cache_labels = cache.images("test"), np.asarray(cache.labels("test"))
        # The flow starts a model's evaluation while later models still train. Holding a training
        # slot keeps a training off this device while we time it: latency measured next to a
        # training run would be the training's, not the model's.
        with training_slots(config).acquire(f"evaluate[{model}]") as device:
            timed_devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
            footprint = model_footprint(network, image_size)
            timing: list[dict[str, Any]] = []
            speed = measure_speed(network, image_size, settings, timed_devices, timing)
            network = network.to(device)
            feed = BatchFeed(images, cache_labels, batch_size=settings.batch_size, device=device, train=False,
                             image_size=image_size, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
            probs, labels = predict(network, feed, device, total=len(cache_labels))
            val_labels = np.asarray(cache.labels("val"))
            val_probs = predict(network, BatchFeed(cache.images("val"), val_labels, batch_size=settings.batch_size,
                                                   device=device, train=False, image_size=image_size,
                                                   mean=tuple(meta["mean"]), std=tuple(meta["std"])),
                                device, total=len(val_labels))[0] if len(val_labels) else np.zeros((0, len(classes)))
            # The other seeds' trainings: test predictions only (the same architecture: no timing).
            replica_probs = {seed: predict(_load_replica(model, best_path, device, classes), feed, device,
                                           total=len(cache_labels))[0]
                             for seed, best_path in replicas}
        with QUIET.heavy():
            if not np.array_equal(labels, cache_labels):
                raise EvaluationInputError("the batch feed returned the test labels out of cache order; "
                                           "predictions cannot be matched to photos")
            scores = score(probs, labels, settings)
            per_seed = [{"seed": recipe.seed, **{k: scores.metrics[k] for k in SEED_KEYS}}]
            for seed, seed_probs in replica_probs.items():
                seed_scores = score(seed_probs, labels, settings).metrics
                per_seed.append({"seed": seed, **{k: seed_scores[k] for k in SEED_KEYS}})

            index = cache.index
            paths = index[index["split"] == "test"].sort_values("position")["path"].astype(str).tolist()
            if len(paths) != len(labels):
                raise EvaluationInputError(f"the cache index lists {len(paths)} test photos but the cache holds "
                                           f"{len(labels)}; run preprocess again (food101 stage preprocess)")
            values = {
                "model": model, **scores.metrics, **speed, **footprint,
                "train_time_s": train_summary.get("train_time_s"),
                "train_images_per_s": train_summary.get("images_per_s"),
                **seed_summary(per_seed),
            }
            values = {key: values[key] for key in METRIC_KEYS}
            final = write_evaluation(eval_dir(config, model), values, scores, paths, labels, classes, display,
                                     f"{model}: reliability on {len(labels)} test photos", per_seed, timing,
                                     arrays={PROBS_FILE: probs.astype(np.float32),
                                             VAL_PROBS_FILE: val_probs.astype(np.float32)})

            run.set_tags({"eval_device": str(device), "cpu_threads": torch.get_num_threads(),
                          "precision": "bf16-autocast" if device.type == "cuda" else "fp32"})
            run.log_metrics({k: v for k, v in values.items() if isinstance(v, (int, float))})
            run.log_artifacts(final, "eval")
        log.info("%s: top-1 %.4f [%.4f, %.4f], top-5 %.4f, ECE %.4f", model, values["top1"],
                 values["top1_ci_low"], values["top1_ci_high"], values["top5"], values["ece"])
        if values["n_seeds"] > 1:
            log.info("%s: top-1 over %d seeds %.4f ± %.4f (sd)", model, values["n_seeds"],
                     values["top1_seed_mean"], values["top1_seed_sd"])
        return {
            "model": model, "eval_dir": str(final), "n_test": values["n_test"], "top1": values["top1"],
            "top5": values["top5"], "macro_f1": values["macro_f1"], "ece": values["ece"],
            "latency_cpu_p50_ms": values["latency_cpu_p50_ms"],
        }


def trained_replicas(config: Config, model: str) -> list[tuple[int, Path]]:
    """(seed, best.pt) of every finished replica training that `train.seeds` asks for."""
    found = []
    for seed in replica_seeds(config.train.for_model(model)):
        folder = replica_dir(config, model, seed)
        summary = read_json(folder / "train.json") if (folder / "train.json").is_file() else {}
        if summary.get("status") == "ok" and (folder / "best.pt").is_file():
            found.append((seed, folder / "best.pt"))
        else:
            log.warning("%s: no finished training with seed %d in %s; it is left out of the mean and sd over "
                        "seeds (train it: food101 stage train --model %s)", model, seed, folder, model)
    return found


def _load_replica(model: str, best_path: Path, device: torch.device, classes: list[str]) -> nn.Module:
    network, meta = load_best(best_path, device)
    _check_classes(model, meta, classes)
    return network.to(memory_format=torch.channels_last)


def _check_classes(model: str, meta: dict[str, Any], classes: list[str]) -> None:
    if list(meta["classes"]) != classes:
        raise EvaluationInputError(
            f"{model} was trained on {len(meta['classes'])} classes that differ from the cache's "
            f"{len(classes)}; train it again (food101 stage train --model {model}) on this cache"
        )


# --- readers --------------------------------------------------------------------------------------


def _existing(config: Config, model: str, name: str) -> Path:
    path = eval_dir(config, model) / name
    if not path.is_file():
        raise EvaluationMissing(f"{path} does not exist: evaluate {model} first "
                                f"(food101 stage evaluate --model {model})")
    return path


def read_metrics(config: Config, model: str) -> dict[str, Any]:
    return read_json(_existing(config, model, METRICS_FILE))


def read_seeds(config: Config, model: str) -> list[dict[str, Any]]:
    """seeds.json: [{seed, top1, top5, macro_f1}] per training of the model (train.seeds > 1 only)."""
    return read_json(_existing(config, model, SEEDS_FILE))


def read_per_class(config: Config, model: str) -> pd.DataFrame:
    return pd.read_csv(_existing(config, model, PER_CLASS_FILE))


def read_confusion_counts(config: Config, model: str) -> np.ndarray:
    return np.load(_existing(config, model, COUNTS_FILE))


def read_predictions(config: Config, model: str) -> pd.DataFrame:
    return pd.read_parquet(_existing(config, model, PREDICTIONS_FILE))


def read_probs(config: Config, model: str, split: str = "test") -> np.ndarray:
    """The saved softmax probabilities of `split` (test or val), rows in cache order."""
    return np.load(_existing(config, model, PROBS_FILE if split == "test" else VAL_PROBS_FILE))


def read_timing_samples(config: Config, model: str) -> pd.DataFrame:
    """timing_samples.parquet: metric (latency_ms, throughput_ips), device (cpu, gpu), sample_index, value."""
    return pd.read_parquet(_existing(config, model, TIMING_FILE))
