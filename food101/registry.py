"""The MLflow Model Registry: every trained model of a benchmark, the recommended one as `champion`.

One registered model per profile, `food101-classifier-<profile>`, whose versions are the
candidates: the issue's "the recommended one gets alias champion and the one it replaces
previous" is an alias move inside one registered model. One per profile, because a demo run on
5 classes must never replace the champion of the full 101-class benchmark.

Each version is a real MLflow PyTorch model (pickle format: loads on the CPU with
`mlflow.pytorch.load_model` and serves through pyfunc), built from the training checkpoint
`best.pt`; the checkpoint's classes, display names, mean/std and image size travel in the
MLmodel `metadata`, so predicting needs nothing from the local artifacts/ folder.
It is saved locally, logged under the benchmark's parent run at `registry/<model>/` and
registered with `MlflowClient.create_model_version` - no active run or global tracking URI,
so it is safe from Prefect worker threads.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from food101.config import Config
from food101.errors import Food101Error
from food101.tracking import client_for, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
ARTIFACT_DIR = "registry"


class RegistryError(Food101Error):
    """The model registry cannot give what was asked."""


class NoChampionError(RegistryError):
    """No benchmark has registered a champion for this profile yet."""


class RegistryUnavailable(RegistryError):
    """The MLflow tracking/registry server cannot be reached."""


class PhotoError(Food101Error):
    """A photo to classify is missing or cannot be decoded."""


def registered_model_name(config: Config) -> str:
    return f"food101-classifier-{config.profile}"


def champion_uri(config: Config) -> str:
    return f"models:/{registered_model_name(config)}@{CHAMPION}"


# --- registering -------------------------------------------------------------------------------


def register_models(config: Config, parent_run_id: str, models: list[str], recommended: str) -> dict[str, Any]:
    """Register each trained model as a version; move `champion` to the recommended one.

    The version that was champion before gets `previous`. Models without a best.pt (training
    failed) are skipped and listed; the recommended one must exist.
    """
    client = client_for(config)
    name = registered_model_name(config)
    missing = {m: str(_best_path(config, m)) for m in models if not _best_path(config, m).is_file()}
    if recommended in missing or recommended not in models:
        raise RegistryError(
            f"cannot register {recommended!r} as champion: no checkpoint at "
            f"{_best_path(config, recommended)} (did its training fail? see train.json)"
        )
    _ensure_registered_model(client, name, config)
    versions: dict[str, str] = {}
    for model in models:
        if model in missing:
            log.warning("not registering %s: %s does not exist", model, missing[model])
            continue
        versions[model] = _register_one(config, client, name, parent_run_id, model)
    old_champion = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, versions[recommended])
    previous = None
    if old_champion is not None and str(old_champion.version) != versions[recommended]:
        client.set_registered_model_alias(name, PREVIOUS, old_champion.version)
        previous = {"model": old_champion.tags.get("model"), "version": str(old_champion.version)}
    client.set_tag(parent_run_id, "registry_champion", f"{name}/{versions[recommended]}")
    log.info("registry %s: champion %s (version %s)%s", name, recommended, versions[recommended],
             f", previous version {previous['version']}" if previous else "")
    return {
        "name": name,
        "versions": versions,
        "champion": {"model": recommended, "version": versions[recommended]},
        "previous": previous,
        "skipped": missing,
        "uri": champion_uri(config),
    }


def _register_one(config: Config, client: MlflowClient, name: str, parent_run_id: str, model: str) -> str:
    import mlflow.pytorch

    network, meta = load_checkpoint(_best_path(config, model))
    # The preprocessing travels with the model: a demo champion expects demo-sized photos.
    metadata = {**meta, "model": model, "profile": config.profile,
                "resize": config.preprocess.resize, "crop": config.preprocess.crop}
    with tempfile.TemporaryDirectory(prefix="food101-register-") as folder:
        local = Path(folder) / model
        mlflow.pytorch.save_model(
            network, local, serialization_format="pickle", metadata=metadata,
            # Given explicitly: inferring them costs ~3 s per model and can pick up the wrong torch.
            pip_requirements=[_pin("torch"), _pin("torchvision"), _pin("mlflow"), _pin("pillow")],
        )
        client.log_artifacts(parent_run_id, str(local), f"{ARTIFACT_DIR}/{model}")
    source = f"{client.get_run(parent_run_id).info.artifact_uri}/{ARTIFACT_DIR}/{model}"
    tags = {"model": model, "arch": meta["arch"], "profile": config.profile,
            "val_top1": str(meta.get("val_top1")), "epoch": str(meta.get("epoch"))}
    version = client.create_model_version(
        name, source, run_id=parent_run_id, tags=tags,
        description=f"{model} ({meta['arch']}, {meta['num_classes']} classes) from benchmark {parent_run_id}",
    )
    return str(version.version)


def load_checkpoint(path: Path) -> tuple[Any, dict[str, Any]]:
    """A torchvision network in eval mode from a best.pt, and its metadata (everything but weights)."""
    import torch
    import torchvision

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network = torchvision.models.get_model(checkpoint["arch"], weights=None, num_classes=checkpoint["num_classes"])
    network.load_state_dict(checkpoint["state_dict"])
    network.eval()
    meta = {
        "arch": checkpoint["arch"],
        "num_classes": int(checkpoint["num_classes"]),
        "image_size": int(checkpoint["image_size"]),
        "mean": [float(v) for v in checkpoint["mean"]],
        "std": [float(v) for v in checkpoint["std"]],
        "classes": list(checkpoint["classes"]),
        "display": list(checkpoint["display"]),
        "epoch": int(checkpoint["epoch"]) if checkpoint.get("epoch") is not None else None,
        "val_top1": float(checkpoint["val_top1"]) if checkpoint.get("val_top1") is not None else None,
    }
    return network, meta


# --- predicting --------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    network: Any
    meta: dict[str, Any]
    name: str
    version: str


def load_champion(config: Config, alias: str = CHAMPION) -> LoadedModel:
    """The model behind `models:/<name>@<alias>`, on the CPU in eval mode, with its metadata."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    name = registered_model_name(config)
    uri = tracking_uri(config)
    hint = f"run a benchmark first: food101 run --profile {config.profile}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise NoChampionError(f"no model registry at {uri} (no benchmark has run here yet); {hint}")
    client = client_for(config)
    try:
        version = client.get_model_version_by_alias(name, alias)
        source = client.get_model_version_download_uri(name, version.version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(exc).lower():
            raise NoChampionError(
                f"no model registered as {name}@{alias} in MLflow at {uri}; {hint}{_other_profiles(client, name)}"
            ) from exc
        raise RegistryUnavailable(
            f"cannot reach the MLflow registry at {uri}: {exc}. Start the server (make mlflow-server) "
            "or unset MLFLOW_TRACKING_URI to use the project's mlflow.db"
        ) from exc
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)
    network = mlflow.pytorch.load_model(local, map_location="cpu")
    network.eval()
    meta = Model.load(local).metadata or {}
    return LoadedModel(network=network, meta=meta, name=name, version=str(version.version))


def photo_tensor(path: Path, resize: int, crop: int, image_size: int, mean: list[float], std: list[float]):
    """One photo exactly as evaluation sees it, shape (3, S, S): the preprocess stage's decode
    (RGB, shorter side to `resize`, centre `crop`), then the feed's eval resize to the model's
    `image_size` when different, then the checkpoint's normalisation."""
    import torch
    import torch.nn.functional as F
    from PIL import UnidentifiedImageError

    from tasks.preprocess import load_image

    path = Path(path)
    if not path.is_file():
        raise PhotoError(f"photo not found: {path}")
    try:
        pixels = load_image(path, resize, crop)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PhotoError(f"cannot read photo {path}: {exc}") from exc
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255.0
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255.0
    return (x[0] - mean_t) / std_t


def predict(config: Config, photos: list[Path], top_k: int = 5, alias: str = CHAMPION) -> list[dict[str, Any]]:
    """Top-k dishes for each photo from the registry's champion.

    Returns one dict per photo: {"photo", "model", "version", "top": [{"class", "dish",
    "probability"}, ...]} with probabilities in decreasing order. Photos are preprocessed with the
    resize/crop recorded with the model, so any profile's config can predict with it.
    """
    import torch

    photos = [Path(p) for p in photos]
    if not photos:
        raise PhotoError("no photos given: pass one or more image files")
    for photo in photos:  # fail on a bad path before spending time on the registry
        if not photo.is_file():
            raise PhotoError(f"photo not found: {photo}")
    loaded = load_champion(config, alias)
    meta = loaded.meta
    batch = torch.stack([
        photo_tensor(p, meta.get("resize", config.preprocess.resize), meta.get("crop", config.preprocess.crop),
                     meta["image_size"], meta["mean"], meta["std"])
        for p in photos
    ])
    with torch.inference_mode():
        probabilities = torch.softmax(loaded.network(batch).float(), dim=1)
    k = min(top_k, probabilities.shape[1])
    top_p, top_i = probabilities.topk(k, dim=1)
    results = []
    for photo, values, indices in zip(photos, top_p.tolist(), top_i.tolist(), strict=True):
        results.append({
            "photo": str(photo),
            "model": meta.get("model"),
            "version": loaded.version,
            "top": [
                {"class": meta["classes"][i], "dish": meta["display"][i], "probability": p}
                for p, i in zip(values, indices, strict=True)
            ],
        })
    return results


# --- internals ---------------------------------------------------------------------------------


def _best_path(config: Config, model: str) -> Path:
    return config.paths.models / model / "best.pt"


def _ensure_registered_model(client: MlflowClient, name: str, config: Config) -> None:
    try:
        client.create_registered_model(
            name, tags={"profile": config.profile},
            description=f"Food-101 classifiers benchmarked with profile {config.profile!r}; "
            f"alias {CHAMPION} = the recommended model, {PREVIOUS} = the one it replaced",
        )
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(exc).lower():
            return None
        raise


def _other_profiles(client: MlflowClient, name: str) -> str:
    """A hint naming the profiles that do have a champion (a demo run registers food101-classifier-demo)."""
    try:
        found = client.search_registered_models(filter_string="name LIKE 'food101-classifier-%'")
    except MlflowException:
        return ""
    others = sorted(m.name.removeprefix("food101-classifier-") for m in found
                    if m.name != name and CHAMPION in (m.aliases or {}))
    return f" (champions exist for profiles {others}: pass --profile NAME)" if others else ""


def _pin(package: str) -> str:
    return f"{package}=={package_version(package).split('+')[0]}"
