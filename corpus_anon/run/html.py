"""The report page's HTML primitives: escaping, number formats, tables, badges, links, the palette.
Everything a value passes through on its way into the page is escaped here."""

from __future__ import annotations

import html
import math
import os
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from corpus_anon.io.storage import normalize_uri

# The palette: anonymized, original, alarm.
C_ANON, C_ORIG, C_BAD = "#2b6cb0", "#dd6b20", "#c53030"


# ---- reading ------------------------------------------------------------------------------------
def num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---- html helpers ---------------------------------------------------------------------------------
def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def fmt(v: Any, digits: int = 3) -> str:
    f = num(v)
    if f is None:
        return "–"
    if float(f).is_integer() and abs(f) < 1e12 and not isinstance(v, float):
        return str(int(f))
    return f"{f:.{digits}f}"


def pct(v: Any) -> str:
    f = num(v)
    return "–" if f is None else f"{100 * f:.1f} %"


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", compact: bool = False) -> str:
    """Cells are HTML already (escape before). `compact` leaves out the optional `</td>` and `</tr>`
    end tags (HTML allows it), a third of a long table's size."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    if compact:
        body = "".join("<tr>" + "".join(f"<td>{c}" for c in r) for r in rows)
    else:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def local_dir(uri: str) -> str | None:
    norm = normalize_uri(uri)
    return norm[len("file://"):] if norm.startswith("file://") else None


def link(uri: Any, base_dir: str | None, text: str) -> str:
    """A relative link when both the report and the object are on local disk, else the URI as text."""
    if not uri:
        return "–"
    try:
        norm = normalize_uri(str(uri))
    except Exception:  # noqa: BLE001 - a malformed URI is shown as it is
        return f"<code>{esc(uri)}</code>"
    if base_dir is not None and norm.startswith("file://"):
        rel = os.path.relpath(norm[len("file://"):], base_dir)
        return f'<a href="{esc(quote(rel))}">{esc(text)}</a>'
    return f"<code>{esc(norm)}</code>"


def badge(text: str, kind: str = "") -> str:
    return f'<span class="b {kind}">{esc(text)}</span>'
