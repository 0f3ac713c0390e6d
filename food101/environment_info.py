"""The machine and software a benchmark ran on, for the report's environment section.

Numbers without the hardware and versions behind them cannot be compared, so the report prints
these next to every result. Everything here is read-only and quick (well under a second).
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import psutil

from food101.tracking import git_commit

# The distributions whose versions change the numbers or the pipeline's behaviour.
PACKAGES = (
    "torch",
    "torchvision",
    "prefect",
    "mlflow",
    "dvc",
    "great-expectations",
    "numpy",
    "pandas",
    "pillow",
    "matplotlib",
)


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC 7B13'), from /proc/cpuinfo on Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution; None when it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_info() -> dict[str, Any]:
    """CUDA devices visible to torch: name and memory of each, plus the CUDA/cuDNN versions."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda_available": False, "cuda_version": torch.version.cuda, "devices": []}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        })
    return {
        "cuda_available": True,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "devices": devices,
    }


def collect_environment(project_dir: Path | None = None) -> dict[str, Any]:
    """Hardware, OS, Python, package versions and git commit of this process's machine."""
    memory = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_gb": round(memory.total / 2**30, 1),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "gpu": gpu_info(),
        "packages": package_versions(),
        "git_commit": git_commit(project_dir) if project_dir is not None else "unknown",
    }
