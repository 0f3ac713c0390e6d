"""What makes two benchmarks comparable, and what differs when they are not.

A benchmark records a comparability key: the data (manifest hash and class list), the image
sizes, each model's recipe, the evaluation settings and the hardware. Two benchmarks measure
the same thing when their data, class list, preprocessing sizes and evaluation settings agree;
recipes may differ (that is what a benchmark is for: the changes are shown as such), and timings
are compared only on the same hardware. The robustness figures depend on more than that (which
corruptions, their strengths and seed, the mCE baseline, the corruption code itself): the key's
`robustness` entry records it, and only the robustness metrics need it to agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from food101.config import Config
from food101.io import read_json

log = logging.getLogger(__name__)

# The fields of the key that must agree for two benchmarks to be compared at all.
COMPARABLE_FIELDS = ("data_hash", "classes", "image_sizes", "evaluate")
# The robustness settings that change its numbers; within_points and most_hurt_classes change only
# the report's wording. The corrupted pixels no longer depend on the batch or the device
# (CORRUPTIONS_VERSION 3), but the model's outputs do, bit for bit: batch_size and device_type stay.
ROBUSTNESS_FIELDS = ("corruptions", "severities", "levels", "baseline_model", "seed", "batch_size",
                     "bootstrap_samples", "device_type")


def comparability_key(
    config: Config, models: list[str], hardware: str,
    data_hash: str | None = None, classes: list[str] | None = None,
) -> dict[str, Any]:
    """This benchmark's key; data hash and classes default to validate's validation.json and
    classes.json (None when that stage left none, which makes the benchmark comparable to nothing)."""
    from tasks.preprocess import META_FILE
    from tasks.train import training_hash

    manifest = config.paths.manifest
    if data_hash is None and (manifest / "validation.json").is_file():
        data_hash = read_json(manifest / "validation.json").get("data_hash")
    if classes is None and (manifest / "classes.json").is_file():
        classes = list(read_json(manifest / "classes.json").get("names") or [])
    cache_meta = config.paths.cache / META_FILE
    data_key = read_json(cache_meta).get("key") if cache_meta.is_file() else None
    return {
        "data_hash": data_hash,
        "classes": classes,
        "image_sizes": {"resize": config.preprocess.resize, "crop": config.preprocess.crop},
        "evaluate": config.raw.get("evaluate"),
        "train_image_size": {m: config.train.for_model(m).image_size for m in models},
        "recipe_hashes": {m: training_hash(config, m, data_key) for m in models},
        "hardware": hardware,
        "robustness": robustness_key(config),
    }


def robustness_key(config: Config) -> dict[str, Any]:
    """What the robustness figures were measured with: the settings that change them (order of the
    lists aside) and the version of the corruptions' code."""
    from food101.corruptions import CORRUPTIONS_VERSION
    from food101.devices import slot_devices

    settings = config.robustness
    key: dict[str, Any] = {name: getattr(settings, name) for name in ROBUSTNESS_FIELDS if name != "device_type"}
    key["device_type"] = slot_devices(config)[0].type  # where the stage corrupts the photos
    key["corruptions"] = sorted(settings.corruptions)
    key["severities"] = sorted(settings.severities)
    key["levels"] = {name: list(settings.levels[name]) for name in key["corruptions"]}
    key["corruptions_version"] = CORRUPTIONS_VERSION
    return json.loads(json.dumps(key, default=str))


def recipes(config: Config, models: list[str]) -> dict[str, dict[str, Any]]:
    """Each model's effective training recipe (train.py's recipe_params), JSON-safe."""
    from tasks.train import recipe_params

    return {m: json.loads(json.dumps(recipe_params(config.train.for_model(m)), default=str)) for m in models}


def key_tag(key: dict[str, Any]) -> str:
    """A short hash of the comparable fields, set as a tag so MLflow finds comparable runs by search."""
    blob = {name: key.get(name) for name in COMPARABLE_FIELDS}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_comparable(key: dict[str, Any]) -> bool:
    """A key without a data hash or class list describes data nobody can vouch for."""
    return bool(key.get("data_hash")) and bool(key.get("classes"))


def key_differences(current: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What keeps `other` from being compared with `current`, in words ("data hash differs: 1a2b… vs 9f8e…")."""
    if not other:
        return ["the earlier benchmark recorded no comparability key (made by an older version)"]
    found = []
    now_hash, then_hash = current.get("data_hash"), other.get("data_hash")
    if not now_hash or not then_hash:
        found.append("data hash not recorded" + ("" if now_hash else " for this benchmark"))
    elif now_hash != then_hash:
        found.append(f"data hash differs: {_short(now_hash)} vs {_short(then_hash)}")
    now_classes, then_classes = current.get("classes") or [], other.get("classes") or []
    if now_classes != then_classes:
        added, removed = sorted(set(now_classes) - set(then_classes)), sorted(set(then_classes) - set(now_classes))
        detail = f"{len(now_classes)} vs {len(then_classes)}"
        if added or removed:
            detail += f"; new: {_few(added)}; gone: {_few(removed)}"
        else:
            detail += "; same names, another order"
        found.append(f"classes differ ({detail})")
    for name, words in (("image_sizes", "image sizes"), ("evaluate", "evaluation settings")):
        if current.get(name) != other.get(name):
            found.append(f"{words} differ: {_changes(other.get(name) or {}, current.get(name) or {})}")
    return found


def robustness_differences(current: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What keeps `other`'s robustness figures from being compared with `current`'s, in words
    ("robustness.corruptions differ: new: motion_blur; gone: none"); empty when they compare."""
    now, then = current.get("robustness"), other.get("robustness")
    if not then:
        return ["the earlier benchmark recorded no robustness settings (made by an older version)"]
    if not now:
        return ["this benchmark recorded no robustness settings"]
    found = []
    if now.get("corruptions_version") != then.get("corruptions_version"):
        found.append("corruption definitions changed (food101/corruptions.py CORRUPTIONS_VERSION "
                     f"{_value(then.get('corruptions_version'))} -> {_value(now.get('corruptions_version'))})")
    now_names, then_names = now.get("corruptions") or [], then.get("corruptions") or []
    if now_names != then_names:
        added, removed = sorted(set(now_names) - set(then_names)), sorted(set(then_names) - set(now_names))
        found.append(f"robustness.corruptions differ: new: {_few(added)}; gone: {_few(removed)}")
    now_levels, then_levels = now.get("levels") or {}, then.get("levels") or {}
    changed = sorted(n for n in set(now_levels) & set(then_levels) if now_levels[n] != then_levels[n])
    if changed:
        found.append(f"robustness.levels differ for {_few(changed)}")
    rest = [f for f in ROBUSTNESS_FIELDS if f not in ("corruptions", "levels")]
    text = _changes({f: then.get(f) for f in rest}, {f: now.get(f) for f in rest})
    if text:
        found.append(f"robustness settings differ: {text}")
    return found


def recipe_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{model: "lr 0.1 -> 0.05, epochs 10 -> 5"} for each model whose recipe changed."""
    out = {}
    for model in sorted(before.keys() & after.keys()):
        text = _changes(before[model], after[model])
        if text:
            out[model] = text
    return out


def _changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = sorted(before.keys() | after.keys())
    return ", ".join(f"{k} {_value(before.get(k))} -> {_value(after.get(k))}"
                     for k in keys if before.get(k) != after.get(k))


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "unset" if value is None else str(value)


def _short(digest: str) -> str:
    return f"{digest[:4]}…"


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
