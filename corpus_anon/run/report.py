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
import io
import json
import logging
import random
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from corpus_anon import __version__
from corpus_anon.io.records import RunLayout, now_iso
from corpus_anon.io.storage import Storage, join
from corpus_anon.run.charts import svg_hist, svg_series, svg_tradeoff
from corpus_anon.run.html import C_ANON, C_BAD, C_ORIG, badge, esc, fmt, html_table, link, local_dir, num, pct
from corpus_anon.run.thumbs import FRACTIONS, THUMB_HEIGHT, clip_thumbs

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# The anonymized clip without face enhancement (the paper's ablation), when a run writes one.
UNENHANCED_COLUMN = "output_uri_unenhanced"
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


def report_uri(layout: RunLayout) -> str:
    return join(layout.root, REPORT_NAME)


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


def _unchecked(r: dict[str, Any]) -> bool:
    """An anonymized clip whose identity was not measured because no face was found in its original."""
    return bool(r.get("output_uri")) and "id_orig_anon" in r and num(r.get("id_orig_anon")) is None


def _exposed(r: dict[str, Any]) -> int:
    """Frames of the clip where the exposure check found an original face still recognizable."""
    return int(num(r.get("exposed_frames")) or 0)


def _flags(r: dict[str, Any]) -> str:
    out = []
    if r.get("status") == "leak" or r.get("leak") is True:
        out.append(badge("leak", "bad"))
    n = _exposed(r)
    if n:
        out.append(badge(f"exposed on {n} frame{'s' if n != 1 else ''}", "bad"))
    if r.get("exposure_covered") is False:
        out.append(badge("exposure check incomplete", "warn"))
    if r.get("reidentified") is True:
        out.append(badge("re-identified", "bad"))
    if r.get("face_lost") is True:
        out.append(badge("face lost", "warn"))
    if _unchecked(r):
        out.append(badge("no face found in the original", "warn"))
    if num(r.get("seed_attempt")):
        out.append(badge(f"re-seeded ×{int(num(r.get('seed_attempt')))}"))
    return " ".join(out)


def _status(r: dict[str, Any]) -> str:
    s = str(r.get("status") or "unknown")
    return badge(s, {"ok": "good", "leak": "bad", "error": "bad"}.get(s, "warn"))


def _dist(values: Iterable[Any]) -> dict[str, float] | None:
    xs = sorted(f for f in (num(v) for v in values) if f is not None)
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
            + html_table(("status", "clips"), status_rows))


def _exposure_counts(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `exposure` counts when the run wrote them, else counted from the rows."""
    from corpus_anon.run.summaries import summary_counts

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
    out.append(html_table(("exposure check", "value"), [
        ("clips checked", fmt(ex["clips_checked"])),
        ("original faces tracked, all clips (faces_tracked)", fmt(ex["faces_tracked"])),
        ("clips with exposed frames", fmt(ex["clips_exposed"]) + (" " + badge("leak", "bad") if ex["clips_exposed"]
                                                                  else " " + badge("none", "good"))),
        ("exposed frames, all clips (exposed_frames)", fmt(ex["exposed_frames"])),
        ("clips where some face was not checked within gate.max_gap_frames", fmt(ex["clips_not_covered"])),
    ], "num"))
    exposed = sorted((r for r in rows if _exposed(r)), key=lambda r: (-_exposed(r), str(r.get("clip_id"))))
    if exposed:
        out.append(html_table(("clip_id", "signer", "status", "exposed frames", "longest run", "faces tracked",
                               "frames checked"),
                              ((esc(r.get("clip_id")), esc(r.get("signer_id")), _status(r), fmt(r.get("exposed_frames")),
                                fmt(r.get("max_exposed_run")), fmt(r.get("faces_tracked")), fmt(r.get("frames_checked")))
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
    anon = [f for f in (num(r.get("id_orig_anon")) for r in rows) if f is not None]
    per_signer = reid.get("per_signer") or {}
    xclip = [f for f in (num(v.get("id_orig_orig_xclip")) for v in per_signer.values()) if f is not None]
    lines = [(threshold, f"threshold {threshold:g}", C_BAD)] if threshold is not None else []
    shade = None
    if threshold is not None:
        shade = (-1e9, threshold) if lower else (threshold, 1e9)
    out.append(svg_hist(
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
            v = num(item[1].get("id_orig_anon"))
            return (v is None, (v if lower else -v) if v is not None else 0.0, str(item[0]))

        body = []
        for s, v in sorted(per_signer.items(), key=key):
            a, o = num(v.get("id_orig_anon")), num(v.get("id_orig_orig_xclip"))
            a_cell = fmt(a) + (" " + badge("same person", "bad") if _same(a, kind, threshold) else "")
            o_cell = fmt(o) + (" " + badge("not recognized", "warn") if o is not None and threshold is not None
                               and not _same(o, kind, threshold) else "")
            mine = clips_by_signer.get(str(s), [])
            body.append((esc(s), o_cell, a_cell, fmt(v.get("n_clips")),
                         str(sum(1 for r in mine if r.get("reidentified") is True))))
        out.append(html_table(("signer", "Original (id_orig_orig_xclip)", "Anonymized (id_orig_anon)",
                               "clips with a face", "re-identified clips"), body, "num"))
        out.append('<p class="small muted">Sorted most alike first. Original: the signer\'s original clips against '
                   "the signer's other original clips (leave-one-out; – with a single clip). Anonymized: each "
                   "clip's original against its anonymized version, averaged over the signer.</p>")
    else:
        out.append('<p class="muted">Not measured: summary.json has no per-signer table.</p>')
    # re-identification vs chance
    out.append("<h3>Re-identification against the corpus's own signers</h3>")
    if reid.get("n_tested"):
        top1, chance, orig = num(reid.get("reid_top1")), num(reid.get("reid_chance")), num(reid.get("reid_top1_originals"))
        verdict = ""
        if top1 is not None and chance is not None:
            verdict = (badge("above chance", "bad") if top1 > chance + 1e-9
                       else badge("at or below chance", "good"))
        out.append(html_table(("measure", "value"), [
            ("anonymized clips whose best gallery is their own signer (reid_top1)", f"{pct(top1)} {verdict}"),
            ("the same test on the original clips (reid_top1_originals)", pct(orig)),
            ("chance (reid_chance)", pct(chance)),
            ("clips tested (n_tested)", fmt(reid.get("n_tested"))),
            ("left out: signer with one clip (n_left_out)", fmt(reid.get("n_left_out"))),
            ("no face in the original (n_no_face)", fmt(reid.get("n_no_face"))),
        ], "num"))
        out.append('<p class="small muted">Leave-one-out over the run\'s signers: a low reid_top1 means something '
                   "only when reid_top1_originals is high (the embedder recognizes these signers at all). "
                   "With few tested clips, top-1 moves in steps of 1/n_tested.</p>")
    else:
        note = reid.get("note") or "not measured"
        out.append(f'<p class="muted">Not measured ({esc(note)}).</p>')
    return "".join(out)


def _landmark_notes(rows: list[dict[str, Any]]) -> str:
    """Why landmark columns are empty, counted over the clips (``landmark_note``, ``nmm_static``)."""
    notes: dict[str, int] = {}
    for r in rows:
        for n in str(r.get("landmark_note") or "").split("; "):
            if n:
                notes[n] = notes.get(n, 0) + 1
    static = sum(1 for r in rows
                 if r.get("nmm_static") and num(r.get("nmm_corr")) is None and num(r.get("nmm_frames")))
    if static:
        notes["every marker series of the original is static (no movement to agree with)"] = static
    if not notes:
        return ""
    return ('<p class="small muted">Landmark fidelity: '
            + esc("; ".join(f"{n} ({k} clip{'s' if k != 1 else ''})" for n, k in sorted(notes.items()))) + ".</p>")


def _section_fidelity(rows: list[dict[str, Any]]) -> str:
    figs, body = [], []
    tradeoff = svg_tradeoff(rows)
    if tradeoff:
        figs.append(tradeoff)
    for col, meaning, ref in FIDELITY:
        vals = [f for f in (num(r.get(col)) for r in rows) if f is not None]
        if vals:
            lines = [(ref, f"{ref:.1f}", "#2f855a")] if ref is not None else []
            figs.append(svg_hist([(col, vals, C_ANON)], lines=lines, width=360, height=160, bins=20,
                                 title=col, note=meaning))
    for col in STATS_COLUMNS:
        d = _dist(r.get(col) for r in rows)
        if d:
            body.append((f"<code>{esc(col)}</code>", str(d["n"]), fmt(d["min"]), fmt(d["p10"]), fmt(d["median"]),
                         fmt(d["mean"]), fmt(d["max"])))
    if not figs and not body:
        return '<p class="muted">Expression and hand fidelity: not measured (faces.backend: none).</p>'
    out = "".join(figs) + _landmark_notes(rows)
    if body:
        out += html_table(("metric", "n", "min", "p10", "median", "mean", "max"), body, "num")
    missing = [c for c, _, _ in FIDELITY if not any(num(r.get(c)) is not None for r in rows)
               and (c in ("expr_fidelity", "hand_fidelity", "warp_error") or any("landmark_frames" in r for r in rows))]
    if missing:
        out += f'<p class="small muted">Not measured: {esc(", ".join(missing))}.</p>'
    return out


def _marker_panel(r: dict[str, Any]) -> str:
    """The clip's linguistic-fidelity panel: brow raise and mouth opening over the clip, original vs
    anonymized, and the agreement numbers; empty when the clip was measured without landmarks."""
    from corpus_anon.run.summaries import parse_nmm_series

    nums = []
    if num(r.get("landmark_frames")):
        nums.append(esc(f'markers kept {fmt(r.get("nmm_corr"))} (brow {fmt(r.get("nmm_brow_corr"))}, mouth '
                        f'{fmt(r.get("nmm_mouth_corr"))})') + "<br>"
                    + esc(f'same hand on {fmt(r.get("hand_lm_frames"))} of {fmt(r.get("hand_frames_orig"))} hand '
                          f'frames, error {fmt(r.get("hand_lm_err"))} hand sizes · as many hands as the original on '
                          f'{pct(r.get("hand_presence_agree"))} of frames'))
    series = parse_nmm_series(r.get("nmm_series"))
    charts = ""
    if series:
        charts = (svg_series(series, "brow_raise", "brow raise") + svg_series(series, "mouth_open", "mouth opening"))
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
    score = fmt(r.get("id_orig_anon"))
    meta = (f'{_status(r)} {_flags(r)}<br><span class="small">signer {esc(r.get("signer_id"))} · '
            f'id_orig_anon {score} · match rate {fmt(r.get("id_match_rate"))} · expr {fmt(r.get("expr_fidelity"))} · '
            f'hand {fmt(r.get("hand_fidelity"))}</span><br><span class="small">'
            f'{link(r.get("video_uri"), base_dir, "original")} · {link(r.get("output_uri"), base_dir, "anonymized")}'
            + (f' · {link(r.get(UNENHANCED_COLUMN), base_dir, "no enhancement")}' if r.get(UNENHANCED_COLUMN) else "")
            + "</span>")
    return (f'<div class="card{" alarm" if alarm else ""}"><h4>{esc(label)} {esc(r.get("clip_id"))}</h4>{meta}'
            f'<div class="grid" style="grid-template-columns:auto repeat({cols},auto)">{"".join(cells)}</div>'
            f'{_marker_panel(r)}</div>')


def _alarm(r: dict[str, Any], kind: str | None, threshold: float | None) -> bool:
    """Leak, re-identified, or a mean score on the same-person side of the threshold."""
    return (r.get("status") == "leak" or r.get("leak") is True or r.get("reidentified") is True or _exposed(r) > 0
            or (kind is not None and _same(num(r.get("id_orig_anon")), kind, threshold)))


def _pick(rows: list[dict[str, Any]], kind: str | None, max_embedded: int,
          seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(worst clips: exposed frames first, then by identity score; a seeded random sample of the
    other clips with an output)."""
    with_output = [r for r in rows if r.get("output_uri")]
    worst: list[dict[str, Any]] = []
    if kind is not None:
        scored = [r for r in with_output if num(r.get("id_orig_anon")) is not None or _exposed(r)]
        sign = 1.0 if kind == "euclidean" else -1.0
        # Clips with exposed frames first (most first), then by the signer's mean score.
        scored.sort(key=lambda r: (-_exposed(r), sign * (num(r.get("id_orig_anon")) or 0.0), str(r.get("clip_id"))))
        worst = scored[:max_embedded]
    taken = {id(r) for r in worst}
    rest = sorted((r for r in with_output if id(r) not in taken), key=lambda r: str(r.get("clip_id")))
    sample = random.Random(seed).sample(rest, min(max_embedded, len(rest)))
    sample.sort(key=lambda r: str(r.get("clip_id")))
    return worst, sample


def _models_line(rows: list[dict[str, Any]]) -> str | None:
    profiles = sorted({str(r["models_profile"]) for r in rows if r.get("models_profile")})
    if not profiles:
        return None
    modes = sorted({str(r["diffusion_mode"]) for r in rows if r.get("diffusion_mode")})
    text = esc(", ".join(profiles)) + (f" ({esc(', '.join(modes))})" if modes else "")
    if "tiny" in profiles:
        text += " " + badge("tiny profile: random weights, the anonymized pictures are noise", "warn")
    return text


def render_report(rows: list[dict[str, Any]], summary: dict[str, Any], layout: RunLayout, *,
                  thumbs: dict[int, dict[str, tuple[list[bytes | None], str | None]]],
                  worst: list[dict[str, Any]], sample: list[dict[str, Any]], variants: Sequence[tuple[str, str]],
                  kind: str | None, threshold: float | None, backend: str | None, seed: int = 0) -> str:
    base_dir = local_dir(layout.root)
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
    parts.append(html_table(("run", "value"), info))
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
    if any(num(r.get("landmark_frames")) for r in rows):
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
                                   f"frame(s), longest run {fmt(r.get('max_exposed_run'))}")
                reasons.append(f"identity gate: id_mean_score {fmt(r.get('id_mean_score'))}, "
                               f"match rate {fmt(r.get('id_match_rate'))}")
                return esc("; ".join(reasons))
            return "–"
        parts.append(html_table(("clip_id", "status", "attempts", "error"),
                                ((esc(r.get("clip_id")), _status(r), fmt(r.get("attempts")), why(r)) for r in bad)))
    else:
        parts.append('<p class="muted">Every clip is ok.</p>')

    # everything else
    shown = {id(r) for r in worst} | {id(r) for r in sample}
    rest = [r for r in rows if id(r) not in shown]
    if kind is not None:
        sign = 1.0 if kind == "euclidean" else -1.0
        rest.sort(key=lambda r: (num(r.get("id_orig_anon")) is None, sign * (num(r.get("id_orig_anon")) or 0.0),
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
        parts.append(html_table(
            ("clip_id", "signer", "status", "id_orig_anon", "match", "markers", "hand lm", "expr", "hand", "warp",
             "flags", "clip", "original"),
            ((esc(r.get("clip_id")), esc(r.get("signer_id")), esc(r.get("status")), fmt(r.get("id_orig_anon")),
              fmt(r.get("id_match_rate")), fmt(r.get("nmm_corr")), fmt(r.get("hand_lm_err")),
              fmt(r.get("expr_fidelity")), fmt(r.get("hand_fidelity")),
              fmt(r.get("warp_error")), _flags(r), link(r.get("output_uri"), base_dir, "clip"),
              link(r.get("video_uri"), base_dir, "original")) for r in rest), "num", compact=True))
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
    if kind is not None and not any(num(r.get("id_orig_anon")) is not None for r in rows) and not reid.get("n_tested"):
        kind = None
    threshold = num(reid.get("id_threshold"))
    if threshold is None:
        threshold = next((num(r.get("id_threshold")) for r in rows if num(r.get("id_threshold")) is not None), None)
    backend = _face_backend(storage, layout, rows)
    worst, sample = _pick(rows, kind, max(0, int(max_embedded)), seed)
    variants = [("original", "video_uri"), ("anonymized", "output_uri")]
    if any(r.get(UNENHANCED_COLUMN) for r in rows):
        variants.append(("anonymized, no face enhancement", UNENHANCED_COLUMN))
    embedded = worst + sample
    with ThreadPoolExecutor(max(1, min(threads, len(embedded) or 1))) as pool:
        got = list(pool.map(lambda r: clip_thumbs(storage, r, variants, thumb_height), embedded))
    thumbs = {id(r): t for r, t in zip(embedded, got)}
    page = render_report(rows, summary, layout, thumbs=thumbs, worst=worst, sample=sample, variants=variants,
                         kind=kind, threshold=threshold, backend=backend, seed=seed)
    uri = report_uri(layout)
    storage.write_text(uri, page)
    log.info("report: %s (%d bytes, %d clips embedded)", uri, len(page.encode("utf-8")), len(embedded))
    return uri


__all__ = ["REPORT_NAME", "UNENHANCED_COLUMN", "render_report", "report_uri", "write_report"]
