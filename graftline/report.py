"""The evaluation report as one self-contained HTML page (figures embedded), logged to MLflow
beside the model; the Prefect markdown artifact carries the same tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0 2em; } figcaption { color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
.verdict { font-size: 1.15em; padding: .5em .8em; background: #f4f6fb; border-left: 4px solid #4a6fd0; }
"""


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats with four decimals."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(path: Path, caption: str) -> str:
    """A PNG embedded in the page (the report is one file, readable anywhere)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def html_report(
    title: str, verdict: str, tables: Mapping[str, str], figures: Mapping[str, Path | str]
) -> str:
    """The page: title, the gate's verdict, tables (title -> HTML), then figures (caption ->
    PNG path, or a sentence saying why a figure is missing)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='verdict'>{html.escape(verdict)}</p>",
    ]
    for name, content in tables.items():
        parts += [f"<h2>{html.escape(name)}</h2>", content]
    parts.append("<h2>Figures</h2>")
    for caption, src in figures.items():
        if isinstance(src, Path):
            parts.append(figure(src, caption))
        else:
            parts.append(f"<p><b>{html.escape(caption)}</b>: {html.escape(src)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
