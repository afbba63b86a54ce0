"""The report page's HTML: one template, escaping, tables, inlined images (stdlib only).

Every string that comes from a run (file names, labels, reasons) goes through `esc`; pictures
are `data:` URIs, and the page's Content-Security-Policy allows nothing else, so it can make no
request, even by mistake.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

#: Nothing but inline styles and `data:` images; no script, font, frame or fetch.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2330; background: #fff;
       margin: 0 auto; max-width: 1180px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d8dce6; padding-bottom: 4px; }
.sub { color: #5b6478; margin: 0 0 12px; }
.note { color: #6b7385; font-style: italic; margin: 4px 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d8dce6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline td:first-child { color: #5b6478; }
img.plot { max-width: 100%; height: auto; display: block; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 150px; border: 1px solid #d8dce6; border-radius: 4px; padding: 6px;
        font-size: 12px; overflow-wrap: anywhere; }
.card img { display: block; margin: 0 auto 4px; max-width: 138px; max-height: 138px; }
.thumb-missing { height: 96px; display: flex; align-items: center; justify-content: center;
                 background: #f3f4f8; color: #6b7385; text-align: center; margin-bottom: 4px; }
.wrong { color: #b3261e; font-weight: 600; }
.file { color: #5b6478; }
"""


def esc(value: Any) -> str:
    """`value` as text, HTML-escaped (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    """A number for a table cell; anything else (None, a hand-edited string) as escaped text."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else esc(value)
    return esc(value)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, mime: str, alt: str, cls: str = "plot", id: str | None = None) -> str:
    ident = f' id="{esc(id)}"' if id else ""
    return f'<img{ident} class="{esc(cls)}" alt="{esc(alt)}" src="{data_uri(data, mime)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[str]], cls: str = "",
          numeric: Iterable[int] = ()) -> str:
    """A table of cells that are already HTML (pass them through `esc` / `num`); no header
    row when `headers` is None."""
    numeric = set(numeric)
    head = "" if headers is None else \
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    klass = f' class="{esc(cls)}"' if cls else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


def section(ident: str, title: str, body: str) -> str:
    return f'<section id="{esc(ident)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body>"
        f'<h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>\n{body}\n</body></html>\n')
