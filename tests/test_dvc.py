"""`dvc repro` in a temporary git copy of the project reproduces the pipeline, then does nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# One of the benchmark's models and one added by one line in params (dvc.yaml's foreach picks it up).
# Each stage is a `food101 stage` process that spends seconds importing torch, MLflow and Prefect
# before any work: two models exercise the foreach as well as four, at half the processes.
MODELS = ("resnet50", "resnet18")


def project_copy(target: Path) -> Path:
    """Copy the project's files as git sees them (tracked, plus new files not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{output}")
    return done


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("dvc-project"))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
    env.pop("FOOD101_PARAMS", None)
    run(["git", "init", "-q"], root, env)
    # The demo profile, trained for fewer steps: DVC's behaviour does not depend on the epochs.
    fast = ["train.epochs=2", "train.max_steps_per_epoch=3", "train.overrides={}", "evaluate.latency_runs=5",
            "evaluate.settle_s=0", f"models=[{','.join(MODELS)}]"]
    run(["food101", "params", "--profile", "demo", *sum((["--set", s] for s in fast), []),
         "--write", "params.yaml"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo params"], root, env)
    first = run(["dvc", "repro"], root, env)
    return root, env, first


def test_dvc_repro_runs_every_stage_of_the_pipeline(dvc_project):
    root, _, first = dvc_project
    for stage in ("download", "validate", "preprocess", "confusion", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    for model in MODELS:
        assert f"Running stage 'train@{model}'" in first.stdout
        assert f"Running stage 'evaluate@{model}'" in first.stdout
        assert f"Running stage 'export@{model}'" in first.stdout
        assert f"Running stage 'robustness@{model}'" in first.stdout
        assert (root / "artifacts" / "eval" / model / "metrics.json").is_file()
    assert (root / "reports" / "report.html").is_file()
    assert "resnet18" in (root / "reports" / "report.md").read_text()
    assert (root / "dvc.lock").is_file()


def test_second_dvc_repro_runs_nothing(dvc_project):
    root, env, _ = dvc_project
    again = run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    status = run(["dvc", "status"], root, env)
    assert "up to date" in status.stdout


def test_dvc_metrics_show_reads_the_summary(dvc_project):
    root, env, _ = dvc_project
    shown = run(["dvc", "metrics", "show", "--json"], root, env)
    assert "summary.json" in shown.stdout
    assert "top1" in shown.stdout


def test_the_flow_with_the_same_params_predicts_what_dvc_repro_predicted(dvc_project, tmp_path, prefect_harness):
    """`food101 run` and `dvc repro` are two ways into one DAG: the same per-photo predictions."""
    from flows.benchmark import benchmark
    from tests.conftest import assert_same_predictions, generated_overrides

    root, _, _ = dvc_project
    result = benchmark(params_file=str(root / "params.yaml"), overrides=generated_overrides(tmp_path))
    assert result["failures"] == {}
    assert_same_predictions(root / "artifacts" / "eval", tmp_path / "artifacts" / "eval", list(result["models"]))


def test_dvc_exp_run_sweeps_a_parameter_and_exp_show_lists_it(dvc_project):
    root, env, _ = dvc_project
    # Only robustness and the report depend on robustness.bootstrap_samples: a cheap, real experiment
    # (an evaluate.* parameter would re-run evaluation, then export, the slowest stage, behind it).
    done = run(["dvc", "exp", "run", "-n", "bootstrap-400", "-S", "robustness.bootstrap_samples=400"], root, env)
    assert "Running stage 'robustness@resnet50'" in done.stdout and "Running stage 'report'" in done.stdout
    for upstream in ("train", "evaluate", "export"):
        assert f"Running stage '{upstream}@resnet50'" not in done.stdout
    shown = run(["dvc", "exp", "show", "--json"], root, env)
    assert "bootstrap-400" in shown.stdout
