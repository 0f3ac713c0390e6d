"""One seed, one model: a training does not depend on what else draws random numbers in the process.

The flow runs trainings and evaluations on threads of one process, which share torch's (and
numpy's, and Python's) process-wide generators. These tests train the same recipe alone and then
beside a thread that keeps drawing from, and reseeding, those generators (what an evaluation
building a model used to do), and ask for byte-identical weights.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from food101.models import build_model
from tasks.preprocess import build_cache
from tasks.train import load_best, load_checkpoint, model_dir, save_checkpoint, train
from tests.conftest import SAMPLE, make_config, sample_classes, sample_manifest

# Dropout and stochastic depth: randomness in the forward pass as well as in the initialisation.
ARCH = "efficientnet_b0"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread: the tests share two cores, and the comparison wants the same kernels."""


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real preprocess cache of the sample at the demo profile's 64 px, built once."""
    root = tmp_path_factory.mktemp("reproducibility")
    config = make_config(root)
    build_cache(sample_manifest(), SAMPLE, sample_classes(), config.preprocess, config.paths.cache,
                workers=1, progress_bar=False)
    return config.paths.cache


class Beside:
    """A daemon thread running `_run` while the `with` block does its work; stopped at the end."""

    def __init__(self, name: str) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class GlobalRandomness(Beside):
    """A thread that draws from, and reseeds, every process-wide generator until stopped."""

    def __init__(self) -> None:
        super().__init__("global-rng")
        self.draws = 0

    def _run(self) -> None:
        while not self.stop.is_set():
            torch.randn(64)
            random.random()
            np.random.rand()
            self.draws += 1
            if self.draws % 50 == 0:
                torch.manual_seed(self.draws)
            self.stop.wait(0.001)


def _train(root: Path, cache: Path) -> dict[str, torch.Tensor]:
    config = make_config(root, paths__cache=str(cache), models=[ARCH], train__overrides={}, train__epochs=2,
                         train__batch_size=16, train__max_steps_per_epoch=3)
    train.fn(config, ARCH)
    return load_checkpoint(model_dir(config, ARCH) / "checkpoint.pt")["model"]


def test_a_training_beside_a_thread_using_the_global_generators_gives_the_same_weights(
    cache_path: Path, tmp_path: Path
) -> None:
    alone = _train(tmp_path / "alone", cache_path)
    torch.manual_seed(12345)  # another global state at the start changes nothing either
    with GlobalRandomness() as other:
        beside = _train(tmp_path / "beside", cache_path)
    assert other.draws > 10  # the other thread did draw while the model trained
    assert alone.keys() == beside.keys()
    different = [key for key in alone if not torch.equal(alone[key], beside[key])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


class ExportsBeside(Beside):
    """A thread that exports a small model to ONNX again and again until stopped, as export[m]
    does beside later models' trainings in the flow (and, warm, in a long-lived `food101 serve`)."""

    def __init__(self, path: Path) -> None:
        from food101.models import build_model as build
        from food101.onnx_inference import with_preprocessing

        network = build("mobilenet_v3_large", 5, pretrained=False).eval()
        self.module = with_preprocessing(network, [0.5] * 3, [0.5] * 3, 32, 32)
        super().__init__("exports")
        self.path, self.rounds, self.errors = path, 0, []

    def _run(self) -> None:
        from tasks.export import export_onnx

        while not self.stop.is_set():
            try:
                export_onnx(self.module, 32, self.path, opset=20)
            except Exception as exc:  # noqa: BLE001 - asserted by the test
                self.errors.append(exc)
                return
            self.rounds += 1


def test_a_training_beside_an_onnx_export_gives_the_same_weights(cache_path: Path, tmp_path: Path) -> None:
    """torch.export sets process-wide state while it traces (torch.compiler.is_compiling() true),
    which changed AdamW's arithmetic in a training on another thread: every tensor differed."""
    alone = _train(tmp_path / "alone", cache_path)
    with ExportsBeside(tmp_path / "beside.onnx") as exports:
        beside = _train(tmp_path / "beside", cache_path)
    assert exports.errors == [] and exports.rounds >= 1  # an export ran while the model trained
    different = [key for key in alone if not torch.equal(alone[key], beside[key])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def test_building_a_model_depends_on_its_seed_only_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = build_model(ARCH, 5, pretrained=False, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    again = build_model(ARCH, 5, pretrained=False, seed=3).state_dict()
    other = build_model(ARCH, 5, pretrained=False, seed=4).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "mobilenet_v3_large"])
def test_loading_a_trained_model_draws_nothing_from_the_global_generator(arch: str, tmp_path: Path) -> None:
    """What evaluation, the report and the registry do beside a running training."""
    saved = build_model(arch, 5, pretrained=False).state_dict()
    path = tmp_path / arch / "best.pt"
    save_checkpoint(path, {"state_dict": saved, "arch": arch, "num_classes": 5, "image_size": 64})
    before = torch.get_rng_state()
    net, meta = load_best(path)
    assert torch.equal(torch.get_rng_state(), before)
    loaded = net.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not any(t.is_meta for t in loaded.values()) and meta["arch"] == arch
