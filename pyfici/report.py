"""A small, dependency-free builder for self-contained HTML reports.

Images are embedded as base64 data URIs (the report is one file that can be
mailed or archived) and are also kept as PNG files beside it.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyfici.engine.files import atomic_write_text


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (path, caption)
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)  # (caption, rows)
    pre: list[str] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p class=note>(no rows)</p>"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
            f'data-file="{html.escape(Path(path).name)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def write_report(path: str | Path, title: str, sections: list[Section], intro: str = "") -> Path:
    """Write one self-contained HTML file; returns its path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=note>generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    if intro:
        parts.append(f"<p>{intro}</p>")
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{p}</p>" for p in s.paragraphs]
        for cap, rows in s.tables:
            parts.append(f"<p><b>{html.escape(cap)}</b></p>{_table(rows)}")
        for p, cap in s.images:
            if Path(p).is_file():
                parts.append(_img(p, cap))
            else:
                parts.append(f"<p class=note>missing image: {html.escape(str(p))}</p>")
        parts += [f"<pre>{html.escape(t)}</pre>" for t in s.pre]
    # marks every image as loaded or not once the page has loaded (checked by the browser test)
    parts.append("<script>window.addEventListener('load',function(){var n=0;for(var i of document.images)"
                 "{var ok=i.complete&&i.naturalWidth>0;i.setAttribute('data-loaded',ok?'1':'0');n+=ok?1:0;}"
                 "document.body.setAttribute('data-images-loaded',n+'/'+document.images.length);});</script>")
    parts.append("</body></html>")
    path = Path(path)
    atomic_write_text("\n".join(parts), path)
    return path
