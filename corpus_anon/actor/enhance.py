"""Facial expression enhancement (METHOD.md §6.2): reenact the anonymized face with the original
signer's facial motion (TPSMM, relative mode) and paste it back, hands kept on top.

The steps, each in its own module: one fixed "tube" box per clip crops both clips (`actor.tube`);
the source image is the anonymized crop at the best original frame (detected, confident, no hand
near the face: `best_source_frame`), and that frame is also the driving anchor, so both poses
coincide; the prediction goes back at box size, is colour-matched to the anonymized face and
alpha-blended with a feathered face mask (`actor.masks`) multiplied by (1 - hand mask): wherever a
hand is in front of or next to the face, the diffusion output is kept (`actor.handlayer`). Pixels with
zero alpha, and everything outside the tube box, are the anonymized frames bit for bit.

With landmarks (``models.landmarks``: MediaPipe's face mesh and hands, measured once per clip on the
original), three of those rules change. The mask follows the face (``masks.mesh_face_mask``). The
source is a translated key frame, never a propagated one, whose face is confident, hand-free and
nearest the clip's median expression (``neutral_source_frame``): relative motion adds the source's
expression to every frame, so a neutral one is what relative mode assumes. Hands on top come from the
hand landmarks (``handlayer.hand_model_layer``), and the moving-skin rule runs only where no hand model
did. ``info`` says which ran. The original is measured once per clip (``measure_original``): the mesh
on every frame, the hands tracked from frame to frame and only near the face.

Module level imports only the stdlib, numpy, torch and ``models.landmarks`` (numpy only at import);
cv2 and the metrics module are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from corpus_anon.models.landmarks import ClipLandmarks
from corpus_anon.models.hands import NEAR_FACE
from corpus_anon.models.facemesh import EXPRESSION_FEATURES, expression_features
from corpus_anon.actor.handlayer import free_of_skin, hand_layer, hand_model_layer, keep_mask
from corpus_anon.actor.masks import face_mask, match_colour, mesh_face_mask
from corpus_anon.actor.tube import check_boxes, crop, fill_missing_boxes, scaled_box, tube_box, uncrop, valid_rows

if TYPE_CHECKING:
    from corpus_anon.models.landmarks import Landmarks
    from corpus_anon.models.reenact import Reenactor

log = logging.getLogger(__name__)


def best_source_frame(boxes: np.ndarray, scores: np.ndarray, hand_masks: np.ndarray | None = None,
                      margin: float = 0.2) -> int:
    """Frame whose anonymized face becomes the TPSMM source (and whose original is the anchor).

    Among frames with a detected face, the highest detector score (NaN counts as lowest) among those
    with no hand pixel inside the face box scaled by 1 + ``margin``; if every face has a hand on it,
    the highest score overall. Ties go to the earliest frame. Raises ValueError without a valid box.
    """
    b = np.asarray(boxes, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if b.ndim != 2 or b.shape[1] != 4 or s.shape != (len(b),):
        raise ValueError(f"best_source_frame needs boxes (T, 4) and scores (T,), got {b.shape} and {s.shape}.")
    ok = valid_rows(b)
    if not ok.any():
        raise ValueError("best_source_frame: no frame has a valid face box.")
    key = np.where(np.isfinite(s), s, -np.inf)
    free = ok.copy()
    if hand_masks is not None:
        m = np.asarray(hand_masks, dtype=bool)
        if m.ndim != 3 or len(m) != len(b):
            raise ValueError(f"hand_masks must be (T, H, W) with T = {len(b)}, got {m.shape}.")
        h, w = m.shape[1:]
        for t in np.flatnonzero(ok):
            x0, y0, x1, y1 = scaled_box(b[t], 1 + margin, w, h)
            free[t] = not m[t, y0:y1, x0:x1].any()
    pool = free if free.any() else ok
    idx = np.flatnonzero(pool)
    best = int(idx[np.argmax(key[idx])])
    log.debug("source frame %d (score %s, %d of %d faces free of hands)", best, s[best], int(free.sum()), int(ok.sum()))
    return best


def _mesh_points_per_frame(clip_lm: ClipLandmarks, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 468, 2) mesh points for every frame and (T,) bool, True where the frame has its own mesh.

    A frame without a usable mesh takes the nearest frame's that has one (the earlier on a tie), moved
    with the face box: scaled by the ratio of the boxes' sizes (square root of the area) about the box
    centre and translated with it. All NaN when no frame has a mesh. ``boxes`` are the filled boxes."""
    t_len = len(boxes)
    own = np.zeros(t_len, dtype=bool)
    pts = np.full((t_len, 468, 2), np.nan)
    for t in range(t_len):
        i = clip_lm.at(t)
        if i is not None and np.isfinite(clip_lm.face[i, :, :2]).all():
            pts[t] = clip_lm.face[i, :, :2]
            own[t] = True
    have = np.flatnonzero(own)
    if not len(have):
        return pts, own
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    for t in np.flatnonzero(~own):
        u = int(have[np.argmin(np.abs(have - t))])
        pts[t] = (pts[u] - centre[u]) * (side[t] / side[u]) + centre[t]
    return pts, own


def neutral_source_frame(boxes: np.ndarray, scores: np.ndarray, hand_free: np.ndarray, features: np.ndarray,
                         key_frames: Sequence[int] | None = None,
                         min_score_frac: float = 0.8) -> tuple[int, str]:
    """The TPSMM source frame with a neutral face, and the rule that chose it.

    ``boxes`` (T, 4) are the detector's (NaN where it missed), ``scores`` (T,) its scores (not
    negative; NaN where unknown), ``hand_free`` (T,) True where no hand overlaps the face,
    ``features`` (T, k) the expression features of the original face's mesh
    (``facemesh.expression_features``; NaN rows where no confident mesh), ``key_frames`` the
    translated key frames (None: every frame is one). Rules, in order (the fallbacks are logged):

    - ``"neutral-key"``: among key frames whose face is confident (detected with a score of at least
      ``min_score_frac`` x the clip's best, or with no score at all when the clip has none; and
      meshed) and hand-free, the one whose features are nearest (Euclidean) to the clip's
      per-feature median, each feature divided by its spread over the clip (interquartile range
      over every meshed frame; 1 where that is 0);
    - ``"key"``: else the highest-scoring key frame with a detected face, hand-free ones first (only
      with ``key_frames``);
    - ``"score"``: else the highest-scoring frame with a detected face, hand-free ones first (the
      rule without landmarks, ``best_source_frame``).

    Ties go to the earliest frame. Returns (frame, rule); raises ValueError without a valid box.
    """
    b = np.asarray(boxes, dtype=np.float64)
    t_len = len(b)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    free = np.asarray(hand_free, dtype=bool).reshape(-1)
    f = np.asarray(features, dtype=np.float64)
    if (b.ndim != 2 or b.shape[1] != 4 or s.shape != (t_len,) or free.shape != (t_len,) or f.ndim != 2
            or len(f) != t_len):
        raise ValueError(f"neutral_source_frame needs boxes (T, 4), scores (T,), hand_free (T,) and features (T, k), "
                         f"got {b.shape}, {s.shape}, {free.shape} and {f.shape}.")
    ok = valid_rows(b)
    if not ok.any():
        raise ValueError("neutral_source_frame: no frame has a valid face box.")
    key = np.zeros(t_len, dtype=bool)
    if key_frames is None:
        key[:] = True
    else:
        k = np.asarray(list(key_frames), dtype=np.int64)
        if len(k) and (k.min() < 0 or k.max() >= t_len):
            raise ValueError(f"key_frames must be frame indices in [0, {t_len}), got {k.min()} to {k.max()}.")
        key[k] = True
    rank = np.where(np.isfinite(s), s, -np.inf)
    meshed = np.isfinite(f).all(axis=1)
    scored = ok & np.isfinite(rank)
    if scored.any():
        top = rank[scored].max()
        confident = scored & meshed & (rank >= (min_score_frac * top if top > 0 else top))
    else:  # boxes that come without scores: the mesh alone says the face is there
        confident = ok & meshed
    pool = confident & free & key
    if pool.any():
        ref = f[meshed]
        med = np.median(ref, axis=0)
        spread = np.subtract(*np.percentile(ref, [75, 25], axis=0))
        spread = np.where(spread > 1e-9, spread, 1.0)
        dist = np.linalg.norm((f - med) / spread, axis=1)
        idx = np.flatnonzero(pool)
        best = int(idx[np.argmin(dist[idx])])
        log.debug("source frame %d: key frame nearest the median expression (distance %.2f, %d candidates)",
                  best, dist[best], len(idx))
        return best, "neutral-key"
    stages = ([("key", ok & key)] if key_frames is not None else []) + [("score", ok)]
    for rule, allowed in stages:
        if not allowed.any():
            continue
        if rule == "key":
            log.info("source frame: no key frame has a confident, meshed, hand-free face; "
                     "the best key frame with a face")
        else:
            log.info("source frame: no key frame has a face; the best frame with a face (the rule without landmarks)")
        choice = allowed & free if (allowed & free).any() else allowed
        idx = np.flatnonzero(choice)
        return int(idx[np.argmax(rank[idx])]), rule
    raise AssertionError("unreachable: ok.any() holds")


def measure_original(landmarks: Landmarks, orig: np.ndarray, boxes: np.ndarray,
                     kps: Sequence[np.ndarray | None] | None = None, hands: bool = True,
                     check: Callable[[], None] | None = None) -> ClipLandmarks:
    """The original clip's landmarks as ``enhance_clip`` uses them, on every frame (``frames`` is
    ``arange(T)``): the face mesh in each frame's box with the undetected rows filled
    (``fill_missing_boxes``: the mesh itself says whether a face is there) and, with ``hands``, the
    hands near the face (``Landmarks.clip`` with ``near_face=NEAR_FACE``, tracked from frame to frame:
    palms every ``HAND_DETECT_EVERY`` frames and where a hand is lost, in the bundle's ``hand_space``
    around the face). Hands away from the face are not measured (``hands_near_face`` says so), so the
    result's hands are no measure of the signing space. ``kps`` are the detector's five keypoints in
    ArcFace's order (eyes first) or None (dlib's order starts with one eye's corners: pass None). Measure
    once and pass the result as ``clip_landmarks`` to enhance the same original again (a re-seeded
    attempt) without re-measuring; ``check`` (a deadline's) runs between the models' batches."""
    o = np.asarray(orig)
    return landmarks.clip(o, fill_missing_boxes(check_boxes(boxes, len(o))), kps, hands=hands,
                          near_face=NEAR_FACE, track_hands=True, check=check)


def enhance_clip(orig: np.ndarray, anon: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 reenactor: Reenactor, size: int = 256, batch_size: int = 8, hands: bool = True,
                 colour_smooth: int = 2, feather_frac: float = 0.04, hand_dilate_px: int = 3,
                 landmarks: Landmarks | None = None, key_frames: Sequence[int] | None = None,
                 kps: Sequence[np.ndarray | None] | None = None,
                 clip_landmarks: ClipLandmarks | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Restore the original facial expressions on the anonymized clip (METHOD.md §6.2).

    ``orig`` and ``anon`` are uint8 RGB (T, H, W, 3), approximately pixel-aligned; ``boxes`` (T, 4)
    the signer's face box on the original (NaN where undetected), ``scores`` (T,) its detector score,
    ``kps`` its five keypoints per frame (None where undetected). The anonymized crop at the source
    frame is animated with the original crops' motion anchored at that frame, resized back,
    colour-matched and blended with alpha = face mask x (1 - hand keep); missing boxes are interpolated.

    With ``landmarks`` (measured here by ``measure_original``) or ``clip_landmarks`` (already
    measured by it):
    the face mask is ``mesh_face_mask`` of each frame's mesh (a frame without one takes its nearest
    neighbour's, moved with the box; the ellipse when no frame has a mesh); the source frame is
    ``neutral_source_frame`` over ``key_frames`` (the translated key frames; None: every frame); with
    ``hands``, hands on top come from the hand model (``hand_model_layer``) when it ran, else from the
    moving-skin rule (``hand_layer``). Without landmarks it is the module as it was: the ellipse in
    each box (``face_mask``), ``best_source_frame`` and the moving-skin rule (``key_frames`` then only
    tells ``source_is_key``).

    Returns the frames and ``info``: ``enhanced``, ``tube_box`` (x0, y0, x1, y1) or None,
    ``source_frame`` or None, ``source_is_key`` (None without ``key_frames``), ``source_rule``
    (``neutral_source_frame``'s rule, or ``"score"``), ``mask`` ("mesh" or "ellipse"),
    ``mesh_frames`` (share of frames with their own mesh, 0.0 without one), ``hand_source``
    ("mediapipe-hands", "skin-motion" or None without ``hands``), ``hand_pixels_kept`` (share of
    the face-mask weight that hands gave back to the diffusion output, 0.0 when not enhanced) and
    ``reason`` (None when enhanced). Without a valid box the anonymized frames come back unchanged.
    """
    o = np.asarray(orig)
    a = np.asarray(anon)
    if o.dtype != np.uint8 or o.ndim != 4 or o.shape[3] != 3 or a.shape != o.shape or a.dtype != np.uint8:
        raise ValueError(f"orig and anon must be uint8 RGB frames (T, H, W, 3) of one shape, got {o.shape} "
                         f"{o.dtype} and {a.shape} {a.dtype}.")
    t_len, h, w = o.shape[:3]
    b = check_boxes(boxes, t_len)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != (t_len,):
        raise ValueError(f"scores must be (T,) = ({t_len},), got {s.shape}.")
    if kps is not None and len(kps) != t_len:
        raise ValueError(f"kps must hold one entry per frame ({t_len}), got {len(kps)}.")
    if clip_landmarks is not None and len(clip_landmarks.frames) != t_len:
        raise ValueError(f"clip_landmarks must cover every frame ({t_len}), got {len(clip_landmarks.frames)}.")
    multiple = reenactor.model.size_multiple
    if size < multiple or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple} px for this TPSMM, got {size}.")
    info: dict[str, Any] = {"enhanced": False, "tube_box": None, "source_frame": None, "source_is_key": None,
                            "source_rule": None, "mask": None, "mesh_frames": 0.0, "hand_source": None,
                            "hand_pixels_kept": 0.0, "reason": None}
    tube = tube_box(b, w, h)
    if tube is None:
        info["reason"] = "no valid face box"
        log.info("enhance: %s in %d frames; clip left as it is", info["reason"], t_len)
        return a.copy(), info
    x0, y0, x1, y1 = tube
    filled = fill_missing_boxes(b)
    offset = np.array([x0, y0, x0, y0], dtype=np.float64)
    lm = clip_landmarks
    if lm is None and landmarks is not None:
        lm = measure_original(landmarks, o, b, kps, hands=hands)
    if lm is None:
        layer = hand_layer(o, filled) if hands else np.zeros((t_len, h, w), dtype=bool)
        best, rule = best_source_frame(b, s, layer), "score"
        keep_layer = layer[:, y0:y1, x0:x1]
        fm = np.stack([face_mask(filled[t] - offset, (y1 - y0, x1 - x0), feather_frac) for t in range(t_len)])
        info.update(mask="ellipse", hand_source="skin-motion" if hands else None)
    else:
        if hands and lm.hands is not None and lm.hand_model is not None:
            per_frame = [[] if lm.at(t) is None else lm.hands[lm.at(t)] for t in range(t_len)]
            keep_layer, free = hand_model_layer(per_frame, filled, tube)
            info["hand_source"] = lm.hand_model
        elif hands:
            layer = hand_layer(o, filled)
            keep_layer, free = layer[:, y0:y1, x0:x1], free_of_skin(layer, filled)
            info["hand_source"] = "skin-motion"
        else:
            keep_layer, free = np.zeros((t_len, y1 - y0, x1 - x0), dtype=bool), np.ones(t_len, dtype=bool)
        pts, own = _mesh_points_per_frame(lm, filled)
        feats = np.full((t_len, len(EXPRESSION_FEATURES)), np.nan)
        for t in np.flatnonzero(own):
            feats[t] = expression_features(pts[t])
        best, rule = neutral_source_frame(b, s, free, feats, key_frames)
        if own.any():
            fm = np.stack([mesh_face_mask(pts[t] - offset[:2], (y1 - y0, x1 - x0)) for t in range(t_len)])
            info.update(mask="mesh", mesh_frames=float(own.mean()))
        else:
            log.info("enhance: no frame has a usable face mesh; the ellipse in each box instead")
            fm = np.stack([face_mask(filled[t] - offset, (y1 - y0, x1 - x0), feather_frac) for t in range(t_len)])
            info["mask"] = "ellipse"
    driving = crop(o, tube, size)
    source = crop(a[best:best + 1], tube, size)
    pred = reenactor.animate(source, driving, driving_initial_index=best, batch_size=batch_size)
    del driving
    face = uncrop(pred, tube)
    del pred
    region = a[:, y0:y1, x0:x1]
    region_f = region.astype(np.float32) / 255.0
    keep = np.stack([keep_mask(keep_layer[t], hand_dilate_px) for t in range(t_len)])
    alpha = fm * (1.0 - keep)
    face = match_colour(face, region_f, alpha, smooth=colour_smooth)
    blended = np.clip(np.rint((region_f + alpha[..., None] * (face - region_f)) * 255.0), 0, 255).astype(np.uint8)
    out = a.copy()
    # Zero alpha means "the diffusion output", bit for bit, not a float round trip of it.
    out[:, y0:y1, x0:x1] = np.where(alpha[..., None] > 0, blended, region)
    total = float(fm.sum())
    info.update(enhanced=True, tube_box=tube, source_frame=best, source_rule=rule,
                source_is_key=None if key_frames is None else best in set(int(k) for k in key_frames),
                hand_pixels_kept=float((fm * keep).sum() / total) if total > 0 else 0.0)
    log.info("enhance: %d frames, tube %s, %s mask, source frame %d (%s), hands by %s kept %.3f of the face mask",
             t_len, tube, info["mask"], best, rule, info["hand_source"], info["hand_pixels_kept"])
    return out, info


__all__ = [
    "best_source_frame", "enhance_clip", "measure_original", "neutral_source_frame",
]
