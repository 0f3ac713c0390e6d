"""Ensembles in the model registry: a version that names its members' versions, never weights.

An ensemble's version holds one file, `food101-ensemble.json` (format `food101-ensemble/1`): its
members as (model, version) of the same registered model, their weights and the method. Its
sha256 is a version tag checked before the file is read, as a model's weights are. Predicting
loads each member version through the registry's own trusted loader (state dict + JSON + sha256),
runs every member on the photo with its own normalisation, and averages their probabilities with
the registered weights: the same computation the ensemble stage scored on the test split. So an
ensemble adds no new kind of artefact to trust, and a member replaced in the registry is caught by
its own sha256.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from food101.config import Config
from food101.io import write_json

log = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "food101-ensemble/1"
ENSEMBLE_FILE = "food101-ensemble.json"
ENSEMBLE_SHA_TAG = "ensemble_sha256"


def register_ensembles(config: Config, client: MlflowClient, name: str, parent_run_id: str,
                       ensembles: list[str], versions: dict[str, str]) -> dict[str, str]:
    """One version per evaluated ensemble whose members all have versions; {ensemble: version}."""
    from food101.registry import ARTIFACT_DIR, FORMAT_TAG, _sha256
    from tasks.ensemble import read_ensemble

    registered: dict[str, str] = {}
    for ensemble in ensembles:
        record = read_ensemble(config, ensemble)
        missing = [m for m in record["members"] if m not in versions]
        if missing:
            log.warning("not registering ensemble %s: members %s are not registered", ensemble, missing)
            continue
        document = {"format": ENSEMBLE_FORMAT, "model": ensemble, "profile": config.profile,
                    "method": record["method"], "weights": record["weights"],
                    "members": [{"model": m, "version": versions[m]} for m in record["members"]]}
        with tempfile.TemporaryDirectory(prefix="food101-register-") as folder:
            local = Path(folder) / ensemble
            local.mkdir()
            sha256 = _sha256(write_json(local / ENSEMBLE_FILE, document))
            client.log_artifacts(parent_run_id, str(local), f"{ARTIFACT_DIR}/{ensemble}")
        source = f"{client.get_run(parent_run_id).info.artifact_uri}/{ARTIFACT_DIR}/{ensemble}"
        tags = {"model": ensemble, "profile": config.profile, FORMAT_TAG: ENSEMBLE_FORMAT, ENSEMBLE_SHA_TAG: sha256,
                "members": ",".join(f"{m['model']}:{m['version']}" for m in document["members"])}
        version = client.create_model_version(
            name, source, run_id=parent_run_id, tags=tags,
            description=f"ensemble {ensemble} ({record['method']} of "
                        f"{' + '.join(record['members'])}) from benchmark {parent_run_id}")
        registered[ensemble] = str(version.version)
    return registered


def read_document(path: Path, what: str) -> dict[str, Any]:
    """The ensemble file, refused unless it is this pipeline's format with members and weights."""
    from food101.registry import UntrustedModel

    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UntrustedModel(f"{what}: {ENSEMBLE_FILE} is not valid JSON ({exc})") from exc
    members = document.get("members") if isinstance(document, dict) else None
    if (document.get("format") != ENSEMBLE_FORMAT or not isinstance(members, list)
            or len(document.get("weights") or []) != len(members)):
        raise UntrustedModel(f"{what}: {ENSEMBLE_FILE} is not this pipeline's (format {ENSEMBLE_FORMAT})")
    return document


def load_members(config: Config, name: str, version: Any, source: str, what: str,
                      hint: str) -> tuple[list[Any], list[float]]:
    """An ensemble version's member models (each checked as a champion would be) and weights."""
    from mlflow.exceptions import MlflowException

    from food101.registry import (
        FORMAT,
        FORMAT_TAG,
        RegistryError,
        UntrustedModel,
        _download,
        _load_version,
        _registry_client,
        _require_trusted,
        _verified,
    )

    with tempfile.TemporaryDirectory(prefix="food101-ensemble-") as folder:
        path = _verified(_download(f"{source}/{ENSEMBLE_FILE}", Path(folder), config, what),
                         version.tags.get(ENSEMBLE_SHA_TAG), what, hint)
        document = read_document(path, what)
    client = _registry_client(config, hint)
    members = []
    for member in document["members"]:
        try:
            found = client.get_model_version(name, member["version"])
            member_source = client.get_model_version_download_uri(name, found.version)
        except MlflowException as exc:
            raise RegistryError(f"{what}: member {member['model']} version {member['version']} cannot be read "
                                f"({exc}); {hint}") from exc
        member_what = f"version {found.version} of {name} ({member['model']}, member of {what})"
        _require_trusted(found, member_what, hint)
        if found.tags.get(FORMAT_TAG) != FORMAT:
            raise UntrustedModel(f"{member_what} is not a single model; an ensemble's members must be models")
        members.append(_load_version(config, name, found, member_source, member_what, hint))
    if len({tuple(m.meta["classes"]) for m in members}) != 1:
        raise UntrustedModel(f"{what}: its members were trained on different classes; {hint}")
    return members, [float(w) for w in document["weights"]]
