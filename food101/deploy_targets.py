"""Which model, runtime and precision to ship for each deployment target in `export.targets`.

Each target names a rule; a rule reads the export stage's rows (one per model x runtime x
precision) as data and returns a choice with a one-sentence reason. An int8 variant whose
accuracy drop against fp32 is significant (McNemar) is never chosen, and the reason says so when
it would have won. The report's deployment section, the champion's tag in the registry and
`food101 serve-model` all call `recommend_targets`, so they say the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from food101.config import ExportConfig, TargetConfig
from food101.formatting import num, pct


@dataclass(frozen=True)
class TargetChoice:
    target: str
    label: str
    choice: str | None  # "resnet50, onnxruntime int8"; None when nothing qualifies
    row: dict[str, Any] | None
    reason: str  # one sentence, capitalised, ending in a period


def variant_name(row: dict[str, Any]) -> str:
    return f"{row['model']} on {row['runtime']} {row['precision']}"


def _eligible(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r.get("significant_drop")]


def _excluded_note(rows: list[dict[str, Any]], winner: Callable[[list[dict[str, Any]]], dict[str, Any] | None],
                   chosen: dict[str, Any] | None) -> str:
    """' (resnet50 in int8 would have won, but its int8 accuracy drop is significant)' when that is so."""
    best_of_all = winner(rows)
    if best_of_all is not None and best_of_all is not chosen and best_of_all.get("significant_drop"):
        return (f"; {best_of_all['model']} in int8 would have won, but its int8 accuracy drop against fp32 is "
                "significant (McNemar), so it is not recommended in int8")
    return ""


def _most_accurate(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    # Ties in accuracy go to the faster variant.
    return min(rows, key=lambda r: (-r["top1"], r["latency_p95_ms"]), default=None)


def _under_p95(rows: list[dict[str, Any]], target: TargetConfig) -> tuple[dict[str, Any] | None, str]:
    budget = target.max_p95_ms
    fits = [r for r in rows if r["latency_p95_ms"] <= budget]
    pick = lambda candidates: _most_accurate([r for r in candidates if r["latency_p95_ms"] <= budget])  # noqa: E731
    chosen = pick(_eligible(rows))
    if chosen is None:
        fastest = min(_eligible(rows), key=lambda r: r["latency_p95_ms"], default=None)
        if fastest is None:
            return None, "No variant can be recommended: every one is excluded."
        return fastest, (f"No variant meets the {num(budget, 0)} ms p95 budget, so {variant_name(fastest)} is "
                         f"recommended as the fastest ({num(fastest['latency_p95_ms'], 1)} ms p95).")
    others = len(fits) - 1
    return chosen, (f"Of the {others + 1} {'variant' if others == 0 else 'variants'} under the {num(budget, 0)} ms "
                    f"p95 budget, {variant_name(chosen)} is the most accurate ({pct(chosen['top1'])} top-1, "
                    f"{num(chosen['latency_p95_ms'], 1)} ms p95){_excluded_note(rows, pick, chosen)}.")


def _under_size(rows: list[dict[str, Any]], target: TargetConfig) -> tuple[dict[str, Any] | None, str]:
    budget = target.max_size_mb
    onnx_rows = [r for r in rows if r["runtime"] == "onnxruntime"]  # an edge device runs a runtime, not Python
    pick = lambda candidates: _most_accurate([r for r in candidates if r["size_mb"] <= budget])  # noqa: E731
    chosen = pick(_eligible(onnx_rows))
    if chosen is None:
        smallest = min(_eligible(onnx_rows), key=lambda r: r["size_mb"], default=None)
        if smallest is None:
            return None, "No ONNX variant can be recommended: none was exported or every one is excluded."
        return smallest, (f"No ONNX file is under {num(budget, 0)} MB, so {variant_name(smallest)} is recommended "
                          f"as the smallest ({num(smallest['size_mb'], 1)} MB).")
    return chosen, (f"Of the ONNX files under {num(budget, 0)} MB, {variant_name(chosen)} is the most accurate "
                    f"({pct(chosen['top1'])} top-1, {num(chosen['size_mb'], 1)} MB)"
                    f"{_excluded_note(onnx_rows, pick, chosen)}.")


def _max_throughput(rows: list[dict[str, Any]], target: TargetConfig) -> tuple[dict[str, Any] | None, str]:
    pick = lambda candidates: max(candidates, key=lambda r: r["throughput_ips"], default=None)  # noqa: E731
    chosen = pick(_eligible(rows))
    if chosen is None:
        return None, "No variant can be recommended: every one is excluded."
    return chosen, (f"Of all variants, {variant_name(chosen)} has the highest throughput "
                    f"({num(chosen['throughput_ips'], 0)} images/s, measured on this machine's CPU)"
                    f"{_excluded_note(rows, pick, chosen)}.")


RULES: dict[str, Callable[[list[dict[str, Any]], TargetConfig], tuple[dict[str, Any] | None, str]]] = {
    "max_accuracy_under_p95": _under_p95,
    "max_accuracy_under_size": _under_size,
    "max_throughput": _max_throughput,
}


def recommend_targets(rows: list[dict[str, Any]], settings: ExportConfig) -> list[TargetChoice]:
    """One choice per target in params.yaml's order."""
    choices = []
    for name, target in settings.targets.items():
        if not rows:
            choices.append(TargetChoice(name, target.label, None, None, "No model was exported."))
            continue
        row, reason = RULES[target.rule](rows, target)
        choices.append(TargetChoice(name, target.label, variant_name(row) if row else None, row, reason))
    return choices


def serving_variant(rows: list[dict[str, Any]], settings: ExportConfig, model: str) -> dict[str, Any] | None:
    """The runtime and precision to serve `model` in: the serve target's rule over that model's rows."""
    own = [r for r in rows if r["model"] == model]
    if not own:
        return None
    row, _ = RULES[settings.targets[settings.serve_target].rule](own, settings.targets[settings.serve_target])
    return row
