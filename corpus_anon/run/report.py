"""`report.html`: one self-contained page a corpus maintainer reads before a release goes out.

Written to `{output}/{cfg_fp}/report.html` from the run's `metrics/metrics.parquet` and
`summary.json` (never from `embeddings/`: original-face embeddings stay out of every report). It
holds, with inline CSS, inline SVG charts and thumbnails as inline JPEG data URIs (no external
resource of any kind):

- what the run settled (counts by status, leak / exposed / re-identified / face_lost, release
  candidates);
- the exposure check: how many clips left some original face — the signer's or anyone else's —
  recognizable on some frame, and how many frames;
- identity: a histogram of per-clip `id_orig_anon` against the per-signer `id_orig_orig_xclip`
  with the backend's threshold, the per-signer table (the paper's Table 1) and re-identification
  against chance;
- fidelity: the trade-off at a glance (one dot per clip: facial markers kept against hands kept,
  the clips counted per quadrant, the median clip marked and its quadrant named in the caption),
  then the distributions of the landmark agreement columns (`nmm_corr`, `hand_lm_err`,
  `hand_presence_agree`, from MediaPipe's face mesh and hands), of the older `expr_fidelity` and
  `hand_fidelity` heuristics, and of `warp_error`;
- a contact sheet: the `max_embedded` clips most alike their original (exposed clips first, then
  lowest Euclidean distance or highest cosine `id_orig_anon`) and a seeded random sample of as
  many others, each at a few
  time points as original | anonymized (| anonymized without face enhancement, when a run writes
  that output in the `output_uri_unenhanced` column), with its marker panel: the original's and
  the anonymized brow raise and mouth opening over the clip (the `nmm_series` column) and its hand
  agreement (the contact sheet's clips only: the page says so);
- every non-`ok` row with its error, and every other clip in a table with links (relative for
  local outputs, the URI otherwise), so the file stays small at 10,000 clips.

The page is private: it shows original faces and signer ids. Driver side: PyAV and numpy only
(no torch, diffusers, insightface, onnxruntime or cv2).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import random
import statistics
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Iterable, Sequence
from urllib.parse import quote

from corpus_anon import __version__
from corpus_anon.errors import one_sentence
from corpus_anon.io.records import RunLayout, now_iso
from corpus_anon.io.storage import PolicyError, Storage, join, normalize_uri

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# The anonymized clip without face enhancement (the paper's ablation), when a run writes one.
UNENHANCED_COLUMN = "output_uri_unenhanced"
THUMB_HEIGHT = 160
JPEG_QSCALE = 5  # FFmpeg MJPEG qscale (2 = best .. 31); about quality 70 of libjpeg
FRACTIONS = (1 / 6, 1 / 2, 5 / 6)  # where in each clip the thumbnails are taken
FIDELITY = (
    ("nmm_corr", "face mesh: marker correlation, original vs anonymized; higher = brows, eyes and mouth kept", 1.0),
    ("hand_lm_err", "hand landmarks: mean point error in hand sizes; lower = handshapes kept", 0.0),
    ("hand_lm_recall", "share of the original's hand frames where the output shows the same hand", 1.0),
    ("hand_presence_agree", "share of frames where the output shows as many of the original's hands (hands it "
                            "adds are not looked for); higher = hands kept", 1.0),
    ("expr_fidelity", "higher = facial expressions kept", None),
    ("hand_fidelity", "higher = handshapes kept", None),
    ("warp_error", "1.0 = as stable as the source; higher flickers", 1.0),
)
STATS_COLUMNS = ("id_orig_anon", "id_worst", "id_match_rate", "id_orig_orig", "face_frac_orig",
                 "face_frac_anon", "nmm_corr", "nmm_mae", "nmm_brow_corr", "nmm_eye_corr", "nmm_mouth_corr",
                 "nmm_width_corr", "nmm_anon_score", "hand_lm_err", "hand_lm_recall", "hand_presence_agree",
                 "hand_lm_frames",
                 "landmark_frames", "t_landmarks_s", "expr_fidelity", "hand_fidelity", "warp_error", "hand_pixels_kept",
                 "faces_tracked", "frames_checked", "exposed_frames")
C_ANON, C_ORIG, C_BAD = "#2b6cb0", "#dd6b20", "#c53030"


def report_uri(layout: RunLayout) -> str:
    return join(layout.root, REPORT_NAME)


# ---- reading ------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _read_rows(storage: Storage, layout: RunLayout) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(layout.metrics)
    except FileNotFoundError:
        raise FileNotFoundError(f"{layout.metrics} does not exist; the run has not finished.") from None
    return pq.read_table(io.BytesIO(data)).to_pylist()


def _read_json(storage: Storage, uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        log.warning("report: %s is not valid JSON (%s); left out", uri, e)
        return {}


def _face_backend(storage: Storage, layout: RunLayout, rows: list[dict[str, Any]]) -> str | None:
    for r in rows:
        if r.get("face_backend"):
            return str(r["face_backend"])
    try:
        import yaml

        cfg = yaml.safe_load(storage.read_text(layout.config)) or {}
        return str((cfg.get("faces") or {}).get("backend") or "") or None
    except Exception:  # noqa: BLE001 - only used for a label
        return None


# ---- thumbnails -----------------------------------------------------------------------------------
def _jpeg(frame: Any, height: int) -> bytes:
    """One decoded PyAV frame as a JPEG `height` px high, in its displayed orientation."""
    import av
    import numpy as np

    rot = int(getattr(frame, "rotation", 0) or 0) % 360
    cw, ch = frame.width, frame.height
    dw, dh = (ch, cw) if rot in (90, 270) else (cw, ch)
    th = max(2, height - height % 2)
    tw = min(4 * th, max(2, int(round(dw * th / dh / 2)) * 2))
    coded = (th, tw) if rot in (90, 270) else (tw, th)
    rgb = frame.reformat(width=coded[0], height=coded[1], format="rgb24", interpolation="AREA").to_ndarray()
    if rot:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rot // 90))
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = rgb.shape[1], rgb.shape[0]
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.qmin = ctx.qmax = JPEG_QSCALE
    vf = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*ctx.encode(vf), *ctx.encode(None)])


def _frame_time(frame: Any, tb: Any) -> float | None:
    if frame.pts is not None and tb is not None:
        return float(frame.pts * tb)
    return float(frame.time) if frame.time is not None else None


def _grab(src: Any, offset: float, length: float | None, fractions: Sequence[float], height: int) -> list[bytes | None]:
    """JPEGs of the frames nearest `offset + f * length` (seconds, stream time) for each fraction."""
    import av

    from corpus_anon.io.video import open_source  # the allow-list: originals are files from elsewhere

    out: list[bytes | None] = [None] * len(fractions)
    with open_source(src) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        tb = vs.time_base
        if length is None:
            if vs.duration is not None and tb is not None:
                total = float(vs.duration * tb)
            elif c.duration is not None:
                total = c.duration / 1_000_000
            else:
                total = offset + 1.0
            length = max(0.0, total - offset)
        for k, f in enumerate(fractions):
            target = offset + f * length
            try:
                c.seek(max(0, int(target / tb)) if tb else 0, stream=vs, backward=True, any_frame=False)
            except av.FFmpegError:
                c.seek(0, stream=vs)
            prev, prev_t, best = None, None, None
            for i, fr in enumerate(c.decode(vs)):
                t = _frame_time(fr, tb)
                t = float(i) if t is None else t
                if t >= target - 1e-6:
                    best = prev if prev is not None and abs(prev_t - target) < abs(t - target) else fr
                    break
                prev, prev_t = fr, t
            best = best if best is not None else prev
            if best is not None:
                out[k] = _jpeg(best, height)
    if all(b is None for b in out):
        raise ValueError("no frame could be decoded")
    return out


def _thumbs(storage: Storage, uri: Any, offset: float, length: float | None,
            height: int) -> tuple[list[bytes | None], str | None]:
    """(JPEGs per time point, None) or ([], why) for an object that cannot be read."""
    if not uri:
        return [], "not produced"
    try:
        norm = normalize_uri(str(uri))
        storage.check_read(norm)
        if norm.startswith("file://"):
            path = norm[len("file://"):]
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            return _grab(path, offset, length, FRACTIONS, height), None
        fs, path = storage.filesystem(norm)
        with fs.open(path, "rb") as f:  # ranged reads: a long session recording is not downloaded whole
            return _grab(f, offset, length, FRACTIONS, height), None
    except Exception as e:  # noqa: BLE001 - one unreadable clip must not stop the report
        why = ("not found" if isinstance(e, FileNotFoundError) else
               "outside storage.allowed_prefixes.read" if isinstance(e, PolicyError) else one_sentence(e))
        log.warning("report: no thumbnails from %s (%s)", uri, one_sentence(e))
        return [], why


# ---- html helpers ---------------------------------------------------------------------------------
def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if f is None:
        return "–"
    if float(f).is_integer() and abs(f) < 1e12 and not isinstance(v, float):
        return str(int(f))
    return f"{f:.{digits}f}"


def _pct(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{100 * f:.1f} %"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", compact: bool = False) -> str:
    """Cells are HTML already (escape before). `compact` leaves out the optional `</td>` and `</tr>`
    end tags (HTML allows it), a third of a long table's size."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    if compact:
        body = "".join("<tr>" + "".join(f"<td>{c}" for c in r) for r in rows)
    else:
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _local_dir(uri: str) -> str | None:
    norm = normalize_uri(uri)
    return norm[len("file://"):] if norm.startswith("file://") else None


def _link(uri: Any, base_dir: str | None, text: str) -> str:
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


def _badge(text: str, kind: str = "") -> str:
    return f'<span class="b {kind}">{esc(text)}</span>'


def _unchecked(r: dict[str, Any]) -> bool:
    """An anonymized clip whose identity was not measured because no face was found in its original."""
    return bool(r.get("output_uri")) and "id_orig_anon" in r and _num(r.get("id_orig_anon")) is None


def _exposed(r: dict[str, Any]) -> int:
    """Frames of the clip where the exposure check found an original face still recognizable."""
    return int(_num(r.get("exposed_frames")) or 0)


def _flags(r: dict[str, Any]) -> str:
    out = []
    if r.get("status") == "leak" or r.get("leak") is True:
        out.append(_badge("leak", "bad"))
    n = _exposed(r)
    if n:
        out.append(_badge(f"exposed on {n} frame{'s' if n != 1 else ''}", "bad"))
    if r.get("exposure_covered") is False:
        out.append(_badge("exposure check incomplete", "warn"))
    if r.get("reidentified") is True:
        out.append(_badge("re-identified", "bad"))
    if r.get("face_lost") is True:
        out.append(_badge("face lost", "warn"))
    if _unchecked(r):
        out.append(_badge("no face found in the original", "warn"))
    if _num(r.get("seed_attempt")):
        out.append(_badge(f"re-seeded ×{int(_num(r.get('seed_attempt')))}"))
    return " ".join(out)


def _status(r: dict[str, Any]) -> str:
    s = str(r.get("status") or "unknown")
    return _badge(s, {"ok": "good", "leak": "bad", "error": "bad"}.get(s, "warn"))


# ---- charts ---------------------------------------------------------------------------------------
def _svg_hist(series: Sequence[tuple[str, Sequence[float], str]], *, lines: Sequence[tuple[float, str, str]] = (),
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
                     f'<text x="{X(xv):.1f}" y="{mt + ph + 15}" class="a" text-anchor="middle">{_tick(xv)}</text>')
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


def _tick(x: float) -> str:
    t = f"{x:.2f}"
    return "0.00" if t == "-0.00" else t


def _dist(values: Iterable[Any]) -> dict[str, float] | None:
    xs = sorted(f for f in (_num(v) for v in values) if f is not None)
    if not xs:
        return None
    return {"n": len(xs), "min": xs[0], "p10": xs[int(0.1 * (len(xs) - 1))], "median": statistics.median(xs),
            "mean": statistics.fmean(xs), "max": xs[-1]}


# ---- the page -------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1a202c;background:#f7f7f8}
main{max-width:1280px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.private{background:#fff5f5;border:2px solid #c53030;color:#822727;padding:8px 12px;border-radius:4px;margin:8px 0}
.muted{color:#666}.small{font-size:12px}
nav a{margin-right:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#edf2f7;position:sticky;top:0}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.num td{text-align:right;font-variant-numeric:tabular-nums}table.num td:first-child{text-align:left}
.b{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;background:#e2e8f0;white-space:nowrap}
.b.good{background:#c6f6d5;color:#22543d}.b.bad{background:#fed7d7;color:#822727}.b.warn{background:#feebc8;color:#7b341e}
.facts{display:flex;flex-wrap:wrap;gap:8px}.fact{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 12px}
.fact b{font-size:20px;display:block}.fact.bad{border-color:#c53030;background:#fff5f5}.fact.warn{border-color:#dd6b20}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ccc;border-radius:4px;padding:8px}
.card.alarm{border:2px solid #c53030;background:#fff5f5}
.card h4{margin:0 0 4px;font-size:14px;word-break:break-all}
.grid{display:grid;gap:3px;align-items:center}
.grid .h{font-size:12px;color:#444;text-align:center}
.grid .tl{font-size:11px;color:#666;writing-mode:vertical-rl;transform:rotate(180deg)}
.grid img{display:block;height:%(h)dpx}
.ph{height:%(h)dpx;min-width:%(phw)dpx;max-width:260px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f8f8f8 8px,#f8f8f8 16px);
display:flex;align-items:center;justify-content:center;text-align:center;font-size:11px;color:#822727;padding:4px;box-sizing:border-box;overflow:hidden}
figure{margin:6px 0;display:inline-block;vertical-align:top;background:#fff;border:1px solid #ddd;padding:4px}
figcaption{font-size:12px}.key{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
svg text.a{font-size:11px;fill:#333}svg text.t{font-size:13px;font-weight:600;fill:#222}
code{font-size:12px;word-break:break-all}
"""


def _section_facts(rows: list[dict[str, Any]], summary: dict[str, Any], measured: bool) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        s = str(r.get("status") or "unknown")
        counts[s] = counts.get(s, 0) + 1
    leak = sum(1 for r in rows if r.get("status") == "leak")
    reid = sum(1 for r in rows if r.get("reidentified") is True)
    lost = sum(1 for r in rows if r.get("face_lost") is True)
    errors = sum(v for k, v in counts.items() if k not in ("ok", "leak"))
    cand = sum(1 for r in rows if r.get("status") == "ok" and r.get("reidentified") is not True
               and r.get("face_lost") is not True)
    reseeded = len(summary.get("reseeded_clips") or [])
    unchecked = sum(1 for r in rows if _unchecked(r))
    exposure = _exposure_counts(rows, summary)

    def fact(label: str, value: Any, kind: str = "") -> str:
        return f'<div class="fact {kind}"><b>{esc(value)}</b>{esc(label)}</div>'

    facts = [fact("clips in the metrics table", len(rows)), fact("ok", counts.get("ok", 0)),
             fact("error", errors, "bad" if errors else ""), fact("leak (identity gate)", leak, "bad" if leak else "")]
    if exposure["clips_checked"]:
        ce, fe = exposure["clips_exposed"], exposure["exposed_frames"]
        facts.append(fact("exposed: clips with an original face still recognizable", ce, "bad" if ce else ""))
        facts.append(fact("exposed frames, all clips", fe, "bad" if fe else ""))
    if measured:
        facts.append(fact("re-identified (corpus test)", reid, "bad" if reid else ""))
        facts.append(fact("identity not checked: no face found in the original", unchecked,
                          "warn" if unchecked else ""))
    else:
        facts.append(fact("re-identified: not measured", "–", "warn"))
    facts += [fact("face_lost", lost, "warn" if lost else ""), fact("re-seeded by the gate", reseeded),
              fact("release candidates", cand)]
    status_rows = [(esc(k), f'<span class="n">{v}</span>') for k, v in sorted(counts.items())]
    return (f'<div class="facts">{"".join(facts)}</div>'
            '<p class="small muted">Release candidates: status <code>ok</code>, not re-identified and not '
            '<code>face_lost</code> (the release defaults <code>release.exclude_reidentified</code> and '
            '<code>release.exclude_face_lost</code>); <code>--exclude</code> / <code>--approve</code> lists and '
            'tombstones are applied by <code>corpus-anon release</code>, not here. A clip whose original had no '
            'face the detector found is released like any other, but the identity gate never looked at it: '
            'check those by eye.</p>'
            + _table(("status", "clips"), status_rows))


def _exposure_counts(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `exposure` counts when the run wrote them, else counted from the rows."""
    from corpus_anon.actor.exposure import summary_counts

    got = summary.get("exposure")
    return got if isinstance(got, dict) and "clips_checked" in got else summary_counts(rows)


EXPOSURE_TEXT = (
    "The exposure check follows every face the detector finds in the original clip — the signer and "
    "anyone else in the picture — and compares the anonymized clip with the original <i>at the same place</i>: "
    "on every frame where the detector lost a face for a moment (a hand in front of it), on every frame where a "
    "face shows up in the anonymized clip, and otherwise often enough that no more than "
    "<code>gate.max_gap_frames</code> frames of any face go unchecked. A frame where the face embeddings still say "
    "“the same person” is an <b>exposed frame</b>. A clip with any exposed frame is <code>leak</code> and is "
    "never released (<code>diffslva</code> clips are re-generated with new seeds first; a pixelated clip stays "
    "<code>leak</code>): look at those frames, fix the anonymization, or leave the clip out. The check sees only "
    "faces the detector finds on at least one frame of the original."
)


def _section_exposure(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    ex = _exposure_counts(rows, summary)
    if not ex["clips_checked"]:
        return '<h3>Exposure check</h3><p class="muted">Not run (no clip has its columns).</p>'
    out = ["<h3>Exposure check: every face, every frame</h3>", f"<p>{EXPOSURE_TEXT}</p>"]
    out.append(_table(("exposure check", "value"), [
        ("clips checked", _fmt(ex["clips_checked"])),
        ("original faces tracked, all clips (faces_tracked)", _fmt(ex["faces_tracked"])),
        ("clips with exposed frames", _fmt(ex["clips_exposed"]) + (" " + _badge("leak", "bad") if ex["clips_exposed"]
                                                                    else " " + _badge("none", "good"))),
        ("exposed frames, all clips (exposed_frames)", _fmt(ex["exposed_frames"])),
        ("clips where some face was not checked within gate.max_gap_frames", _fmt(ex["clips_not_covered"])),
    ], "num"))
    exposed = sorted((r for r in rows if _exposed(r)), key=lambda r: (-_exposed(r), str(r.get("clip_id"))))
    if exposed:
        out.append(_table(("clip_id", "signer", "status", "exposed frames", "longest run", "faces tracked",
                           "frames checked"),
                          ((esc(r.get("clip_id")), esc(r.get("signer_id")), _status(r), _fmt(r.get("exposed_frames")),
                            _fmt(r.get("max_exposed_run")), _fmt(r.get("faces_tracked")), _fmt(r.get("frames_checked")))
                           for r in exposed), "num"))
    return "".join(out)


def _direction(kind: str, threshold: float | None) -> tuple[str, bool]:
    """(sentence, lower_is_more_alike)."""
    if kind == "euclidean":
        rule = f"the same person at a distance ≤ {threshold:g}" if threshold is not None else ""
        return (f"Scores are Euclidean distances between face embeddings: <b>lower = more alike</b>; the backend "
                f"judges {rule}. Anonymized clips should sit right of the line, originals left of it."), True
    rule = f"the same person at a similarity ≥ {threshold:g}" if threshold is not None else ""
    return (f"Scores are cosine similarities between face embeddings: <b>higher = more alike</b>; the backend "
            f"judges {rule}. Anonymized clips should sit left of the line, originals right of it."), False


def _same(score: float | None, kind: str, threshold: float | None) -> bool:
    if score is None or threshold is None:
        return False
    return score <= threshold if kind == "euclidean" else score >= threshold


def _section_identity(rows: list[dict[str, Any]], reid: dict[str, Any], kind: str | None,
                      threshold: float | None, backend: str | None) -> str:
    if kind is None:
        why = "faces.backend: none" if backend in (None, "none") else "no clip had a face in its original"
        return f'<p class="muted">Identity: not measured ({esc(why)}).</p>'
    sentence, lower = _direction(kind, threshold)
    out = [f"<p>{sentence}</p>"]
    anon = [f for f in (_num(r.get("id_orig_anon")) for r in rows) if f is not None]
    per_signer = reid.get("per_signer") or {}
    xclip = [f for f in (_num(v.get("id_orig_orig_xclip")) for v in per_signer.values()) if f is not None]
    lines = [(threshold, f"threshold {threshold:g}", C_BAD)] if threshold is not None else []
    shade = None
    if threshold is not None:
        shade = (-1e9, threshold) if lower else (threshold, 1e9)
    out.append(_svg_hist(
        [("per clip: original vs anonymized (id_orig_anon)", anon, C_ANON),
         ("per signer: original vs the signer's other clips (id_orig_orig_xclip)", xclip, C_ORIG)],
        lines=lines, shade=shade, xlabel=f"{kind} score ({'lower' if lower else 'higher'} = more alike; "
                                        "shaded = judged the same person)",
        title="Identity scores", width=760, height=240))
    if not xclip:
        out.append('<p class="small muted">No per-signer original reference: every signer has a single clip '
                   'with a face (or the corpus test did not run).</p>')
    # per-signer table (Table 1)
    out.append("<h3>Per signer (the paper's Table 1)</h3>")
    if per_signer:
        clips_by_signer: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            clips_by_signer.setdefault(str(r.get("signer_id")), []).append(r)

        def key(item: tuple[str, dict[str, Any]]) -> tuple[int, float, str]:
            v = _num(item[1].get("id_orig_anon"))
            return (v is None, (v if lower else -v) if v is not None else 0.0, str(item[0]))

        body = []
        for s, v in sorted(per_signer.items(), key=key):
            a, o = _num(v.get("id_orig_anon")), _num(v.get("id_orig_orig_xclip"))
            a_cell = _fmt(a) + (" " + _badge("same person", "bad") if _same(a, kind, threshold) else "")
            o_cell = _fmt(o) + (" " + _badge("not recognized", "warn") if o is not None and threshold is not None
                                and not _same(o, kind, threshold) else "")
            mine = clips_by_signer.get(str(s), [])
            body.append((esc(s), o_cell, a_cell, _fmt(v.get("n_clips")),
                         str(sum(1 for r in mine if r.get("reidentified") is True))))
        out.append(_table(("signer", "Original (id_orig_orig_xclip)", "Anonymized (id_orig_anon)",
                           "clips with a face", "re-identified clips"), body, "num"))
        out.append('<p class="small muted">Sorted most alike first. Original: the signer\'s original clips against '
                   "the signer's other original clips (leave-one-out; – with a single clip). Anonymized: each "
                   "clip's original against its anonymized version, averaged over the signer.</p>")
    else:
        out.append('<p class="muted">Not measured: summary.json has no per-signer table.</p>')
    # re-identification vs chance
    out.append("<h3>Re-identification against the corpus's own signers</h3>")
    if reid.get("n_tested"):
        top1, chance, orig = _num(reid.get("reid_top1")), _num(reid.get("reid_chance")), _num(reid.get("reid_top1_originals"))
        verdict = ""
        if top1 is not None and chance is not None:
            verdict = (_badge("above chance", "bad") if top1 > chance + 1e-9
                       else _badge("at or below chance", "good"))
        out.append(_table(("measure", "value"), [
            ("anonymized clips whose best gallery is their own signer (reid_top1)", f"{_pct(top1)} {verdict}"),
            ("the same test on the original clips (reid_top1_originals)", _pct(orig)),
            ("chance (reid_chance)", _pct(chance)),
            ("clips tested (n_tested)", _fmt(reid.get("n_tested"))),
            ("left out: signer with one clip (n_left_out)", _fmt(reid.get("n_left_out"))),
            ("no face in the original (n_no_face)", _fmt(reid.get("n_no_face"))),
        ], "num"))
        out.append('<p class="small muted">Leave-one-out over the run\'s signers: a low reid_top1 means something '
                   "only when reid_top1_originals is high (the embedder recognizes these signers at all). "
                   "With few tested clips, top-1 moves in steps of 1/n_tested.</p>")
    else:
        note = reid.get("note") or "not measured"
        out.append(f'<p class="muted">Not measured ({esc(note)}).</p>')
    return "".join(out)


def hands_kept(r: dict[str, Any]) -> float | None:
    """One clip's hands kept, in [0, 1]: the share of the original's hand frames where the anonymized
    clip shows the same hand (``hand_lm_recall``) times 1 − ``hand_lm_err`` (clipped to [0, 1]); None
    when the original shows no hand or no hand model ran."""
    recall = _num(r.get("hand_lm_recall"))
    if recall is None:
        return None
    err = _num(r.get("hand_lm_err"))
    return recall * (1.0 - min(1.0, max(0.0, err or 0.0)))


def _hands_kept(rows: list[dict[str, Any]]) -> tuple[str, Any]:
    """The x axis of the trade-off view: (label, value of a row) — ``hands_kept`` where the hand model
    saw a hand in some original, else the older edge heuristic hand_fidelity."""
    if any(hands_kept(r) is not None for r in rows):
        return ("hands kept: hand_lm_recall × (1 − hand_lm_err)", hands_kept)
    return ("hands kept: hand_fidelity (edge F-score; no hand landmarks)", lambda r: _num(r.get("hand_fidelity")))


# The trade-off view's "kept" line on both axes: markers kept where nmm_corr reaches it, hands kept
# where hands_kept does.
KEPT = 0.5


def _quadrant(x: float, y: float) -> str:
    """The trade-off view's name for a clip at hands kept ``x`` and markers kept ``y``."""
    if y >= KEPT:
        return "both kept" if x >= KEPT else "hands lost, markers kept"
    return "markers lost, hands kept" if x >= KEPT else "both lost"


def _svg_tradeoff(rows: list[dict[str, Any]], width: int = 400, height: int = 320) -> str:
    """One dot per clip: facial markers kept (``nmm_corr``, y) against hands kept (x), the four
    quadrants split at ``KEPT`` named with their clip counts and tinted (green: both kept; red: both
    lost), the median clip marked with a cross, and a caption that says in words where the median clip
    lies, so a pass that keeps hands and loses the face (pixelation) reads at a glance."""
    xlabel, xval = _hands_kept(rows)
    pts = [(xval(r), _num(r.get("nmm_corr")), r) for r in rows]
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
        counts[_quadrant(x, y)] += 1
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
                     f'<title>{esc(r.get("clip_id"))}: nmm_corr {_fmt(y)}, hands {_fmt(x)}</title></circle>')
    mx = statistics.median(x for x, _, _ in pts)
    my = statistics.median(y for _, y, _ in pts)
    cx, cy = X(mx), Y(my)
    cross = f"M{cx - 8:.1f} {cy:.1f}H{cx + 8:.1f}M{cx:.1f} {cy - 8:.1f}V{cy + 8:.1f}"
    parts.append(f'<path d="{cross}" stroke="#fff" stroke-width="5"/>'
                 f'<path d="{cross}" stroke="#111" stroke-width="2.5"><title>median clip: nmm_corr {_fmt(my)}, '
                 f'hands {_fmt(mx)}</title></path>'
                 f'<text x="{cx + (10 if mx < 0.75 else -10):.1f}" y="{cy - 6:.1f}" class="a" '
                 f'text-anchor="{"start" if mx < 0.75 else "end"}" font-weight="600" stroke="#fff" stroke-width="3" '
                 f'paint-order="stroke">median</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 5}" class="a" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text transform="translate(12 {mt + ph / 2:.1f}) rotate(-90)" class="a" text-anchor="middle">'
                 f'facial markers kept (nmm_corr)</text></svg>')
    headline = f"The median clip: {_quadrant(mx, my)} (markers kept {_fmt(my)}, hands kept {_fmt(mx)})."
    detail = (f"{len(pts)} clips: " + "; ".join(f"{n} {q}" for q, n in sorted(counts.items(), key=lambda c: -c[1])
                                                 if n) + f" (kept = at least {KEPT:g} on its axis).")
    return (f'<figure style="max-width:{width}px">{"".join(parts)}<figcaption><b>{esc(headline)}</b> '
            f'{esc(detail)}</figcaption></figure>')


def _landmark_notes(rows: list[dict[str, Any]]) -> str:
    """Why landmark columns are empty, counted over the clips (``landmark_note``, ``nmm_static``)."""
    notes: dict[str, int] = {}
    for r in rows:
        for n in str(r.get("landmark_note") or "").split("; "):
            if n:
                notes[n] = notes.get(n, 0) + 1
    static = sum(1 for r in rows
                 if r.get("nmm_static") and _num(r.get("nmm_corr")) is None and _num(r.get("nmm_frames")))
    if static:
        notes["every marker series of the original is static (no movement to agree with)"] = static
    if not notes:
        return ""
    return ('<p class="small muted">Landmark fidelity: '
            + esc("; ".join(f"{n} ({k} clip{'s' if k != 1 else ''})" for n, k in sorted(notes.items()))) + ".</p>")


def _section_fidelity(rows: list[dict[str, Any]]) -> str:
    figs, body = [], []
    tradeoff = _svg_tradeoff(rows)
    if tradeoff:
        figs.append(tradeoff)
    for col, meaning, ref in FIDELITY:
        vals = [f for f in (_num(r.get(col)) for r in rows) if f is not None]
        if vals:
            lines = [(ref, f"{ref:.1f}", "#2f855a")] if ref is not None else []
            figs.append(_svg_hist([(col, vals, C_ANON)], lines=lines, width=360, height=160, bins=20,
                                  title=col, note=meaning))
    for col in STATS_COLUMNS:
        d = _dist(r.get(col) for r in rows)
        if d:
            body.append((f"<code>{esc(col)}</code>", str(d["n"]), _fmt(d["min"]), _fmt(d["p10"]), _fmt(d["median"]),
                         _fmt(d["mean"]), _fmt(d["max"])))
    if not figs and not body:
        return '<p class="muted">Expression and hand fidelity: not measured (faces.backend: none).</p>'
    out = "".join(figs) + _landmark_notes(rows)
    if body:
        out += _table(("metric", "n", "min", "p10", "median", "mean", "max"), body, "num")
    missing = [c for c, _, _ in FIDELITY if not any(_num(r.get(c)) is not None for r in rows)
               and (c in ("expr_fidelity", "hand_fidelity", "warp_error") or any("landmark_frames" in r for r in rows))]
    if missing:
        out += f'<p class="small muted">Not measured: {esc(", ".join(missing))}.</p>'
    return out


def _svg_series(series: dict[str, Any], name: str, label: str, width: int = 220, height: int = 70) -> str:
    """A small chart of one marker series over the clip: the original's (orange) and the anonymized
    (blue) values at the measured frames, gaps where a mesh is missing."""
    frames = [int(t) for t in series.get("frames") or []]
    o = (series.get("orig") or {}).get(name) or []
    a = (series.get("anon") or {}).get(name) or []
    vals = [v for v in (*o, *a) if _num(v) is not None]
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
            if _num(v) is None:
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


def _marker_panel(r: dict[str, Any]) -> str:
    """The clip's linguistic-fidelity panel: brow raise and mouth opening over the clip, original vs
    anonymized, and the agreement numbers; empty when the clip was measured without landmarks."""
    from corpus_anon.actor.metrics import parse_nmm_series

    nums = []
    if _num(r.get("landmark_frames")):
        nums.append(esc(f'markers kept {_fmt(r.get("nmm_corr"))} (brow {_fmt(r.get("nmm_brow_corr"))}, mouth '
                        f'{_fmt(r.get("nmm_mouth_corr"))})') + "<br>"
                    + esc(f'same hand on {_fmt(r.get("hand_lm_frames"))} of {_fmt(r.get("hand_frames_orig"))} hand '
                          f'frames, error {_fmt(r.get("hand_lm_err"))} hand sizes · as many hands as the original on '
                          f'{_pct(r.get("hand_presence_agree"))} of frames'))
    series = parse_nmm_series(r.get("nmm_series"))
    charts = ""
    if series:
        charts = (_svg_series(series, "brow_raise", "brow raise") + _svg_series(series, "mouth_open", "mouth opening"))
    if not nums and not charts:
        return ""
    key = (f'<span class="key" style="background:{C_ORIG}"></span>original'
           f'<span class="key" style="background:{C_ANON}"></span>anonymized') if charts else ""
    return f'<div class="small">{nums[0] if nums else ""}<br>{charts}<br>{key}</div>'


def _clip_card(r: dict[str, Any], variants: Sequence[tuple[str, str]], thumbs: dict[str, tuple[list[bytes | None], str | None]],
               label: str, base_dir: str | None, alarm: bool) -> str:
    cols = len(variants)
    cells = ['<div></div>'] + [f'<div class="h">{esc(name)}</div>' for name, _ in variants]
    for k, f in enumerate(FRACTIONS):
        cells.append(f'<div class="tl">{int(round(100 * f))} %</div>')
        for _, col in variants:
            imgs, why = thumbs.get(col, ([], "not produced"))
            b = imgs[k] if k < len(imgs) else None
            if b:
                cells.append(f'<img alt="{esc(col)} at {int(round(100 * f))} %" '
                             f'src="data:image/jpeg;base64,{base64.b64encode(b).decode("ascii")}">')
            else:
                cells.append(f'<div class="ph">{esc(why or "no frame here")}</div>')
    score = _fmt(r.get("id_orig_anon"))
    meta = (f'{_status(r)} {_flags(r)}<br><span class="small">signer {esc(r.get("signer_id"))} · '
            f'id_orig_anon {score} · match rate {_fmt(r.get("id_match_rate"))} · expr {_fmt(r.get("expr_fidelity"))} · '
            f'hand {_fmt(r.get("hand_fidelity"))}</span><br><span class="small">'
            f'{_link(r.get("video_uri"), base_dir, "original")} · {_link(r.get("output_uri"), base_dir, "anonymized")}'
            + (f' · {_link(r.get(UNENHANCED_COLUMN), base_dir, "no enhancement")}' if r.get(UNENHANCED_COLUMN) else "")
            + "</span>")
    return (f'<div class="card{" alarm" if alarm else ""}"><h4>{esc(label)} {esc(r.get("clip_id"))}</h4>{meta}'
            f'<div class="grid" style="grid-template-columns:auto repeat({cols},auto)">{"".join(cells)}</div>'
            f'{_marker_panel(r)}</div>')


def _alarm(r: dict[str, Any], kind: str | None, threshold: float | None) -> bool:
    """Leak, re-identified, or a mean score on the same-person side of the threshold."""
    return (r.get("status") == "leak" or r.get("leak") is True or r.get("reidentified") is True or _exposed(r) > 0
            or (kind is not None and _same(_num(r.get("id_orig_anon")), kind, threshold)))


def _pick(rows: list[dict[str, Any]], kind: str | None, max_embedded: int,
          seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(worst clips: exposed frames first, then by identity score; a seeded random sample of the
    other clips with an output)."""
    with_output = [r for r in rows if r.get("output_uri")]
    worst: list[dict[str, Any]] = []
    if kind is not None:
        scored = [r for r in with_output if _num(r.get("id_orig_anon")) is not None or _exposed(r)]
        sign = 1.0 if kind == "euclidean" else -1.0
        # Clips with exposed frames first (most first), then by the signer's mean score.
        scored.sort(key=lambda r: (-_exposed(r), sign * (_num(r.get("id_orig_anon")) or 0.0), str(r.get("clip_id"))))
        worst = scored[:max_embedded]
    taken = {id(r) for r in worst}
    rest = sorted((r for r in with_output if id(r) not in taken), key=lambda r: str(r.get("clip_id")))
    sample = random.Random(seed).sample(rest, min(max_embedded, len(rest)))
    sample.sort(key=lambda r: str(r.get("clip_id")))
    return worst, sample


def _clip_thumbs(storage: Storage, r: dict[str, Any], variants: Sequence[tuple[str, str]],
                 height: int) -> dict[str, tuple[list[bytes | None], str | None]]:
    start = _num(r.get("start_s")) or 0.0
    end = _num(r.get("end_s"))
    length = _num(r.get("duration_s"))
    if length is None and end is not None:
        length = max(0.0, end - start)
    out = {}
    for _, col in variants:
        offset = start if col == "video_uri" else 0.0
        out[col] = _thumbs(storage, r.get(col), offset, length, height)
    return out


def _models_line(rows: list[dict[str, Any]]) -> str | None:
    profiles = sorted({str(r["models_profile"]) for r in rows if r.get("models_profile")})
    if not profiles:
        return None
    modes = sorted({str(r["diffusion_mode"]) for r in rows if r.get("diffusion_mode")})
    text = esc(", ".join(profiles)) + (f" ({esc(', '.join(modes))})" if modes else "")
    if "tiny" in profiles:
        text += " " + _badge("tiny profile: random weights, the anonymized pictures are noise", "warn")
    return text


def render_report(rows: list[dict[str, Any]], summary: dict[str, Any], layout: RunLayout, *,
                  thumbs: dict[int, dict[str, tuple[list[bytes | None], str | None]]],
                  worst: list[dict[str, Any]], sample: list[dict[str, Any]], variants: Sequence[tuple[str, str]],
                  kind: str | None, threshold: float | None, backend: str | None, seed: int = 0) -> str:
    base_dir = _local_dir(layout.root)
    reid = summary.get("reid") or {}
    anonymizer = summary.get("anonymizer") or next((r.get("anonymizer") for r in rows if r.get("anonymizer")), None)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
             f"<title>corpus-anon run {esc(layout.cfg_fp)} — private review report</title>"
             f"<style>{CSS % {'h': THUMB_HEIGHT, 'phw': THUMB_HEIGHT}}</style></head><body><main>"]
    parts.append(f"<h1>Run {esc(layout.cfg_fp)} — review before release</h1>")
    parts.append('<div class="private"><b>Private — do not publish or attach to a release.</b> This page shows '
                 "original faces, source clip ids and signer ids. Keep it with the run's other private files "
                 "(records, tracks, embeddings).</div>")
    info = [("folder", f"<code>{esc(layout.root)}</code>"), ("anonymizer", esc(anonymizer or "unknown"))]
    models = _models_line(rows)
    if models:
        info.append(("models", models))
    info += [("face backend", esc(backend or "none")),
             ("finished", esc(summary.get("finished_at") or "unknown")),
             ("report written", esc(now_iso()) + f" by corpus-anon {esc(__version__)}")]
    parts.append(_table(("run", "value"), info))
    parts.append('<nav class="small"><a href="#status">status</a><a href="#identity">identity</a>'
                 '<a href="#fidelity">fidelity</a><a href="#sheet">contact sheet</a>'
                 '<a href="#failures">failures</a><a href="#clips">all other clips</a></nav>')
    measured = kind is not None
    parts.append('<h2 id="status">What the run settled</h2>' + _section_facts(rows, summary, measured))
    parts.append('<h2 id="identity">Identity</h2>' + _section_exposure(rows, summary)
                 + _section_identity(rows, reid, kind, threshold, backend))
    parts.append('<h2 id="fidelity">Facial markers, hands and stability</h2>' + _section_fidelity(rows))

    # contact sheet
    parts.append('<h2 id="sheet">Contact sheet</h2>')
    panels = ""
    if any(_num(r.get("landmark_frames")) for r in rows):
        panels = (" Each card's marker panel (brow raise and mouth opening over the clip, original vs "
                  "anonymized, and its hand agreement) is drawn for the clips of this sheet only; the other "
                  "clips' series are in the metrics table's nmm_series column.")
    parts.append(f'<p class="small muted">Frames at 1/6, 1/2 and 5/6 of each clip, {THUMB_HEIGHT} px high; columns: '
                 + " | ".join(esc(n) for n, _ in variants) + "." + esc(panels) + "</p>")
    if worst:
        direction = "lowest" if kind == "euclidean" else "highest"
        first = "exposed clips, then " if any(_exposed(r) for r in worst) else ""
        parts.append(f"<h3>The {len(worst)} clips most alike their original ({first}{direction} id_orig_anon first)</h3>")
        parts.append('<div class="cards">' + "".join(
            _clip_card(r, variants, thumbs.get(id(r), {}), f"#{i + 1}", base_dir, _alarm(r, kind, threshold))
            for i, r in enumerate(worst)) + "</div>")
    elif not measured:
        parts.append('<p class="muted">No ranking by identity: not measured.</p>')
    if sample:
        noun = "clip" if len(sample) == 1 else "clips"
        parts.append(f"<h3>A random sample of {len(sample)} other {noun} (seed {seed})</h3>")
        parts.append('<div class="cards">' + "".join(
            _clip_card(r, variants, thumbs.get(id(r), {}), "", base_dir, _alarm(r, kind, threshold))
            for r in sample) + "</div>")
    if not worst and not sample:
        parts.append('<p class="muted">No clip has an anonymized output.</p>')

    # failures
    bad = [r for r in rows if r.get("status") != "ok"]
    parts.append(f'<h2 id="failures">Not ok ({len(bad)})</h2>')
    if bad:
        def why(r: dict[str, Any]) -> str:
            if r.get("error"):
                return esc(r["error"])
            if r.get("status") == "leak":
                reasons = []
                if _exposed(r):
                    reasons.append(f"exposure check: an original face is still recognizable on {_exposed(r)} "
                                   f"frame(s), longest run {_fmt(r.get('max_exposed_run'))}")
                reasons.append(f"identity gate: id_mean_score {_fmt(r.get('id_mean_score'))}, "
                               f"match rate {_fmt(r.get('id_match_rate'))}")
                return esc("; ".join(reasons))
            return "–"
        parts.append(_table(("clip_id", "status", "attempts", "error"),
                            ((esc(r.get("clip_id")), _status(r), _fmt(r.get("attempts")), why(r)) for r in bad)))
    else:
        parts.append('<p class="muted">Every clip is ok.</p>')

    # everything else
    shown = {id(r) for r in worst} | {id(r) for r in sample}
    rest = [r for r in rows if id(r) not in shown]
    if kind is not None:
        sign = 1.0 if kind == "euclidean" else -1.0
        rest.sort(key=lambda r: (_num(r.get("id_orig_anon")) is None, sign * (_num(r.get("id_orig_anon")) or 0.0),
                                 str(r.get("clip_id"))))
    else:
        rest.sort(key=lambda r: str(r.get("clip_id")))
    parts.append(f'<h2 id="clips">All other clips ({len(rest)})</h2>')
    if not rest:
        parts.append('<p class="muted">None: every clip is in the contact sheet above.</p>')
    else:
        order = "most alike their original first" if kind is not None else "by clip id"
        parts.append(f'<p class="small muted">Not embedded; {order}. Links are relative to this file for local '
                     "outputs, the URI otherwise.</p>")
        parts.append(_table(
            ("clip_id", "signer", "status", "id_orig_anon", "match", "markers", "hand lm", "expr", "hand", "warp",
             "flags", "clip", "original"),
            ((esc(r.get("clip_id")), esc(r.get("signer_id")), esc(r.get("status")), _fmt(r.get("id_orig_anon")),
              _fmt(r.get("id_match_rate")), _fmt(r.get("nmm_corr")), _fmt(r.get("hand_lm_err")),
              _fmt(r.get("expr_fidelity")), _fmt(r.get("hand_fidelity")),
              _fmt(r.get("warp_error")), _flags(r), _link(r.get("output_uri"), base_dir, "clip"),
              _link(r.get("video_uri"), base_dir, "original")) for r in rest), "num", compact=True))
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_report(storage: Storage, layout: RunLayout, *, max_embedded: int = 12, seed: int = 0,
                 threads: int = 4, thumb_height: int = THUMB_HEIGHT) -> str:
    """Write `{run}/report.html` from the run's metrics table and summary; return its URI.

    Embeds thumbnails of at most `max_embedded` worst clips by identity score plus `max_embedded`
    seeded random others; an unreadable source becomes a placeholder tile. Never reads embeddings."""
    rows = _read_rows(storage, layout)
    summary = _read_json(storage, layout.summary)
    reid = summary.get("reid") or {}
    kind = reid.get("id_score_kind") or next((str(r["id_score_kind"]) for r in rows if r.get("id_score_kind")), None)
    if kind is not None and not any(_num(r.get("id_orig_anon")) is not None for r in rows) and not reid.get("n_tested"):
        kind = None
    threshold = _num(reid.get("id_threshold"))
    if threshold is None:
        threshold = next((_num(r.get("id_threshold")) for r in rows if _num(r.get("id_threshold")) is not None), None)
    backend = _face_backend(storage, layout, rows)
    worst, sample = _pick(rows, kind, max(0, int(max_embedded)), seed)
    variants = [("original", "video_uri"), ("anonymized", "output_uri")]
    if any(r.get(UNENHANCED_COLUMN) for r in rows):
        variants.append(("anonymized, no face enhancement", UNENHANCED_COLUMN))
    embedded = worst + sample
    with ThreadPoolExecutor(max(1, min(threads, len(embedded) or 1))) as pool:
        got = list(pool.map(lambda r: _clip_thumbs(storage, r, variants, thumb_height), embedded))
    thumbs = {id(r): t for r, t in zip(embedded, got)}
    page = render_report(rows, summary, layout, thumbs=thumbs, worst=worst, sample=sample, variants=variants,
                         kind=kind, threshold=threshold, backend=backend, seed=seed)
    uri = report_uri(layout)
    storage.write_text(uri, page)
    log.info("report: %s (%d bytes, %d clips embedded)", uri, len(page.encode("utf-8")), len(embedded))
    return uri


__all__ = ["REPORT_NAME", "UNENHANCED_COLUMN", "render_report", "report_uri", "write_report"]
