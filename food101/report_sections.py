"""The report's sections, built as document blocks from the upstream results (`Inputs`).

Separate from tasks/report.py, which reads the upstream files, decides and writes: these builders only
turn numbers already read into tables, paragraphs and figure references, and touch no file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from food101.config import Config
from food101.document import DASH, Bullets, Callout, Code, Figure, Heading, Para, Row, Section, Table
from food101.formatting import ci_cell, duration, num, pct
from food101.history import HISTORY_FILE
from food101.recommend import Recommendations, by_accuracy, deploy_heading, has_seed_runs, significance_text

# Headline metrics copied into summary.json and the Prefect table (in this order).
HEADLINE_KEYS = (
    "top1", "top1_ci_low", "top1_ci_high", "top5", "macro_f1", "ece",
    "latency_cpu_p50_ms", "latency_cpu_p95_ms", "latency_gpu_p50_ms", "latency_gpu_p95_ms",
    "throughput_cpu_ips", "throughput_gpu_ips", "params", "size_mb", "gflops",
    "train_time_s", "train_images_per_s", "n_test",
    "mean_corruption_accuracy", "mce",  # from the robustness stage (mCE against robustness.baseline_model)
)
# With train.seeds > 1: a summary-table column and these keys in summary.json (mean and sd of top-1).
SEEDS_COLUMN = "top-1 over seeds (mean ± sd)"
SEED_KEYS = ("n_seeds", "top1_seed_mean", "top1_seed_sd")


@dataclass
class Inputs:
    models: list[str]                              # the models the benchmark asked for
    metrics: dict[str, dict[str, Any]]             # evaluated models only
    train: dict[str, dict[str, Any]]
    history: dict[str, pd.DataFrame]
    per_class: dict[str, pd.DataFrame]
    failures: dict[str, str]
    classes: dict[str, Any] | None
    validation: dict[str, Any] | None
    manifest: pd.DataFrame | None
    pairs: dict[str, pd.DataFrame]
    shared_pairs: pd.DataFrame | None
    groups: dict[str, Any] | None
    group_rule: str | None
    significance: list[dict[str, Any]]
    previous: dict[str, Any] | None
    trends_plot: Path | None = None                # every benchmark of the profile (food101.history)

    def display(self, name: str) -> str:
        """A class's display name ('Apple pie') from classes.json, else the folder name."""
        if self.classes and name in self.classes.get("names", []):
            names, shown = self.classes["names"], self.classes.get("display") or []
            index = names.index(name)
            if index < len(shown):
                return shown[index]
        return str(name)


def _summary_table(inputs: Inputs, recs: Recommendations) -> tuple[Table, list[dict[str, Any]]]:
    headers = ["model", "top-1 % (95% CI)", "top-5 %", "macro-F1", "ECE", "training time", "train img/s",
               "CPU latency ms p50 / p95", "GPU latency ms p50 / p95", "params (M)", "size MB", "GFLOPs"]
    seeds = has_seed_runs(inputs.metrics)
    if seeds:
        headers.insert(2, SEEDS_COLUMN)
    rows, records = [], []
    for model in by_accuracy(inputs.metrics):
        m = inputs.metrics[model]
        t = inputs.train.get(model, {})
        train_time = m.get("train_time_s", t.get("train_time_s"))
        train_ips = m.get("train_images_per_s", t.get("images_per_s"))
        params = m.get("params", t.get("params"))
        name = f"**{model}** (deploy)" if model == recs.deploy.model else model
        rows.append([
            name, ci_cell(m).replace("%", ""), _top5_cell(inputs, m), num(m.get("macro_f1"), 3),
            num(m.get("ece"), 3), duration(train_time), num(train_ips, 0),
            _pair(m.get("latency_cpu_p50_ms"), m.get("latency_cpu_p95_ms"), 1),
            _pair(m.get("latency_gpu_p50_ms"), m.get("latency_gpu_p95_ms"), 2),
            num(params / 1e6 if params else None, 1), num(m.get("size_mb"), 1), num(m.get("gflops"), 2),
        ])
        records.append({"model": model, "status": "ok", **{k: m.get(k) for k in HEADLINE_KEYS}})
        if seeds:
            rows[-1].insert(2, _seed_cell(m))
            records[-1].update({k: m.get(k) for k in SEED_KEYS})
    for model, error in inputs.failures.items():
        rows.append([f"**{model}** FAILED"] + [DASH] * (len(headers) - 1))
        records.append({"model": model, "status": "failed", "error": error})
    return Table(headers, rows), records


def _seed_cell(metrics: dict[str, Any]) -> str:
    """'81.2 ± 0.4 (3 seeds)' in top-1 points; a dash for a model trained once."""
    n = metrics.get("n_seeds") or 1
    if n < 2 or metrics.get("top1_seed_sd") is None:
        return DASH
    return f"{100 * metrics['top1_seed_mean']:.1f} ± {100 * metrics['top1_seed_sd']:.1f} ({n} seeds)"


def _pair(first: float | None, second: float | None, digits: int) -> str:
    if first is None and second is None:
        return DASH
    return f"{num(first, digits)} / {num(second, digits)}"


def _scaled(value: float | None) -> float | None:
    return None if value is None else 100 * value


GLOSSARY = [
    "**top-1 / top-5**: share of test photos whose correct class is the model's first guess / among its "
    "five first guesses. The 95% confidence interval comes from bootstrapping the test set.",
    "**macro-F1**: the F1 score averaged over classes with equal weight (a model cannot hide a bad class).",
    "**ECE** (expected calibration error): how far the model's confidence is from its actual accuracy; "
    "0 is perfectly calibrated.",
    "**p50 / p95 latency**: median and 95th-percentile time to classify one photo (batch of 1), after warm-up.",
    "**Pareto set**: models that no other model beats on accuracy and speed at the same time.",
]
SEEDS_GLOSSARY = (
    "**top-1 over seeds**: each model trained again with the next seeds (`train.seeds`) and every training "
    "scored on the test set; the mean and sample standard deviation of those top-1 scores. The other "
    "columns describe the training with `train.seed`."
)


def _ensemble_note(config: Config, metrics: dict[str, dict[str, Any]]) -> list[Any]:
    """Under the summary table: what each ensemble combines and why its latency is a sum."""
    shown = [e for e in config.ensembles if e.name in metrics]
    if not shown:
        return []
    parts = [f"`{e.name}` = {e.method} of {' + '.join(e.members)}" for e in shown]
    return [Para("Ensembles: " + "; ".join(parts) + ". An ensemble runs every member on each photo, one "
                 "after the other: its latency is the sum of its members' batch-1 latencies, and its size, "
                 "parameters and training time are their sums. Weighted ensembles fit their weights on the "
                 "validation split, never on test.")]


def _worst_classes(inputs: Inputs, model: str, k: int) -> list[str]:
    table = inputs.per_class.get(model)
    if table is None or "accuracy" not in table:
        return []
    rows = table.sort_values(["accuracy", "class"]).head(k)
    return [f"{_class_label(inputs, r)} ({pct(_frac(r['accuracy']), 0)})" for _, r in rows.iterrows()]


def _frac(value: float) -> float:
    return value / 100.0 if value > 1.0 else value


def _class_label(inputs: Inputs, row: pd.Series) -> str:
    display = row.get("display")
    return str(display) if isinstance(display, str) and display else inputs.display(str(row["class"]))


def _recommendations_section(recs: Recommendations) -> Section:
    blocks: list[Any] = [Heading(deploy_heading(recs)),
                         Para(f"{recs.deploy.reason} The rules and their thresholds come from `params.yaml` "
                              "(`report:`); each is worked out below.")]
    for rec in recs.rules():
        label = rec.model if rec.rule != "pareto" else ", ".join(rec.models)
        blocks.append(Heading(f"{rec.title}: {label or 'none'}"))
        blocks.append(Para(rec.reason))
    return Section("recommendations", "Recommendations", blocks)


def _tradeoffs_section(inputs: Inputs, plots: dict[str, Path]) -> Section:
    blocks: list[Any] = []
    if "accuracy_vs_latency" in plots:
        blocks.append(Figure(plots["accuracy_vs_latency"],
                             "Top-1 accuracy against median batch-1 CPU latency. Vertical bars: 95% CI of top-1; "
                             "horizontal whiskers reach the p95 latency; dashed staircase: the Pareto front; "
                             "dotted red line: the latency budget (applies to p95)."))
    else:
        blocks.append(Para("No CPU latency was measured, so accuracy against latency cannot be plotted."))
    if "accuracy_vs_training_time" in plots:
        blocks.append(Figure(plots["accuracy_vs_training_time"],
                             "Top-1 accuracy against training time (wall clock, minutes); dashed: Pareto front."))
    calibration = [k for k in plots if k.startswith("reliability_")]
    if calibration:
        blocks.append(Heading("Calibration"))
        blocks.append(Para("Reliability diagrams: a calibrated model's confidence matches its accuracy "
                           "(bars on the diagonal). ECE summarises the gap."))
        blocks.append(Row([
            Figure(plots[key], f"{key.removeprefix('reliability_')}: reliability diagram (ECE "
                   f"{num(inputs.metrics[key.removeprefix('reliability_')].get('ece'), 3)}).")
            for key in calibration]))
    return Section("accuracy-vs-cost", "Accuracy vs cost", blocks)


def _learning_section(inputs: Inputs, plots: dict[str, Path]) -> Section:
    if "learning_curves" not in plots:
        return Section("learning-curves", "Learning curves", [Para("No training history (history.csv) was found.")])
    rows = []
    for model, frame in inputs.history.items():
        t = inputs.train.get(model, {})
        label = f"{model} (failed)" if model in inputs.failures else model
        rows.append([label, str(t.get("epochs_run", len(frame))), str(t.get("best_epoch", DASH)),
                     pct(_frac(t["best_val_top1"])) if t.get("best_val_top1") is not None else DASH,
                     str(t.get("device", DASH)), str(t.get("pretrained", DASH))])
    return Section("learning-curves", "Learning curves", [
        Para("Loss and top-1 accuracy per epoch on the training data (dashed) and the validation split "
             "carved from it (solid). A widening gap means over-fitting; curves still rising mean more epochs "
             "would help."),
        Figure(plots["learning_curves"], "Learning curves of every model."),
        Table(["model", "epochs run", "best epoch", "best val top-1", "device", "pretrained"], rows),
    ])


def _classes_section(inputs: Inputs) -> Section:
    blocks: list[Any] = []
    worst_sets = []
    for model in by_accuracy(inputs.metrics):
        table = inputs.per_class.get(model)
        if table is None or "accuracy" not in table:
            continue
        k = min(5, max(1, len(table) // 2))
        ordered = table.sort_values(["accuracy", "class"], ascending=[False, True])
        best_rows = list(ordered.head(k).iterrows())
        worst_rows = list(ordered.iloc[::-1].head(k).iterrows())
        worst_sets.append({str(r["class"]) for _, r in worst_rows})
        rows = []
        for (_, b), (_, w) in zip(best_rows, worst_rows, strict=True):
            rows.append([_class_label(inputs, b), pct(_frac(b["accuracy"]), 0), _f1(b),
                         _class_label(inputs, w), pct(_frac(w["accuracy"]), 0), _f1(w)])
        blocks.append(Heading(model))
        blocks.append(Table(["best class", "accuracy", "F1", "worst class", "accuracy", "F1"], rows))
    if not blocks:
        return Section("best-and-worst-classes", "Best and worst classes",
                       [Para("No per-class results (per_class.csv) were found.")])
    hard = set.intersection(*worst_sets) if len(worst_sets) > 1 else set()
    lead = "Per-class accuracy on the test set, from each model's per_class.csv."
    if hard:
        lead += (" Hard for every model: " + ", ".join(sorted(inputs.display(c) for c in hard))
                 + " (in every model's worst list): likely a data problem or genuinely ambiguous dishes.")
    return Section("best-and-worst-classes", "Best and worst classes", [Para(lead), *blocks])


def _f1(row: pd.Series) -> str:
    return num(float(row["f1"]), 2) if "f1" in row and pd.notna(row["f1"]) else DASH


def _pair_rows(inputs: Inputs, frame: pd.DataFrame, limit: int) -> list[list[str]]:
    rows = []
    for _, r in frame.head(limit).iterrows():
        rate = r.get("rate")
        rows.append([inputs.display(str(r["true"])), inputs.display(str(r["predicted"])),
                     str(int(r["count"])) if "count" in r and pd.notna(r["count"]) else DASH,
                     pct(_frac(float(rate))) if rate is not None and pd.notna(rate) else DASH])
    return rows


def _confusion_section(inputs: Inputs, plots: dict[str, Path]) -> Section:
    blocks: list[Any] = [Para(
        "The confusion matrices are row-normalised (each row is a true class; a dark cell off "
        "the diagonal is a frequent mistake) and ordered so that classes confused with each other sit together. "
        "Click a large image to see it at full size.")]
    for model in by_accuracy(inputs.metrics):
        blocks.append(Heading(model))
        row = []
        if f"matrix_{model}" in plots:
            row.append(Figure(plots[f"matrix_{model}"], f"{model}: normalised confusion matrix.", zoom=True))
        if model in inputs.pairs:
            row.append(Table(["true class", "predicted as", "count", "rate"],
                             _pair_rows(inputs, inputs.pairs[model], 10),
                             caption=f"{model}: most confused pairs (rate = share of the true class's test "
                                     "photos predicted as the other class)"))
        if row:
            blocks.append(Row(row))
        if f"examples_{model}" in plots:
            blocks.append(Figure(plots[f"examples_{model}"], f"{model}: misclassified test photos from the top "
                                 "confused pairs.", zoom=True))
        if len(blocks) and isinstance(blocks[-1], Heading):
            blocks.append(Para("The confusion stage's outputs for this model were not found."))
    blocks.append(Heading("Mistakes every model makes"))
    if inputs.shared_pairs is not None and len(inputs.shared_pairs):
        frame = inputs.shared_pairs
        cols = ["true", "predicted"]
        rows = [[inputs.display(str(r["true"])), inputs.display(str(r["predicted"]))] for _, r in frame.iterrows()]
        blocks.append(Para("Pairs in the most-confused list of every model: more data or better labels for these "
                           "classes would help all models."))
        blocks.append(Table(["true class", "predicted as"], rows) if set(cols) <= set(frame.columns)
                      else Para("shared_pairs.csv has no true/predicted columns."))
    else:
        blocks.append(Para("No confused pair is shared by all models."))
    groups = (inputs.groups or {}).get("combined") or []
    blocks.append(Heading("Groups of similar foods"))
    if groups:
        rule = f" ({inputs.group_rule})" if inputs.group_rule else ""
        blocks.append(Para("Classes the models confuse with each other, from clustering the symmetrised "
                           f"confusion of all models{rule}:"))
        blocks.append(Bullets([", ".join(inputs.display(str(c)) for c in group) for group in groups]))
    else:
        blocks.append(Para("No groups of similar foods were found at the configured threshold."))
    if "dendrogram" in plots:
        blocks.append(Figure(plots["dendrogram"], "Dendrogram of the classes by mutual confusion.", zoom=True))
    blocks.append(Heading("Are the differences real?"))
    if inputs.significance:
        blocks.append(Para("McNemar's exact test on the same test photos, for every pair of models:"))
        blocks.append(Bullets([significance_text([e], e["a"], e["b"]) for e in inputs.significance]))
    else:
        blocks.append(Para("No significance tests were found (significance.json)."))
    return Section("where-the-models-fail", "Where the models fail", blocks)


def _history_section(inputs: Inputs) -> Section:
    history = inputs.previous
    title, anchor = "Since the last benchmark", "since-the-last-benchmark"
    if not history or not history.get("previous"):
        other = (history or {}).get("not_comparable")
        if other:  # food101.history.compare: what keeps the latest benchmark from being compared
            return Section(anchor, title, [
                Callout(f"**No comparable earlier benchmark.** The latest one (run `{other.get('run_id', '?')}` of "
                        f"{other.get('date', '?')}, profile `{other.get('profile', '?')}`) measured something else, "
                        "so nothing is compared with it:", "warning"),
                Bullets(list(other.get("differences") or [])),
            ] + _not_applicable_blocks(history))
        return Section(anchor, title, [Para(
            "This is the first benchmark of this profile, or of any profile on this data with these evaluation "
            "settings: there is no earlier run to compare with. "
            f"(The comparison reads `{HISTORY_FILE}` next to this report when it exists.)")])
    previous = history["previous"]
    blocks: list[Any] = [Para(
        f"Compared with the last benchmark on the same data and evaluation settings: run "
        f"`{previous.get('run_id', '?')}` of {previous.get('date', '?')} (profile `{previous.get('profile', '?')}`). "
        "Accuracy: McNemar's exact test on the photos both evaluated. Timing: a Mann-Whitney U test on the "
        "two runs' raw samples plus a minimum change of the median, and *inconclusive* when either machine "
        "was busy while timing, the hardware differs, or samples are missing.")]
    regressions = history.get("regressions") or []
    if regressions:
        blocks.append(Callout(f"**{len(regressions)} regression{'s' if len(regressions) != 1 else ''}** since "
                              "the last benchmark:", "danger"))
        blocks.append(Bullets([_describe(r) for r in regressions]))
    else:
        blocks.append(Callout("No regression since the last benchmark.", "ok"))
    robustness = history.get("robustness_not_comparable")
    if robustness:  # food101.history.compare: robustness measured another way, its rows not tested
        blocks.append(Para("**Robustness not comparable** (its rows are shown, not tested): "
                           + "; ".join(robustness.get("differences") or []) + "."))
    recipes = history.get("recipe_changes") or {}
    if recipes:
        blocks.append(Para("**Recipe changes** since then (the metric changes of these models may come from them):"))
        blocks.append(Bullets([f"{model}: {change}" for model, change in recipes.items()]))
    deltas = history.get("deltas") or []
    if deltas:  # food101.history.compare: one row per model and metric both benchmarks measured
        rows = [[d.get("model", DASH), d.get("metric", DASH), _cell(d.get("previous")), _cell(d.get("current")),
                 _signed(d.get("delta")), d.get("outcome") or ("significant" if d.get("significant") else DASH),
                 d.get("reason") or d.get("test") or DASH, "changed" if d.get("recipe_change") else DASH]
                for d in deltas]
        blocks.append(Table(["model", "metric", "previous", "now", "change", "outcome", "why (test)", "recipe"],
                            rows))
    blocks.extend(_not_applicable_blocks(history))
    if inputs.trends_plot is not None:
        blocks.append(Figure(inputs.trends_plot, "Every benchmark of this profile so far, oldest first."))
    return Section(anchor, title, blocks)


def _not_applicable_blocks(history: dict[str, Any]) -> list[Any]:
    items = history.get("not_applicable") or []
    if not items:
        return []
    return [Para("Not compared (cannot discriminate): " + "; ".join(
        f"{item['metric']}: n/a, {item['reason']}" for item in items) + ".")]


def _top5_cell(inputs: Inputs, m: dict[str, Any]) -> str:
    n_classes = len((inputs.classes or {}).get("names", []))
    return "n/a" if 0 < n_classes <= 5 else num(_scaled(m.get("top5")), 1)


def _top5_note(n_classes: int | None) -> list[str]:
    if not n_classes or n_classes > 5:
        return []
    return [f"top-5 % is n/a: with {n_classes} classes every photo's class is among the top 5, so it is 100% "
            "by construction and says nothing about the model."]


def _signed(value: Any) -> str:
    return f"{value:+.4g}" if isinstance(value, (int, float)) else _cell(value)


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        message = item.get("message") or item.get("text")
        if message:
            return str(message)
        return ", ".join(f"{k}: {_cell(v)}" for k, v in item.items())
    return str(item)


def _cell(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _validation_section(inputs: Inputs) -> Section:
    anchor, title = "data-validation", "Data validation"
    v = inputs.validation
    if v is None:
        return Section(anchor, title, [Para("No validation results (validation.json) were found.")])
    quarantined = v.get("quarantined") or []
    expectations = v.get("expectations") or []
    passed = sum(1 for e in expectations if e.get("success"))
    n_classes = len((inputs.classes or {}).get("names", []))
    verdict = "**Passed.**" if v.get("success") else "**Failed.**"
    if v.get("success") and passed < len(expectations):
        verdict = "**Passed** (the failed expectations below are tolerable ones, handled by quarantine)."
    text = (f"{verdict} {int(v.get('images', 0)):,} images checked "
            f"across {n_classes} classes; {len(quarantined)} quarantined (left out of training and testing); "
            f"{passed} of {len(expectations)} expectations passed. Data hash: `{v.get('data_hash', DASH)}`.")
    blocks: list[Any] = [Para(text)]
    if dataset := v.get("dataset"):
        names = list((inputs.classes or {}).get("display") or (inputs.classes or {}).get("names") or [])
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        blocks.append(Para(f"Dataset: `{dataset.get('source')}` at `{dataset.get('root')}`, "
                           f"{dataset.get('classes')} classes ({shown}). Split: {dataset.get('split_rule')}."))
    if inputs.manifest is not None and len(inputs.manifest):
        counts = inputs.manifest[inputs.manifest["status"] != "quarantined"].groupby("split")["class"]
        per = counts.count()
        per_class = inputs.manifest[inputs.manifest["status"] != "quarantined"].groupby(["split", "class"]).size()
        rows = []
        for split in per.index:
            sizes = per_class.loc[split]
            spread = f"{int(sizes.min())}" if sizes.min() == sizes.max() else f"{int(sizes.min())}–{int(sizes.max())}"
            rows.append([str(split), f"{int(per[split]):,}", spread])
        blocks.append(Table(["split", "images used", "images per class"], rows))
    if quarantined:
        shown = quarantined[:50]
        blocks.append(Table(["quarantined file", "reason"], [[str(q.get("path")), str(q.get("reason"))]
                                                              for q in shown]))
        if len(quarantined) > len(shown):
            blocks.append(Para(f"… and {len(quarantined) - len(shown)} more (see validation.json)."))
    if expectations:
        rows = []
        for e in expectations:
            details = e.get("details")
            text = details if isinstance(details, str) else json.dumps(details, default=str) if details else ""
            rows.append([str(e.get("expectation")), "✓ passed" if e.get("success") else "✗ failed",
                         text[:160] + ("…" if len(text) > 160 else "")])
        blocks.append(Table(["expectation", "result", "details"], rows))
    return Section(anchor, title, blocks)


def _failures_section(inputs: Inputs) -> Section:
    if not inputs.failures:
        return Section("failures", "Failures", [Para("Every model trained and evaluated successfully.")])
    rows = [[f"**{m}**", inputs.train.get(m, {}).get("status", DASH), " ".join(str(e).split())[:400]]
            for m, e in inputs.failures.items()]
    return Section("failures", "Failures", [
        Callout("These models are missing from every comparison above; fix the cause and rerun their stages "
                "(`food101 stage train --model M`, then `evaluate`).", "warning"),
        Table(["model", "train.json status", "error"], rows),
    ])


def _environment_section(config: Config, inputs: Inputs, env: dict[str, Any], data_hash: str | None) -> Section:
    gpu = env.get("gpu") or {}
    gpus = ", ".join(f"{d['name']} ({d['memory_gb']} GB)" for d in gpu.get("devices", [])) or "none (no CUDA)"
    rows = [
        ["CPU", f"{env.get('cpu')} — {env.get('cpu_cores_physical')} cores / {env.get('cpu_cores_logical')} threads"],
        ["RAM", f"{env.get('ram_gb')} GB"],
        ["GPU", gpus + (f", CUDA {gpu.get('cuda_version')}" if gpu.get("cuda_available") else "")],
        ["OS", str(env.get("os"))],
        ["Python", str(env.get("python"))],
        *[[name, str(version or "not installed")] for name, version in (env.get("packages") or {}).items()],
        ["git commit", f"`{env.get('git_commit')}`"],
        ["data hash (DVC / validation)", f"`{data_hash or DASH}`"],
        ["profile", f"`{config.profile}`"],
        ["config hash", f"`{config.digest()}`"],
    ]
    devices = [f"{m}: {t.get('device')}" for m, t in inputs.train.items() if t.get("device")]
    if devices:
        rows.append(["training device", "; ".join(devices)])
    return Section("environment", "Environment", [
        Para("The machine that wrote this report (latency and throughput were measured by the evaluate stage, "
             "normally on the same machine)."),
        Table(["", ""], rows),
        Code(yaml.safe_dump(config.to_dict(), sort_keys=False), "Effective parameters (params.yaml + profile + "
             "overrides)", "yaml"),
    ])
