"""The report's inline SVG charts (no script, no external asset): histograms with threshold lines,
the privacy/fidelity trade-off scatter and the per-clip marker series."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from corpus_anon.run.html import C_ANON, C_BAD, C_ORIG, esc, fmt, num


# ---- charts ---------------------------------------------------------------------------------------
def svg_hist(series: Sequence[tuple[str, Sequence[float], str]], *, lines: Sequence[tuple[float, str, str]] = (),
             shade: tuple[float, float] | None = None, width: int = 640, height: int = 220, bins: int = 24,
             xlabel: str = "", title: str = "", note: str = "") -> str:
    """Overlaid histograms, each series as its share of its own count (so 3 signers and 3,000 clips
    compare), with vertical reference lines and an optional shaded x range."""
    vals = [v for _, vs, _ in series for v in vs]
    if not vals:
        return '<p class="muted">no values</p>'
    lo, hi = min(vals + [x for x, _, _ in lines]), max(vals + [x for x, _, _ in lines])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.04 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    ml, mr, mt, mb = 44, 24, 26 if title else 10, 38
    pw, ph = width - ml - mr, height - mt - mb
    step = (hi - lo) / bins

    def X(x: float) -> float:
        return ml + (x - lo) / (hi - lo) * pw

    shares = []
    for _, vs, _ in series:
        counts = [0] * bins
        for v in vs:
            counts[min(bins - 1, max(0, int((v - lo) / step)))] += 1
        shares.append([c / len(vs) if vs else 0.0 for c in counts])
    ymax = max(max(s) for s in shares) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title or xlabel)}">']
    if title:
        parts.append(f'<text x="{ml}" y="16" class="t">{esc(title)}</text>')
    if shade is not None:
        x0, x1 = X(max(lo, shade[0])), X(min(hi, shade[1]))
        if x1 > x0:
            parts.append(f'<rect x="{x0:.1f}" y="{mt}" width="{x1 - x0:.1f}" height="{ph}" fill="{C_BAD}" opacity="0.07"/>')
    n = len(series)
    bw = pw / bins
    for si, ((_, vs, color), sh) in enumerate(zip(series, shares)):
        for b, s in enumerate(sh):
            if s <= 0:
                continue
            h = s / ymax * ph
            x = ml + b * bw + 1 + si * (bw - 2) / n
            parts.append(f'<rect x="{x:.1f}" y="{mt + ph - h:.1f}" width="{max(1.0, (bw - 2) / n):.1f}" '
                         f'height="{h:.1f}" fill="{color}" opacity="0.85"/>')
    # axes and ticks
    parts.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#555"/>')
    parts.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#555"/>')
    for i in range(6):
        xv = lo + (hi - lo) * i / 5
        parts.append(f'<line x1="{X(xv):.1f}" y1="{mt + ph}" x2="{X(xv):.1f}" y2="{mt + ph + 4}" stroke="#555"/>'
                     f'<text x="{X(xv):.1f}" y="{mt + ph + 15}" class="a" text-anchor="middle">{tick(xv)}</text>')
    for frac in (0.5, 1.0):
        y = mt + ph - frac * ph
        parts.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" class="a" text-anchor="end">{100 * ymax * frac:.0f}%</text>'
                     f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#ddd"/>')
    for x, label, color in lines:
        parts.append(f'<line x1="{X(x):.1f}" y1="{mt}" x2="{X(x):.1f}" y2="{mt + ph}" stroke="{color}" '
                     f'stroke-width="2" stroke-dasharray="5 3"/>'
                     f'<text x="{X(x) + 4:.1f}" y="{mt + 12}" class="a" fill="{color}">{esc(label)}</text>')
    if xlabel:
        parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" class="a" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{esc(lbl)} (n={len(vs)})'
                      for lbl, vs, c in series)
    if note:
        legend += f"<br>{esc(note)}"
    return f'<figure style="max-width:{width}px">{"".join(parts)}<figcaption>{legend}</figcaption></figure>'


def tick(x: float) -> str:
    t = f"{x:.2f}"
    return "0.00" if t == "-0.00" else t


# The trade-off view's "kept" line on both axes: markers kept where nmm_corr reaches it, hands kept
# where hands_kept does.
KEPT = 0.5


def quadrant(x: float, y: float) -> str:
    """The trade-off view's name for a clip at hands kept ``x`` and markers kept ``y``."""
    if y >= KEPT:
        return "both kept" if x >= KEPT else "hands lost, markers kept"
    return "markers lost, hands kept" if x >= KEPT else "both lost"


def svg_tradeoff(rows: list[dict[str, Any]], width: int = 400, height: int = 320) -> str:
    """One dot per clip: facial markers kept (``nmm_corr``, y) against hands kept (x), the four
    quadrants split at ``KEPT`` named with their clip counts and tinted (green: both kept; red: both
    lost), the median clip marked with a cross, and a caption that says in words where the median clip
    lies, so a pass that keeps hands and loses the face (pixelation) reads at a glance."""
    xlabel, xval = hands_kept_axis(rows)
    pts = [(xval(r), num(r.get("nmm_corr")), r) for r in rows]
    pts = [(x, y, r) for x, y, r in pts if x is not None and y is not None]
    if not pts:
        return ""
    ml, mr, mt, mb = 50, 12, 26, 34
    pw, ph = width - ml - mr, height - mt - mb

    def X(x: float) -> float:
        return ml + max(0.0, min(1.0, x)) * pw

    def Y(y: float) -> float:  # correlation in [-1, 1]
        return mt + (1 - (max(-1.0, min(1.0, y)) + 1) / 2) * ph

    counts = {q: 0 for q in ("both kept", "hands lost, markers kept", "markers lost, hands kept", "both lost")}
    for x, y, _ in pts:
        counts[quadrant(x, y)] += 1
    xk, yk = X(KEPT), Y(KEPT)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="facial markers kept against hands kept">',
             f'<text x="{ml}" y="16" class="t">facial markers vs hands kept</text>',
             f'<rect x="{xk:.1f}" y="{mt}" width="{ml + pw - xk:.1f}" height="{yk - mt:.1f}" fill="#2f855a" '
             f'opacity="0.10"/>',
             f'<rect x="{ml}" y="{yk:.1f}" width="{xk - ml:.1f}" height="{mt + ph - yk:.1f}" fill="{C_BAD}" '
             f'opacity="0.06"/>',
             f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#555"/>',
             f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#555"/>',
             f'<line x1="{ml}" y1="{yk:.1f}" x2="{ml + pw}" y2="{yk:.1f}" stroke="#bbb" stroke-dasharray="4 3"/>',
             f'<line x1="{xk:.1f}" y1="{mt}" x2="{xk:.1f}" y2="{mt + ph}" stroke="#bbb" stroke-dasharray="4 3"/>']
    for v in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{X(v):.1f}" y="{mt + ph + 13}" class="a" text-anchor="middle">{v:.1f}</text>')
    for v in (-1.0, 0.0, 0.5, 1.0):
        parts.append(f'<text x="{ml - 4}" y="{Y(v) + 4:.1f}" class="a" text-anchor="end">{v:g}</text>')
    corners = (("both kept", X(1) - 4, Y(1) + 13, "end"),
               ("markers lost, hands kept", X(1) - 4, Y(-1) - 5, "end"),
               ("hands lost, markers kept", X(0) + 4, Y(1) + 13, "start"),
               ("both lost", X(0) + 4, Y(-1) - 5, "start"))
    for label, x, y, anchor in corners:
        n = counts[label]
        parts.append(f'<text x="{x:.1f}" y="{y:.1f}" class="a" text-anchor="{anchor}" '
                     f'fill="{"#222" if n else "#999"}" font-weight="{600 if n else 400}">'
                     f'{esc(label)} ({n})</text>')
    r_dot = 4.0 if len(pts) <= 200 else 2.5
    alpha = 0.75 if len(pts) <= 200 else 0.35
    for x, y, r in pts:
        color = C_BAD if r.get("status") == "leak" else C_ANON
        parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{r_dot}" fill="{color}" opacity="{alpha}">'
                     f'<title>{esc(r.get("clip_id"))}: nmm_corr {fmt(y)}, hands {fmt(x)}</title></circle>')
    mx = statistics.median(x for x, _, _ in pts)
    my = statistics.median(y for _, y, _ in pts)
    cx, cy = X(mx), Y(my)
    cross = f"M{cx - 8:.1f} {cy:.1f}H{cx + 8:.1f}M{cx:.1f} {cy - 8:.1f}V{cy + 8:.1f}"
    parts.append(f'<path d="{cross}" stroke="#fff" stroke-width="5"/>'
                 f'<path d="{cross}" stroke="#111" stroke-width="2.5"><title>median clip: nmm_corr {fmt(my)}, '
                 f'hands {fmt(mx)}</title></path>'
                 f'<text x="{cx + (10 if mx < 0.75 else -10):.1f}" y="{cy - 6:.1f}" class="a" '
                 f'text-anchor="{"start" if mx < 0.75 else "end"}" font-weight="600" stroke="#fff" stroke-width="3" '
                 f'paint-order="stroke">median</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 5}" class="a" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text transform="translate(12 {mt + ph / 2:.1f}) rotate(-90)" class="a" text-anchor="middle">'
                 f'facial markers kept (nmm_corr)</text></svg>')
    headline = f"The median clip: {quadrant(mx, my)} (markers kept {fmt(my)}, hands kept {fmt(mx)})."
    detail = (f"{len(pts)} clips: " + "; ".join(f"{n} {q}" for q, n in sorted(counts.items(), key=lambda c: -c[1])
                                                 if n) + f" (kept = at least {KEPT:g} on its axis).")
    return (f'<figure style="max-width:{width}px">{"".join(parts)}<figcaption><b>{esc(headline)}</b> '
            f'{esc(detail)}</figcaption></figure>')


def svg_series(series: dict[str, Any], name: str, label: str, width: int = 220, height: int = 70) -> str:
    """A small chart of one marker series over the clip: the original's (orange) and the anonymized
    (blue) values at the measured frames, gaps where a mesh is missing."""
    frames = [int(t) for t in series.get("frames") or []]
    o = (series.get("orig") or {}).get(name) or []
    a = (series.get("anon") or {}).get(name) or []
    vals = [v for v in (*o, *a) if num(v) is not None]
    if len(frames) < 2 or not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    ml, mt, mb = 4, 14, 4
    pw, ph = width - 2 * ml, height - mt - mb
    f0, f1 = frames[0], max(frames[-1], frames[0] + 1)

    def path(vs: Sequence[Any]) -> str:
        d, pen = [], "M"
        for t, v in zip(frames, vs):
            if num(v) is None:
                pen = "M"
                continue
            x = ml + (t - f0) / (f1 - f0) * pw
            y = mt + (1 - (float(v) - lo) / (hi - lo)) * ph
            d.append(f"{pen}{x:.1f} {y:.1f}")
            pen = "L"
        return " ".join(d)

    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{esc(label)}, original and anonymized">'
            f'<text x="{ml}" y="11" class="a">{esc(label)}</text>'
            f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#ddd"/>'
            f'<path d="{path(o)}" fill="none" stroke="{C_ORIG}" stroke-width="1.5"/>'
            f'<path d="{path(a)}" fill="none" stroke="{C_ANON}" stroke-width="1.5"/></svg>')


def hands_kept(r: dict[str, Any]) -> float | None:
    """One clip's hands kept, in [0, 1]: the share of the original's hand frames where the anonymized
    clip shows the same hand (``hand_lm_recall``) times 1 − ``hand_lm_err`` (clipped to [0, 1]); None
    when the original shows no hand or no hand model ran."""
    recall = num(r.get("hand_lm_recall"))
    if recall is None:
        return None
    err = num(r.get("hand_lm_err"))
    return recall * (1.0 - min(1.0, max(0.0, err or 0.0)))


def hands_kept_axis(rows: list[dict[str, Any]]) -> tuple[str, Any]:
    """The x axis of the trade-off view: (label, value of a row) — ``hands_kept`` where the hand model
    saw a hand in some original, else the older edge heuristic hand_fidelity."""
    if any(hands_kept(r) is not None for r in rows):
        return ("hands kept: hand_lm_recall × (1 − hand_lm_err)", hands_kept)
    return ("hands kept: hand_fidelity (edge F-score; no hand landmarks)", lambda r: num(r.get("hand_fidelity")))
