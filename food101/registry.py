"""The MLflow Model Registry: every trained model of a benchmark, the recommended one as `champion`.

One registered model per profile, `food101-classifier-<profile>`, whose versions are the
candidates: the recommended one gets alias `champion` and the one it replaces `previous`. One per
profile, because a demo run on 5 classes must never replace the champion of the full benchmark.

A version is data, never code: its artifact folder (under the benchmark's parent run,
`registry/<model>/`) holds the weights as a state dict (`weights.pt`) and `food101-model.json`
(architecture name, classes, normalisation, image size, preprocessing, the weights' sha256).
When the model was exported, the same folder holds `onnx-fp32/` and `onnx-int8/` (MLflow's ONNX
flavour: MLmodel, model.onnx, pinned requirements) and the export's `preprocess.json`, each file's
sha256 a version tag too; the champion version's `serving_runtime`/`serving_precision` tags name
what the report recommends serving it in (food101.deploy_targets.serving_variant).
Loading reads the JSON, checks the sha256 against the one recorded as a version tag at
registration, reads the weights with `torch.load(weights_only=True)` and builds the architecture
by name. A version without this pipeline's tags (for example a pickled model someone registered
through the MLflow client) is refused, never unpickled. ONNX files are protobuf graphs, read by ONNX Runtime,
never unpickled, and checked against their recorded sha256 the same way. Registration uses
`MlflowClient` with explicit ids - no active run or global tracking URI, so it is safe from Prefect worker threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from food101.config import Config
from food101.errors import Food101Error
from food101.io import write_json
from food101.tracking import client_for, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
ARTIFACT_DIR = "registry"
PREFIX = "food101-classifier-"
FORMAT = "food101-state-dict/1"
WEIGHTS_FILE = "weights.pt"
META_FILE = "food101-model.json"
FORMAT_TAG = "food101_format"
SHA_TAG = "weights_sha256"
ONNX_PRECISIONS = ("fp32", "int8")
ONNX_MODEL_FILE = "model.onnx"  # the ONNX flavour's file inside onnx-<precision>/
PREPROCESS_FILE = "preprocess.json"
PREPROCESS_SHA_TAG = "preprocess_sha256"
RUNTIME_TAG = "serving_runtime"
PRECISION_TAG = "serving_precision"
META_KEYS = ("arch", "num_classes", "image_size", "mean", "std", "classes", "display", "resize", "crop")


class RegistryError(Food101Error):
    """The model registry cannot give what was asked."""


class NoChampionError(RegistryError):
    """No benchmark has registered a champion for this profile yet."""


class RegistryUnavailable(RegistryError):
    """The MLflow tracking/registry server cannot be reached."""


class UntrustedModel(RegistryError):
    """A registered version this pipeline did not write, or whose files changed since it did."""


class PhotoError(Food101Error):
    """A photo to classify is missing or cannot be decoded."""


def registered_model_name(config: Config, profile: str | None = None) -> str:
    return f"{PREFIX}{profile or config.profile}"


def champion_uri(config: Config, profile: str | None = None) -> str:
    return f"models:/{registered_model_name(config, profile)}@{CHAMPION}"


# --- registering -------------------------------------------------------------------------------


def register_models(config: Config, parent_run_id: str, models: list[str], recommended: str,
                    ensembles: list[str] | None = None) -> dict[str, Any]:
    """Register each trained model as a version, then each evaluated ensemble (a version naming its
    members' versions: food101/ensemble_registry.py); the aliases do not move (see promote_champion).

    Models without a best.pt (training failed) are skipped and listed; the recommended one must
    exist.
    """
    client = client_for(config)
    name = registered_model_name(config)
    missing = {m: str(_best_path(config, m)) for m in models if not _best_path(config, m).is_file()}
    if recommended in (ensembles or []):
        pass  # checked below: registered only when its members are
    elif recommended in missing or recommended not in models:
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
    if ensembles:
        from food101.ensemble_registry import register_ensembles

        versions.update(register_ensembles(config, client, name, parent_run_id, ensembles, versions))
    if recommended not in versions:
        raise RegistryError(f"cannot register {recommended!r} as champion: its members are not all registered")
    serving = ({"runtime": "pytorch", "precision": "fp32", "why": "an ensemble runs its members in PyTorch"}
               if recommended in (ensembles or [])
               else serving_choice(config, recommended, client.get_model_version(name, versions[recommended]).tags))
    return {"name": name, "parent_run_id": parent_run_id, "versions": versions, "recommended": recommended,
            "champion": None, "previous": None, "skipped": missing, "uri": champion_uri(config), "serving": serving}


def serving_choice(config: Config, model: str, version_tags: dict[str, str]) -> dict[str, str]:
    """The runtime and precision the report's serve target picks for `model`, among those registered.

    PyTorch fp32 when the model has no registered ONNX files (its export failed or did not run).
    """
    from food101.deploy_targets import serving_variant
    from tasks.export import deployment_rows, load_exports

    registered = [p for p in ONNX_PRECISIONS if onnx_sha_tag(p) in version_tags]
    rows = [r for r in deployment_rows(load_exports(config, [model]))
            if r["runtime"] == "pytorch" or r["precision"] in registered]
    row = serving_variant(rows, config.export, model) if registered else None
    if row is None:
        return {"runtime": "pytorch", "precision": "fp32", "why": "no ONNX export registered"}
    return {"runtime": row["runtime"], "precision": row["precision"],
            "why": f"export.targets.{config.export.serve_target} rule over {model}'s variants"}


def promote_champion(config: Config, registered: dict[str, Any]) -> dict[str, Any]:
    """Move `champion` to the recommended version of `registered`; the old champion gets `previous`.

    Called only once the benchmark has passed its regression gate.
    """
    client = client_for(config)
    name, recommended = registered["name"], registered["recommended"]
    version = registered["versions"][recommended]
    old_champion = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    # An alias has no tags of its own: the version it points at carries the serving choice, and
    # the registered model names it for the UI.
    serving = registered.get("serving") or {"runtime": "pytorch", "precision": "fp32"}
    client.set_model_version_tag(name, version, RUNTIME_TAG, serving["runtime"])
    client.set_model_version_tag(name, version, PRECISION_TAG, serving["precision"])
    client.set_registered_model_tag(name, "champion_serving",
                                    f"version {version} ({recommended}) on {serving['runtime']} {serving['precision']}")
    previous = None
    if old_champion is not None and str(old_champion.version) != version:
        client.set_registered_model_alias(name, PREVIOUS, old_champion.version)
        previous = {"model": old_champion.tags.get("model"), "version": str(old_champion.version)}
    client.set_tag(registered["parent_run_id"], "registry_champion", f"{name}/{version}")
    log.info("registry %s: champion %s (version %s)%s", name, recommended, version,
             f", previous version {previous['version']}" if previous else "")
    return {**registered, "champion": {"model": recommended, "version": version}, "previous": previous}


def _register_one(config: Config, client: MlflowClient, name: str, parent_run_id: str, model: str) -> str:
    import torch

    checkpoint = _read_checkpoint(_best_path(config, model))
    # The preprocessing travels with the model: a demo champion expects demo-sized photos.
    meta = {**_checkpoint_meta(checkpoint), "model": model, "profile": config.profile,
            "resize": config.preprocess.resize, "crop": config.preprocess.crop}
    with tempfile.TemporaryDirectory(prefix="food101-register-") as folder:
        local = Path(folder) / model
        local.mkdir()
        torch.save(checkpoint["state_dict"], local / WEIGHTS_FILE)
        sha256 = _sha256(local / WEIGHTS_FILE)
        write_json(local / META_FILE, {"format": FORMAT, **meta, SHA_TAG: sha256})
        onnx_tags = _add_onnx(config, model, local, meta)
        client.log_artifacts(parent_run_id, str(local), f"{ARTIFACT_DIR}/{model}")
    source = f"{client.get_run(parent_run_id).info.artifact_uri}/{ARTIFACT_DIR}/{model}"
    tags = {"model": model, "arch": meta["arch"], "profile": config.profile, "val_top1": str(meta.get("val_top1")),
            "epoch": str(meta.get("epoch")), FORMAT_TAG: FORMAT, SHA_TAG: sha256, **onnx_tags}
    version = client.create_model_version(
        name, source, run_id=parent_run_id, tags=tags,
        description=f"{model} ({meta['arch']}, {meta['num_classes']} classes) from benchmark {parent_run_id}",
    )
    return str(version.version)


def onnx_sha_tag(precision: str) -> str:
    return f"onnx_{precision}_sha256"


def _add_onnx(config: Config, model: str, local: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Put the model's ONNX fp32 and int8 (MLflow's ONNX flavour) and preprocess.json into `local`;
    their sha256 tags. Nothing when the export is missing, failed, or older than the checkpoint."""
    import mlflow.onnx
    import onnx
    import onnxruntime

    from tasks.export import EXPORT_FILE, ExportMissing, export_dir, exported_files

    summary = export_dir(config, model) / EXPORT_FILE
    if not summary.is_file():
        return {}
    try:
        files = exported_files(config, model)
    except ExportMissing as exc:
        log.warning("registering %s without ONNX: %s", model, exc)
        return {}
    # An export from an earlier checkpoint would register a graph that is not this model.
    if summary.stat().st_mtime < _best_path(config, model).stat().st_mtime:
        log.warning("registering %s without ONNX: %s is older than its best.pt (run food101 stage export "
                    "--model %s)", model, summary, model)
        return {}
    preprocess = json.loads(files["preprocess"].read_text())
    if preprocess.get("classes") != meta["classes"]:
        log.warning("registering %s without ONNX: its preprocess.json lists other classes", model)
        return {}
    requirements = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    tags = {}
    for precision in ONNX_PRECISIONS:
        target = local / f"onnx-{precision}"
        # save_model + log_artifacts keeps to the explicit run id (as export's onnx model does);
        # one file, no external data, so one sha256 covers the graph and its weights.
        mlflow.onnx.save_model(onnx.load(str(files[precision])), target, pip_requirements=requirements,
                               save_as_external_data=False,
                               metadata={"model": model, "precision": precision, "input": preprocess["input_layout"]})
        tags[onnx_sha_tag(precision)] = _sha256(target / ONNX_MODEL_FILE)
    shutil.copyfile(files["preprocess"], local / PREPROCESS_FILE)
    tags[PREPROCESS_SHA_TAG] = _sha256(local / PREPROCESS_FILE)
    return tags


def load_checkpoint(path: Path) -> tuple[Any, dict[str, Any]]:
    """A network in eval mode from a best.pt, and its metadata (everything but the weights)."""
    checkpoint = _read_checkpoint(path)
    meta = _checkpoint_meta(checkpoint)
    return _build(meta["arch"], meta["num_classes"], checkpoint["state_dict"], str(path)), meta


def _read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {
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


def _build(arch: str, num_classes: int, state_dict: dict[str, Any], what: str) -> Any:
    """The architecture by name with these weights, in eval mode; a mismatch names `what`."""
    from food101.models import build_model

    try:
        network = build_model(arch, num_classes, pretrained=False)
        network.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UntrustedModel(f"{what}: the weights do not fit {arch!r} with {num_classes} classes ({exc})") from exc
    return network.eval()


# --- loading -----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    network: Any
    meta: dict[str, Any]
    name: str
    version: str


def latest_champion_profile(config: Config) -> str:
    """The profile whose champion a benchmark registered most recently (a predict without --profile)."""
    client = _registry_client(config, hint="run a benchmark first: food101 run --profile demo")
    try:
        found = client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")
        champions = [(int(client.get_model_version(m.name, m.aliases[CHAMPION]).creation_timestamp or 0),
                      m.name.removeprefix(PREFIX)) for m in found if CHAMPION in (m.aliases or {})]
    except MlflowException as exc:
        raise _unavailable(config, exc) from exc
    if not champions:
        raise NoChampionError(f"no champion model registered in MLflow at {tracking_uri(config)}; "
                              "run a benchmark first: food101 run --profile demo")
    return max(champions)[1]


def _champion_version(config: Config, alias: str, profile: str | None) -> tuple[str, Any, str, str, str]:
    """(registered name, version, its download URI, what to call it in messages, what to do) of a
    version this pipeline registered; the tags of anything else are refused before any download."""
    name = registered_model_name(config, profile)
    hint = f"run a benchmark first: food101 run --profile {profile or config.profile}"
    client = _registry_client(config, hint)
    try:
        version = client.get_model_version_by_alias(name, alias)
        source = client.get_model_version_download_uri(name, version.version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(exc).lower():
            raise NoChampionError(
                f"no model registered as {name}@{alias} in MLflow at {tracking_uri(config)}; "
                f"{hint}{_other_profiles(client, name)}"
            ) from exc
        raise _unavailable(config, exc) from exc
    what = f"version {version.version} of {name} (alias {alias})"
    _require_trusted(version, what, hint)
    return name, version, source, what, hint


def _require_trusted(version: Any, what: str, hint: str) -> None:
    from food101.ensemble_registry import ENSEMBLE_FORMAT, ENSEMBLE_SHA_TAG

    tags = version.tags
    if not ((tags.get(FORMAT_TAG) == FORMAT and tags.get(SHA_TAG))
            or (tags.get(FORMAT_TAG) == ENSEMBLE_FORMAT and tags.get(ENSEMBLE_SHA_TAG))):
        raise UntrustedModel(
            f"{what} was not registered by this pipeline (no {FORMAT_TAG}/{SHA_TAG} tags), so it is not "
            f"loaded: it may hold code. Point the alias at a version a benchmark registered "
            f"(MlflowClient().set_registered_model_alias) or {hint}"
        )


def _verified(path: Path, recorded: str | None, what: str, hint: str) -> Path:
    actual = _sha256(path)
    if actual != recorded:
        raise UntrustedModel(f"{what}: {path.name} has sha256 {actual}, but {recorded} was recorded at "
                             f"registration; the files changed since: {hint}")
    return path


def load_champion(config: Config, alias: str = CHAMPION, profile: str | None = None) -> LoadedModel:
    """The model behind `models:/<name>@<alias>`, on the CPU in eval mode, with its metadata.

    Only a version this pipeline registered is loaded, and only as data (see the module's doc).
    """
    name, version, source, what, hint = _champion_version(config, alias, profile)
    if version.tags.get(FORMAT_TAG) != FORMAT:
        raise RegistryError(f"{what} is the ensemble {version.tags.get('model')}: `food101 predict` runs its "
                            "members; it has no single network to load")
    return _load_version(config, name, version, source, what, hint)


def _load_version(config: Config, name: str, version: Any, source: str, what: str, hint: str) -> LoadedModel:
    """A trusted model version's network and metadata (sha256 checked, weights_only)."""
    import torch

    recorded = version.tags.get(SHA_TAG)
    with tempfile.TemporaryDirectory(prefix="food101-champion-") as folder:
        meta_path, weights_path = (_download(f"{source}/{file}", Path(folder), config, what)
                                   for file in (META_FILE, WEIGHTS_FILE))
        meta = _read_meta(meta_path, what)
        actual = _sha256(weights_path)
        if not (meta.get(SHA_TAG) == recorded == actual):
            raise UntrustedModel(
                f"{what}: {WEIGHTS_FILE} has sha256 {actual}, but {recorded} was recorded at registration "
                f"(its {META_FILE} says {meta.get(SHA_TAG)}); the files changed since: {hint}"
            )
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            # weights_only refuses anything but tensors and plain containers
            raise UntrustedModel(f"{what}: {WEIGHTS_FILE} is not a plain state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise UntrustedModel(f"{what}: {WEIGHTS_FILE} holds a {type(state).__name__}, not a state dict")
    network = _build(meta["arch"], int(meta["num_classes"]), state, what)
    return LoadedModel(network=network, meta=meta, name=name, version=str(version.version))


def champion_serving(config: Config, alias: str = CHAMPION, profile: str | None = None) -> dict[str, str]:
    """{"runtime", "precision"} the report recommends for the champion (its version tags)."""
    _, version, _, _, _ = _champion_version(config, alias, profile)
    return {"runtime": version.tags.get(RUNTIME_TAG, "pytorch"), "precision": version.tags.get(PRECISION_TAG, "fp32")}


def load_champion_onnx(config: Config, precision: str | None = None, alias: str = CHAMPION,
                       profile: str | None = None, threads: int = 1) -> Any:
    """The champion's registered ONNX model in an ONNX Runtime session (a model_server.ServedModel).

    `precision` None: the one the champion's serving tags name, fp32 when they name PyTorch (the
    fp32 graph matches PyTorch within export.max_abs_logit_diff). Both files are checked against
    the sha256 recorded at registration before ONNX Runtime reads them.
    """
    from food101.model_server import ServedModel

    name, version, source, what, hint = _champion_version(config, alias, profile)
    if version.tags.get(FORMAT_TAG) != FORMAT:
        raise RegistryError(f"{what} is the ensemble {version.tags.get('model')}, which has no ONNX graph; "
                            "use food101 predict --runtime torch")
    precision = _onnx_precision(version.tags, precision)
    if precision not in ONNX_PRECISIONS:
        raise RegistryError(f"precision {precision!r} is not one of {', '.join(ONNX_PRECISIONS)}")
    recorded = version.tags.get(onnx_sha_tag(precision))
    if not recorded or not version.tags.get(PREPROCESS_SHA_TAG):
        raise NoChampionError(
            f"{what} ({version.tags.get('model')}) has no registered ONNX {precision} model (its export failed or "
            f"did not run before registration); use --runtime torch, or re-run the benchmark: {hint}")
    with tempfile.TemporaryDirectory(prefix="food101-champion-onnx-") as folder:
        graph = _verified(_download(f"{source}/onnx-{precision}/{ONNX_MODEL_FILE}", Path(folder), config, what),
                          recorded, what, hint)
        preprocess = _verified(_download(f"{source}/{PREPROCESS_FILE}", Path(folder), config, what),
                               version.tags[PREPROCESS_SHA_TAG], what, hint)
        label = f"{version.tags.get('model')} (version {version.version} of {name}, onnxruntime {precision})"
        return ServedModel.from_files(graph, preprocess, label, threads)


def _download(uri: str, folder: Path, config: Config, what: str) -> Path:
    import mlflow.artifacts

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder),
                                                        tracking_uri=tracking_uri(config)))
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{what}: cannot download {uri} ({exc}); re-run the benchmark to register it") from exc


def _read_meta(path: Path, what: str) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UntrustedModel(f"{what}: {META_FILE} is not valid JSON ({exc})") from exc
    missing = [key for key in (*META_KEYS, SHA_TAG) if not isinstance(meta, dict) or key not in meta]
    if missing or meta.get("format") != FORMAT:
        raise UntrustedModel(f"{what}: {META_FILE} is not this pipeline's (format {FORMAT}; missing {missing})")
    return meta


# --- predicting --------------------------------------------------------------------------------


def photo_tensor(path: Path, resize: int, crop: int, image_size: int, mean: list[float], std: list[float]):
    """One photo exactly as evaluation sees it, shape (3, S, S): the preprocess stage's decode
    (RGB, shorter side to `resize`, centre `crop`), then the feed's eval resize to the model's
    `image_size` when different, then the checkpoint's normalisation."""
    import torch
    import torch.nn.functional as F
    from PIL import UnidentifiedImageError

    from tasks.preprocess import load_image

    path = Path(path)
    _check_photo(path)
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


def _check_photo(path: Path) -> None:
    """Refuse a missing file, a non-image and a decompression bomb from the header alone."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise PhotoError(f"photo not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:  # reads the header, decodes nothing
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise PhotoError(f"{path} is too large to be a photo ({exc}); pass a photo under {limit} pixels") from exc
    except UnidentifiedImageError as exc:
        raise PhotoError(f"{path} is not an image Pillow can read; pass a JPEG or PNG photo") from exc
    except OSError as exc:
        raise PhotoError(f"cannot read photo {path}: {exc}") from exc
    if limit and width * height > limit:
        raise PhotoError(f"{path} is too large to be a photo ({width}x{height} pixels, over {limit}); "
                         "pass a smaller photo")


RUNTIMES = ("torch", "onnx")


def predict(config: Config, photos: list[Path], top_k: int = 5, alias: str = CHAMPION,
            profile: str | None = None, runtime: str = "torch", precision: str | None = None) -> list[dict[str, Any]]:
    """Top-k dishes for each photo from the champion of `profile` (default: the config's).

    Returns one dict per photo: {"photo", "model", "version", "registered_model", "runtime", "top":
    [{"class", "dish", "probability"}, ...]} with probabilities in decreasing order. Photos are
    preprocessed with the resize/crop recorded with the model, so any profile's config can predict
    with it. `runtime` "torch" runs the registered state dict, "onnx" the registered ONNX graph in
    ONNX Runtime (`precision` as load_champion_onnx picks it).
    """
    photos = [Path(p) for p in photos]
    if not photos:
        raise PhotoError("no photos given: pass one or more image files")
    if runtime not in RUNTIMES:
        raise RegistryError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    for photo in photos:  # fail on a bad photo before spending time on the registry
        _check_photo(photo)
    if runtime == "onnx":
        return _predict_onnx(config, photos, top_k, alias, profile, precision)
    return _predict_torch(config, photos, top_k, alias, profile)


def _predict_torch(config: Config, photos: list[Path], top_k: int, alias: str,
                   profile: str | None) -> list[dict[str, Any]]:
    import torch

    name, version, source, what, hint = _champion_version(config, alias, profile)
    if version.tags.get(FORMAT_TAG) == FORMAT:
        members, weights = [_load_version(config, name, version, source, what, hint)], [1.0]
    else:
        from food101.ensemble_registry import load_members

        members, weights = load_members(config, name, version, source, what, hint)
    loaded = members[0]
    meta = loaded.meta
    probabilities = 0
    with torch.inference_mode():
        for member, weight in zip(members, weights, strict=True):
            m = member.meta
            batch = torch.stack([photo_tensor(p, m["resize"], m["crop"], m["image_size"], m["mean"], m["std"])
                                 for p in photos])
            probabilities = probabilities + weight * torch.softmax(member.network(batch).float(), dim=1)
    if version.tags.get(FORMAT_TAG) != FORMAT:  # an ensemble: named as itself
        loaded = LoadedModel(None, {**meta, "model": version.tags.get("model")}, name, str(version.version))
        meta = loaded.meta
    k = min(top_k, probabilities.shape[1])
    top_p, top_i = probabilities.topk(k, dim=1)
    results = []
    for photo, values, indices in zip(photos, top_p.tolist(), top_i.tolist(), strict=True):
        results.append({
            "photo": str(photo),
            "model": meta.get("model"),
            "version": loaded.version,
            "registered_model": loaded.name,
            "runtime": "pytorch fp32",
            "top": [
                {"class": meta["classes"][i], "dish": meta["display"][i], "probability": p}
                for p, i in zip(values, indices, strict=True)
            ],
        })
    return results


def _onnx_precision(tags: dict[str, str], precision: str | None) -> str:
    if precision is not None:
        return precision
    return tags.get(PRECISION_TAG, "fp32") if tags.get(RUNTIME_TAG) == "onnxruntime" else "fp32"


def _predict_onnx(config: Config, photos: list[Path], top_k: int, alias: str, profile: str | None,
                  precision: str | None) -> list[dict[str, Any]]:
    from food101.model_server import BadPhoto

    name, version, _, _, _ = _champion_version(config, alias, profile)
    precision = _onnx_precision(version.tags, precision)
    served = load_champion_onnx(config, precision, alias, profile)
    results = []
    for photo in photos:
        try:
            pixels = served.decode(photo.read_bytes())
        except BadPhoto as exc:
            raise PhotoError(f"cannot read photo {photo}: {exc}") from exc
        results.append({"photo": str(photo), "model": version.tags.get("model"), "version": str(version.version),
                        "registered_model": name, "runtime": f"onnxruntime {precision}",
                        "top": served.predict(pixels, min(top_k, len(served.preprocess["classes"])))})
    return results


# --- internals ---------------------------------------------------------------------------------


def _best_path(config: Config, model: str) -> Path:
    return config.paths.models / model / "best.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _registry_client(config: Config, hint: str) -> MlflowClient:
    uri = tracking_uri(config)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise NoChampionError(f"no model registry at {uri} (no benchmark has run here yet); {hint}")
    return client_for(config)


def _unavailable(config: Config, exc: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"cannot reach the MLflow registry at {tracking_uri(config)}: {exc}. Start the server (make "
        "mlflow-server) or unset MLFLOW_TRACKING_URI to use the project's mlflow.db"
    )


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
        found = client.search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")
    except MlflowException:
        return ""
    others = sorted(m.name.removeprefix(PREFIX) for m in found
                    if m.name != name and CHAMPION in (m.aliases or {}))
    return f" (champions exist for profiles {others}: pass --profile NAME)" if others else ""
