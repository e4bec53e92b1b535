"""Identity, expression and hand fidelity metrics, and the leak gate (METHOD.md §9).

Everything here is a pure function on arrays: the caller detects faces, embeds them and passes
the results in. Per clip, an anonymized clip must (a) not be judged the original signer by the
face backend's own rule (``identity_metrics`` / ``leaks``), (b) keep the facial expressions
(``expr_fidelity``) and (c) keep the handshapes (``hand_mask`` / ``hand_fidelity``), without
flickering more than the source (``warp_error``). At corpus level, on the driver,
``run.summaries.leave_one_out_reid`` asks whether the anonymized clips can still be matched to their
signer among all signers.

Module level imports only the stdlib, numpy and ``corpus_anon.models.faces`` (numpy only). The
per-clip image metrics import cv2, torch and ``corpus_anon.models.flow`` inside the functions that
need them.

Linguistic fidelity by landmarks (``nmm_agreement``, ``hand_agreement``): MediaPipe's face mesh and
hand landmarks (``corpus_anon.models.landmarks``), measured on the original and the anonymized clip at
the same sampled frames, are what pose-based sign-recognition models consume, so these are the primary
fidelity columns: ``nmm_corr`` / ``nmm_mae`` (the four non-manual-marker series, brow raise, eye
openness, mouth openness and mouth width, with per-series ``nmm_<brow|eye|mouth|width>_corr`` and
``_mae``), ``hand_lm_err`` (mean 21-point error over the original hand's size), ``hand_lm_frames`` and
``hand_lm_recall`` and ``hand_presence_agree`` (a recall by count: the anonymized hands are read only
where the original's are, so a hand the output adds is never counted). They stand beside the older
heuristics ``expr_fidelity`` (dlib 68-point trajectories, None without the 68-point predictor) and
``hand_fidelity`` (edge F-score in the moving skin), which are kept so that metrics tables of earlier
runs stay comparable; the report and the card show the landmark columns first.
"""

from __future__ import annotations

import logging
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from corpus_anon.models import faces

log = logging.getLogger(__name__)

# dlib / iBUG 68-point layout: brows 17-26, eyes 36-47, mouth 48-67 (outer lip 48-59, inner 60-67).
# These regions carry the non-manual grammar (brow raise/furrow, eye gaze and squint, mouth morphemes).
EXPR_LANDMARKS = np.r_[17:27, 36:48, 48:68]

# Skin in YCrCb (OpenCV's 8-bit scaling, Cr/Cb offset by 128): Cr in [133, 173], Cb in [77, 127] —
# the fixed box of Chai & Ngan (1999), which covers light to dark skin because chroma, not luma,
# separates skin from most backgrounds. Luma is left free so shading does not break the rule.
SKIN_CR = (133, 173)
SKIN_CB = (77, 127)

# Canny hysteresis thresholds on 8-bit grayscale; fixed so the score means the same for every
# model and corpus (no learned edge detector, no weights).
CANNY_LOW = 100
CANNY_HIGH = 200


def face_fraction(present: np.ndarray) -> float:
    """Fraction of frames in which the signer's face was found (0.0 for an empty clip)."""
    p = np.asarray(present, dtype=bool).reshape(-1)
    return float(p.mean()) if p.size else 0.0


def identity_metrics(orig: np.ndarray, anon_at_orig: np.ndarray, kind: str, threshold: float) -> dict[str, Any]:
    """How much of the original signer's identity the anonymized clip still carries.

    ``orig`` (T, D): per-frame embeddings of the original signer's face, rows NaN where there is
    none; ``anon_at_orig`` (T, D): embeddings of the anonymized frames taken at the original face's
    keypoints (so a detector missing the new face cannot hide a leak), NaN exactly where ``orig``
    is. Scores s(a, b) are the backend's (``faces.score_embeddings``): cosine similarity (higher =
    more alike) or Euclidean distance (lower = more alike); "same person" is
    ``faces.same_person_rule(s, kind, threshold)``. Over the F frames with a face:

    - ``id_orig_orig`` = s(mean(first F//2 faces), mean(last F - F//2 faces)), the same-signer
      reference (Table 1, "Original"); None when F < 2;
    - ``id_orig_anon`` = (1/F) Σ_t s(orig_t, anon_t);
    - ``id_worst`` = the most alike frame pair (max cosine or min distance);
    - ``id_match_rate`` = (1/F) Σ_t same(s(orig_t, anon_t)), the per-frame re-identification rate;
    - ``id_mean_score`` = s(mean(orig), mean(anon)) with ``faces.mean_embedding`` (Table 1,
      "Anonymized"); ``id_mean_same`` = same(id_mean_score);
    - ``id_n_faces`` = F, ``id_score_kind`` = kind.

    No face in the original: every score None, rate 0.0, ``id_mean_same`` False.
    """
    faces.check_kind(kind)
    o = np.asarray(orig, dtype=np.float64)
    a = np.asarray(anon_at_orig, dtype=np.float64)
    if o.ndim != 2 or o.shape != a.shape:
        raise ValueError(f"orig and anon_at_orig must both be (T, D), got {o.shape} and {a.shape}.")
    has_o = np.isfinite(o).all(axis=1)
    has_a = np.isfinite(a).all(axis=1)
    missing = np.flatnonzero(has_o & ~has_a)
    if missing.size:
        raise ValueError(f"anon_at_orig has no embedding at {missing.size} frame(s) where the original has a face "
                         f"(first: frame {int(missing[0])}); it must be embedded at every original face.")
    idx = np.flatnonzero(has_o)
    out: dict[str, Any] = {
        "id_orig_orig": None, "id_orig_anon": None, "id_worst": None, "id_match_rate": 0.0,
        "id_mean_score": None, "id_mean_same": False, "id_n_faces": int(idx.size), "id_score_kind": kind,
    }
    if idx.size == 0:
        return out
    if idx.size >= 2:
        h = idx.size // 2
        out["id_orig_orig"] = float(faces.score_embeddings(
            faces.mean_embedding(o[idx[:h]], kind), faces.mean_embedding(o[idx[h:]], kind), kind))
    s = np.asarray(faces.score_embeddings(o[idx], a[idx], kind), dtype=np.float64).reshape(-1)
    same = np.asarray(faces.same_person_rule(s, kind, threshold), dtype=bool).reshape(-1)
    mean_score = float(faces.score_embeddings(
        faces.mean_embedding(o[idx], kind), faces.mean_embedding(a[idx], kind), kind))
    out.update(
        id_orig_anon=float(s.mean()),
        id_worst=float(s[faces.best_index(s, kind)]),
        id_match_rate=float(same.mean()),
        id_mean_score=mean_score,
        id_mean_same=bool(faces.same_person_rule(mean_score, kind, threshold)),
    )
    log.debug("identity over %d faces (%s): %s", idx.size, kind, out)
    return out


def leaks(ident: dict[str, Any], max_match_rate: float = 0.05) -> bool:
    """The per-clip leak gate: the mean anonymized face is judged the signer, or more than
    ``max_match_rate`` of the frames are. A clip whose original shows no face cannot leak a face
    (``identity_metrics`` gives it rate 0.0 and ``id_mean_same`` False)."""
    return bool(ident["id_mean_same"]) or float(ident["id_match_rate"]) > max_match_rate


def expr_fidelity(orig_lm: np.ndarray, anon_lm: np.ndarray, boxes: np.ndarray, min_frames: int = 3) -> float | None:
    """Mean Pearson correlation of the expressive landmark trajectories, original vs anonymized.

    Landmarks (T, 68, 2) in dlib's 68-point layout are made box-relative, u = (p - box origin) /
    (box width, box height) with the face box (T, 4) (x0, y0, x1, y1), so head motion and face size
    do not count as expression. For each x and y trajectory of the brows (17-26), eyes (36-47) and
    mouth (48-67), r = Σ(u_o - ū_o)(u_a - ū_a) / sqrt(Σ(u_o - ū_o)² Σ(u_a - ū_a)²) over the frames
    where both clips and the box are valid; constant trajectories (r undefined) are skipped. Returns
    the mean r (1 = every movement kept), or None with fewer than ``min_frames`` such frames or no
    non-constant trajectory.

    The usual source of these landmarks, dlib's 68-point shape predictor, is trained on iBUG 300-W,
    whose licence excludes commercial use.
    """
    o = np.asarray(orig_lm, dtype=np.float64)
    a = np.asarray(anon_lm, dtype=np.float64)
    b = np.asarray(boxes, dtype=np.float64)
    if o.ndim != 3 or o.shape[1:] != (68, 2) or o.shape != a.shape or b.shape != (len(o), 4):
        raise ValueError(f"expr_fidelity needs landmarks (T, 68, 2) twice and boxes (T, 4), got {o.shape}, "
                         f"{a.shape} and {b.shape}.")
    o, a = o[:, EXPR_LANDMARKS], a[:, EXPR_LANDMARKS]
    size = b[:, 2:] - b[:, :2]
    ok = (np.isfinite(o).all(axis=(1, 2)) & np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
          & (size > 0).all(axis=1))
    n = int(ok.sum())
    if n < max(min_frames, 2):
        return None
    origin, scale = b[ok, None, :2], size[ok, None, :]
    uo = ((o[ok] - origin) / scale).reshape(n, -1)
    ua = ((a[ok] - origin) / scale).reshape(n, -1)
    uo -= uo.mean(axis=0)
    ua -= ua.mean(axis=0)
    so, sa = np.sqrt((uo ** 2).mean(axis=0)), np.sqrt((ua ** 2).mean(axis=0))
    keep = (so > 1e-6) & (sa > 1e-6)
    if not keep.any():
        return None
    r = (uo[:, keep] * ua[:, keep]).mean(axis=0) / (so[keep] * sa[keep])
    log.debug("expr_fidelity over %d frames, %d of %d trajectories", n, int(keep.sum()), keep.size)
    return float(r.mean())


def _check_frames(name: str, frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[3] != 3:
        raise ValueError(f"{name} must be uint8 RGB frames (T, H, W, 3), got {f.shape} {f.dtype}.")
    return f


def hand_mask(frames: np.ndarray, face_boxes: np.ndarray, motion_thresh: int = 15, dilate_px: int = 5,
              face_margin: float = 0.2) -> np.ndarray:
    """(T, H, W) bool: moving skin outside the signer's face, where the handshapes are.

    skin = SKIN_CR[0] <= Cr <= SKIN_CR[1] and SKIN_CB[0] <= Cb <= SKIN_CB[1] on the RGB frame in
    YCrCb; motion = max(|g_t - g_{t-1}|, |g_t - g_{t+1}|) > ``motion_thresh`` on grayscale g, dilated
    by a disc of radius ``dilate_px`` (a uniform hand only changes near its outline); minus the face
    box (x0, y0, x1, y1), NaN where none, scaled by 1 + ``face_margin`` about its centre. Without a
    neighbouring frame (T = 1) nothing moves, so the mask is empty. Computed on the original clip.
    """
    import cv2  # lazy: the driver imports this module

    f = _check_frames("frames", frames)
    t_len, h, w = f.shape[:3]
    b = np.asarray(face_boxes, dtype=np.float64)
    if b.shape != (t_len, 4):
        raise ValueError(f"face_boxes must be (T, 4) = ({t_len}, 4), got {b.shape}.")
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in f]).astype(np.int16)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    out = np.zeros((t_len, h, w), dtype=bool)
    for t in range(t_len):
        diff = np.zeros((h, w), dtype=np.int16)
        if t > 0:
            diff = np.maximum(diff, np.abs(gray[t] - gray[t - 1]))
        if t + 1 < t_len:
            diff = np.maximum(diff, np.abs(gray[t] - gray[t + 1]))
        moving = (diff > motion_thresh).astype(np.uint8)
        if not moving.any():
            continue
        moving = cv2.dilate(moving, kernel) > 0
        ycc = cv2.cvtColor(np.ascontiguousarray(f[t]), cv2.COLOR_RGB2YCrCb)
        cr, cb = ycc[..., 1], ycc[..., 2]
        skin = (cr >= SKIN_CR[0]) & (cr <= SKIN_CR[1]) & (cb >= SKIN_CB[0]) & (cb <= SKIN_CB[1])
        m = skin & moving
        if np.isfinite(b[t]).all():
            cx, cy = (b[t, 0] + b[t, 2]) / 2, (b[t, 1] + b[t, 3]) / 2
            hw = (b[t, 2] - b[t, 0]) * (1 + face_margin) / 2
            hh = (b[t, 3] - b[t, 1]) * (1 + face_margin) / 2
            x0, x1 = int(np.clip(np.floor(cx - hw), 0, w)), int(np.clip(np.ceil(cx + hw), 0, w))
            y0, y1 = int(np.clip(np.floor(cy - hh), 0, h)), int(np.clip(np.ceil(cy + hh), 0, h))
            m[y0:y1, x0:x1] = False
        out[t] = m
    log.debug("hand_mask: %.4f of pixels", float(out.mean()) if out.size else 0.0)
    return out


def hand_fidelity(orig: np.ndarray, anon: np.ndarray, mask: np.ndarray, tol_px: int = 2) -> float | None:
    """Edge F-score of the anonymized hands against the original's, inside ``mask``.

    Canny edges (thresholds CANNY_LOW/CANNY_HIGH on grayscale, weight-free so the number means the
    same under every model) of both clips; counted over all frames, inside the mask: precision P =
    anon edge pixels within ``tol_px`` (Euclidean) of an original edge / anon edge pixels, recall
    R = original edge pixels within ``tol_px`` of an anon edge / original edge pixels, F = 2PR / (P + R)
    (0 when P + R = 0). Nearest edges are searched in the whole frame, so the mask border does not
    cut matches. None when neither clip has an edge inside the mask.
    """
    import cv2  # lazy: the driver imports this module

    o = _check_frames("orig", orig)
    a = _check_frames("anon", anon)
    m = np.asarray(mask, dtype=bool)
    if a.shape != o.shape or m.shape != o.shape[:3]:
        raise ValueError(f"hand_fidelity needs orig and anon (T, H, W, 3) and mask (T, H, W) of one size, "
                         f"got {o.shape}, {a.shape} and {m.shape}.")

    def edges(img: np.ndarray) -> np.ndarray:
        return cv2.Canny(cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH) > 0

    def near(e: np.ndarray) -> np.ndarray:
        if not e.any():
            return np.zeros(e.shape, dtype=bool)
        dist = cv2.distanceTransform((~e).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return dist <= tol_px

    n_a = hit_a = n_o = hit_o = 0
    for t in range(len(o)):
        if not m[t].any():
            continue
        eo, ea = edges(o[t]), edges(a[t])
        io, ia = eo & m[t], ea & m[t]
        n_o += int(io.sum())
        n_a += int(ia.sum())
        if ia.any():
            hit_a += int((ia & near(eo)).sum())
        if io.any():
            hit_o += int((io & near(ea)).sum())
    if n_o + n_a == 0:
        return None
    p = hit_a / n_a if n_a else 0.0
    r = hit_o / n_o if n_o else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    log.debug("hand_fidelity: precision %.3f recall %.3f (%d / %d edge px)", p, r, n_a, n_o)
    return float(f)


def warp_error(orig: np.ndarray, anon: np.ndarray, max_pairs: int = 16, preset: str = "medium") -> float | None:
    """Temporal instability of the anonymized clip relative to the source's (1.0 = as stable).

    For t >= 1 (at most ``max_pairs`` evenly spaced t), DIS backward flow t -> t-1 and its
    forward-backward occlusion mask are computed on the ORIGINAL frames (``flow.flow_pair``); both
    clips' frame t-1 is warped into t with that flow, and E_x = mean |x_t - warp(x_{t-1})| over
    the non-occluded pixels whose sample lies inside the frame (all pairs and channels pooled).
    Returns E_anon / E_orig: lower is better, above 1 means the anonymization adds flicker. None
    when T < 2, nothing is visible, or E_orig is (numerically) 0.
    """
    o = _check_frames("orig", orig)
    a = _check_frames("anon", anon)
    if a.shape != o.shape:
        raise ValueError(f"orig {o.shape} and anon {a.shape} differ in shape.")
    t_len = len(o)
    if t_len < 2 or max_pairs < 1:
        return None
    import torch  # lazy: the driver imports this module

    from corpus_anon.models import flow

    ts = np.unique(np.round(np.linspace(1, t_len - 1, min(max_pairs, t_len - 1))).astype(int))
    h, w = o.shape[1:3]
    grid = flow.pixel_grid(h, w)
    err_o = err_a = 0.0
    n = 0
    with torch.no_grad():
        for t in ts:
            pair = flow.flow_pair(o[t], o[t - 1], preset=preset)
            coords = grid + pair.f_b
            inside = ((coords[0, 0] >= 0) & (coords[0, 0] <= w - 1) & (coords[0, 1] >= 0)
                      & (coords[0, 1] <= h - 1))
            keep = (pair.occ[0, 0] < 0.5) & inside
            prev = torch.from_numpy(np.stack([o[t - 1], a[t - 1]])).permute(0, 3, 1, 2).float()
            cur = torch.from_numpy(np.stack([o[t], a[t]])).permute(0, 3, 1, 2).float()
            d = (flow.warp(prev, pair.f_b) - cur).abs().mean(dim=1)  # (2, H, W)
            err_o += float(d[0][keep].sum())
            err_a += float(d[1][keep].sum())
            n += int(keep.sum())
    if n == 0 or err_o / n < 1e-6:
        return None
    log.debug("warp_error over %d pairs, %d px: orig %.3f anon %.3f", len(ts), n, err_o / n, err_a / n)
    return err_a / err_o


# ---- linguistic fidelity by landmarks -----------------------------------------------------------
# The four series of ``facemesh.expression_features`` (kept here as names so the driver needs no model).
NMM_SERIES = ("brow_raise", "eye_open", "mouth_open", "mouth_width")
NMM_SHORT = {"brow_raise": "brow", "eye_open": "eye", "mouth_open": "mouth", "mouth_width": "width"}
# A series whose original standard deviation is below this (in the feature's own unit: a fraction of
# the outer-eye distance for brow raise, of the eye's width for eye openness, of the face's height or
# width for the mouth) is a static face: no marker to agree with. It is a floor, not a noise model: on
# the demo's small faces (about 45 px high, swaying) the mesh's own jitter on a still photo reaches
# about 0.002 in brow raise (its spread during a raise: 0.011), 0.005-0.012 in mouth openness and
# 0.012-0.035 in eye openness, so there a still face can still get a correlation, of jitter against
# jitter.
NMM_MIN_STD = 0.004
NMM_MIN_FRAMES = 3
NMM_COLUMNS = ("nmm_corr", "nmm_mae", *(f"nmm_{NMM_SHORT[n]}_{m}" for n in NMM_SERIES for m in ("corr", "mae")),
               "nmm_frames", "nmm_static")
HAND_COLUMNS = ("hand_lm_err", "hand_lm_frames", "hand_lm_recall", "hand_presence_agree", "hand_frames_orig",
                "hand_frames_anon")
# An anonymized hand farther than this (mean point distance over the original hand's size) from every
# original hand is another hand, not the same one moved.
HAND_PAIR_MAX = 1.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two series; 0.0 when ``y`` is constant (``x`` is checked by the caller)."""
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = math.sqrt(float((dx ** 2).sum())), math.sqrt(float((dy ** 2).sum()))
    if sy <= 1e-12 or sx <= 1e-12:
        return 0.0
    return float(np.clip((dx * dy).sum() / (sx * sy), -1.0, 1.0))


def nmm_agreement(orig_feats: np.ndarray, anon_feats: np.ndarray, min_std: float = NMM_MIN_STD,
                  min_frames: int = NMM_MIN_FRAMES) -> dict[str, Any]:
    """How well the anonymized clip keeps the non-manual markers, per series and overall.

    ``orig_feats`` and ``anon_feats`` (N, 4) are ``facemesh.expression_features`` of the original and
    the anonymized face at the same N frames (brow raise, eye openness, mouth openness, mouth width,
    each a fraction of the face's height or width), NaN rows where a mesh is missing. Over the frames
    where both rows are finite, per series: the Pearson correlation ``nmm_<s>_corr`` (1 = every
    movement kept; 0 when the anonymized series is flat while the original moves) and the mean
    absolute error ``nmm_<s>_mae`` (in the feature's unit). The correlation is None for a series
    whose original standard deviation is below ``min_std``: a static face has no marker to agree
    with, and such series are listed in ``nmm_static`` (comma-separated names, "" when none).
    ``nmm_corr`` is the mean of the defined correlations (None when none is), ``nmm_mae`` the mean of
    the four errors, ``nmm_frames`` the number of frames compared. With fewer than ``min_frames``
    such frames every value is None.
    """
    o = np.asarray(orig_feats, dtype=np.float64)
    a = np.asarray(anon_feats, dtype=np.float64)
    k = len(NMM_SERIES)
    if o.ndim != 2 or o.shape[1] != k or o.shape != a.shape:
        raise ValueError(f"nmm_agreement needs two (N, {k}) feature arrays of one shape, got {o.shape} and {a.shape}.")
    ok = np.isfinite(o).all(axis=1) & np.isfinite(a).all(axis=1)
    n = int(ok.sum())
    out: dict[str, Any] = {c: None for c in NMM_COLUMNS}
    out["nmm_frames"] = n
    if n < max(2, min_frames):
        return out
    o, a = o[ok], a[ok]
    corrs, maes, static = [], [], []
    for j, name in enumerate(NMM_SERIES):
        short = NMM_SHORT[name]
        mae = float(np.abs(o[:, j] - a[:, j]).mean())
        out[f"nmm_{short}_mae"] = mae
        maes.append(mae)
        if float(o[:, j].std()) < min_std:
            static.append(name)
            continue
        r = _pearson(o[:, j], a[:, j])
        out[f"nmm_{short}_corr"] = r
        corrs.append(r)
    out["nmm_corr"] = float(np.mean(corrs)) if corrs else None
    out["nmm_mae"] = float(np.mean(maes))
    out["nmm_static"] = ",".join(static)
    return out


def _hand_xy(hand: Any) -> np.ndarray:
    p = np.asarray(hand.points, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != 21 or p.shape[1] < 2:
        raise ValueError(f"a hand needs 21 landmark points (21, 2 or 3), got {p.shape}.")
    return p[:, :2]


def hand_pairs(orig: Sequence[Any], anon: Sequence[Any],
               max_err: float = HAND_PAIR_MAX) -> list[tuple[int, int, float]]:
    """The original and anonymized hands of one frame that are the same hand: (i, j, error) with
    error = mean distance of the 21 (x, y) points / the original hand's size (``Hand.size``, pixels).
    Pairs are taken greedily, same handedness (probability of a right hand on the same side of 0.5)
    before the other, then the smallest error; a pair with error above ``max_err`` is not the same
    hand. Each hand is in at most one pair."""
    cands = []
    for i, ho in enumerate(orig):
        po, size = _hand_xy(ho), float(ho.size)
        if not size > 0:
            continue
        side_o = float(ho.handedness) >= 0.5
        for j, ha in enumerate(anon):
            err = float(np.linalg.norm(_hand_xy(ha) - po, axis=1).mean()) / size
            if err <= max_err:
                cands.append((side_o != (float(ha.handedness) >= 0.5), err, i, j))
    pairs, used_o, used_a = [], set(), set()
    for _, err, i, j in sorted(cands):
        if i not in used_o and j not in used_a:
            used_o.add(i)
            used_a.add(j)
            pairs.append((i, j, err))
    return pairs


def hand_agreement(orig_hands: Sequence[Sequence[Any]], anon_hands: Sequence[Sequence[Any]],
                   max_err: float = HAND_PAIR_MAX) -> dict[str, Any]:
    """How well the anonymized clip keeps the hands, from hand landmarks at the same N sampled frames.

    ``orig_hands[t]`` and ``anon_hands[t]`` are the hands found in frame t of each clip (objects with
    ``points`` (21, 2 or 3) in frame pixels, ``handedness`` and ``size``, as ``hands.Hand``).
    Hands are paired within a frame by ``hand_pairs``. Returns ``hand_lm_err``, the mean over all
    pairs of the mean point distance divided by the original hand's size (0 = the same landmarks;
    None without a pair), ``hand_lm_frames`` (frames with at least one pair), ``hand_lm_recall``
    (``hand_lm_frames`` over the frames where the original has a hand: how often the anonymized clip
    still shows the hand; None when the original has none), ``hand_presence_agree``
    (share of the N frames where both lists hold the same number of hands, None when N = 0), and
    ``hand_frames_orig`` / ``hand_frames_anon`` (frames with at least one hand in each clip).

    As the clips are measured (``identity.landmark_fidelity``), the anonymized hands are read only at
    the squares of the original's hands (``identity.hands_at``), so a frame never holds more anonymized
    hands than original ones: ``hand_presence_agree`` is then the share of sampled frames where the
    output shows as many hands as the original (every hand it had, whether or not the same hand by
    ``hand_pairs``; a frame where the original shows none counts as agreeing). It is a recall by count:
    hands the output adds elsewhere are not looked for and cannot lower it.
    """
    if len(orig_hands) != len(anon_hands):
        raise ValueError(f"hand_agreement needs the hands of the same frames, got {len(orig_hands)} and "
                         f"{len(anon_hands)} frames.")
    errs: list[float] = []
    frames = agree = 0
    for ho, ha in zip(orig_hands, anon_hands):
        pairs = hand_pairs(ho, ha, max_err)
        errs.extend(e for _, _, e in pairs)
        frames += bool(pairs)
        agree += len(ho) == len(ha)
    n = len(orig_hands)
    with_hand = sum(1 for h in orig_hands if len(h))
    return {
        "hand_lm_err": float(np.mean(errs)) if errs else None,
        "hand_lm_frames": frames,
        "hand_lm_recall": frames / with_hand if with_hand else None,
        "hand_presence_agree": agree / n if n else None,
        "hand_frames_orig": with_hand,
        "hand_frames_anon": sum(1 for h in anon_hands if len(h)),
    }


def nmm_series_json(frames: Sequence[int], orig_feats: np.ndarray, anon_feats: np.ndarray, digits: int = 3) -> str:
    """The marker series of one clip as compact JSON for the report's per-clip panel:
    ``{"frames": [...], "orig": {series: [...]}, "anon": {series: [...]}}``, values rounded to
    ``digits`` decimals, null where a mesh is missing."""
    o = np.asarray(orig_feats, dtype=np.float64)
    a = np.asarray(anon_feats, dtype=np.float64)
    if o.shape != (len(frames), len(NMM_SERIES)) or a.shape != o.shape:
        raise ValueError(f"nmm_series_json needs ({len(frames)}, {len(NMM_SERIES)}) features twice, got {o.shape} "
                         f"and {a.shape}.")

    def col(x: np.ndarray) -> list[float | None]:
        return [round(float(v), digits) if math.isfinite(float(v)) else None for v in x]

    return json.dumps({"frames": [int(t) for t in frames],
                       "orig": {n: col(o[:, j]) for j, n in enumerate(NMM_SERIES)},
                       "anon": {n: col(a[:, j]) for j, n in enumerate(NMM_SERIES)}}, separators=(",", ":"))


__all__ = [
    "CANNY_HIGH", "CANNY_LOW", "EXPR_LANDMARKS", "SKIN_CB", "SKIN_CR", "expr_fidelity", "face_fraction",
    "hand_fidelity", "hand_mask", "identity_metrics", "leaks", "warp_error", "HAND_COLUMNS", "NMM_COLUMNS", "NMM_SERIES", "hand_agreement",
    "hand_pairs", "nmm_agreement", "nmm_series_json",
]
