"""The report stage: sections with the upstream numbers, the recommendation rules, failures,
summary.json, a self-contained HTML page, the history hook, MLflow and Prefect publishing.

Upstream outputs come from tests/report_fixtures.py (no training); MLflow and Prefect are real.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from food101.recommend import pareto_front, recommend
from tasks.report import report
from tests.conftest import make_config
from tests.report_fixtures import MODEL_SPECS, write_upstream_outputs

SECTIONS = [
    "Contents", "Executive summary", "Recommendations", "Summary table", "Accuracy vs cost", "Deployment",
    "Learning curves", "Best and worst classes", "Where the models fail", "Robustness", "Since the last benchmark",
    "Data validation", "Failures", "Environment",
]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    return root, write_upstream_outputs(make_config(root))


def run_report(root: Path, name: str, **kwargs):
    """report.fn on the shared upstream outputs, writing into its own reports folder."""
    overrides = {k: v for k, v in kwargs.items() if "__" in k}
    call = {k: v for k, v in kwargs.items() if "__" not in k}
    config = make_config(root, paths__reports=str(root / f"reports-{name}"), **overrides)
    return config, report.fn(config, **call)


@pytest.fixture(scope="module")
def default_report(upstream):
    root, facts = upstream
    config, result = run_report(root, "default")
    return config, facts, result, Path(result["report_md"]).read_text()


def sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def table_rows(text: str) -> dict[str, list[str]]:
    """First-column -> cells of every Markdown table row in `text` (header and rule skipped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[re.sub(r"\*\*|\(deploy\)", "", cells[0]).strip()] = cells[1:]
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


# --- the document --------------------------------------------------------------------------------


def test_report_has_every_section_with_the_fixture_numbers(default_report):
    config, facts, result, markdown = default_report
    found = sections(markdown)
    assert list(found) == SECTIONS
    assert markdown.startswith(f"# {config.report.title}\n")

    summary_rows = table_rows(found["Summary table"])
    for model, m in facts.metrics.items():
        cells = summary_rows[model]
        assert cells[0] == f"{pct(m['top1'])} ({pct(m['top1_ci_low'])}–{pct(m['top1_ci_high'])})"
        # The sample has 5 classes: top-5 is 100% by construction, shown as n/a with the reason.
        assert cells[1] == ("n/a" if len(facts.classes) <= 5 else pct(m["top5"]))
        assert cells[2] == f"{m['macro_f1']:.3f}" and cells[3] == f"{m['ece']:.3f}"
        assert cells[5] == f"{m['train_images_per_s']:,.0f}"
        assert cells[6] == f"{m['latency_cpu_p50_ms']:.1f} / {m['latency_cpu_p95_ms']:.1f}"
        assert cells[7] == "—"  # no GPU latency in the fixture
        assert cells[8] == f"{m['params'] / 1e6:.1f}" and cells[9] == f"{m['size_mb']:.1f}"
        assert cells[10] == f"{m['gflops']:.2f}"
    assert "| **mobilenet_v3_large** (deploy) |" in found["Summary table"]
    assert len(facts.classes) > 5 or "top-5 % is n/a: with 5 classes" in found["Summary table"]
    assert table_rows(found["Summary table"])["resnet50"][4] == "1 h 30 min"

    summary = found["Executive summary"]
    assert "**Deploy mobilenet_v3_large.**" in summary
    assert f"{pct(facts.metrics['mobilenet_v3_large']['top1'])}%" in summary and "50 test photos" in summary

    recs = found["Recommendations"]
    assert "### Best accuracy: resnet50" in recs
    assert "### Fastest within 1 point of the best: efficientnet_b0" in recs
    assert "### Best under the 20 ms CPU latency budget: mobilenet_v3_large" in recs
    pair = next(s for s in facts.significance if {s["a"], s["b"]} == {"resnet50", "efficientnet_b0"})
    assert pair["sentence"] in recs  # McNemar between the top two, in the best-accuracy reasoning

    assert "plots/accuracy_vs_latency.png" in found["Accuracy vs cost"]
    assert "plots/accuracy_vs_training_time.png" in found["Accuracy vs cost"]
    assert "plots/learning_curves.png" in found["Learning curves"]
    assert table_rows(found["Learning curves"])["resnet50"][0] == "6"  # epochs run

    # Best and worst classes from per_class.csv (display names).
    import pandas as pd

    per_class = pd.read_csv(config.paths.eval / "resnet50" / "per_class.csv").sort_values(["accuracy", "class"])
    worst = per_class.iloc[0]
    assert f"| {worst['display']} | {100 * worst['accuracy']:.0f}% |" in found["Best and worst classes"]

    fail = found["Where the models fail"]
    for model in facts.metrics:
        assert f"plots/matrix_{model}.png" in fail and f"plots/examples_{model}.png" in fail
    pairs = pd.read_csv(config.paths.confusion / "resnet50_pairs.csv")
    top = pairs.iloc[0]
    display = dict(zip(facts.classes, facts.display, strict=True))
    assert f"| {display[top['true']]} | {display[top['predicted']]} | {int(top['count'])} |" in fail
    for true, predicted in facts.shared_pairs:
        assert f"| {display[true]} | {display[predicted]} |" in fail
    for group in facts.groups:
        assert ", ".join(display[c] for c in group) in fail
    assert all(s["sentence"] in fail for s in facts.significance)

    assert "first benchmark of this profile" in found["Since the last benchmark"]
    validation = found["Data validation"]
    assert facts.data_hash in validation and facts.quarantined[0]["path"] in validation
    assert "5 of 6 expectations passed" in validation and "✗ failed" in validation
    assert "Every model trained and evaluated successfully." in found["Failures"]
    env = found["Environment"]
    assert facts.data_hash in env and "| torch |" in env and "| Python |" in env and "git commit" in env
    assert "latency_budget_ms: 20.0" in env  # the effective params, in a collapsible block
    assert "<details>" in env

    # Every image the Markdown links exists next to it.
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (Path(result["report_md"]).parent / link).is_file(), link


def test_summary_json_is_a_valid_metric_file(default_report):
    config, facts, result, _ = default_report
    summary = json.loads(Path(result["summary"]).read_text())
    assert result["recommended"] == summary["recommended"] == "mobilenet_v3_large"
    assert summary["recommendations"] == {
        "best_accuracy": "resnet50", "fastest_within_points": "efficientnet_b0",
        "best_under_latency_budget": "mobilenet_v3_large",
        "pareto": ["mobilenet_v3_large", "efficientnet_b0", "resnet50"],
    }
    assert set(summary["models"]) == set(MODEL_SPECS)
    assert summary["models"]["resnet50"]["top1"] == pytest.approx(0.82)
    assert summary["data_hash"] == facts.data_hash and summary["failed"] == {}
    assert Path(result["summary"]).parent == config.paths.reports


def test_html_is_self_contained_with_decodable_images(default_report):
    config, _, result, markdown = default_report
    page = Path(result["report_html"]).read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(re.findall(r"!\[", markdown)) >= 10
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as img:
            img.verify()
    anchors = set(re.findall(r'href="#([\w-]+)"', page))
    ids = set(re.findall(r'id="([\w-]+)"', page))
    assert anchors and anchors <= ids  # the table of contents points at real sections
    assert '<nav class="toc"' in page and "<style>" in page


# --- the rules ------------------------------------------------------------------------------------


def metrics_of(**models: tuple[float, float | None, float | None]) -> dict[str, dict]:
    """name=(top1, cpu p50 ms, cpu p95 ms)."""
    return {name: {"top1": t, "latency_cpu_p50_ms": p50, "latency_cpu_p95_ms": p95, "n_test": 1000}
            for name, (t, p50, p95) in models.items()}


def test_recommendations_follow_the_rules():
    specs = {m: {k: v for k, v in s.items()} for m, s in MODEL_SPECS.items()}
    recs = recommend(specs, latency_budget_ms=20.0, within_points=1.0)
    assert recs.best_accuracy.model == "resnet50"
    assert recs.fastest_within.model == "efficientnet_b0"  # 0.5 points behind, 2.3x faster
    assert recs.under_budget.model == "mobilenet_v3_large"  # the only one with p95 <= 20 ms
    assert recs.deploy.model == "mobilenet_v3_large"
    assert "If the budget could stretch to 25 ms, efficientnet_b0" in recs.under_budget.reason

    # A wider budget lets the more accurate model in.
    assert recommend(specs, 30.0, 1.0).under_budget.model == "efficientnet_b0"
    # A tighter "within" keeps only the best, which is then also the fastest of the near ones.
    tight = recommend(specs, 20.0, 0.1)
    assert tight.fastest_within.model == "resnet50" and "stands alone" in tight.fastest_within.reason
    # No model meets the budget: say so, and deploy the fastest within N points instead.
    none_fit = recommend(specs, 5.0, 1.0)
    assert none_fit.under_budget.model is None and "No model meets it" in none_fit.under_budget.reason
    assert none_fit.deploy.model == "efficientnet_b0"


def test_pareto_set_leaves_out_dominated_models():
    metrics = metrics_of(fast=(0.70, 5.0, 6.0), mid=(0.80, 20.0, 22.0), slow_worse=(0.75, 40.0, 45.0),
                         best=(0.85, 60.0, 70.0))
    recs = recommend(metrics, latency_budget_ms=25.0, within_points=1.0)
    assert recs.pareto.models == ["fast", "mid", "best"]
    assert "slow_worse is slower and less accurate than mid" in recs.pareto.reason
    assert pareto_front({"a": (1.0, 0.5), "b": (1.0, 0.5)}) == ["a", "b"]  # ties dominate nothing
    assert recs.under_budget.model == "mid" and recs.deploy.model == "mid"


def test_recommendation_without_latency_falls_back_to_accuracy():
    recs = recommend(metrics_of(a=(0.60, None, None), b=(0.65, None, None)), 20.0, 1.0)
    assert recs.best_accuracy.model == recs.deploy.model == "b"
    assert recs.under_budget.model is None and recs.pareto.model is None


def test_significance_sentence_between_the_top_two_is_quoted():
    sig = [{"a": "y", "b": "x", "n_a_only": 3, "n_b_only": 40, "p_value": 1e-8, "sentence": "X beats Y, for real."}]
    recs = recommend(metrics_of(x=(0.9, 10.0, 12.0), y=(0.8, 5.0, 6.0)), 20.0, 1.0, sig)
    assert "X beats Y, for real." in recs.best_accuracy.reason


def test_latency_budget_and_within_points_come_from_params(upstream):
    root, _ = upstream
    _, result = run_report(root, "budget30", report__latency_budget_ms=30.0)
    summary = json.loads(Path(result["summary"]).read_text())
    assert result["recommended"] == "efficientnet_b0" == summary["recommendations"]["best_under_latency_budget"]
    assert summary["latency_budget_ms"] == 30.0


# --- failures, history, publishing ----------------------------------------------------------------


def test_failed_models_are_marked_and_the_others_reported(upstream, tmp_path):
    # A failure reported by the flow (stale eval files exist) ...
    root, _ = upstream
    _, result = run_report(root, "failed", failures={"efficientnet_b0": "CUDA out of memory at batch 128"})
    markdown = Path(result["report_md"]).read_text()
    found = sections(markdown)
    assert "**1 model failed** (efficientnet_b0)" in found["Executive summary"]
    assert "CUDA out of memory at batch 128" in found["Failures"]
    assert table_rows(found["Summary table"])["efficientnet_b0 FAILED"][0] == "—"
    assert "resnet50" in table_rows(found["Summary table"]) and "mobilenet_v3_large" in table_rows(
        found["Summary table"])
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["failed"] == {"efficientnet_b0": "CUDA out of memory at batch 128"}
    assert "efficientnet_b0" not in summary["models"] and summary["recommended"] == "mobilenet_v3_large"

    # ... and one found only in train.json (status failed, never evaluated).
    config = make_config(tmp_path, paths__tracking_db=str(root / "mlflow.db"),  # reuse the module's MLflow db
                         paths__tracking_artifacts=str(root / "mlruns"))
    write_upstream_outputs(config, failed={"resnet50": "loss became NaN at epoch 2"})
    result = report.fn(config)
    found = sections(Path(result["report_md"]).read_text())
    assert "loss became NaN at epoch 2" in found["Failures"] and "| failed |" in found["Failures"]
    assert "### Best accuracy: efficientnet_b0" in found["Recommendations"]
    assert json.loads(Path(result["summary"]).read_text())["failed"] == {"resnet50": "loss became NaN at epoch 2"}


def test_comparison_with_the_previous_benchmark(upstream):
    root, facts = upstream
    reports = root / "reports-history"
    reports.mkdir()
    history = {
        "previous": {"run_id": "abc123", "date": "2026-11-18",
                     "metrics": {"resnet50": {"top1": 0.84, "latency_cpu_p50_ms": 40.0}}},
        "deltas": [{"model": "resnet50", "metric": "top1", "previous": 0.84, "current": 0.82, "delta": -0.02,
                    "significant": True, "test": "mcnemar p=0.01 (30 lost, 10 gained of 1000 shared)",
                    "outcome": "regression", "recipe_change": "lr 0.1 -> 0.05"}],
        "recipe_changes": {"resnet50": "lr 0.1 -> 0.05"},
        "regressions": [{"model": "resnet50", "metric": "top1", "message": "resnet50 top-1 fell 2.0 points"}],
    }
    (reports / "history.json").write_text(json.dumps(history))
    _, result = run_report(root, "history")
    found = sections(Path(result["report_md"]).read_text())
    assert "Regression since the last benchmark" in found["Executive summary"]
    since = found["Since the last benchmark"]
    assert "`abc123`" in since and "2026-11-18" in since and "resnet50 top-1 fell 2.0 points" in since
    assert table_rows(since)["resnet50"] == ["top1", "0.84", "0.82", "-0.02", "regression",
                                             "mcnemar p=0.01 (30 lost, 10 gained of 1000 shared)", "changed"]
    assert "resnet50: lr 0.1 -> 0.05" in since
    assert json.loads(Path(result["summary"]).read_text())["regressions"] == 1


def test_published_to_the_mlflow_parent_run(upstream):
    from food101.tracking import finish_run, start_benchmark_run

    root, _ = upstream
    config = make_config(root, paths__reports=str(root / "reports-mlflow"))
    parent = start_benchmark_run(config)
    result = report.fn(config, parent_run_id=parent.run_id)
    finish_run(parent)
    client = parent.client
    assert {Path(a.path).name for a in client.list_artifacts(parent.run_id, "report")} >= {
        "report.md", "report.html", "summary.json"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    (stage,) = [r for r in children if r.data.tags.get("stage") == "report"]
    assert stage.data.tags["recommended"] == result["recommended"]
    assert {Path(a.path).name for a in client.list_artifacts(stage.info.run_id, "plots")} >= {
        "accuracy_vs_latency.png", "learning_curves.png"}


def test_prefect_artifacts_inside_a_flow_run(upstream, prefect_harness):
    from prefect import flow
    from prefect.artifacts import Artifact

    root, _ = upstream
    config = make_config(root, paths__reports=str(root / "reports-prefect"))

    @flow(name="report-artifacts-test")
    def publish() -> dict:
        return report(config)

    result = publish()
    markdown = Artifact.get("food101-report")
    table = Artifact.get("food101-summary")
    assert markdown is not None and table is not None
    assert f"Deploy {result['recommended']}" in markdown.data
    assert "data:image" not in markdown.data  # images are not inlined into the Prefect UI
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {row["model"] for row in rows} == set(MODEL_SPECS)
