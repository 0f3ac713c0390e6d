"""A small document model (sections of paragraphs, tables, figures...) and its two renderings.

The report stage builds a `Report` out of these blocks once; `render_markdown` and `render_html`
turn it into report.md and a self-contained report.html (inline CSS, images as data URIs, no
scripts), so the two never disagree about content.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASH = "—"

# --- blocks ------------------------------------------------------------------------------------


@dataclass
class Para:
    text: str  # inline **bold**, `code` and [links](#anchor) only


@dataclass
class Heading:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Figure:
    path: Path
    caption: str
    zoom: bool = False  # large images: click to see them at full size


@dataclass
class Code:
    text: str
    summary: str
    language: str = ""


@dataclass
class Callout:
    text: str
    kind: str = "info"  # info | ok | warning | danger


@dataclass
class Row:
    """Blocks side by side in HTML when there is room (one after the other in Markdown)."""

    blocks: list[Any]


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    summary: dict[str, Any]
    table_rows: list[dict[str, Any]]  # the summary table as records (Prefect table artifact)


# --- rendering --------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(report: Report, base: Path, embed_images: bool = True) -> str:
    """The report as GitHub-flavoured Markdown; images linked relative to `base` (or left out)."""
    out = [f"# {report.title}", "", report.subtitle, "", "## Contents", ""]
    out += [f"- [{s.title}](#{s.id})" for s in report.sections] + [""]
    for section in report.sections:
        out += [f'<a id="{section.id}"></a>', "", f"## {section.title}", ""]
        for block in section.blocks:
            out += _md_block(block, base, embed_images) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_block(block: Any, base: Path, embed_images: bool) -> list[str]:
    if isinstance(block, Para):
        return [block.text]
    if isinstance(block, Heading):
        return [f"### {block.text}"]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Callout):
        label = {"danger": "Warning", "warning": "Note", "ok": "OK", "info": "Info"}[block.kind]
        return [f"> **{label}:** {block.text}"]
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
        lines.append("|" + "|".join("---" for _ in block.headers) + "|")
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return lines
    if isinstance(block, Row):
        lines: list[str] = []
        for inner in block.blocks:
            lines += _md_block(inner, base, embed_images) + [""]
        return lines[:-1]
    if isinstance(block, Figure):
        if not embed_images:
            return [f"*Figure: {block.caption} (see report.html)*"]
        relative = Path(block.path).resolve().relative_to(base.resolve()).as_posix()
        alt = block.caption.split(". ")[0].rstrip(".")
        return [f"![{alt}]({relative})", "", f"*{block.caption}*"]
    if isinstance(block, Code):
        return [f"<details><summary>{html.escape(block.summary)}</summary>", "", f"```{block.language}",
                block.text.rstrip(), "```", "", "</details>"]
    raise TypeError(f"unknown block {type(block).__name__}")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\(#([\w-]+)\)", r'<a href="#\2">\1</a>', out)
    return out


_NUMERIC = re.compile(r"^[\s+\-−]?[\d.,]+")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: inline CSS, images as data URIs, no scripts."""
    counter = iter(range(1_000_000))
    body = []
    for section in report.sections:
        body.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>')
        body += [_html_block(block, counter) for block in section.blocks]
        body.append("</section>")
    toc = "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in report.sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(report.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{html.escape(report.title)}</h1><p class="subtitle">{_inline(report.subtitle)}</p></header>
<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>
<main>
{chr(10).join(body)}
</main>
<footer>Generated by the food101-benchmark report stage. Every number above comes from the files of the
evaluate, train, confusion and validate stages of this run.</footer>
</body>
</html>
"""


def _html_block(block: Any, counter: Iterable[int]) -> str:
    if isinstance(block, Para):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Heading):
        return f"<h3>{_inline(block.text)}</h3>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Callout):
        return f'<div class="callout {block.kind}">{_inline(block.text)}</div>'
    if isinstance(block, Row):
        return '<div class="row">' + "".join(_html_block(b, counter) for b in block.blocks) + "</div>"
    if isinstance(block, Table):
        numeric = [
            i > 0 and bool(block.rows) and all(_NUMERIC.match(r[i]) or r[i] == DASH for r in block.rows)
            for i in range(len(block.headers))
        ]
        head = "".join(f'<th{" class=num" if numeric[i] else ""}>{_inline(h)}</th>'
                       for i, h in enumerate(block.headers))
        rows = "".join(
            "<tr>" + "".join(f'<td{" class=num" if numeric[i] else ""}>{_inline(c)}</td>' for i, c in enumerate(r))
            + "</tr>" for r in block.rows)
        caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
        headless = all(not h for h in block.headers)
        thead = "" if headless else f"<thead><tr>{head}</tr></thead>"
        return f'<div class="table-wrap"><table>{caption}{thead}<tbody>{rows}</tbody></table></div>'
    if isinstance(block, Figure):
        img = f'<img src="{_data_uri(block.path)}" alt="{html.escape(block.caption)}">'
        if block.zoom:
            ident = f"zoom-{next(counter)}"
            img = (f'<input type="checkbox" id="{ident}" class="zoom-toggle">'
                   f'<label for="{ident}" class="zoomable" title="click to zoom">{img}</label>')
        return f"<figure>{img}<figcaption>{_inline(block.caption)}</figcaption></figure>"
    if isinstance(block, Code):
        return (f"<details><summary>{html.escape(block.summary)}</summary>"
                f"<pre><code>{html.escape(block.text)}</code></pre></details>")
    raise TypeError(f"unknown block {type(block).__name__}")


_CSS = """
:root { --ink:#1f2933; --muted:#52606d; --line:#d9e2ec; --bg:#ffffff; --soft:#f5f7fa; --accent:#1f5f9e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 24px 32px 64px; color: var(--ink); background: var(--bg);
  font: 16px/1.6 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", "DejaVu Sans",
  sans-serif; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 16px; }
h1 { font-size: 2rem; margin: 0.2em 0 0.1em; line-height: 1.25; }
h2 { font-size: 1.45rem; margin: 1.8em 0 0.5em; padding-bottom: 0.2em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.12rem; margin: 1.4em 0 0.4em; }
.subtitle { color: var(--muted); margin: 0 0 12px; font-size: 0.95rem; }
a { color: var(--accent); }
code { font: 0.88em/1.4 "DejaVu Sans Mono", Menlo, Consolas, monospace; background: var(--soft);
  padding: 0.1em 0.3em; border-radius: 3px; word-break: break-all; }
pre { background: var(--soft); padding: 12px 16px; border-radius: 6px; overflow: auto; max-height: 480px; }
pre code { background: none; padding: 0; word-break: normal; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 24px;
  margin: 16px 0 8px; }
nav.toc h2 { border: 0; margin: 0.4em 0 0.2em; font-size: 1.05rem; }
nav.toc ol { columns: 2; margin: 0; padding-left: 1.4em; }
#executive-summary p { font-size: 1.08rem; }
.callout { border-left: 5px solid; border-radius: 4px; padding: 10px 14px; margin: 12px 0; }
.callout.info { border-color: #2f80ed; background: #eef5fe; }
.callout.ok { border-color: #27ae60; background: #edf8f1; }
.callout.warning { border-color: #f2994a; background: #fff5eb; }
.callout.danger { border-color: #c0392b; background: #fdecea; }
.table-wrap { overflow-x: auto; margin: 12px 0; }
table { border-collapse: collapse; font-size: 0.9rem; min-width: 50%; }
caption { caption-side: top; text-align: left; color: var(--muted); font-style: italic; padding-bottom: 4px; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
.row { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; justify-content: center; }
.row > figure { flex: 1 1 300px; max-width: 100%; }
.row > .table-wrap { flex: 0 1 auto; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 16px 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.9rem; margin-top: 4px; }
.zoom-toggle { display: none; }
.zoomable { cursor: zoom-in; display: block; overflow: auto; }
.zoom-toggle:checked + .zoomable { cursor: zoom-out; }
.zoom-toggle:checked + .zoomable img { max-width: none; }
details { margin: 12px 0; }
summary { cursor: pointer; color: var(--accent); font-weight: 600; }
footer { margin-top: 48px; color: var(--muted); font-size: 0.85rem; border-top: 1px solid var(--line);
  padding-top: 8px; }
@media print { nav.toc { display: none; } .zoomable { overflow: visible; } }
"""
