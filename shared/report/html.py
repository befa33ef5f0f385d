"""Self-contained HTML pages: escaped text, tables, embedded figures, inline CSS.

A page written here loads nothing from anywhere: the style sheet is inline,
every image is a ``data:image/png;base64,...`` URI, there is no script, no
web font and no link to another site (the system font stack is used). So a
report can be opened on an offline hospital machine, attached to an e-mail
or filed, and it shows the same everywhere; opening it makes no network
request (``tests/test_report_browser.py`` checks this in a headless browser).

Every value put into a page goes through :func:`esc`; callers never paste
raw text into markup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.formatting import fmt_metric

__all__ = ["CSS", "Section", "data_uri", "esc", "figure", "kv_table", "note", "num", "page", "para", "table"]

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1100px; padding: 1.5rem 2rem 4rem; color: #1d2230; background: #ffffff;
       line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { font-size: 1.3rem; border-bottom: 2px solid #d7dce6; padding-bottom: .25rem; margin-top: 2.4rem; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
.subtitle { color: #4a5368; margin-top: 0; }
nav ol { columns: 2; font-size: .95rem; }
.tbl { overflow-x: auto; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #cfd5e1; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #eef1f7; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
figure { margin: .8rem 0 1.2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e6ee; }
figcaption { font-size: .85rem; color: #4a5368; }
.note { background: #f6f8fb; border-left: 4px solid #8aa1c9; padding: .5rem .8rem; font-size: .9rem; }
.warn { background: #fff7e6; border-left: 4px solid #d99a2b; padding: .5rem .8rem; font-size: .9rem; }
.gallery { display: flex; flex-wrap: wrap; gap: .6rem; }
.gallery figure { width: 150px; margin: 0; }
.gallery img { width: 150px; }
ul.tight li { margin: .1rem 0; }
footer { margin-top: 3rem; font-size: .8rem; color: #6a7285; }
"""


def esc(value: object) -> str:
    """``value`` as text safe inside HTML (``<``, ``&``, quotes escaped)."""
    return html.escape(str(value), quote=True)


def num(value: object, digits: int = 3) -> str:
    """A number for a table cell (``n/a`` when missing); integers without decimals."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 and digits == 0:
        return str(int(value))
    return fmt_metric(value, digits)


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI (the page embeds it; nothing is fetched)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def para(text: str) -> str:
    """A paragraph of escaped text."""
    return f"<p>{esc(text)}</p>"


def note(text: str, *, warn: bool = False) -> str:
    """A highlighted remark (``warn`` for a caveat the reader must not miss)."""
    return f'<div class="{"warn" if warn else "note"}">{esc(text)}</div>'


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, caption: str | None = None,
          numeric: Sequence[bool] | None = None) -> str:
    """A table of escaped cells; ``numeric[i]`` right-aligns column ``i``.

    Cells are shown as given (format numbers first, e.g. with :func:`num`).
    """
    rows = [list(r) for r in rows]
    right = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(("<td class=\"n\">" if i < len(right) and right[i] else "<td>") + f"{esc(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="tbl"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def kv_table(pairs: Iterable[tuple[str, object]], *, caption: str | None = None) -> str:
    """A two-column table of ``(name, value)`` pairs."""
    return table(("", ""), ((k, v) for k, v in pairs), caption=caption).replace(
        "<thead><tr><th></th><th></th></tr></thead>", "")


def figure(png: bytes, alt: str, caption: str | None = None) -> str:
    """An embedded PNG figure with its alternative text and caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


@dataclass(frozen=True)
class Section:
    """One section of a page: its HTML id (tests find it by this), heading and body markup."""

    id: str
    title: str
    body: str


def page(title: str, subtitle: str, sections: Sequence[Section], footer: str = "") -> str:
    """A complete HTML document: title, a table of contents, the sections, a footer.

    The document carries a Content-Security-Policy that forbids loading
    anything but embedded ``data:`` images and the inline style: even a
    mistake in a caller could not make the page fetch a resource.
    """
    nav = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p class=\"subtitle\">{esc(subtitle)}</p></header>"
        f"<nav><h2>Contents</h2><ol>{nav}</ol></nav>{body}"
        f"<footer>{esc(footer)}</footer></body></html>\n"
    )
