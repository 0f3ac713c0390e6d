"""report: the benchmark's answer, which model to deploy and why, with every number behind it.

Reads what the other stages wrote (metrics, per-class results, histories, confusion analysis,
data validation), applies the recommendation rules of `params.yaml` (`report:`), and writes
`report.md`, a self-contained `report.html` (images as data URIs, inline CSS, no scripts),
`summary.json` (a DVC metric) and `plots/*.png` under `paths.reports`. The same document is
published to the MLflow parent run and, inside a Prefect run, as Prefect artifacts.

The document is built once as a list of sections of simple blocks (paragraphs, tables,
figures, ...) and rendered twice, to Markdown and to HTML, so the two never disagree. The section
builders live in food101/report_sections.py and the figures in food101/report_plots.py.
"""


from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from food101.config import Config
from food101.document import DASH, Bullets, Callout, Para, Report, Section, render_html, render_markdown
from food101.environment_info import collect_environment
from food101.history import read_history as read_comparison
from food101.history import trends_path
from food101.io import read_json, replace_dir, staging_dir, write_json, write_text
from food101.recommend import (
    Recommendations,
    executive_summary_text,
    failures_text,
    has_seed_runs,
    normalise_metrics,
    recommend,
)
from food101.report_plots import _colours, _save, plot_accuracy_vs_cost, plot_learning_curves
from food101.report_sections import (  # noqa: F401  (SEEDS_COLUMN: tests import it from here)
    GLOSSARY,
    SEEDS_COLUMN,
    SEEDS_GLOSSARY,
    Inputs,
    _classes_section,
    _confusion_section,
    _ensemble_note,
    _environment_section,
    _failures_section,
    _history_section,
    _learning_section,
    _recommendations_section,
    _summary_table,
    _top5_note,
    _tradeoffs_section,
    _validation_section,
    _worst_classes,
)
from food101.timing import noise_reasons
from food101.tracking import stage_run
from tasks import robustness as robust
from tasks.export import DEPLOYMENT_PLOT, deployment_rows, deployment_section, load_exports, plot_deployment

log = logging.getLogger(__name__)

REPORT_ARTIFACT_KEY = "food101-report"
SUMMARY_ARTIFACT_KEY = "food101-summary"
PLOTS_DIR = "plots"


# --- inputs: the files the other stages wrote -------------------------------------------------


def load_inputs(config: Config, models: list[str], failures: dict[str, str]) -> Inputs:
    """Read every upstream output that exists, through the writers' readers; optional ones may be missing."""
    # The writers' modules own the formats; imported here so that `import tasks.report` stays light.
    from tasks.confusion import read_confusion
    from tasks.evaluate import METRICS_FILE, PER_CLASS_FILE, eval_dir, read_metrics, read_per_class
    from tasks.train import model_dir, read_history, read_train_summary
    from tasks.validate import read_classes, read_validation

    paths = config.paths
    failed = dict(failures)
    metrics, train, history, per_class = {}, {}, {}, {}
    for model in models:
        if (model_dir(config, model) / "train.json").is_file():
            summary = train[model] = read_train_summary(config, model)
            if summary.get("status") == "failed" and model not in failed:
                failed[model] = str(summary.get("error") or "training failed (train.json status 'failed')")
        if (model_dir(config, model) / "history.csv").is_file():
            history[model] = read_history(config, model)
        if model in failed:
            continue  # files from an earlier run would be stale: do not report them as this run's
        if not (eval_dir(config, model) / METRICS_FILE).is_file():
            failed[model] = f"not evaluated: {eval_dir(config, model) / METRICS_FILE} does not exist"
            continue
        metrics[model] = normalise_metrics(read_metrics(config, model))
        # The recommendation says so when the latency it rests on was timed on a busy machine.
        state = metrics[model].get("machine_state")
        metrics[model]["timing_noisy"] = bool(state) and bool(noise_reasons(
            state, config.alerts.max_load_per_core, config.alerts.max_other_cpu_share, "this"))
        if (eval_dir(config, model) / PER_CLASS_FILE).is_file():
            per_class[model] = read_per_class(config, model)
    for model, values in robust.headlines(config, list(metrics)).items():
        metrics[model].update({key: value for key, value in values.items() if key != "ce"})

    confusion = read_confusion(config) if (paths.confusion / "summary.json").is_file() else {}
    manifest_file = paths.manifest / "manifest.parquet"
    return Inputs(
        models=list(models),
        metrics=metrics,
        train=train,
        history=history,
        per_class=per_class,
        failures=failed,
        classes=read_classes(config) if (paths.manifest / "classes.json").is_file() else None,
        validation=read_validation(config) if (paths.manifest / "validation.json").is_file() else None,
        # Only the columns the report counts; read directly since read_manifest refuses a failed validation.
        manifest=pd.read_parquet(manifest_file, columns=["class", "split", "status"])
        if manifest_file.is_file() else None,
        pairs={m: frame for m, frame in confusion.get("pairs", {}).items() if m in metrics},
        shared_pairs=confusion.get("shared_pairs"),
        groups=confusion.get("groups"),
        group_rule=(confusion.get("summary") or {}).get("group_rule"),
        significance=[e for e in confusion.get("significance", []) if {e.get("a"), e.get("b")} <= set(metrics)],
        previous=read_comparison(config),  # the flow's comparison with the previous benchmark, if any
        trends_plot=trends if (trends := trends_path(config)).is_file() else None,
    )


# --- the document ------------------------------------------------------------------------------


def build_report(
    config: Config,
    inputs: Inputs,
    recs: Recommendations,
    environment: dict[str, Any],
    plots: dict[str, Path],
    generated_at: dt.datetime,
) -> Report:
    """Every section of the report, as blocks; `plots` maps a figure key to its file."""
    metrics = inputs.metrics
    data_hash = (inputs.validation or {}).get("data_hash")
    n_classes = len((inputs.classes or {}).get("names", [])) or None
    regressions = list((inputs.previous or {}).get("regressions") or [])

    table, records = _summary_table(inputs, recs)
    sections = [
        _executive_summary(inputs, recs, n_classes, regressions, config.robustness.within_points),
        _recommendations_section(recs),
        Section("summary-table", "Summary table", [
            Para("All models, most accurate first. Latency is for one photo at a time (batch 1)"
                 f"{_latency_threads_note(metrics)}; "
                 f"{DASH} means not measured (no GPU, or the stage did not record it)."),
            table,
            *_ensemble_note(config, metrics),
            Bullets(GLOSSARY + ([SEEDS_GLOSSARY] if has_seed_runs(metrics) else []) + _top5_note(n_classes)),
        ]),
        _tradeoffs_section(inputs, plots),
        deployment_section(config, load_exports(config, list(metrics)), plots.get("deployment")),
        _learning_section(inputs, plots),
        _classes_section(inputs),
        _confusion_section(inputs, plots),
        robust.section(config, metrics, plots),
        _history_section(inputs),
        _validation_section(inputs),
        _failures_section(inputs),
        _environment_section(config, inputs, environment, data_hash),
    ]
    subtitle = (f"Profile `{config.profile}` · {len(metrics)} of {len(inputs.models)} models evaluated · "
                f"{n_classes or '?'} classes · generated {generated_at:%Y-%m-%d %H:%M} UTC · "
                f"commit `{str(environment.get('git_commit', 'unknown'))[:12]}`")
    summary = {
        "title": config.report.title,
        "profile": config.profile,
        "generated_at": generated_at.isoformat(),
        "git_commit": environment.get("git_commit"),
        "data_hash": data_hash,
        "recommended": recs.deploy.model,
        "recommended_because": recs.deploy.reason,
        "recommendations": {
            "best_accuracy": recs.best_accuracy.model,
            "fastest_within_points": recs.fastest_within.model,
            "best_under_latency_budget": recs.under_budget.model,
            "pareto": recs.pareto.models,
        },
        "latency_budget_ms": config.report.latency_budget_ms,
        "within_points": config.report.within_points,
        "models": {r["model"]: {k: v for k, v in r.items() if k != "model"} for r in records if r["status"] == "ok"},
        "failed": dict(inputs.failures),
        "regressions": len(regressions),
    }
    return Report(config.report.title, subtitle, sections, summary, records)



def _latency_threads_note(metrics: dict[str, dict]) -> str:
    """' on one CPU thread (...)' when every model's CPU latency ran on the same count (evaluate records it)."""
    counts = {m.get("latency_cpu_threads") for m in metrics.values()} - {None}  # None: an older metrics.json
    if len(counts) != 1:
        return ""
    (count,) = counts
    return f" on {'one CPU thread' if count == 1 else f'{count} CPU threads'} (`evaluate.latency_threads`)"


def _executive_summary(inputs: Inputs, recs: Recommendations, n_classes: int | None,
                       regressions: list[Any], robust_within: float | None = None) -> Section:
    blocks: list[Any] = []
    if regressions:
        blocks.append(Callout(f"**Regression since the last benchmark** ({len(regressions)} finding"
                              f"{'s' if len(regressions) != 1 else ''}): see [Since the last benchmark]"
                              "(#since-the-last-benchmark).", "danger"))
    if inputs.failures:
        blocks.append(Callout(failures_text(list(inputs.failures), list(inputs.metrics)), "warning"))
    chosen = recs.deploy.model
    if chosen is None:
        blocks.append(Para("**No model finished evaluation, so there is no recommendation.** See "
                           "[Failures](#failures) for what went wrong."))
        return Section("executive-summary", "Executive summary", blocks)
    robust_model = robust.most_robust_within(inputs.metrics, robust_within)[0] if robust_within is not None else None
    text = executive_summary_text(recs, inputs.metrics, n_classes, inputs.significance, robust_model)
    n_test = inputs.metrics[chosen].get("n_test")
    worst = _worst_classes(inputs, chosen, 3)
    if worst:
        text += f" Its weakest classes are {', '.join(worst)}."
    if n_test and n_test < 1000:
        text += (f" With only {int(n_test):,} test photos the intervals are wide: treat differences of a few "
                 "points as noise.")
    blocks.append(Para(text))
    return Section("executive-summary", "Executive summary", blocks)



# --- writing and publishing ------------------------------------------------------------------


def _make_plots(config: Config, inputs: Inputs, folder: Path) -> dict[str, Path]:
    """Draw the report's own plots and copy the upstream figures into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    metrics = inputs.metrics
    colours = _colours(inputs.models)
    plots: dict[str, Path] = {}
    latency = {m: v["latency_cpu_p50_ms"] for m, v in metrics.items() if v.get("latency_cpu_p50_ms") is not None}
    if latency:
        p95 = {m: metrics[m].get("latency_cpu_p95_ms") for m in latency}
        fig = plot_accuracy_vs_cost(metrics, latency, "median batch-1 CPU latency (ms per photo)",
                                    "Accuracy vs CPU latency", colours, cost_high=p95,
                                    budget=config.report.latency_budget_ms)
        plots["accuracy_vs_latency"] = _save(fig, folder / "accuracy_vs_latency.png")
    train_time = {}
    for m, v in metrics.items():
        seconds = v.get("train_time_s", inputs.train.get(m, {}).get("train_time_s"))
        if seconds is not None:
            train_time[m] = seconds / 60.0
    if train_time:
        fig = plot_accuracy_vs_cost(metrics, train_time, "training time (minutes, wall clock)",
                                    "Accuracy vs training time", colours)
        plots["accuracy_vs_training_time"] = _save(fig, folder / "accuracy_vs_training_time.png")
    exported = deployment_rows(load_exports(config, list(metrics)))
    if exported:
        plots["deployment"] = plot_deployment(exported, folder / DEPLOYMENT_PLOT)
    if inputs.history:
        fig = plot_learning_curves(inputs.history, inputs.train, colours)
        plots["learning_curves"] = _save(fig, folder / "learning_curves.png")
    # Upstream figures, copied so that report.md and the MLflow artifacts stand on their own.
    from tasks.evaluate import RELIABILITY_FILE, eval_dir

    upstream = {f"reliability_{m}": eval_dir(config, m) / RELIABILITY_FILE for m in metrics}
    for m in metrics:
        upstream[f"matrix_{m}"] = config.paths.confusion / f"{m}_matrix.png"
        upstream[f"examples_{m}"] = config.paths.confusion / f"{m}_examples.png"
    upstream["dendrogram"] = config.paths.confusion / "dendrogram.png"
    for key, source in upstream.items():
        if source.is_file():
            plots[key] = folder / f"{key}.png"
            shutil.copyfile(source, plots[key])
    plots.update(robust.section_plots(config, list(metrics), folder))
    return plots


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run (artifacts need one); False under `.fn` alone."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _publish_prefect(report: Report, markdown_text: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    deploy = report.summary.get("recommended")
    create_markdown_artifact(markdown=markdown_text, key=REPORT_ARTIFACT_KEY,
                             description=f"{report.title}: deploy {deploy}")
    create_table_artifact(table=report.table_rows, key=SUMMARY_ARTIFACT_KEY,
                          description=f"{report.title}: headline metrics per model")


@dataclass
class Written:
    """What `write_report_files` produced."""

    document: Report
    recommendations: Recommendations
    inputs: Inputs
    report_md: Path
    report_html: Path
    summary: Path
    plots_dir: Path


def write_report_files(config: Config, models: list[str], failures: dict[str, str]) -> Written:
    """Read the upstream files, decide, and write report.md/html, summary.json and plots/ atomically."""
    inputs = load_inputs(config, models, failures)
    if inputs.failures:
        log.warning("report: %d model(s) failed and are reported as such: %s",
                    len(inputs.failures), ", ".join(inputs.failures))
    recs = recommend(inputs.metrics, config.report.latency_budget_ms, config.report.within_points,
                     inputs.significance)
    environment = collect_environment(config.project_dir)
    reports_dir = config.paths.reports
    reports_dir.mkdir(parents=True, exist_ok=True)

    # Plots are drawn into a staging folder and swapped in whole; the documents follow.
    staged = staging_dir(reports_dir / PLOTS_DIR, stage="report")
    staged_plots = _make_plots(config, inputs, staged)
    plots_dir = replace_dir(reports_dir / PLOTS_DIR, staged)
    plots = {key: plots_dir / path.name for key, path in staged_plots.items()}

    generated_at = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
    document = build_report(config, inputs, recs, environment, plots, generated_at)
    md_path = write_text(reports_dir / "report.md", render_markdown(document, reports_dir))
    html_path = write_text(reports_dir / "report.html", render_html(document))
    summary_path = write_json(reports_dir / "summary.json", document.summary)
    log.info("report: deploy %s (%s); written to %s", recs.deploy.model, recs.deploy.reason, html_path)
    return Written(document, recs, inputs, md_path, html_path, summary_path, plots_dir)


@task(name="report", cache_policy=NONE)
def report(
    config: Config,
    models: list[str] | None = None,
    failures: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    """Write the benchmark report (Markdown, self-contained HTML, summary.json, plots) and publish it."""
    models = list(models or [*config.models, *(e.name for e in config.ensembles)])
    params = {"report": config.raw.get("report", {}), "models": models}
    with stage_run(config, "report", parent_run_id, params=params) as run:
        written = write_report_files(config, models, failures or {})
        chosen = written.recommendations.deploy.model
        run.set_tags({"recommended": chosen or "none"})
        run.log_metrics({
            "models_evaluated": len(written.inputs.metrics),
            "models_failed": len(written.inputs.failures),
            **({"recommended_top1": written.inputs.metrics[chosen]["top1"]} if chosen else {}),
        })
        documents = (written.report_md, written.report_html, written.summary)
        for path in documents:
            run.log_artifact(path)
        run.log_artifacts(written.plots_dir, PLOTS_DIR)
        if parent_run_id:
            for path in documents:
                run.client.log_artifact(parent_run_id, str(path), "report")
        if in_prefect_run():
            text = render_markdown(written.document, config.paths.reports, embed_images=False)
            _publish_prefect(written.document, text)
        else:
            log.debug("report: not inside a Prefect run, so no Prefect artifacts were created")
        return {
            "report_md": str(written.report_md),
            "report_html": str(written.report_html),
            "summary": str(written.summary),
            "recommended": chosen,
        }


def read_summary(config: Config) -> dict[str, Any]:
    """The report's summary.json: headline metrics per model and the recommendation."""
    path = config.paths.reports / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the report stage first (food101 stage report)")
    return read_json(path)


__all__ = ["load_inputs", "read_summary", "report", "build_report", "in_prefect_run", "write_report_files"]
