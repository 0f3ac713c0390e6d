"""robustness[model]: corruptions that grow with severity, reproducible, on test photos only,
reaching the model; mCE as ImageNet-C defines it; bad settings refused before anything runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from food101.config import CORRUPTIONS, SEVERITIES, ConfigError, load_config
from tests.conftest import REPO, SAMPLE, make_config
from tests.conftest import generated_overrides as _overrides


def _sample_photos(n: int = 16, side: int = 64) -> torch.Tensor:
    """Real sample photos as the cache holds them: uint8, centre-cropped squares (B, 3, H, W)."""
    paths = sorted(SAMPLE.glob("images/*/*.jpg"))[::10][:n]
    photos = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = side / min(image.size)
            image = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))))
            left, top = (image.width - side) // 2, (image.height - side) // 2
            photos.append(np.asarray(image.crop((left, top, left + side, top + side))))
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()


def _corrupted(x: torch.Tensor, name: str, severity: int, settings) -> torch.Tensor:
    from tasks.robustness import Draws, corrupt, photo_uniforms

    draws = Draws(photo_uniforms(settings.seed, name, severity, len(x)))
    return corrupt(x, name, severity, settings, draws)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_pixels_more_with_severity_and_the_same_way_twice(name):
    settings = load_config(REPO / "params.yaml").robustness
    photos = _sample_photos()
    assert torch.equal(_corrupted(photos, name, 0, settings), photos)  # severity 0 is the clean photo
    distances = []
    for severity in SEVERITIES:
        first = _corrupted(photos, name, severity, settings)
        again = _corrupted(photos, name, severity, settings)
        assert first.dtype == torch.uint8 and first.shape == photos.shape
        assert torch.equal(first, again), f"{name} severity {severity} differs between two runs"
        distances.append(float((first.float() - photos.float()).abs().mean()))
    assert distances[0] > 0, f"{name} at severity 1 leaves the photos untouched"
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), f"{name}: {distances}"


def test_cpu_chunks_give_the_photos_what_one_pass_over_the_batch_gives():
    """corrupt() splits a CPU batch into cache-sized chunks; each photo's draws must follow it."""
    from food101.corruptions import CPU_CHUNK_PIXELS, OPERATIONS, Draws, corrupt, photo_uniforms

    settings = load_config(REPO / "params.yaml").robustness
    photos = _sample_photos(n=CPU_CHUNK_PIXELS // (224 * 224) + 3, side=224)
    for name in ("brightness_bright", "contrast", "gaussian_noise", "gaussian_blur", "motion_blur", "jpeg", "rotation",
                 "occlusion", "off_centre_crop"):
        uniforms = photo_uniforms(settings.seed, name, 4, len(photos))
        chunked = corrupt(photos, name, 4, settings, Draws(uniforms))
        whole = OPERATIONS[name](photos, float(settings.levels[name][3]), Draws(uniforms))
        assert torch.equal(chunked, whole), name


def test_jpeg_gives_the_same_pixels_on_one_thread_and_on_several():
    """JPEG splits the batch over torch's thread count; each photo is coded alone, so the photos
    must not depend on it (a benchmark on a bigger machine sees the same corrupted photos)."""
    from food101.corruptions import Draws, corrupt, photo_uniforms

    settings = load_config(REPO / "params.yaml").robustness
    photos = _sample_photos(n=7)
    uniforms = photo_uniforms(settings.seed, "jpeg", 5, len(photos))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = corrupt(photos, "jpeg", 5, settings, Draws(uniforms))
        torch.set_num_threads(3)
        several = corrupt(photos, "jpeg", 5, settings, Draws(uniforms))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)
    assert not torch.equal(one, photos)


def test_the_throughput_baseline_blurs_motion_with_the_stage_s_own_streak():
    """benchmarks/robustness_throughput.py's per-photo loop must time the same corruption as the
    stage: for motion blur (Pillow has no streak kernel) the same pixels for every direction."""
    import runpy

    from food101.corruptions import MOTION_DIRECTIONS, Draws, corrupt

    baseline = runpy.run_path(str(REPO / "benchmarks" / "robustness_throughput.py"), run_name="baseline")
    settings = load_config(REPO / "params.yaml").robustness
    photos = _sample_photos(n=2)

    class Fixed:  # the loop's generator, giving the uniform that picks one direction
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    for direction in range(MOTION_DIRECTIONS):
        uniform = (direction + 0.5) / MOTION_DIRECTIONS
        ours = corrupt(photos, "motion_blur", 5, settings, Draws(torch.full((len(photos), 2), uniform)))
        loop = [np.asarray(baseline["_pil_one"](Image.fromarray(photo.permute(1, 2, 0).numpy()), "motion_blur",
                                                float(settings.levels["motion_blur"][4]), Fixed(uniform)))
                for photo in photos]
        assert np.array_equal(ours.permute(0, 2, 3, 1).numpy(), np.stack(loop)), direction


def test_no_corruption_draws_from_a_generator_so_every_device_and_batch_sees_the_same_photos():
    """A CUDA generator draws other numbers than the CPU's from the same seed: every corruption, the
    noise too, takes its randomness from the photos' uniforms (not torch's global generator), or a
    GPU run sees other photos."""
    from food101.corruptions import Draws, corrupt, photo_uniforms

    settings = load_config(REPO / "params.yaml").robustness
    photos = _sample_photos(n=6)
    for name in CORRUPTIONS:
        uniforms = photo_uniforms(settings.seed, name, 5, len(photos))
        torch.manual_seed(1)
        one = corrupt(photos, name, 5, settings, Draws(uniforms))
        torch.manual_seed(2)
        other = corrupt(photos, name, 5, settings, Draws(uniforms))
        assert torch.equal(one, other), name
        alone = [corrupt(photos[i:i + 1], name, 5, settings, Draws(uniforms[i:i + 1]))
                 for i in range(len(photos))]  # nor on the batch a photo falls in
        assert torch.equal(torch.cat(alone), one), name


@pytest.mark.parametrize("severity", SEVERITIES)
def test_the_noise_is_gaussian_with_the_severity_s_sd_and_differs_between_photos(severity):
    """The noise comes from a seeded table: on mid-grey photos (no clipping below 5 sd) each photo's
    noise has mean 0 and the level's sd, and no two photos get the same noise."""
    from food101.corruptions import Draws, corrupt, photo_uniforms

    settings = load_config(REPO / "params.yaml").robustness
    grey = torch.full((8, 3, 64, 64), 128, dtype=torch.uint8)
    uniforms = photo_uniforms(settings.seed, "gaussian_noise", severity, len(grey))
    noise = (corrupt(grey, "gaussian_noise", severity, settings, Draws(uniforms)).double()
             - 128).flatten(1)
    sd = 255 * settings.levels["gaussian_noise"][severity - 1]
    clipped = (noise.abs() >= 127).double().mean()
    assert float(noise.mean(1).abs().max()) < 5 * sd / 110 + 0.5  # 5 standard errors of a mean of 12,288
    if clipped < 1e-3:
        assert float(noise.std(1).sub(sd).abs().max()) < 0.05 * sd
    assert len({tuple(row[:32].tolist()) for row in noise}) == len(grey)


def test_corruption_error_is_imagenet_c_s_ratio_of_summed_errors():
    from tasks.robustness import corruption_errors

    rng = np.random.default_rng(0)
    baseline = rng.integers(1, 6, size=(200, 3)).astype(float)  # wrong severities per photo and corruption
    half = np.floor(baseline / 2)
    ce, mce = corruption_errors(half, baseline, samples=200, seed=0)
    expected = 100 * half.sum(axis=0) / baseline.sum(axis=0)
    np.testing.assert_allclose(ce, expected)
    assert mce.estimate == pytest.approx(expected.mean())
    assert mce.low < mce.estimate < mce.high
    same_ce, same = corruption_errors(baseline, baseline, samples=50, seed=0)
    assert list(same_ce) == [100.0] * 3 and same.low == same.high == 100.0


def test_most_robust_rule_looks_only_within_the_points_of_the_best():
    from tasks.robustness import most_robust_within

    metrics = {"a": {"top1": 0.90, "mean_corruption_accuracy": 0.50},
               "b": {"top1": 0.895, "mean_corruption_accuracy": 0.60},
               "c": {"top1": 0.80, "mean_corruption_accuracy": 0.75}}
    chosen, reason = most_robust_within(metrics, 1.0)
    assert chosen == "b"
    assert reason.startswith("Of the 2 models within 1 point") and reason.endswith(".")
    assert most_robust_within(metrics, 10.0)[0] == "c"
    assert most_robust_within({"a": {"top1": 0.9}}, 1.0)[0] is None


def test_executive_summary_names_the_more_robust_model_only_when_it_differs():
    from food101.recommend import executive_summary_text, recommend

    metrics = {"a": {"top1": 0.90, "n_test": 500, "mean_corruption_accuracy": 0.41},
               "b": {"top1": 0.895, "n_test": 500, "mean_corruption_accuracy": 0.62}}
    recs = recommend(metrics, 20.0, 1.0, [])
    chosen = recs.deploy.model
    other = "b" if chosen == "a" else "a"
    text = executive_summary_text(recs, metrics, 5, [], robust=other)
    assert (f" On degraded photos (blur, noise, poor light, compression) {other} holds up better: "
            f"{100 * metrics[other]['mean_corruption_accuracy']:.1f}% mean accuracy under corruptions") in text
    assert text.endswith("see [Robustness](#robustness).")
    assert "degraded" not in executive_summary_text(recs, metrics, 5, [], robust=chosen)


@pytest.mark.parametrize(("override", "message"), [
    ("robustness.corruptions=[gausian_blur]", "did you mean 'gaussian_blur'?"),
    ("robustness.severities=[1, 6]", "6 is not a severity; robustness.levels lists severities 1-5; did you mean 5?"),
    ("robustness.levels.jpeg=[50, 30]", "robustness.levels.jpeg must list 5 strengths"),
    ("robustness.baseline_model=resnet5", "did you mean 'resnet50'"),
])
def test_bad_robustness_settings_stop_at_load_config(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?").replace("[", r"\[")):
        load_config(REPO / "params.yaml", "demo", [*(f"{k}={v}" for k, v in _overrides(tmp_path).items()), override])


# --- the stage in the demo benchmark (the session's one demo run) ---------------------------------


def test_the_stage_reads_only_the_test_rows(demo_run):
    from tasks.preprocess import open_cache
    from tasks.robustness import read_per_photo

    config = demo_run["config"]
    index = open_cache(config).index
    test_ids = index[index["split"] == "test"].sort_values("position")["image_id"].astype(str).tolist()
    other_ids = set(index[index["split"] != "test"]["image_id"].astype(str))
    settings = config.robustness
    for model in config.models:
        frame = read_per_photo(config, model)
        assert len(frame) == len(test_ids) * len(settings.corruptions) * len(settings.severities)
        for (_, _), group in frame.groupby(["corruption", "severity"], sort=False):
            assert group["image_id"].tolist() == test_ids
        assert not set(frame["image_id"]) & other_ids


def test_severity_zero_reproduces_evaluate_exactly(demo_run):
    from tasks.evaluate import read_metrics, read_predictions
    from tasks.preprocess import open_cache
    from tasks.robustness import classify, load_test_photos, read_results
    from tasks.train import load_trained_model

    config = demo_run["config"]
    photos = load_test_photos(open_cache(config))
    for model in config.models:
        network, meta = load_trained_model(config, model, "cpu")
        network = network.to(memory_format=torch.channels_last)
        preds = classify(network, photos, "gaussian_blur", 0, config.robustness, torch.device("cpu"),
                         int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]))
        clean = read_predictions(config, model)
        np.testing.assert_array_equal(preds, clean["pred"].to_numpy())
        assert read_results(config, model)["clean_top1"] == read_metrics(config, model)["top1"]


def test_blur_and_noise_at_the_highest_severity_cost_accuracy(demo_run):
    from tasks.robustness import read_results

    config = demo_run["config"]
    worst = max(SEVERITIES)
    drops = {}
    for model in config.models:
        results = read_results(config, model)
        for name in ("gaussian_blur", "gaussian_noise"):
            row = next(r for r in results["corruptions"][name]["severities"] if r["severity"] == worst)
            drops[(model, name)] = results["clean_top1"] - row["accuracy"]
    assert max(drops.values()) >= 0.1, drops  # at least 5 of the 50 test photos lost


def test_metrics_reach_mlflow_and_summary_json(demo_run):
    from mlflow.tracking import MlflowClient

    from food101.tracking import client_for
    from tasks.report import read_summary

    config = demo_run["config"]
    client: MlflowClient = client_for(config)
    parent = demo_run["result"]["parent_run_id"]
    runs = client.search_runs([r.experiment_id for r in client.search_experiments()],
                              f"tags.mlflow.parentRunId = '{parent}' and tags.stage = 'robustness'")
    assert sorted(r.data.tags["model"] for r in runs) == sorted(config.models)
    settings = config.robustness
    expected = {f"top1_{c}_s{s}" for c in settings.corruptions for s in settings.severities}
    for run in runs:
        assert expected | {"mean_corruption_accuracy", "relative_robustness"} <= set(run.data.metrics)
    summary = read_summary(config)
    baseline = config.robustness.baseline_model
    for model in config.models:
        values = summary["models"][model]
        assert 0.0 <= values["mean_corruption_accuracy"] <= 1.0
        assert values["mce"] is not None
    assert summary["models"][baseline]["mce"] == pytest.approx(100.0)
    report = (config.paths.reports / "report.md").read_text()
    assert "## Robustness" in report and "robustness_examples.png" in report


def test_per_photo_frame_has_one_row_per_photo_and_condition():
    from tasks.robustness import SplitPhotos, per_photo_frame

    photos = SplitPhotos(np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 2]), ["a", "b", "c"], ["1", "2", "3"])
    preds = {("jpeg", 1): np.array([0, 0, 2]), ("jpeg", 5): np.array([1, 1, 1])}
    frame = per_photo_frame(photos, preds)
    assert list(frame["correct"]) == [True, False, True, False, True, False]
    assert isinstance(frame, pd.DataFrame) and set(frame["severity"]) == {1, 5}


def test_a_demo_config_selects_a_subset(tmp_path):
    config = make_config(tmp_path, robustness__corruptions=["jpeg"], robustness__severities=[5])
    assert config.robustness.corruptions == ["jpeg"] and config.robustness.severities == [5]


def test_the_throughput_benchmark_runs_without_the_pipeline_stack():
    """The GPU machines that run benchmarks/robustness_throughput.py have no Prefect, MLflow or kornia."""
    import json
    import os
    import subprocess
    import sys

    blocked = ["prefect", "mlflow", "great_expectations", "dvc", "starlette", "uvicorn", "kornia", "dask"]
    script = (
        "import runpy, sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "sys.argv = ['robustness_throughput.py', '--images', '4', '--size', '32', '--batch', '4', '--repeats', '1']\n"
        "runpy.run_path('benchmarks/robustness_throughput.py', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["ratio"] > 0
