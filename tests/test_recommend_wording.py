"""Every outcome of the recommendation rules reads right: the exact sentence a manager sees for
each case, and checks over every sentence the rules can render (no pasted fragments, no ties
presented as rankings, no "1 points")."""

from __future__ import annotations

import json
import re

import pytest

from food101.recommend import (
    deploy_heading,
    executive_summary_text,
    failures_text,
    recommend,
)


def metrics_of(**models: tuple) -> dict[str, dict]:
    """name=(top1, cpu p50 ms, cpu p95 ms[, extra metrics]); 50 test photos, a ±10-point interval."""
    out = {}
    for name, (top1, p50, p95, *extra) in models.items():
        out[name] = {"top1": top1, "top5": 1.0, "latency_cpu_p50_ms": p50, "latency_cpu_p95_ms": p95, "n_test": 50,
                     "top1_ci_low": max(0.0, top1 - 0.1), "top1_ci_high": min(1.0, top1 + 0.1),
                     **(extra[0] if extra else {})}
    return out


# case: (metrics, latency budget ms, within points, the deploy rule's outcome, its headline)
CASES = {
    "one model": (
        metrics_of(resnet50=(0.80, 10.0, 12.0)), 20.0, 1.0, "only_model",
        "**Deploy resnet50.** Only one model was evaluated, so resnet50 is the one to deploy."),
    "a tie for best accuracy": (
        metrics_of(mobilenet_v3_large=(0.28, 10.0, 12.0), resnet50=(0.28, 15.0, 18.0)), 20.0, 1.0,
        "under_budget_best",
        "**Deploy mobilenet_v3_large.** Of all models, mobilenet_v3_large is the most accurate (tied with "
        "resnet50), and it meets the 20 ms p95 CPU latency budget."),
    "a tie for best accuracy, no model within the budget": (
        metrics_of(mobilenet_v3_large=(0.28, 30.0, 32.0), resnet50=(0.28, 45.0, 48.0)), 20.0, 1.0,
        "fastest_within",
        "**Deploy mobilenet_v3_large.** No model meets the 20 ms p95 CPU latency budget, so mobilenet_v3_large "
        "is recommended as the fastest model within 1 top-1 point of the best."),
    "a tie in latency": (
        metrics_of(resnet50=(0.80, 10.0, 12.0), efficientnet_b0=(0.79, 10.0, 12.0),
                   mobilenet_v3_large=(0.70, 5.0, 6.0)), 5.0, 2.0, "fastest_within",
        "**Deploy resnet50.** No model meets the 5 ms p95 CPU latency budget, so resnet50 is recommended as the "
        "fastest model within 2 top-1 points of the best."),
    "no model within the latency budget": (
        metrics_of(resnet50=(0.80, 30.0, 35.0), efficientnet_b0=(0.78, 20.0, 25.0)), 10.0, 3.0, "fastest_within",
        "**Deploy efficientnet_b0.** No model meets the 10 ms p95 CPU latency budget, so efficientnet_b0 is "
        "recommended as the fastest model within 3 top-1 points of the best."),
    "every model within the budget": (
        metrics_of(resnet50=(0.80, 10.0, 12.0), efficientnet_b0=(0.75, 5.0, 6.0)), 20.0, 1.0, "under_budget_best",
        "**Deploy resnet50.** Of all models, resnet50 is the most accurate, and it meets the 20 ms p95 CPU "
        "latency budget."),
    "the best model also the fastest": (
        metrics_of(resnet50=(0.80, 5.0, 6.0), efficientnet_b0=(0.75, 10.0, 12.0)), 20.0, 1.0, "under_budget_best",
        "**Deploy resnet50.** Of all models, resnet50 is the most accurate, and it meets the 20 ms p95 CPU "
        "latency budget."),
    "a Pareto set of three": (
        metrics_of(resnet50=(0.80, 30.0, 35.0), efficientnet_b0=(0.75, 10.0, 12.0),
                   mobilenet_v3_large=(0.70, 5.0, 6.0)), 20.0, 1.0, "under_budget",
        "**Deploy efficientnet_b0.** Of the models that meet the 20 ms p95 CPU latency budget, efficientnet_b0 is "
        "the most accurate."),
    "no latency measured": (
        metrics_of(resnet50=(0.60, None, None), efficientnet_b0=(0.65, None, None)), 20.0, 1.0, "untimed",
        "**Deploy efficientnet_b0.** No CPU latency was measured, so efficientnet_b0, the most accurate model, is "
        "recommended."),
    "latency measured on a busy machine": (
        metrics_of(resnet50=(0.80, 30.0, 35.0, {"timing_noisy": True}),
                   efficientnet_b0=(0.75, 10.0, 12.0, {"timing_noisy": True})), 20.0, 1.0, "under_budget",
        "**Deploy efficientnet_b0.** Of the models that meet the 20 ms p95 CPU latency budget, efficientnet_b0 is "
        "the most accurate. The latency behind this choice was measured on a busy machine (efficientnet_b0 and "
        "resnet50), so it may not hold on a quiet one."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_outcome_has_its_own_exact_sentence(case: str):
    metrics, budget, within, outcome, headline = CASES[case]
    recs = recommend(metrics, budget, within)
    assert recs.deploy.case == outcome
    summary = executive_summary_text(recs, metrics, n_classes=5)
    assert summary.startswith(headline + " It reaches "), summary
    assert deploy_heading(recs) == f"Recommended for deployment: {recs.deploy.model}"
    assert recs.deploy.reason in summary  # the recommendations section and the summary share the sentence


def test_ties_are_named_as_ties_and_never_as_a_ranking():
    metrics, budget, within, *_ = CASES["a tie for best accuracy, no model within the budget"]
    recs = recommend(metrics, budget, within)
    summary = executive_summary_text(recs, metrics, n_classes=5)
    assert "It ties with resnet50 at 28.0% top-1; the faster model is recommended." in summary
    assert "follows" not in summary and "runner-up" not in recs.best_accuracy.reason
    assert recs.best_accuracy.reason.startswith(
        "The models **mobilenet_v3_large** and **resnet50** tie for the highest top-1 accuracy at 28.0%")
    assert "resnet50 is slower than mobilenet_v3_large at the same top-1" in recs.pareto.reason
    latency_tie = recommend(*CASES["a tie in latency"][:3])
    assert "The models resnet50 and efficientnet_b0 are equally fast (10.0 ms median batch-1 CPU latency); the " \
           "more accurate, **resnet50**, is chosen." in latency_tie.fastest_within.reason


def test_a_difference_inside_the_intervals_is_no_measurable_difference():
    metrics, budget, within, *_ = CASES["no model within the latency budget"]
    reason = recommend(metrics, budget, within).best_accuracy.reason
    assert "There is no measurable difference between them." in reason
    mcnemar = [{"a": "resnet50", "b": "efficientnet_b0", "p_value": 0.001, "sentence": "McNemar says so."}]
    reason = recommend(metrics, budget, within, mcnemar).best_accuracy.reason
    assert "The difference is measurable. McNemar says so." in reason


def test_failures_are_counted_in_words_that_fit():
    assert failures_text(["resnet50", "efficientnet_b0"], ["mobilenet_v3_large"]) == (
        "**2 models failed** (resnet50 and efficientnet_b0). The report covers the remaining one, "
        "mobilenet_v3_large. See [Failures](#failures).")
    assert failures_text(["resnet50"], ["efficientnet_b0", "mobilenet_v3_large"]).startswith(
        "**1 model failed** (resnet50). The report covers the remaining 2: efficientnet_b0 and mobilenet_v3_large.")


def rendered_texts() -> list[str]:
    texts = [failures_text(["resnet50", "efficientnet_b0"], ["mobilenet_v3_large"])]
    for metrics, budget, within, *_ in CASES.values():
        for within_points in (within, 1.0, 2.5):
            recs = recommend(metrics, budget, within_points)
            texts.append(executive_summary_text(recs, metrics, n_classes=5))
            texts.append(executive_summary_text(recs, metrics, n_classes=1))
            texts.extend(rule.reason for rule in recs.rules())
            texts.append(recs.deploy.reason)
    return texts


@pytest.mark.parametrize("text", rendered_texts())
def test_every_rendered_sentence_is_well_formed(text: str):
    assert "It is no" not in text
    assert "0.0 point" not in text
    assert not re.search(r"(?<![\w.-])1(\.0)? (top-1 )?points\b", text), text
    assert not re.search(r"\b1 food classes\b", text), text
    doubled = re.search(r"\b(\w+) \1\b", text, re.IGNORECASE)
    assert doubled is None, f"doubled word {doubled.group(0)!r} in: {text}"
    assert text.endswith("."), text
    # Found in the demo's summary: "Of all models, X is the most accurate ... It is also the most
    # accurate model; the next ...": one claim, made twice.
    said_best = "Of all models," in text or ", the most accurate model" in text
    assert not (said_best and "also the most accurate" in text), text
    for sentence in re.split(r"(?<=\.)\s+", text):
        first = sentence.lstrip("*`[")[0]
        assert first.isupper() or first.isdigit(), f"sentence starts in lower case: {sentence!r}"


@pytest.mark.slow
def test_the_demo_reports_summary_and_recommendations_say_the_same_thing(demo_run):
    """The real report: one model and one reason in both places, the reason written by the rules."""
    from tests.test_report import sections

    reports = demo_run["config"].paths.reports
    summary = json.loads((reports / "summary.json").read_text())
    found = sections((reports / "report.md").read_text())
    model, reason = summary["recommended"], summary["recommended_because"]
    assert f"**Deploy {model}.** {reason}" in found["Executive summary"]
    recommendations = found["Recommendations"]
    assert f"Recommended for deployment: {model}" in recommendations
    assert reason in recommendations
    for text in (reason, found["Executive summary"].split("\n\n")[-1].strip()):
        assert "It is no" not in text and "0.0 point" not in text
