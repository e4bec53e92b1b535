"""Corpus-level summaries the driver writes into a run's summary.json and report: the exposure check's
counts, the linguistic-fidelity medians, and the leave-one-out re-identification test over the corpus's
own signers (``leave_one_out_reid``). They read the per-clip metrics the actors wrote
(``corpus_anon.actor.metrics``, ``corpus_anon.actor.exposure``); numpy only at import, the face-embedding
rules (``models.faces``) inside the function that needs them."""

from __future__ import annotations

import logging
import json
import math
from collections.abc import Hashable, Sequence
from typing import Any, Iterable

import numpy as np


log = logging.getLogger(__name__)


def leave_one_out_reid(items: list[dict[str, Any]], kind: str,
                       threshold: float) -> tuple[dict[str, Any], dict[str, bool]]:
    """Corpus-level re-identification: can an anonymized clip be matched to its signer?

    Each item has ``clip_id``, ``signer_id``, ``orig`` (D,) mean original embedding (None without a
    face) and ``anon`` (D,) mean anonymized embedding (None exactly when ``orig`` is). For a query
    clip q of signer s, the gallery of each signer is ``faces.mean_embedding`` of that signer's
    original clip embeddings other than q (so q is never in its own gallery); q is tested only
    when s has another clip, else it is left out (``n_left_out``). Closed-set identification picks
    the most alike gallery (max cosine / min distance). Returns the summary

    - ``reid_top1``: fraction of tested clips whose anonymized embedding picks their own signer;
    - ``reid_top1_originals``: the same with the original embedding as query (the embedder's sanity
      check: near 1 means it recognizes these signers, so a low ``reid_top1`` means something);
    - ``reid_chance``: mean over tested clips of 1 / number of galleries (signers with a face);
    - ``n_tested``, ``n_left_out``, ``n_no_face`` (clips without an original embedding);
    - ``per_signer[signer_id]``: ``id_orig_orig_xclip`` (mean score of the signer's clips' originals
      vs their leave-one-out gallery; None with one clip), ``id_orig_anon`` (mean score of each
      clip's original vs its anonymized embedding), ``n_clips`` (clips with an original face);

    and per clip_id ``reidentified``: True only when the clip's own signer wins AND
    ``faces.same_person_rule`` accepts that score — top-1 alone would flag about 1 / #signers of
    perfectly anonymized clips by chance.
    """
    from corpus_anon.models import faces

    faces.check_kind(kind)
    ids = [it["clip_id"] for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({str(c) for c in ids if ids.count(c) > 1})
        raise ValueError(f"leave_one_out_reid got duplicate clip_id(s): {', '.join(dup[:5])}.")
    orig: dict[int, np.ndarray] = {}
    anon: dict[int, np.ndarray] = {}
    by_signer: dict[Hashable, list[int]] = {}
    dim = None
    for i, it in enumerate(items):
        by_signer.setdefault(it["signer_id"], [])
        if it.get("orig") is None:
            if it.get("anon") is not None:
                log.debug("clip %s: anonymized embedding without an original one is ignored", it["clip_id"])
            continue
        if it.get("anon") is None:
            raise ValueError(f"Clip {it['clip_id']!r} has an original embedding but no anonymized one; the "
                             "anonymized face must be embedded wherever the original has one.")
        e_o = np.asarray(it["orig"], dtype=np.float64).reshape(-1)
        e_a = np.asarray(it["anon"], dtype=np.float64).reshape(-1)
        dim = e_o.size if dim is None else dim
        if e_o.size != dim or e_a.size != dim or not (np.isfinite(e_o).all() and np.isfinite(e_a).all()):
            raise ValueError(f"Clip {it['clip_id']!r}: embeddings must be finite and all of one size {dim}, got "
                             f"{e_o.size} and {e_a.size}.")
        orig[i], anon[i] = e_o, e_a
        by_signer[it["signer_id"]].append(i)
    # Full-set galleries serve every query of another signer; only the query's own signer changes.
    full = {s: faces.mean_embedding(np.stack([orig[j] for j in m]), kind) for s, m in by_signer.items() if m}
    names = list(full)

    xclip: dict[Hashable, list[float]] = {s: [] for s in by_signer}
    n_tested = n_left_out = 0
    hits_o = hits_a = 0
    chance: list[float] = []
    flags = {c: False for c in ids}
    for i in orig:
        s = items[i]["signer_id"]
        others = [j for j in by_signer[s] if j != i]
        if not others:
            n_left_out += 1
            continue
        assert i not in others, "a query clip must never be in its own signer's gallery"
        gallery = np.stack([faces.mean_embedding(np.stack([orig[j] for j in others]), kind) if g == s else full[g]
                            for g in names])
        own = names.index(s)
        sc_o = np.asarray(faces.score_embeddings(gallery, orig[i], kind)).reshape(-1)
        sc_a = np.asarray(faces.score_embeddings(gallery, anon[i], kind)).reshape(-1)
        hits_o += faces.best_index(sc_o, kind) == own
        top_a = faces.best_index(sc_a, kind) == own
        hits_a += top_a
        flags[items[i]["clip_id"]] = bool(top_a and faces.same_person_rule(float(sc_a[own]), kind, threshold))
        xclip[s].append(float(sc_o[own]))
        chance.append(1.0 / len(names))
        n_tested += 1

    per_signer: dict[Hashable, dict[str, Any]] = {}
    for s, members in by_signer.items():
        pair = [float(faces.score_embeddings(orig[j], anon[j], kind)) for j in members]
        per_signer[s] = {
            "id_orig_orig_xclip": float(np.mean(xclip[s])) if xclip[s] else None,
            "id_orig_anon": float(np.mean(pair)) if pair else None,
            "n_clips": len(members),
        }
    summary: dict[str, Any] = {
        "reid_top1": hits_a / n_tested if n_tested else None,
        "reid_top1_originals": hits_o / n_tested if n_tested else None,
        "reid_chance": float(np.mean(chance)) if chance else None,
        "n_tested": n_tested,
        "n_left_out": n_left_out,
        "n_no_face": len(items) - len(orig),
        "per_signer": per_signer,
    }
    if n_tested and len(names) < 2:
        log.warning("leave-one-out re-identification with a single signer is trivially top-1 = 1.")
    log.info("re-identification: top-1 %s (originals %s, chance %s) over %d clips, %d left out, %d flagged",
             summary["reid_top1"], summary["reid_top1_originals"], summary["reid_chance"], n_tested,
             n_left_out, sum(flags.values()))
    return summary, flags


def parse_nmm_series(text: Any) -> dict[str, Any] | None:
    """``nmm_series_json``'s output back as a dict, or None when ``text`` is empty or not that JSON."""
    if not text or not isinstance(text, str):
        return None
    try:
        d = json.loads(text)
    except ValueError:
        return None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), (list, dict)) for k in ("frames", "orig", "anon")):
        return None
    return d


FIDELITY_SUMMARY_COLUMNS = ("nmm_corr", "nmm_mae", "nmm_brow_corr", "nmm_mouth_corr", "hand_lm_err",
                            "hand_lm_recall", "hand_presence_agree", "expr_fidelity", "hand_fidelity")


def fidelity_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run's linguistic fidelity at a glance, over the clips with status ok or leak: the median of
    each of ``FIDELITY_SUMMARY_COLUMNS`` (None where no clip has the value) and ``n_<column>`` (how
    many clips have it), ``n_clips``, ``n_static_face`` (clips whose every marker series was static),
    ``n_no_hands`` (clips whose original showed no hand at the sampled frames) and
    ``n_no_landmarks`` (clips measured without landmark models)."""
    done = [r for r in rows if r.get("status") in ("ok", "leak")]
    out: dict[str, Any] = {"n_clips": len(done)}
    for c in FIDELITY_SUMMARY_COLUMNS:
        vals = [float(r[c]) for r in done if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                and math.isfinite(float(r[c]))]
        out[c] = round(float(np.median(vals)), 4) if vals else None
        out[f"n_{c}"] = len(vals)
    out["n_static_face"] = sum(1 for r in done if r.get("nmm_frames") and r.get("nmm_corr") is None
                               and r.get("nmm_static"))
    out["n_no_hands"] = sum(1 for r in done if r.get("hand_frames_orig") == 0)
    out["n_no_landmarks"] = sum(1 for r in done if r.get("landmark_note") and r.get("landmark_frames") in (None, 0))
    return out


def summary_counts(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The exposure check's counts for summary.json, from per-clip records (or flat metric rows).

    `clips_checked`: clips with the check's columns; `clips_exposed` / `exposed_clips`: those with
    exposed frames (ids sorted); `exposed_frames`: their sum; `clips_not_covered`: checked clips
    where some original face track was not covered within gate.max_gap_frames; `faces_tracked`: sum."""
    checked = exposed_frames = faces = 0
    exposed: list[str] = []
    uncovered: list[str] = []
    for rec in records:
        m = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else rec
        if m is None or m.get("exposed_frames") is None:
            continue
        checked += 1
        n = int(m["exposed_frames"])
        faces += int(m.get("faces_tracked") or 0)
        if n > 0:
            exposed.append(str(rec.get("clip_id")))
            exposed_frames += n
        if m.get("exposure_covered") is False:
            uncovered.append(str(rec.get("clip_id")))
    return {"clips_checked": checked, "clips_exposed": len(exposed), "exposed_frames": exposed_frames,
            "faces_tracked": faces, "clips_not_covered": len(uncovered), "exposed_clips": sorted(exposed),
            "not_covered_clips": sorted(uncovered)}
