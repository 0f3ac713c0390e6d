"""What a run started through the deployment may change, and what only `food101 serve` decides.

Whoever starts `food101 serve` on the machine is trusted: their params.yaml, --profile and --set
(paths included) are fixed for every run of the deployment. They travel in the serving process's
environment, which Prefect's runner passes on to each flow run, not in the deployment's
parameters, which anyone who can reach the Prefect API may set for one run. A run's own
`overrides` may tune the benchmark, but not name where anything is read, written or executed:
paths.* lets a run replace folders, data.local_path and data.url read what they name, and
orchestration.* ships the tasks (and their pickles) to another machine.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from food101.config import ConfigError

SERVED_ENV = "FOOD101_SERVED"
FIXED_BY_SERVE = ("paths", "orchestration", "data.local_path", "data.url", "data.md5")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ServedRunRefused(ConfigError):
    """A deployment run asked to change something only `food101 serve` may set."""


def served_environment(params_file: str, overrides: dict[str, Any] | None) -> dict[str, str]:
    """The environment entry that `food101 serve` leaves for its flow runs."""
    return {SERVED_ENV: json.dumps({"params_file": params_file, "overrides": overrides or {}})}


def deployment_run_parameters(
    profile: str | None, overrides: dict[str, Any] | None, params_file: str | None
) -> tuple[str | None, dict[str, Any], str | None]:
    """(profile, overrides, params_file) for a flow run started through the deployment.

    The served overrides come first and the run's own on top, once checked; the params file is
    the served one.
    """
    served = json.loads(os.environ.get(SERVED_ENV) or "{}")
    served_file = served.get("params_file")
    if params_file is not None and params_file != served_file:
        raise ServedRunRefused(
            f"a deployment run cannot choose params_file ({params_file!r}); it is the one `food101 serve` "
            f"was started with ({served_file}). Restart `food101 serve --params PATH` to change it"
        )
    if profile is not None and not (isinstance(profile, str) and _PROFILE_NAME.fullmatch(profile)):
        raise ServedRunRefused(f"profile {profile!r} is not a profile name (a file in profiles/, e.g. demo)")
    if overrides is not None and not isinstance(overrides, dict):
        raise ServedRunRefused(f"overrides must be a mapping of parameter to value, not {type(overrides).__name__}")
    for key in overrides or {}:
        fixed = next((f for f in FIXED_BY_SERVE if not isinstance(key, str) or key == f or key.startswith(f"{f}.")),
                     None)
        if fixed is not None:
            raise ServedRunRefused(
                f"a deployment run cannot override {key!r}: {fixed} is fixed by whoever runs `food101 serve` "
                f"(pass it there with --set); a run may change only other parameters, such as train.epochs"
            )
    return profile, {**served.get("overrides", {}), **(overrides or {})}, served_file
