"""Process environment for the stack: keep state inside the project, telemetry off.

Call `configure(project_dir)` before Prefect, MLflow or matplotlib are imported: Prefect reads
PREFECT_HOME at import time. Values the user already set are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = ".state"


def configure(project_dir: Path) -> None:
    state = Path(project_dir).resolve() / STATE_DIR
    defaults = {
        "PREFECT_HOME": str(state / "prefect"),
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "DVC_SITE_CACHE_DIR": str(state / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(state / "dvc-global"),
        # Telemetry: none of it can leave this network anyway, and it slows start-up.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A flow run without a server starts an ephemeral one, and its first start migrates a new
        # database: 22 s on a quiet 2-core machine, past Prefect's 20 s default ("Timed out while
        # attempting to connect to ephemeral Prefect API server" on a fresh checkout's make demo).
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        # Stage code logs through `logging`; these loggers show up in Prefect's run logs.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "food101,tasks,flows",
        # ... and outside a flow run (a stage under `dvc repro`) they stay local, without a warning.
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key in ("PREFECT_HOME", "MPLCONFIGDIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
