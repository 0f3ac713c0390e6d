"""Shared fixtures: an isolated environment, configs whose outputs live in a temp folder."""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
GENERATED_PATHS = ("raw", "dataset", "manifest", "cache", "models", "eval", "export", "confusion", "robustness",
                   "reports", "tracking_db", "tracking_artifacts")
_DEFAULT_RELATIVE = {
    "raw": "data/raw", "dataset": "data/dataset.json", "manifest": "data/manifest",
    "cache": "data/cache", "models": "artifacts/models", "eval": "artifacts/eval",
    "export": "artifacts/export",
    "robustness": "artifacts/robustness",
    "confusion": "artifacts/confusion", "reports": "reports", "tracking_db": "mlflow.db",
    "tracking_artifacts": "mlruns",
}

# Before anything imports Prefect or MLflow: keep their state out of the home folder.
# A multiprocessing worker of a test process (a pool worker that imports a test module to unpickle
# one of its classes) keeps that process's folder, which that process removes: a folder of its own
# would outlive it, as pool workers exit without running atexit.
_OWNS_STATE = multiprocessing.parent_process() is None or "FOOD101_TEST_STATE_DIR" not in os.environ
if _OWNS_STATE:
    _STATE = Path(os.environ.get("FOOD101_TEST_STATE", "/tmp/food101-test-state")) / str(os.getpid())
    os.environ["FOOD101_TEST_STATE_DIR"] = str(_STATE)
else:
    _STATE = Path(os.environ["FOOD101_TEST_STATE_DIR"])
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["MPLCONFIGDIR"] = str(_STATE / "matplotlib")
os.environ["DVC_SITE_CACHE_DIR"] = str(_STATE / "dvc-site")
os.environ["DVC_GLOBAL_CONFIG_DIR"] = str(_STATE / "dvc-global")
os.environ["TORCH_HOME"] = str(_STATE / "torch")  # no pretrained weights unless a test puts them there
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("FOOD101_PARAMS", None)
# Child processes keep their temporary folders in this run's state, removed with it: a run that a
# test kills (SIGKILL), or that leaves with os._exit after SIGTERM, cannot remove multiprocessing's
# pymp-* folder itself. This process keeps the system's (pytest's tmp_path is there).
tempfile.gettempdir()
(_STATE / "tmp").mkdir(parents=True, exist_ok=True)
os.environ["TMPDIR"] = str(_STATE / "tmp")
# Under pytest-xdist (`make test`) the workers share the cores: each gets its share of threads, as
# food101.devices advises for processes sharing a machine, unless OMP_NUM_THREADS is already set.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

from food101 import env  # noqa: E402

env.configure(REPO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this run's state (Prefect, DVC and torch homes: hundreds of MB a run); keep the template DB."""
    shutil.rmtree(_STATE, ignore_errors=True)


# Prefect and matplotlib make their (empty) homes again while the process exits, after
# pytest_sessionfinish: registered before they are imported, this runs after their exit handlers.
if _OWNS_STATE:
    atexit.register(shutil.rmtree, _STATE, ignore_errors=True)


@functools.cache
def _file_says(module: str, text: str) -> bool:
    """Whether the test file `module` (a node id's path) contains `text`."""
    path = REPO / module
    return path.is_file() and text in path.read_text()


def _uses_demo_run(module: str) -> bool:
    return _file_says(module, "demo_run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the longest files first, as `--dist loadfile` hands them out in collection
    order, so that neither worker is left with one at the end (the demo run's files, then the slow ones)."""
    if not hasattr(config, "workerinput"):
        return

    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return 0 if _uses_demo_run(module) else 1 if _file_says(module, "pytestmark = pytest.mark.slow") else 2

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (make test), with every file that uses the session's demo run on one worker,
    which then runs it once. (xdist_group marks would say it per test, but pytest-xdist 3.8 cannot
    read them under pytest 9.2: its group suffix on node ids no longer takes.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the collection's order (above), not the biggest files first

    class DemoRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "demo_run" if _uses_demo_run(module) else module

    return DemoRunScheduling(config, log)


def _seed_tracking_db(db: Path) -> None:
    """Copy a migrated, empty MLflow database into place: migrating a new one costs 5-15 s here.

    The template outlives the session (one file per MLflow version, beside the per-run state);
    it is built in this run's folder and renamed into place, so parallel sessions never see half of one.
    """
    from importlib.metadata import version

    template = _STATE.parent / f"mlflow-template-{version('mlflow')}.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        building = _STATE / template.name
        building.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(f"sqlite:///{building}").search_experiments()
        os.replace(building, template)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)


def generated_overrides(root: Path) -> dict[str, Any]:
    """--set overrides that move every generated path under `root` (the sample stays shared), and
    timings that start without waiting for a quiet machine: the suite's two workers keep each
    other's core busy, so every evaluation would wait out `evaluate.settle_s` (test_evaluate
    tests the wait)."""
    _seed_tracking_db(root / _DEFAULT_RELATIVE["tracking_db"])
    out = {f"paths.{k}": str(root / v) for k, v in _DEFAULT_RELATIVE.items()}
    out["paths.sample"] = str(SAMPLE)
    out["evaluate.settle_s"] = 0
    return out


def make_config(root: Path, profile: str | None = "demo", **overrides):
    """The repo's params.yaml with a profile, every output redirected under `root`."""
    from food101.config import load_config

    merged = generated_overrides(root) | {k.replace("__", "."): v for k, v in overrides.items()}
    return load_config(REPO / "params.yaml", profile=profile, overrides=merged)


def sample_classes(root: Path = SAMPLE) -> dict[str, list[str]]:
    """Class folder names and display names of a dataset root, as classes.json holds them."""
    from tasks.validate import read_meta

    meta = read_meta(root)
    return {"names": meta.classes, "display": meta.display}


def sample_manifest(root: Path = SAMPLE, repeat: int = 1, rows: int | None = None):
    """The bundled sample as the validate stage lists it, every photo taken as decodable.

    The listing comes from the validate stage's own code; only the image inspection is skipped.
    `repeat` > 1 repeats the rows (more work from the same photos, for benchmarks and kill tests);
    `rows` gives exactly that many, repeating the listing as often as needed.
    """
    import hashlib

    import pandas as pd

    from tasks.validate import read_meta, select_rows

    meta = read_meta(root)
    frame = select_rows(meta, meta.classes, None, None)
    data = [(root / path).read_bytes() for path in frame["path"]]
    frame = frame.assign(bytes=[len(d) for d in data], sha256=[hashlib.sha256(d).hexdigest() for d in data],
                         status="ok")
    if rows is not None:
        repeat = -(-rows // len(frame))
    frame = pd.concat([frame] * repeat, ignore_index=True) if repeat > 1 else frame
    return frame if rows is None else frame.iloc[:rows]


def assert_same_predictions(expected_eval: Path, actual_eval: Path, models: list[str]) -> None:
    """Every test photo's label, prediction and top-5 are identical between two evaluation folders;
    the probabilities agree to float32 rounding (oneDNN's CPU kernels may round the last bit
    differently from one process to the next)."""
    import numpy as np
    import pandas as pd

    from tasks.evaluate import PREDICTIONS_FILE

    exact = ["path", "label", "pred", "correct", "top5_labels"]
    for model in models:
        expected = pd.read_parquet(expected_eval / model / PREDICTIONS_FILE)
        actual = pd.read_parquet(actual_eval / model / PREDICTIONS_FILE)
        pd.testing.assert_frame_equal(actual[exact], expected[exact], check_exact=True, obj=f"{model} predictions")
        difference = np.abs(np.stack(actual["top5_probs"]) - np.stack(expected["top5_probs"])).max()
        assert difference <= 1e-6, f"{model}: probabilities differ by up to {difference:.2e}"


def assert_overfits_one_batch(trainer, x, y, max_steps: int = 60) -> None:
    """Train on the one batch (x, y) until the loss is down 90%, failing after `max_steps`: the
    guard against the old system's 12% (a pipeline that cannot even memorise ten photos)."""
    from food101.engine import train_step

    losses = []
    for _ in range(max_steps):
        loss, _ = train_step(trainer, x, y)
        losses.append(float(loss))
        if losses[-1] <= 0.1 * losses[0]:
            return
    raise AssertionError(f"{trainer.label}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {max_steps} steps")


@contextlib.contextmanager
def single_torch_thread():
    """One torch thread inside the block, the previous count restored after (module fixtures use
    this; tests use `one_thread`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread (and OMP_NUM_THREADS=1 for stages that set their own): tests share 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with single_torch_thread():
        yield


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of the bundled sample, to break on purpose."""
    target = tmp_path / "sample"
    shutil.copytree(SAMPLE, target)
    return target


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test harness: a temporary API database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, prefect_harness):
    """One real demo benchmark (the whole flow on the sample) shared by every test that inspects it."""
    from flows.benchmark import benchmark

    root = tmp_path_factory.mktemp("demo-run")
    overrides = generated_overrides(root)
    result = benchmark(profile="demo", overrides=overrides, params_file=str(REPO / "params.yaml"))
    config = make_config(root)
    return {"root": root, "config": config, "result": result, "overrides": overrides}
