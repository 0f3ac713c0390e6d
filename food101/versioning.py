"""DVC after a flow run: record the outputs of a default-params run, push when a remote exists.

Prefect ran the stages, so DVC did not see them run; `dvc commit --force` hashes the outputs and
writes dvc.lock exactly as `dvc repro` would have, leaving `dvc status` clean. Runs with a
profile or overrides are not recorded: dvc.lock describes params.yaml, and nothing else.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass

from food101.config import Config
from food101.errors import Food101Error

log = logging.getLogger(__name__)


class DvcCommandFailed(Food101Error):
    """A DVC command returned an error; its output is in the message."""


@dataclass(frozen=True)
class DvcRecord:
    committed: bool
    pushed: bool
    reason: str


def record_outputs(config: Config, push: bool = True) -> DvcRecord:
    """`dvc commit -f` (and `dvc push` when a remote is configured) for a default-params run."""
    if not (config.project_dir / ".dvc").is_dir():
        return DvcRecord(False, False, f"{config.project_dir} is not a DVC project")
    if not config.is_default:
        return DvcRecord(False, False, "a profile or overrides were used; dvc.lock describes params.yaml only")
    _dvc(config, "commit", "--force", "--quiet")
    log.info("outputs recorded in dvc.lock (dvc commit)")
    remotes = _dvc(config, "remote", "list").strip()
    if push and remotes:
        _dvc(config, "push", "--quiet")
        log.info("outputs pushed to the DVC remote")
        return DvcRecord(True, True, "committed and pushed")
    return DvcRecord(True, False, "committed; no DVC remote configured" if not remotes else "committed")


def _dvc(config: Config, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=config.project_dir, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise DvcCommandFailed(f"dvc {' '.join(args)} failed in {config.project_dir}:\n{done.stderr.strip()}")
    return done.stdout
