"""The library modules and the stand-alone benchmarks import without the orchestration stack.

A machine with only PyTorch and the scientific stack (a GPU box for a benchmark, say) must be
able to build a cache and run the benchmarks: each check runs in a fresh interpreter whose
import system refuses Prefect, MLflow, Great Expectations, DVC, the server stack, Kornia and Dask.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("prefect", "mlflow", "great_expectations", "dvc", "starlette", "uvicorn", "kornia", "dask")
BENCHMARKS = ("transfer_recipe.py", "train_throughput.py", "parallel_training.py", "robustness_throughput.py")

BLOCKER = f"""
import importlib.abc, runpy, sys
BLOCKED = {BLOCKED!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{{fullname}} is not installed on this machine (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {str(REPO)!r})
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_the_blocker_blocks() -> None:
    result = run_blocked("import prefect")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_library_modules_import_without_the_orchestration_stack() -> None:
    result = run_blocked("import food101.cache, food101.dataset")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_help_runs_without_the_orchestration_stack(script: str) -> None:
    path = REPO / "benchmarks" / script
    code = f"""
sys.argv = [{str(path)!r}, "--help"]
try:
    runpy.run_path({str(path)!r}, run_name="__main__")
except SystemExit as exit:
    sys.exit(exit.code)
"""
    result = run_blocked(code)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
