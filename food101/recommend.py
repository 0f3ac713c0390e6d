"""Which model to deploy: the report's recommendation rules, as pure functions of the metrics.

`recommend` takes each evaluated model's metrics (top-1 as fractions, CPU latency percentiles,
optionally McNemar results and seed spreads) and the two settings of `params.yaml` `report:`
(`latency_budget_ms`, `within_points`), and returns one `Recommendation` per rule plus the one
to deploy, each with the sentence that explains it. No files, no plots: tested on made-up numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from food101.formatting import ci_text, num, pct, plural, point_gap, times_ratio


@dataclass
class Recommendation:
    rule: str          # best_accuracy | fastest_within_points | best_under_latency_budget | pareto | deploy
    title: str
    model: str | None  # None when no model satisfies the rule
    reason: str
    models: list[str] = field(default_factory=list)  # the Pareto set, or the candidates considered


@dataclass
class Recommendations:
    best_accuracy: Recommendation
    fastest_within: Recommendation
    under_budget: Recommendation
    pareto: Recommendation
    deploy: Recommendation

    def rules(self) -> list[Recommendation]:
        return [self.best_accuracy, self.fastest_within, self.under_budget, self.pareto]


def normalise_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Accuracy-like metrics as fractions in [0, 1], whatever scale the file used."""
    out = dict(metrics)
    for key in ("top1", "top1_ci_low", "top1_ci_high", "top5", "top5_ci_low", "top5_ci_high",
                "macro_precision", "macro_recall", "macro_f1"):
        value = out.get(key)
        if isinstance(value, (int, float)) and value > 1.0:
            out[key] = value / 100.0
    mean = out.get("top1_seed_mean")
    if isinstance(mean, (int, float)) and mean > 1.0:
        out["top1_seed_mean"] = mean / 100.0
        if isinstance(out.get("top1_seed_sd"), (int, float)):
            out["top1_seed_sd"] = out["top1_seed_sd"] / 100.0
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Models that no other model beats on both cost (lower is better) and accuracy (higher).

    `points` maps model -> (cost, accuracy). The front is returned from cheapest to dearest.
    """
    front = [name for name in points if dominated_by(points, name) is None]
    return sorted(front, key=lambda m: (points[m][0], -points[m][1], m))


def dominated_by(points: dict[str, tuple[float, float]], name: str) -> str | None:
    """A model that is both cheaper-or-equal and more-or-equally accurate than `name` (not itself)."""
    cost, acc = points[name]
    better = [
        other for other, (c, a) in points.items()
        if other != name and c <= cost and a >= acc and (c < cost or a > acc)
    ]
    return min(better, key=lambda m: (points[m][0], -points[m][1])) if better else None


def find_significance(significance: Iterable[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """The McNemar result for the pair {a, b}, in either order."""
    for entry in significance:
        if {entry.get("a"), entry.get("b")} == {a, b}:
            return entry
    return None


def significance_text(significance: list[dict[str, Any]], a: str, b: str) -> str:
    """The confusion stage's McNemar sentence for the pair {a, b}; empty when it compared none."""
    entry = find_significance(significance, a, b)
    if entry is None:
        return ""
    return str(entry.get("sentence") or "").strip()  # written by the confusion stage (metrics.mcnemar_sentence)


def has_seed_runs(metrics: dict[str, dict[str, Any]]) -> bool:
    """True when some model was trained with more than one seed (`train.seeds` > 1)."""
    return any((m.get("n_seeds") or 1) > 1 for m in metrics.values())


def seed_spread_text(metrics: dict[str, dict[str, Any]], a: str, b: str) -> str:
    """Whether the mean top-1 gap between a and b is larger than their seed-to-seed standard
    deviation; empty when neither was trained with more than one seed."""
    sds = [metrics[m]["top1_seed_sd"] for m in (a, b)
           if (metrics[m].get("n_seeds") or 1) > 1 and metrics[m].get("top1_seed_sd") is not None]
    if not sds:
        return ""
    means = {m: metrics[m]["top1"] if metrics[m].get("top1_seed_mean") is None else metrics[m]["top1_seed_mean"]
             for m in (a, b)}
    gap, spread = abs(means[a] - means[b]), max(sds)
    counts = sorted({int(metrics[m].get("n_seeds") or 1) for m in (a, b)})
    over = f"Over {counts[0]} training seeds" if len(counts) == 1 else "Over repeated trainings"
    sd = f"the seed-to-seed standard deviation (up to {100 * spread:.1f} points)"
    verdict = (f"more than {sd}, so their order does not hinge on the seed" if gap > spread
               else f"no more than {sd}, so another seed could swap them")
    return f"{over}, {a} and {b} are {point_gap(gap)} apart in mean top-1, {verdict}."


def by_accuracy(metrics: dict[str, dict[str, Any]]) -> list[str]:
    def key(m: str) -> tuple:
        lat = metrics[m].get("latency_cpu_p50_ms")
        return (-(metrics[m].get("top1") or 0.0), lat if lat is not None else math.inf, m)

    return sorted(metrics, key=key)


def recommend(
    metrics: dict[str, dict[str, Any]],
    latency_budget_ms: float,
    within_points: float,
    significance: list[dict[str, Any]] | None = None,
) -> Recommendations:
    """Apply the report rules to the evaluated models' metrics (top-1 as fractions).

    - best accuracy: the highest top-1 (ties: the faster one);
    - fastest within N points: among models with top-1 >= best - N points, the lowest median
      (p50) batch-1 CPU latency;
    - best under the latency budget: among models whose p95 batch-1 CPU latency is within the
      budget (a deployment promise is about the slow requests, so the tail counts), the highest top-1;
    - the Pareto set of top-1 against median CPU latency;
    - deploy: the best under the budget; when no model meets it, the fastest within N points;
      without latency measurements, the most accurate.
    """
    significance = significance or []
    if not metrics:
        empty = Recommendation("none", "No model", None, "No model was evaluated, so there is nothing to recommend.")
        return Recommendations(empty, empty, empty, empty, empty)
    ranked = by_accuracy(metrics)
    best = ranked[0]
    best_m = metrics[best]
    p50 = {m: metrics[m].get("latency_cpu_p50_ms") for m in metrics}
    p95 = {m: metrics[m].get("latency_cpu_p95_ms") for m in metrics}

    # Best accuracy, with how sure we are about the ranking of the top two.
    n_test = best_m.get("n_test")
    on = f" on {int(n_test):,} test photos" if n_test else ""
    reason = f"**{best}** has the highest top-1 accuracy: {ci_text(best_m)}{on}."
    if len(ranked) > 1:
        second = ranked[1]
        gap = best_m["top1"] - metrics[second]["top1"]
        reason += f" The runner-up, **{second}**, scores {pct(metrics[second]['top1'])}, {point_gap(gap)} lower."
        sentence = significance_text(significance, best, second)
        if sentence:
            reason += f" {sentence}"
        elif None not in (best_m.get("top1_ci_low"), metrics[second].get("top1_ci_high")):
            overlap = best_m["top1_ci_low"] <= metrics[second]["top1_ci_high"]
            reason += (" Their confidence intervals overlap, so this test set alone does not settle which is better."
                       if overlap else " Their confidence intervals do not overlap.")
        spread = seed_spread_text(metrics, best, second)
        if spread:
            reason += f" {spread}"
    else:
        reason += " It is the only model evaluated."
    best_rec = Recommendation("best_accuracy", "Best accuracy", best, reason, ranked)

    # Fastest within N points of the best.
    threshold = best_m["top1"] - within_points / 100.0
    near = [m for m in ranked if metrics[m]["top1"] >= threshold - 1e-12]
    timed = [m for m in near if p50[m] is not None]
    if not timed:
        fastest_rec = Recommendation(
            "fastest_within_points", f"Fastest within {plural(within_points, 'point')} of the best", None,
            "No CPU latency was measured for the models near the best, so speed cannot be compared.", near)
    else:
        fastest = min(timed, key=lambda m: (p50[m], -metrics[m]["top1"], m))
        lead = (f"Models within {plural(within_points, 'top-1 point')} of the best "
                f"(top-1 ≥ {pct(threshold)}, `report.within_points`): {', '.join(near)}.")
        if fastest == best:
            reason = (f"{lead} **{best}** is itself the fastest of these ({num(p50[best], 1, ' ms')} median "
                      "batch-1 CPU latency), so no accuracy needs to be traded for speed.")
        else:
            reason = (f"{lead} The fastest of them is **{fastest}**: {num(p50[fastest], 1, ' ms')} median "
                      f"batch-1 CPU latency")
            if p50[best] is not None:
                reason += f", {times_ratio(p50[best], p50[fastest])} faster than {best} ({num(p50[best], 1, ' ms')})"
            reason += f", for {point_gap(best_m['top1'] - metrics[fastest]['top1'])} less top-1 " \
                      f"({pct(metrics[fastest]['top1'])})."
            sentence = significance_text(significance, best, fastest)
            if sentence:
                reason += f" {sentence}"
        fastest_rec = Recommendation("fastest_within_points",
                                     f"Fastest within {plural(within_points, 'point')} of the best",
                                     fastest, reason, near)

    # Best under the latency budget (p95).
    budget_title = f"Best under the {latency_budget_ms:g} ms CPU latency budget"
    timed95 = [m for m in ranked if p95[m] is not None]
    fits = [m for m in ranked if p95[m] is not None and p95[m] <= latency_budget_ms]
    lead = (f"Budget: {latency_budget_ms:g} ms batch-1 CPU latency at the 95th percentile "
            "(`report.latency_budget_ms`).")
    if not timed95:
        budget_rec = Recommendation("best_under_latency_budget", budget_title, None,
                                    f"{lead} No CPU latency was measured, so the budget cannot be checked.", [])
    elif not fits:
        quickest = min(timed95, key=lambda m: p95[m])
        budget_rec = Recommendation(
            "best_under_latency_budget", budget_title, None,
            f"{lead} **No model meets it.** The quickest, {quickest}, needs {num(p95[quickest], 1, ' ms')} "
            f"p95 ({times_ratio(p95[quickest], latency_budget_ms)} the budget). A smaller model, a lower input "
            "resolution or a GPU would be needed.", [])
    else:
        chosen = fits[0]  # ranked by accuracy
        listed = ", ".join(f"{m} ({num(p95[m], 1, ' ms')})" for m in fits)
        reason = (f"{lead} Models within it: {listed}. The most accurate of them is **{chosen}** with "
                  f"{ci_text(metrics[chosen])} top-1.")
        if chosen != best:
            reason += f" That is {point_gap(best_m['top1'] - metrics[chosen]['top1'])} below {best}"
            reason += (f", which needs {num(p95[best], 1, ' ms')} p95 "
                       f"({times_ratio(p95[best], latency_budget_ms)} the budget)." if p95[best] is not None else ".")
            # What a slightly bigger budget would buy: the next more accurate model, cheapest first.
            better = [m for m in timed95 if metrics[m]["top1"] > metrics[chosen]["top1"]]
            if better:
                nxt = min(better, key=lambda m: (p95[m], -metrics[m]["top1"]))
                reason += (f" If the budget could stretch to {num(p95[nxt], 0, ' ms')}, {nxt} would add "
                           f"{point_gap(metrics[nxt]['top1'] - metrics[chosen]['top1'])}.")
            sentence = significance_text(significance, best, chosen)
            if sentence:
                reason += f" {sentence}"
        else:
            reason += " It is also the most accurate model overall."
        budget_rec = Recommendation("best_under_latency_budget", budget_title, chosen, reason, fits)

    # Pareto set on accuracy vs median CPU latency.
    points = {m: (p50[m], metrics[m]["top1"]) for m in metrics if p50[m] is not None}
    if not points:
        pareto_rec = Recommendation("pareto", "Pareto set (accuracy vs latency)", None,
                                    "No CPU latency was measured, so there is no accuracy/latency trade-off to show.")
    else:
        front = pareto_front(points)
        listed = ", ".join(f"{m} ({num(points[m][0], 1, ' ms')}, {pct(points[m][1])})" for m in front)
        reason = (f"No other model is both faster (median batch-1 CPU latency) and more accurate than these: "
                  f"{listed}. Each one is the right choice for some latency budget; moving along the set trades "
                  "speed for accuracy.")
        beaten = [m for m in points if m not in front]
        if beaten:
            reason += " Dominated: " + "; ".join(
                f"{m} is slower and less accurate than {dominated_by(points, m)}" for m in beaten) + "."
        else:
            reason += " No model is dominated."
        pareto_rec = Recommendation("pareto", "Pareto set (accuracy vs latency)", front[0], reason, front)

    # The one answer for the executive summary.
    if budget_rec.model is not None:
        deploy = Recommendation("deploy", "Deploy", budget_rec.model,
                                f"the most accurate model that meets the {latency_budget_ms:g} ms p95 CPU "
                                "latency budget", [budget_rec.model])
    elif fastest_rec.model is not None:
        deploy = Recommendation("deploy", "Deploy", fastest_rec.model,
                                f"no model meets the {latency_budget_ms:g} ms latency budget, so the fastest model "
                                f"within {within_points:g} top-1 points of the best", [fastest_rec.model])
    else:
        deploy = Recommendation("deploy", "Deploy", best, "the most accurate model (no CPU latency was measured)",
                                [best])
    return Recommendations(best_rec, fastest_rec, budget_rec, pareto_rec, deploy)
