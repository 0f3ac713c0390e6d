"""The flow and dvc.yaml describe one DAG: same stages, same order, same commands."""

from __future__ import annotations

import yaml

from flows.benchmark import PER_MODEL_STAGES, STAGES
from tests.conftest import REPO


def test_dvc_yaml_and_flow_list_the_same_stages():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)


def test_per_model_stages_fan_out_over_the_models_in_both():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    fanned_out = [name for name, spec in dvc.items() if "foreach" in spec]
    assert fanned_out == list(PER_MODEL_STAGES)
    for name in fanned_out:
        assert dvc[name]["foreach"] == "${models}"
        assert dvc[name]["do"]["cmd"] == f"food101 stage {name} --model ${{item}}"


def test_every_dvc_stage_runs_the_flows_task_function():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in dvc.items():
        cmd = spec["do"]["cmd"] if "do" in spec else spec["cmd"]
        assert cmd.startswith(f"food101 stage {name}")
        deps = spec["do"]["deps"] if "do" in spec else spec["deps"]
        module = STAGES[name].fn.__module__.replace(".", "/") + ".py"
        assert module in deps, f"dvc stage {name} does not depend on its own code {module}"
