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

ALPHA = 0.05  # significance level for "a measurable difference"


@dataclass
class Recommendation:
    rule: str          # best_accuracy | fastest_within_points | best_under_latency_budget | pareto | deploy
    title: str
    model: str | None  # None when no model satisfies the rule
    reason: str
    models: list[str] = field(default_factory=list)  # the Pareto set, or the candidates considered
    case: str = ""     # which outcome of the rule decided (deploy: only_model, under_budget, ...)
    tied: list[str] = field(default_factory=list)    # models that tie with `model` on what the rule ranks
    facts: dict[str, Any] = field(default_factory=dict)  # the numbers the sentence is written from
    noisy: list[str] = field(default_factory=list)   # models whose latency was measured on a busy machine


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
    """Most accurate first; a tie goes to the faster model (median CPU latency), then the name."""
    def key(m: str) -> tuple:
        lat = metrics[m].get("latency_cpu_p50_ms")
        return (-(metrics[m].get("top1") or 0.0), lat if lat is not None else math.inf, m)

    return sorted(metrics, key=key)


def same_top1(metrics: dict[str, dict[str, Any]], a: str, b: str) -> bool:
    """Two models tie when their top-1 reads the same in the report (to 0.1 point)."""
    return pct(metrics[a].get("top1")) == pct(metrics[b].get("top1"))


def measurable(significance: list[dict[str, Any]], metrics: dict[str, dict[str, Any]], a: str, b: str,
               alpha: float = ALPHA) -> bool | None:
    """Whether the top-1 difference between a and b is more than chance on these photos.

    McNemar's test on the same photos when the confusion stage ran it, else whether the 95%
    intervals are disjoint; None when neither is available.
    """
    entry = find_significance(significance, a, b)
    if entry is not None and entry.get("p_value") is not None:
        return float(entry["p_value"]) < alpha
    bounds = [metrics[m].get(k) for m in (a, b) for k in ("top1_ci_low", "top1_ci_high")]
    if None in bounds:
        return None
    a_low, a_high, b_low, b_high = bounds
    return not (a_low <= b_high and b_low <= a_high)


def difference_text(significance: list[dict[str, Any]], metrics: dict[str, dict[str, Any]], a: str, b: str) -> str:
    """'No measurable difference' or 'a measurable difference', with the test behind it; '' when untested."""
    verdict = measurable(significance, metrics, a, b)
    if verdict is None:
        return ""
    detail = significance_text(significance, a, b)
    if not detail:
        detail = ("Their 95% confidence intervals do not overlap." if verdict
                  else "Their 95% confidence intervals overlap.")
    lead = "The difference is measurable." if verdict else "There is no measurable difference between them."
    return f"{lead} {detail}"


def recommend(
    metrics: dict[str, dict[str, Any]],
    latency_budget_ms: float,
    within_points: float,
    significance: list[dict[str, Any]] | None = None,
) -> Recommendations:
    """Apply the report rules to the evaluated models' metrics (top-1 as fractions).

    - best accuracy: the highest top-1 (ties: the faster one);
    - fastest within N points: among models with top-1 >= best - N points, the lowest median
      (p50) batch-1 CPU latency (ties: the more accurate one);
    - best under the latency budget: among models whose p95 batch-1 CPU latency is within the
      budget (a deployment promise is about the slow requests, so the tail counts), the highest top-1;
    - the Pareto set of top-1 against median CPU latency;
    - deploy: the best under the budget; when no model meets it, the fastest within N points;
      without latency measurements, the most accurate.
    """
    significance = significance or []
    if not metrics:
        empty = Recommendation("none", "No model", None, "No model was evaluated, so there is nothing to recommend.",
                               case="none")
        return Recommendations(empty, empty, empty, empty, empty)
    ranked = by_accuracy(metrics)
    p50 = {m: metrics[m].get("latency_cpu_p50_ms") for m in metrics}
    p95 = {m: metrics[m].get("latency_cpu_p95_ms") for m in metrics}
    best_rec = _best_accuracy(metrics, ranked, significance)
    fastest_rec = _fastest_within(metrics, ranked, p50, within_points, significance)
    budget_rec = _under_budget(metrics, ranked, p95, latency_budget_ms, significance)
    pareto_rec = _pareto(metrics, p50)
    deploy = _deploy(metrics, ranked, best_rec, fastest_rec, budget_rec, latency_budget_ms, within_points)
    return Recommendations(best_rec, fastest_rec, budget_rec, pareto_rec, deploy)


# --- one rule each ------------------------------------------------------------------------------


def _best_accuracy(metrics: dict[str, dict[str, Any]], ranked: list[str],
                   significance: list[dict[str, Any]]) -> Recommendation:
    best = ranked[0]
    best_m = metrics[best]
    n_test = best_m.get("n_test")
    on = f" on {int(n_test):,} test photos" if n_test else ""
    tied = [m for m in ranked if same_top1(metrics, best, m)]
    if len(tied) == 1:
        reason = f"The highest top-1 accuracy is **{best}**'s: {ci_text(best_m)}{on}."
    else:
        timed = all(metrics[m].get("latency_cpu_p50_ms") is not None for m in tied)
        rule = "the faster one" if timed else "the first by name, as no latency was measured"
        reason = (f"The models {and_list([f'**{m}**' for m in tied])} tie for the highest top-1 accuracy at "
                  f"{pct(best_m['top1'])}{on}; {rule}, **{best}**, is listed first.")
    if len(ranked) == 1:
        reason += " It is the only model evaluated."
    elif len(tied) < len(ranked):
        second = ranked[len(tied)]
        gap = best_m["top1"] - metrics[second]["top1"]
        reason += f" The runner-up, **{second}**, scores {pct(metrics[second]['top1'])}, {point_gap(gap)} lower."
        difference = difference_text(significance, metrics, best, second)
        if difference:
            reason += f" {difference}"
        spread = seed_spread_text(metrics, best, second)
        if spread:
            reason += f" {spread}"
    return Recommendation("best_accuracy", "Best accuracy", best, reason, ranked, case="tie" if len(tied) > 1 else "",
                          tied=tied if len(tied) > 1 else [])


def _fastest_within(metrics: dict[str, dict[str, Any]], ranked: list[str], p50: dict[str, float | None],
                    within_points: float, significance: list[dict[str, Any]]) -> Recommendation:
    best = ranked[0]
    title = f"Fastest within {plural(within_points, 'point')} of the best"
    threshold = metrics[best]["top1"] - within_points / 100.0
    near = [m for m in ranked if metrics[m]["top1"] >= threshold - 1e-12]
    timed = [m for m in near if p50[m] is not None]
    if not timed:
        return Recommendation("fastest_within_points", title, None,
                              "No CPU latency was measured for the models near the best, so speed cannot be "
                              "compared.", near, case="untimed")
    quickest = min(p50[m] for m in timed)
    equally_fast = [m for m in timed if num(p50[m], 1) == num(quickest, 1)]  # `timed` is in accuracy order
    fastest = equally_fast[0]
    lead = (f"Models within {plural(within_points, 'top-1 point')} of the best (top-1 ≥ {pct(threshold)}, "
            f"`report.within_points`): {and_list(near)}.")
    if len(near) == 1:
        reason = (f"No other model is within {plural(within_points, 'top-1 point')} of the best (top-1 ≥ "
                  f"{pct(threshold)}, `report.within_points`), so **{best}** ({num(p50[best], 1, ' ms')} median "
                  "batch-1 CPU latency) stands alone: no accuracy can be traded for speed at this margin.")
    elif len(timed) == 1:
        reason = (f"{lead} Only **{fastest}** has a CPU latency measurement ({num(p50[fastest], 1, ' ms')} median "
                  "batch-1), so it is the fastest of them.")
    elif len(equally_fast) > 1:
        reason = (f"{lead} The models {and_list(equally_fast)} are equally fast ({num(quickest, 1, ' ms')} median "
                  f"batch-1 CPU latency); the more accurate, **{fastest}**, is chosen.")
    elif fastest == best:
        reason = (f"{lead} The best, **{best}**, is itself the fastest of these ({num(p50[best], 1, ' ms')} median "
                  "batch-1 CPU latency), so no accuracy needs to be traded for speed.")
    else:
        reason = (f"{lead} The fastest of them is **{fastest}**: {num(p50[fastest], 1, ' ms')} median "
                  "batch-1 CPU latency")
        if p50[best] is not None:
            reason += f", {times_ratio(p50[best], p50[fastest])} faster than {best} ({num(p50[best], 1, ' ms')})"
        if same_top1(metrics, best, fastest):
            reason += f", at the same top-1 ({pct(metrics[fastest]['top1'])})."
        else:
            reason += (f", for {point_gap(metrics[best]['top1'] - metrics[fastest]['top1'])} less top-1 "
                       f"({pct(metrics[fastest]['top1'])}).")
            difference = difference_text(significance, metrics, best, fastest)
            if difference:
                reason += f" {difference}"
    tie = len(equally_fast) > 1
    return Recommendation("fastest_within_points", title, fastest, reason, near,
                          case="tie" if tie else "", tied=equally_fast if tie else [])


def _under_budget(metrics: dict[str, dict[str, Any]], ranked: list[str], p95: dict[str, float | None],
                  budget: float, significance: list[dict[str, Any]]) -> Recommendation:
    best = ranked[0]
    title = f"Best under the {budget:g} ms CPU latency budget"
    timed = [m for m in ranked if p95[m] is not None]
    fits = [m for m in timed if p95[m] <= budget]
    lead = f"Budget: {budget:g} ms batch-1 CPU latency at the 95th percentile (`report.latency_budget_ms`)."
    if not timed:
        return Recommendation("best_under_latency_budget", title, None,
                              f"{lead} No CPU latency was measured, so the budget cannot be checked.", [],
                              case="untimed")
    if not fits:
        quickest = min(timed, key=lambda m: p95[m])
        return Recommendation(
            "best_under_latency_budget", title, None,
            f"{lead} **No model meets it.** The quickest, {quickest}, needs {num(p95[quickest], 1, ' ms')} "
            f"p95 ({times_ratio(p95[quickest], budget)} the budget). A smaller model, a lower input "
            "resolution or a GPU would be needed.", [], case="none_fit")
    chosen = fits[0]  # ranked by accuracy, ties to the faster
    listed = and_list([f"{m} ({num(p95[m], 1, ' ms')})" for m in fits])
    every = len(fits) == len(ranked) and len(ranked) > 1
    within = (f"Every model meets it: {listed}." if every
              else f"The only model within it is {listed}." if len(fits) == 1 else f"Models within it: {listed}.")
    tied = [m for m in fits if same_top1(metrics, chosen, m)]
    if len(tied) > 1:
        pick = (f"The models {and_list(tied)} tie at {pct(metrics[chosen]['top1'])} top-1; the faster one, "
                f"**{chosen}**, is chosen.")
    elif len(fits) == 1:
        pick = f"It reaches {ci_text(metrics[chosen])} top-1."
    else:
        pick = f"The most accurate of them is **{chosen}** with {ci_text(metrics[chosen])} top-1."
    reason = f"{lead} {within} {pick}"
    if not same_top1(metrics, best, chosen):
        reason += f" That is {point_gap(metrics[best]['top1'] - metrics[chosen]['top1'])} below {best}"
        reason += (f", which needs {num(p95[best], 1, ' ms')} p95 ({times_ratio(p95[best], budget)} the budget)."
                   if p95[best] is not None else ".")
        better = [m for m in timed if metrics[m]["top1"] > metrics[chosen]["top1"]]
        if better:  # what a slightly bigger budget would buy: the next more accurate model, cheapest first
            nxt = min(better, key=lambda m: (p95[m], -metrics[m]["top1"]))
            reason += (f" If the budget could stretch to {num(p95[nxt], 0, ' ms')}, {nxt} would add "
                       f"{point_gap(metrics[nxt]['top1'] - metrics[chosen]['top1'])}.")
        difference = difference_text(significance, metrics, best, chosen)
        if difference:
            reason += f" {difference}"
    elif len(ranked) > 1 and len(tied) == 1:
        reason += " It is also the most accurate model overall."
    return Recommendation("best_under_latency_budget", title, chosen, reason, fits,
                          case="all_fit" if every else "", tied=tied if len(tied) > 1 else [])


def _pareto(metrics: dict[str, dict[str, Any]], p50: dict[str, float | None]) -> Recommendation:
    title = "Pareto set (accuracy vs latency)"
    points = {m: (p50[m], metrics[m]["top1"]) for m in metrics if p50[m] is not None}
    if not points:
        return Recommendation("pareto", title, None,
                              "No CPU latency was measured, so there is no accuracy/latency trade-off to show.",
                              case="untimed")
    front = pareto_front(points)
    listed = and_list([f"{m} ({num(points[m][0], 1, ' ms')}, {pct(points[m][1])})" for m in front])
    if len(points) == 1:
        reason = f"Only {listed} has a latency measurement, so there is no trade-off to show."
    elif len(front) == 1:
        reason = (f"The Pareto front has one model, {listed}: no other model is faster (median batch-1 CPU "
                  "latency) or more accurate.")
    else:
        reason = (f"No other model is both faster (median batch-1 CPU latency) and more accurate than these "
                  f"{len(front)}: {listed}. Each one is the right choice for some latency budget; moving along the "
                  "set trades speed for accuracy.")
    beaten = [m for m in points if m not in front]
    if beaten:
        reason += " Dominated: " + "; ".join(_dominated_text(points, m) for m in beaten) + "."
    elif len(points) > 1:
        reason += " No model is dominated."
    return Recommendation("pareto", title, front[0], reason, front, case="one" if len(front) == 1 else "")


def _dominated_text(points: dict[str, tuple[float, float]], name: str) -> str:
    other = dominated_by(points, name)
    (cost, acc), (other_cost, other_acc) = points[name], points[other]
    if num(cost, 1) == num(other_cost, 1):
        return f"{name} is as fast as {other} but less accurate"
    if pct(acc) == pct(other_acc):
        return f"{name} is slower than {other} at the same top-1"
    return f"{name} is slower and less accurate than {other}"


# --- the one answer -----------------------------------------------------------------------------


def _deploy(metrics: dict[str, dict[str, Any]], ranked: list[str], best_rec: Recommendation,
            fastest_rec: Recommendation, budget_rec: Recommendation, budget: float,
            within_points: float) -> Recommendation:
    facts = {"budget_ms": budget, "within_points": within_points, "best": ranked[0]}
    if len(ranked) == 1:
        case, model = "only_model", ranked[0]
    elif budget_rec.model is not None:
        case = "under_budget_best" if same_top1(metrics, ranked[0], budget_rec.model) else "under_budget"
        model = budget_rec.model
    elif fastest_rec.model is not None:
        case, model = "fastest_within", fastest_rec.model
    else:
        case, model = "untimed", ranked[0]
    facts["latency_based"] = case in ("under_budget_best", "under_budget", "fastest_within")
    if case != "fastest_within":
        facts["tied"] = [m for m in ranked if m != model and same_top1(metrics, model, m)
                         and (case == "untimed" or m in budget_rec.models)]
    noisy = sorted(m for m in metrics if metrics[m].get("timing_noisy"))
    deploy = Recommendation("deploy", "Deploy", model, "", [model], case=case, facts=facts,
                            noisy=noisy if facts["latency_based"] else [])
    deploy.reason = decision_sentence(deploy)
    return deploy


def decision_sentence(deploy: Recommendation) -> str:
    """Why the deployed model was chosen: one sentence per rule outcome, written for that case."""
    facts, model = deploy.facts, deploy.model
    budget = f"{facts['budget_ms']:g} ms p95 CPU latency budget"
    tied = facts.get("tied") or []
    tie = f" (tied with {and_list(tied)})" if tied else ""
    sentences = {
        "only_model": f"Only one model was evaluated, so {model} is the one to deploy.",
        "under_budget_best": f"Of all models, {model} is the most accurate{tie}, and it meets the {budget}.",
        "under_budget": f"Of the models that meet the {budget}, {model} is the most accurate{tie}.",
        "fastest_within": (f"No model meets the {budget}, so {model} is recommended as the fastest model within "
                           f"{plural(facts['within_points'], 'top-1 point')} of the best."),
        "untimed": f"No CPU latency was measured, so {model}, the most accurate model{tie}, is recommended.",
    }
    text = sentences[deploy.case]
    if deploy.noisy:
        text += (f" The latency behind this choice was measured on a busy machine ({and_list(deploy.noisy)}), "
                 "so it may not hold on a quiet one.")
    return text


def deploy_heading(recs: Recommendations) -> str:
    """The recommendations section's first line: the model to deploy."""
    return f"Recommended for deployment: {recs.deploy.model or 'none'}"


def executive_summary_text(recs: Recommendations, metrics: dict[str, dict[str, Any]], n_classes: int | None,
                           significance: list[dict[str, Any]] | None = None, robust: str | None = None) -> str:
    """The executive summary's paragraph: what to deploy, why, and how it compares with the rest."""
    significance = significance or []
    chosen = recs.deploy.model
    if chosen is None:
        return "**No model finished evaluation, so there is no recommendation.**"
    m = metrics[chosen]
    n_test = m.get("n_test")
    text = f"**Deploy {chosen}.** {recs.deploy.reason} It reaches {ci_text(m)} top-1 accuracy"
    text += f" on {int(n_test):,} test photos" if n_test else ""
    text += f" of {plural(n_classes, 'food class', 'food classes')}" if n_classes else ""
    if m.get("latency_cpu_p50_ms") is not None:
        text += (f", answering in {num(m['latency_cpu_p50_ms'], 1, ' ms')} (median; p95 "
                 f"{num(m.get('latency_cpu_p95_ms'), 1, ' ms')}) per photo on the CPU")
    text += "."
    ranked = by_accuracy(metrics)
    best = ranked[0]
    tied = [x for x in ranked if x != chosen and same_top1(metrics, chosen, x)]
    if tied and not recs.deploy.facts.get("tied"):  # a tie the decision sentence has not named yet
        rule = "; the faster model is recommended" if m.get("latency_cpu_p50_ms") is not None else ""
        text += f" It ties with {and_list(tied)} at {pct(m['top1'])} top-1{rule}."
    if not same_top1(metrics, best, chosen):
        b = metrics[best]
        text += f" The most accurate model, {best}, reaches {pct(b['top1'])} ({point_gap(b['top1'] - m['top1'])} more)"
        if b.get("latency_cpu_p50_ms") and m.get("latency_cpu_p50_ms"):
            text += f" but is {times_ratio(b['latency_cpu_p50_ms'], m['latency_cpu_p50_ms'])} slower"
        text += "."
        difference = difference_text(significance, metrics, best, chosen)
        if difference:
            text += f" {difference}"
    elif len(ranked) > len(tied) + 1:
        others = [x for x in ranked if x != chosen and x not in tied]
        second = others[0]
        # The decision sentence has already called it the most accurate of all, or not (the most
        # accurate under the budget, the fastest within a margin): say it once.
        lead = "The next" if recs.deploy.case in ("under_budget_best", "untimed") else \
            "It is also the most accurate model; the next"
        text += (f" {lead}, {second}, reaches {pct(metrics[second]['top1'])} "
                 f"({point_gap(m['top1'] - metrics[second]['top1'])} less).")
        difference = difference_text(significance, metrics, chosen, second)
        if difference:
            text += f" {difference}"
    if len(ranked) > 1:
        spread = seed_spread_text(metrics, *ranked[:2])
        if spread:
            text += f" {spread}"
    # `robust`: the robustness rule's choice (tasks/robustness.py); named only when it differs.
    robust_mca = (metrics.get(robust) or {}).get("mean_corruption_accuracy")
    chosen_mca = m.get("mean_corruption_accuracy")
    if robust and robust != chosen and robust_mca is not None and chosen_mca is not None:
        text += (f" On degraded photos (blur, noise, poor light, compression) {robust} holds up better: "
                 f"{pct(robust_mca)} mean accuracy under corruptions against {pct(chosen_mca)}; see "
                 "[Robustness](#robustness).")
    return text


def failures_text(failed: list[str], evaluated: list[str]) -> str:
    """The executive summary's warning when some models failed."""
    count = plural(len(failed), "model")
    if not evaluated:
        rest = "No model is left to report."
    elif len(evaluated) == 1:
        rest = f"The report covers the remaining one, {evaluated[0]}."
    else:
        rest = f"The report covers the remaining {len(evaluated)}: {and_list(evaluated)}."
    return f"**{count[0].upper()}{count[1:]} failed** ({and_list(failed)}). {rest} See [Failures](#failures)."


def and_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"
