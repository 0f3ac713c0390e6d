"""How numbers read in the report: percentages, durations, intervals, plurals.

Every missing value prints as the same dash, so a table cell is never "None" or "nan".
"""

from __future__ import annotations

from typing import Any

from food101.document import DASH


def pct(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}{unit}"


def point_gap(delta: float) -> str:
    return f"{100 * abs(delta):.1f} point{'s' if round(100 * abs(delta), 1) != 1 else ''}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def ci_cell(metrics: dict[str, Any], key: str = "top1") -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return pct(metrics.get(key))
    return f"{pct(metrics.get(key))} ({100 * low:.1f}–{100 * high:.1f})"


def ci_text(metrics: dict[str, Any], key: str = "top1") -> str:
    """'82.0% (95% CI 71.4–92.7%)' for prose."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return pct(metrics.get(key))
    return f"{pct(metrics.get(key))} (95% CI {100 * low:.1f}–{100 * high:.1f}%)"


def plural(count: float, word: str, many: str | None = None) -> str:
    """'1 point', '2 points', '1.5 points'; `many` for irregular plurals ('food classes')."""
    return f"{count:g} {word if count == 1 else (many or word + 's')}"


def times_ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.1f}×" if fast > 0 else "∞×"
