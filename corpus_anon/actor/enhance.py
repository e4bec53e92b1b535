"""Facial expression enhancement (METHOD.md §6.2): reenact the anonymized face with the original
signer's facial motion (TPSMM, relative mode) and paste it back, hands kept on top.

One fixed "tube" box per clip (the union of the signer's face boxes, enlarged aspect-preservingly)
crops both clips, so head translation and head shakes stay in the driving signal. The source image
is the anonymized crop at the best original frame (detected, confident, no hand near the face), and
that frame is also the driving anchor, so both poses coincide. The prediction goes back at box size,
is colour-matched to the anonymized face (Reinhard in Lab, statistics smoothed over time so it does
not flicker) and alpha-blended with a feathered elliptical face mask multiplied by (1 - hand mask):
wherever a hand is in front of or next to the face, the diffusion output is kept. Pixels with zero
alpha, and everything outside the tube box, are the anonymized frames bit for bit.

Hands in front of the face (`hand_layer`): ``metrics.hand_mask`` finds moving skin outside the
enlarged face box and leaves the face alone, because the face moves too. Inside that box, and around
it, motion is measured relative to the face. How the face moved between neighbouring frames is
estimated from the grey levels (an affine map, started from no motion or the box motion and refined
robustly, so a hand over part of the face has no say in it): the detector's boxes alone are too
coarse, since on small faces they jump by whole pixels while the head glides, and aligning by them
made the whole textured face look like it moved. The neighbours are warped by that map and a pixel
moves when it differs from one by more than ``motion_thresh`` plus what a one-pixel misalignment of
the edges there could explain. So head translation, scaling and turning cancel: skin that moves with
the face is face. A moving-skin region inside the enlarged box counts as a hand when it reaches
outside the box (skin moving relative to the face there: the hand or arm arriving from outside), or
when it covers at least ``min_area_frac`` of the face box (a hand wholly inside). Brow, eye and mouth
motion is small and enclosed by the face, so it stays enhanced, except when it touches the hand's
moving region (a hand at the mouth): then it is taken as hand too, so the rule errs toward keeping
hands; comparing with both neighbours also keeps, for a frame, the face where a hand is about to be
or just was. A hand resting motionless on the face is not detected (no motion), as in ``hand_mask``.

With landmarks (``models.landmarks``: MediaPipe's face mesh and hands, measured once per clip on the
original), three of those rules change. The mask follows the face (``mesh_face_mask``): the mesh's
face oval, stretched up over the forehead and down over the chin, 1 there and feathered outward, so
the brows and the chin are pasted at full weight where the box ellipse left them half-blended or out.
The source is a translated key frame, never a propagated one, whose face is confident, hand-free and
nearest the clip's median expression (``neutral_source_frame``): relative motion adds the source's
expression to every frame, so a neutral one is what relative mode assumes. Hands on top come from the
hand landmarks (``hand_model_layer``: the hull of a hand's 21 points, dilated) wherever they reach
the face, each frame's united with its neighbours' (a frame where the hand model missed a hand between
two where it found it keeps the hand), and the moving-skin rule runs only where no hand model did.
``info`` says which ran. The original is measured once per clip (``measure_original``): the mesh on
every frame, the hands tracked from frame to frame and only near the face.

Module level imports only the stdlib, numpy, torch and ``models.landmarks`` (numpy only at import);
cv2 and the metrics module are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from corpus_anon.models.landmarks import EXPRESSION_FEATURES, NEAR_FACE, ClipLandmarks, Hand, expression_features

if TYPE_CHECKING:
    from corpus_anon.models.landmarks import Landmarks
    from corpus_anon.models.reenact import Reenactor

log = logging.getLogger(__name__)

# Boxes are compared against float edges; this keeps 22.000000000000004 from rounding out to 23.
_EDGE_TOL = 1e-6


def _valid_rows(boxes: np.ndarray) -> np.ndarray:
    """Rows that hold a finite box of positive width and height."""
    b = np.asarray(boxes, dtype=np.float64)
    ok = np.isfinite(b).all(axis=1)
    ok[ok] = (b[ok, 2] > b[ok, 0]) & (b[ok, 3] > b[ok, 1])
    return ok


def _check_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape != (n, 4):
        raise ValueError(f"boxes must be (T, 4) = ({n}, 4), got {b.shape}.")
    return b


def _scaled_box(box: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The box scaled about its centre and clipped, with the edges ``metrics.hand_mask`` uses."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * scale / 2, (box[3] - box[1]) * scale / 2
    x0, x1 = int(np.clip(np.floor(cx - hw), 0, width)), int(np.clip(np.ceil(cx + hw), 0, width))
    y0, y1 = int(np.clip(np.floor(cy - hh), 0, height)), int(np.clip(np.ceil(cy + hh), 0, height))
    return x0, y0, x1, y1


def fill_missing_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes with undetected rows linearly interpolated between detections and held past the ends,
    so every frame gets a face mask (a face is often missed exactly when a hand covers it).
    All rows stay NaN when none is valid."""
    b = np.asarray(boxes, dtype=np.float64).copy()
    ok = _valid_rows(b)
    if not ok.any():
        b[:] = np.nan
        return b
    idx = np.flatnonzero(ok)
    t = np.arange(len(b))
    for k in range(4):
        b[:, k] = np.interp(t, idx, b[idx, k])
    return b


def tube_box(boxes: np.ndarray, width: int, height: int,
             increase: float = 0.1) -> tuple[int, int, int, int] | None:
    """Union of the valid face boxes over the clip, enlarged aspect-preservingly and clipped.

    Not re-centred per frame: head movement is linguistic and must stay in the driving video.
    With the union's width w and height h, ``w_inc = max(increase, ((1 + 2 increase) h - w) / (2 w))``
    and ``h_inc = max(increase, ((1 + 2 increase) w - h) / (2 h))``; each side grows by w_inc * w or
    h_inc * h (FOMM's crop-video rule), then x0, y0 are floored and x1, y1 ceiled into the frame.
    Returns integer (x0, y0, x1, y1), or None without a valid box or when nothing is left in the frame.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ok = _valid_rows(b)
    if not ok.any():
        return None
    v = b[ok]
    left, top, right, bot = v[:, 0].min(), v[:, 1].min(), v[:, 2].max(), v[:, 3].max()
    w, h = right - left, bot - top
    w_inc = max(increase, ((1 + 2 * increase) * h - w) / (2 * w))
    h_inc = max(increase, ((1 + 2 * increase) * w - h) / (2 * h))
    x0 = max(0, math.floor(left - w_inc * w + _EDGE_TOL))
    y0 = max(0, math.floor(top - h_inc * h + _EDGE_TOL))
    x1 = min(int(width), math.ceil(right + w_inc * w - _EDGE_TOL))
    y1 = min(int(height), math.ceil(bot + h_inc * h - _EDGE_TOL))
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _resize(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Area averaging when shrinking (no aliasing), bilinear when enlarging."""
    import cv2  # lazy: heavy import stays out of module import

    shrink = out_w < img.shape[1] or out_h < img.shape[0]
    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop(frames: np.ndarray, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """(T, 3, size, size) float32 in [0, 1]: the box of every uint8 RGB frame (T, H, W, 3), resized
    to a square (as TPSMM's inputs are; a non-square box is stretched and ``uncrop`` undoes it)."""
    x0, y0, x1, y1 = box
    f = np.asarray(frames)
    out = np.empty((len(f), size, size, 3), dtype=np.float32)
    for t in range(len(f)):
        region = np.ascontiguousarray(f[t, y0:y1, x0:x1]).astype(np.float32) / 255.0
        out[t] = _resize(region, size, size)
    return torch.from_numpy(np.clip(out, 0.0, 1.0)).permute(0, 3, 1, 2).contiguous()


def uncrop(pred: torch.Tensor, box: tuple[int, int, int, int]) -> np.ndarray:
    """(T, y1 - y0, x1 - x0, 3) float32 in [0, 1]: square predictions (T, 3, S, S) resized back to the
    box they were cropped from."""
    x0, y0, x1, y1 = box
    p = pred.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    out = np.empty((len(p), y1 - y0, x1 - x0, 3), dtype=np.float32)
    for t in range(len(p)):
        out[t] = _resize(np.ascontiguousarray(p[t]), x1 - x0, y1 - y0)
    return np.clip(out, 0.0, 1.0)


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
    ok = _valid_rows(b)
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
            x0, y0, x1, y1 = _scaled_box(b[t], 1 + margin, w, h)
            free[t] = not m[t, y0:y1, x0:x1].any()
    pool = free if free.any() else ok
    idx = np.flatnonzero(pool)
    best = int(idx[np.argmax(key[idx])])
    log.debug("source frame %d (score %s, %d of %d faces free of hands)", best, s[best], int(free.sum()), int(ok.sum()))
    return best


def face_mask(box_in_crop: np.ndarray | tuple[float, float, float, float], size: int | tuple[int, int],
              feather_frac: float = 0.04, erode_frac: float = 0.06) -> np.ndarray:
    """(H, W) float32 in [0, 1]: soft elliptical face mask for compositing the reenacted face.

    The ellipse is inscribed in the face box (x0, y0, x1, y1, in the crop's pixels), its semi-axes
    shrunk by ``erode_frac`` x box size so the feather ends inside the face, then blurred with a
    Gaussian of sigma = ``feather_frac`` x box size (box size = sqrt(width x height)). The blur is
    truncated at 3 sigma, so far from the face the mask is exactly 0. ``size`` is S (an S x S crop) or
    (H, W).
    """
    import cv2  # lazy: heavy import stays out of module import

    hgt, wid = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    x0, y0, x1, y1 = (float(v) for v in box_in_crop)
    bw, bh = x1 - x0, y1 - y0
    if not (bw > 0 and bh > 0):
        raise ValueError(f"face_mask needs a box of positive size, got {tuple(box_in_crop)}.")
    box_size = math.sqrt(bw * bh)
    sigma = max(feather_frac * box_size, 0.5)
    a = max(bw / 2 - erode_frac * box_size, 1.0)
    b = max(bh / 2 - erode_frac * box_size, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    ys = (np.arange(hgt, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(wid, dtype=np.float32) + 0.5)[None, :]
    hard = ((((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2) <= 1.0).astype(np.float32)
    k = 2 * int(math.ceil(3 * sigma)) + 1
    soft = cv2.GaussianBlur(hard, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    return np.clip(soft, 0.0, 1.0)


# MediaPipe's face oval: the mesh's silhouette as one closed loop, from the top of the forehead (10)
# round the subject's left (the image's right) to the chin (152) and back up the other side.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
             149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
_FOREHEAD, _CHIN = 10, 152


def mesh_face_mask(points: np.ndarray, size: int | tuple[int, int], extend_up: float = 0.1,
                   extend_down: float = 0.15, margin_frac: float = 0.03,
                   feather_frac: float = 0.1) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the paste-back mask of one face from its mesh, in the same pixels as
    ``points`` (468, 2 or 3: MediaPipe's face mesh, x and y used).

    The mesh's face oval (``FACE_OVAL``) is stretched along the face's own axis (forehead 10 to chin
    152, of length h): each oval point moves away from the axis's midpoint by ``extend_up`` (above it)
    or ``extend_down`` (below it) times its distance along the axis, so the top of the forehead rises
    by ``extend_up`` x h / 2 and the chin drops by ``extend_down`` x h / 2 while the cheeks stay where
    they are. The mask is 1 on that polygon and within ``margin_frac`` x h of it, then falls
    smoothly (smoothstep of the distance) to exactly 0 at ``feather_frac`` x h further out: feathered
    outward, so the brows and the chin keep full weight, and the mask never reaches more than
    (``margin_frac`` + ``feather_frac``) x h beyond the stretched oval. ``size`` is S or (H, W).
    """
    import cv2  # lazy: heavy import stays out of module import

    hgt, wid = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != 468 or p.shape[1] not in (2, 3) or not np.isfinite(p[:, :2]).all():
        raise ValueError(f"mesh_face_mask needs one finite face mesh (468, 2 or 3), got shape {p.shape}.")
    p = p[:, :2]
    axis = p[_CHIN] - p[_FOREHEAD]
    h = float(np.linalg.norm(axis))
    if not h > 1e-6:
        raise ValueError("mesh_face_mask needs a mesh whose forehead (10) and chin (152) are apart, got one point.")
    v = axis / h
    mid = (p[_CHIN] + p[_FOREHEAD]) / 2
    oval = p[list(FACE_OVAL)]
    along = (oval - mid) @ v  # negative above the midpoint
    oval = oval + np.outer(along * np.where(along < 0, extend_up, extend_down), v)
    margin, feather = margin_frac * h, max(feather_frac * h, 1.0)
    dist, (x0, y0) = _outside_distance(oval, margin + feather)
    x = np.clip((dist - margin) / feather, 0.0, 1.0)
    return _paste(1.0 - x * x * (3.0 - 2.0 * x), (x0, y0), (0, 0), (hgt, wid)).astype(np.float32)


def _outside_distance(poly: np.ndarray, reach: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Distance (pixels, 0 inside) from each pixel to the filled polygon ``poly`` (k, 2; pixel centres
    at integers, as the landmark models' points and cv2 have them), over the polygon's box grown by
    ``reach``, and that window's top-left pixel. The window is never clipped to an image, so a pixel's
    nearest polygon point is always in it."""
    import cv2  # lazy: heavy import stays out of module import

    x0, y0 = int(np.floor(poly[:, 0].min() - reach)) - 1, int(np.floor(poly[:, 1].min() - reach)) - 1
    x1, y1 = int(np.ceil(poly[:, 0].max() + reach)) + 2, int(np.ceil(poly[:, 1].max() + reach)) + 2
    shift = 4  # fillPoly's fixed point: polygon vertices to 1/16 px
    pts = np.rint((poly - (x0, y0)) * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    hard = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    cv2.fillPoly(hard, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return cv2.distanceTransform((hard == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE), (x0, y0)


def _paste(window: np.ndarray, at: tuple[int, int], origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) = ``shape``: ``window`` (whose top-left pixel is ``at`` in the frame) placed into a zero
    region whose top-left pixel is ``origin``, cut to it."""
    out = np.zeros(shape, dtype=window.dtype)
    ox, oy = at[0] - origin[0], at[1] - origin[1]
    hgt, wid = window.shape
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + wid, shape[1]), min(oy + hgt, shape[0])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = window[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out


def _smooth_stats(x: np.ndarray, k: int) -> np.ndarray:
    """Centred moving average over +-k frames of per-frame stats (T, C); NaN rows interpolated first."""
    ok = np.isfinite(x).all(axis=1)
    idx = np.flatnonzero(ok)
    t = np.arange(len(x))
    y = np.stack([np.interp(t, idx, x[idx, c]) for c in range(x.shape[1])], axis=1)
    if k <= 0:
        return y
    c = np.cumsum(np.vstack([np.zeros((1, y.shape[1])), y]), axis=0)
    lo = np.clip(t - k, 0, len(y))
    hi = np.clip(t + k + 1, 0, len(y))
    return (c[hi] - c[lo]) / (hi - lo)[:, None]


def _weighted_stats(lab: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel weighted mean and std of one frame; NaN when the weights are (almost) all zero."""
    total = float(w.sum())
    if total < 1e-6:
        nan = np.full(3, np.nan)
        return nan, nan
    mu = (lab * w[..., None]).reshape(-1, 3).sum(axis=0) / total
    var = (((lab - mu) ** 2) * w[..., None]).reshape(-1, 3).sum(axis=0) / total
    return mu, np.sqrt(np.maximum(var, 0.0))


def match_colour(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, smooth: int = 2,
                 max_gain: float = 4.0) -> np.ndarray:
    """Reinhard colour transfer of ``pred`` onto ``target`` in CIE Lab, under ``mask``.

    ``pred`` and ``target`` are (T, H, W, 3) float RGB in [0, 1], ``mask`` (T, H, W) or (H, W) weights.
    Per frame and Lab channel, the mask-weighted mean and std of both are taken, smoothed over
    +-``smooth`` frames (a per-frame transfer would make the face flicker), and every pixel becomes
    (x - mu_pred) x sigma_target / sigma_pred + mu_target. The gain is clipped to
    [1 / max_gain, max_gain] so a nearly flat prediction is not blown up into noise. Returns float32
    RGB clipped to [0, 1]; ``pred`` unchanged when the mask is empty in every frame.
    """
    import cv2  # lazy: heavy import stays out of module import

    p = np.asarray(pred, dtype=np.float32)
    q = np.asarray(target, dtype=np.float32)
    if p.ndim != 4 or p.shape[3] != 3 or q.shape != p.shape:
        raise ValueError(f"match_colour needs pred and target (T, H, W, 3) of one shape, got {p.shape} and {q.shape}.")
    m = np.asarray(mask, dtype=np.float32)
    if m.shape == p.shape[1:3]:
        m = np.broadcast_to(m, p.shape[:3])
    if m.shape != p.shape[:3]:
        raise ValueError(f"mask must be (H, W) or (T, H, W) matching {p.shape[:3]}, got {m.shape}.")
    t_len = len(p)
    lab_p = np.stack([cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2Lab) for x in p])
    stats = np.full((t_len, 12), np.nan)
    for t in range(t_len):
        q_lab = cv2.cvtColor(np.ascontiguousarray(q[t]), cv2.COLOR_RGB2Lab)
        stats[t, 0:3], stats[t, 3:6] = _weighted_stats(lab_p[t], m[t])
        stats[t, 6:9], stats[t, 9:12] = _weighted_stats(q_lab, m[t])
    if not np.isfinite(stats).all(axis=1).any():
        log.debug("match_colour: empty mask in every frame, colours left as they are")
        return p.copy()
    s = _smooth_stats(stats, smooth)
    mu_p, sd_p, mu_q, sd_q = s[:, 0:3], s[:, 3:6], s[:, 6:9], s[:, 9:12]
    gain = np.clip(sd_q / np.maximum(sd_p, 1e-6), 1.0 / max_gain, max_gain)
    out = np.empty_like(p)
    for t in range(t_len):
        lab = (lab_p[t] - mu_p[t]) * gain[t] + mu_q[t]
        out[t] = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(out, 0.0, 1.0)


def _box_motion(box_from: np.ndarray, box_to: np.ndarray) -> np.ndarray:
    """2 x 3 affine map (float64) of frame coordinates that takes ``box_from`` onto ``box_to``
    (the scale and translation of the face box)."""
    sx = (box_to[2] - box_to[0]) / (box_from[2] - box_from[0])
    sy = (box_to[3] - box_to[1]) / (box_from[3] - box_from[1])
    return np.array([[sx, 0.0, box_to[0] - sx * box_from[0]], [0.0, sy, box_to[1] - sy * box_from[1]]],
                    dtype=np.float64)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2 x 3 affine map x -> a(b(x))."""
    return np.hstack([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2:] + a[:, 2:])])


def _invert(m: np.ndarray) -> np.ndarray:
    """The inverse of the 2 x 3 affine map ``m``."""
    inv = np.linalg.inv(m[:, :2])
    return np.hstack([inv, -inv @ m[:, 2:]])


def _warp_region(gray: np.ndarray, mat: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """``region`` (x0, y0, x1, y1) of the frame ``gray`` moved by ``mat`` (frame coordinates, source ->
    destination): pixel (x, y) of the result is the source at mat^-1 (x0 + x, y0 + y), bilinear,
    edges replicated."""
    import cv2  # lazy: heavy import stays out of module import

    x0, y0, x1, y1 = region
    src = _compose(_invert(mat), np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    return cv2.warpAffine(gray, src, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _edge_strength(gray: np.ndarray) -> np.ndarray:
    """Grey-level change per pixel (central differences, L2 over x and y), the largest within one
    pixel: how much a misregistration of up to one pixel can change a pixel."""
    import cv2  # lazy: heavy import stays out of module import

    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REPLICATE)
    return cv2.dilate(0.5 * np.sqrt(gx * gx + gy * gy), np.ones((3, 3), np.uint8))


def _moved(here: np.ndarray, there: np.ndarray, motion_thresh: float, edge_tol_px: float) -> np.ndarray:
    """Pixels whose grey level differs between ``here`` and the aligned neighbour ``there`` by more
    than ``motion_thresh`` plus what a misalignment of ``edge_tol_px`` pixels could explain."""
    edges = np.minimum(_edge_strength(here), _edge_strength(there))
    return np.abs(here - there) > motion_thresh + edge_tol_px * edges


def _best_shift(src: np.ndarray, dst: np.ndarray, face: tuple[slice, slice], use: np.ndarray,
                allowed: np.ndarray, wm: np.ndarray, radius: int) -> np.ndarray | None:
    """The inverse warp ``wm`` moved by the whole-pixel shift within ``radius`` that scores best (as
    in ``_face_motion``, with ``allowed`` from the destination's edges alone: one warp per shift), or
    None when no shift beats ``wm`` itself."""
    import cv2  # lazy: heavy import stays out of module import

    size = (src.shape[1], src.shape[0])
    target, allowed = dst[use], allowed[use]

    def quick(m: np.ndarray) -> float:
        there = cv2.warpAffine(src, m.astype(np.float32), size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)
        return float(np.minimum(np.abs(there[face][use] - target) / allowed, 1.0).mean())

    best, top = None, quick(wm)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx or dy:
                cand = wm + np.array([[0.0, 0.0, dx], [0.0, 0.0, dy]])
                c = quick(cand)
                if c < top:
                    best, top = cand, c
    return best


def _face_motion(g_from: np.ndarray, g_to: np.ndarray, box_from: np.ndarray, box_to: np.ndarray,
                 motion_thresh: float = 15.0, edge_tol_px: float = 1.0, reg_px: int = 64,
                 search_px: int = 3, rounds: int = 2, iters: int = 10, tukey: float = 1.5,
                 previous: np.ndarray | None = None) -> np.ndarray:
    """2 x 3 affine map (frame coordinates, ``g_from`` -> ``g_to``) of how the face moved.

    The detector's boxes are too coarse for this: on small faces they jump by whole pixels (HOG
    cells) while the head moves a fraction of one, so the grey levels decide. The face box of
    ``g_to`` and half its size around it are resampled so the box's longer side is at most ``reg_px``;
    all scoring is over the face box. A map's score is the mean over pixels of |grey difference| /
    (``motion_thresh`` + ``edge_tol_px`` x the smaller ``_edge_strength`` of the two), capped at 1, so
    a hand costs the same wherever it is. The best scoring of no motion, the box motion and
    ``previous`` (the last pair's motion: the head keeps its speed) starts. In each of ``rounds`` rounds
    the pixels that differ under the current map (a hand over the face, mostly), grown by one pixel,
    are left out, unless that leaves under a quarter of the box (the start is far off); in the first
    round whole-pixel shifts up to ``search_px`` are tried (scored with ``g_to``'s edges alone, a
    cheaper pre-selection); then Gauss-Newton on the six affine parameters, with Tukey weights that
    give no say to pixels beyond ``tukey`` x what they may differ by, refines the map. A map replaces
    the current one only when it scores better on that round's pixels. So a hand in front of the face
    does not drag the estimate onto itself.
    """
    import cv2  # lazy: heavy import stays out of module import

    h, w = g_to.shape
    rx0, ry0, rx1, ry1 = _scaled_box(box_to, 2.0, w, h)
    fx0, fy0, fx1, fy1 = _scaled_box(box_to, 1.0, w, h)
    if fx1 - fx0 < 4 or fy1 - fy0 < 4:
        return _box_motion(box_from, box_to)
    k = min(1.0, reg_px / max(fx1 - fx0, fy1 - fy0))
    size = (max(int(round((rx1 - rx0) * k)), 8), max(int(round((ry1 - ry0) * k)), 8))
    kx, ky = size[0] / (rx1 - rx0), size[1] / (ry1 - ry0)
    # frame -> grid coordinates, as cv2.resize maps pixel centres
    to_grid = np.array([[kx, 0.0, kx * (0.5 - rx0) - 0.5], [0.0, ky, ky * (0.5 - ry0) - 0.5]])
    from_grid = _invert(to_grid)
    tmpl = _resize(np.ascontiguousarray(g_to[ry0:ry1, rx0:rx1]), *size)
    inp = _resize(np.ascontiguousarray(g_from[ry0:ry1, rx0:rx1]), *size)
    gy0, gy1 = max(int(np.floor(ky * (fy0 - ry0))), 0), int(np.ceil(ky * (fy1 - ry0)))
    gx0, gx1 = max(int(np.floor(kx * (fx0 - rx0))), 0), int(np.ceil(kx * (fx1 - rx0)))
    face = (slice(gy0, gy1), slice(gx0, gx1))
    t_face = tmpl[face]
    t_edges = _edge_strength(tmpl)[face]
    ys, xs = np.mgrid[gy0:gy1, gx0:gx1].astype(np.float64)
    cx, cy = xs.mean(), ys.mean()
    xs, ys = (xs - cx).ravel(), (ys - cy).ravel()

    # A warp here is the inverse map on the grid: destination (g_to) pixel -> source (g_from) pixel.
    def residual(wm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        there = cv2.warpAffine(inp, wm.astype(np.float32), size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)
        allowed = motion_thresh + edge_tol_px * np.minimum(t_edges, _edge_strength(there)[face])
        return there, there[face] - t_face, allowed

    def score(wm: np.ndarray, use: np.ndarray) -> float:
        _, r, allowed = residual(wm)
        return float(np.minimum(np.abs(r) / allowed, 1.0)[use].mean())

    def grid_warp(m: np.ndarray) -> np.ndarray:
        return _compose(to_grid, _compose(_invert(m), from_grid))

    every = np.ones(t_face.shape, dtype=bool)
    starts = [grid_warp(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])), grid_warp(_box_motion(box_from, box_to))]
    if previous is not None:
        starts.append(grid_warp(previous))
    cur = min(starts, key=lambda m: score(m, every))
    for rnd in range(rounds):
        _, r, allowed = residual(cur)
        use = cv2.dilate((np.abs(r) > allowed).astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
        if use.sum() < 0.25 * use.size:
            use = every
        best = score(cur, use)
        if rnd == 0:  # whole-pixel shifts: the start may be off by more than Gauss-Newton can see
            shifted = _best_shift(inp, t_face, face, use, motion_thresh + edge_tol_px * t_edges, cur, search_px)
            if shifted is not None and score(shifted, use) < best:
                cur, best = shifted, score(shifted, use)
        wm = cur.copy()
        wuse = use.ravel()
        for _ in range(iters):
            there, r, allowed = residual(wm)
            gx = cv2.Sobel(there, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REPLICATE)[face].ravel() * 0.5
            gy = cv2.Sobel(there, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REPLICATE)[face].ravel() * 0.5
            # d there / dx = grad I(W x) A, so the source's gradient is (gx, gy) A^-1
            ainv = np.linalg.inv(wm[:, :2])
            ix = gx * ainv[0, 0] + gy * ainv[1, 0]
            iy = gx * ainv[0, 1] + gy * ainv[1, 1]
            u = (r / allowed).ravel()
            wt = np.where(wuse & (np.abs(u) < tukey), (1.0 - (u / tukey) ** 2) ** 2, 0.0)
            if wt.sum() < 6:
                break
            jac = np.stack([ix * xs, ix * ys, ix, iy * xs, iy * ys, iy], axis=1)
            hess = jac.T @ (jac * wt[:, None])
            try:
                step = -np.linalg.solve(hess + 1e-6 * np.trace(hess) * np.eye(6), jac.T @ (wt * r.ravel()))
            except np.linalg.LinAlgError:
                break
            # the parameters are taken about the face centre c: W x = A (x - c) + (A c + b)
            a = wm[:, :2] + step[[0, 1, 3, 4]].reshape(2, 2)
            at_c = wm[:, :2] @ (cx, cy) + wm[:, 2] + step[[2, 5]]
            nxt = np.hstack([a, (at_c - a @ (cx, cy))[:, None]])
            if not np.isfinite(nxt).all() or abs(np.linalg.det(a)) < 1e-3:
                break
            wm = nxt
            if np.abs(step[[2, 5]]).max() < 0.01 and np.abs(step[[0, 1, 3, 4]]).max() < 1e-4:
                break
        if score(wm, use) < best:
            cur = wm
    return _compose(from_grid, _compose(_invert(cur), to_grid))


def hand_layer(frames: np.ndarray, boxes: np.ndarray, motion_thresh: int = 15, dilate_px: int = 5,
               face_margin: float = 0.2, min_area_frac: float = 0.25, reach: float = 2.0,
               edge_tol_px: float = 1.0) -> np.ndarray:
    """(T, H, W) bool: hand pixels that must stay on top of the reenacted face, on the ORIGINAL clip.

    The union of ``metrics.hand_mask`` (moving skin outside the face box scaled by 1 + ``face_margin``)
    and hands in front of the face. For those, the face's motion between each pair of neighbouring
    frames with a box is estimated once (``_face_motion``, seeded with the previous pair's motion).
    In frame t, over the box scaled by (1 + ``face_margin``) x ``reach``, each neighbour is warped by
    it onto frame t; a pixel moved when it differs from a warped neighbour by more than
    ``motion_thresh`` + ``edge_tol_px`` x the edge strength there (the smaller of both frames', so a
    face misaligned by up to ``edge_tol_px`` pixels has not moved, while a hand's edge over a flat cheek
    has). Moved pixels, closed by one pixel, that are skin (the metrics' YCrCb rule) form 8-connected
    regions. A region with pixels inside the scaled face box is a hand when it also has pixels outside
    it (skin there that moved relative to the face: a hand or arm reaching in), or when, dilated by
    ``dilate_px``, it covers at least ``min_area_frac`` of the (unscaled) face box on skin inside the
    scaled box; keeping regions apart before dilating keeps an eye blinking a
    few pixels from a hand out of it. The hand regions dilated by ``dilate_px`` (a uniform hand only
    changes near its outline), on skin, inside the scaled box, are added. Frames without a box (NaN),
    or without a neighbour that has one, get only the outside mask.
    """
    import cv2  # lazy: heavy import stays out of module import

    from corpus_anon.actor import metrics

    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[3] != 3:
        raise ValueError(f"frames must be uint8 RGB (T, H, W, 3), got {f.shape} {f.dtype}.")
    t_len, h, w = f.shape[:3]
    b = _check_boxes(boxes, t_len)
    out = metrics.hand_mask(f, b, motion_thresh=motion_thresh, dilate_px=dilate_px, face_margin=face_margin)
    ok = _valid_rows(b)
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in f]).astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    kernel_area = int(kernel.sum())
    # how the face moved from frame t to t + 1, once per pair of neighbouring frames with a face
    fwd: dict[int, np.ndarray] = {}
    for t in range(t_len - 1):
        if ok[t] and ok[t + 1]:
            fwd[t] = _face_motion(gray[t], gray[t + 1], b[t], b[t + 1], motion_thresh, edge_tol_px,
                                  previous=fwd.get(t - 1))
    n_face = 0
    for t in np.flatnonzero(ok):
        x0, y0, x1, y1 = _scaled_box(b[t], 1 + face_margin, w, h)
        rx0, ry0, rx1, ry1 = region = _scaled_box(b[t], (1 + face_margin) * reach, w, h)
        mats = ([fwd[t - 1]] if t - 1 in fwd else []) + ([_invert(fwd[t])] if t in fwd else [])
        if x1 <= x0 or y1 <= y0 or not mats:
            continue
        here = gray[t, ry0:ry1, rx0:rx1]
        moved = np.zeros(here.shape, dtype=np.uint8)
        for n, m in zip([t - 1] * (t - 1 in fwd) + [t + 1] * (t in fwd), mats):
            there = _warp_region(gray[n], m, region)
            moved |= _moved(here, there, motion_thresh, edge_tol_px).astype(np.uint8)
        ycc = cv2.cvtColor(np.ascontiguousarray(f[t, ry0:ry1, rx0:rx1]), cv2.COLOR_RGB2YCrCb)
        cr, cb = ycc[..., 1], ycc[..., 2]
        skin = ((cr >= metrics.SKIN_CR[0]) & (cr <= metrics.SKIN_CR[1])
                & (cb >= metrics.SKIN_CB[0]) & (cb <= metrics.SKIN_CB[1]))
        inner = np.zeros_like(skin)
        inner[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = True
        # regions are told apart on the moving skin itself (closed by one pixel), not on its
        # dilation, so a hand and a blinking eye a few pixels apart stay two regions
        core = (cv2.dilate(moved, np.ones((3, 3), np.uint8)) > 0) & skin
        if not (core & inner).any():
            continue
        n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
        inside_ids = set(np.unique(labels[core & inner]).tolist()) - {0}
        hand_ids = inside_ids & set(np.unique(labels[core & ~inner]).tolist())
        face_area = (b[t, 2] - b[t, 0]) * (b[t, 3] - b[t, 1])
        for i in sorted(inside_ids - hand_ids):  # wholly inside: a hand when its region is large
            if stats[i, cv2.CC_STAT_AREA] * kernel_area < min_area_frac * face_area:
                continue
            cx0, cy0 = max(stats[i, 0] - dilate_px, 0), max(stats[i, 1] - dilate_px, 0)
            cx1 = stats[i, 0] + stats[i, 2] + dilate_px
            cy1 = stats[i, 1] + stats[i, 3] + dilate_px
            grown = cv2.dilate((labels[cy0:cy1, cx0:cx1] == i).astype(np.uint8), kernel) > 0
            if (grown & skin[cy0:cy1, cx0:cx1] & inner[cy0:cy1, cx0:cx1]).sum() >= min_area_frac * face_area:
                hand_ids.add(i)
        if not hand_ids:
            continue
        found = (cv2.dilate(np.isin(labels, sorted(hand_ids)).astype(np.uint8), kernel) > 0) & skin & inner
        if found.any():
            out[t, ry0:ry1, rx0:rx1] |= found
            n_face += 1
    log.debug("hand_layer: hands in front of the face in %d of %d frames", n_face, t_len)
    return out


def _keep_mask(hand: np.ndarray, dilate_px: int) -> np.ndarray:
    """Soft weight (H, W) in [0, 1] of keeping the diffusion output: exactly 1 on every hand pixel,
    1 within ``dilate_px`` of one, falling smoothly to 0 over about ``dilate_px`` more."""
    import cv2  # lazy: heavy import stays out of module import

    if not hand.any():
        return np.zeros(hand.shape, dtype=np.float32)
    r = max(int(dilate_px), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    grown = cv2.dilate(hand.astype(np.uint8), kernel).astype(np.float32)
    sigma = r / 2
    k = 2 * int(math.ceil(3 * sigma)) + 1
    soft = cv2.GaussianBlur(grown, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    keep = np.clip(2.0 * soft, 0.0, 1.0)
    keep[hand] = 1.0
    return keep


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


HAND_DILATE_FRAC = 0.1
FOREARM_FRAC = 0.5


def hand_region(hand: Hand, dilate_frac: float = HAND_DILATE_FRAC,
                forearm_frac: float = FOREARM_FRAC) -> tuple[np.ndarray, float]:
    """The polygon (k, 2), frame pixels, and the dilation radius (pixels) of one hand's keep region.

    The polygon is the convex hull of the 21 landmarks and one more point past the wrist (0), away from
    the middle finger's knuckle (9) by ``forearm_frac`` x their distance: the wrist joins the forearm,
    which the landmarks stop short of. The radius is ``dilate_frac`` x the hand's size (the diagonal
    of its points' box). Landmarks sit on the joints' centre line and near the fingertips, so the
    hull misses half a finger's width along each finger (about 0.05 of the hand's length, about 0.04
    of its size), the fingertips' ends and the heel of the palm outside the wrist-to-little-finger
    line; 0.1 of the size covers those and the landmarks' own error of a few percent of the hand."""
    import cv2  # lazy: heavy import stays out of module import

    p = np.asarray(hand.points, dtype=np.float64)[:, :2]
    if p.shape != (21, 2) or not np.isfinite(p).all():
        raise ValueError(f"a hand needs 21 finite landmarks, got shape {np.asarray(hand.points).shape}.")
    stub = p[0] + forearm_frac * (p[0] - p[9])
    hull = cv2.convexHull(np.vstack([p, stub[None]]).astype(np.float32)).reshape(-1, 2).astype(np.float64)
    return hull, dilate_frac * hand.size


def _raster_region(hull: np.ndarray, radius: float, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) = ``shape`` bool: pixels of a region whose top-left pixel is ``origin`` in the frame
    that lie inside the polygon ``hull`` (frame pixels, centres at integers) or within ``radius``
    pixels of it."""
    dist, at = _outside_distance(hull, max(float(radius), 0.0))
    return _paste(dist <= max(float(radius), 0.0), at, origin, shape)


def hand_model_layer(hands: list[list[Hand]], boxes: np.ndarray, region: tuple[int, int, int, int],
                     face_margin: float = 0.2, dilate_frac: float = HAND_DILATE_FRAC,
                     neighbours: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Hands on top from the hand model: (T, h, w) bool over ``region`` (x0, y0, x1, y1 of the frame)
    and (T,) bool, True where no hand overlaps the face.

    ``hands[t]`` are frame t's hands. A hand counts when its keep region (``hand_region``: the hull of
    its landmarks and the wrist's stub, dilated by ``dilate_frac`` x its size) overlaps frame t's face
    box scaled by 1 + ``face_margin``; the counted regions, inside ``region``, are frame t's own layer.
    Frames without a box (NaN) count no hand. Each frame's layer is then the union of its own and
    those of the ``neighbours`` frames on either side, and a frame is free only when they all are: a
    frame where the hand model missed a hand between two where it found it keeps the hand."""
    b = np.asarray(boxes, dtype=np.float64)
    if len(hands) != len(b):
        raise ValueError(f"hands must list one entry per frame ({len(b)}), got {len(hands)}.")
    rx0, ry0, rx1, ry1 = region
    layer = np.zeros((len(b), ry1 - ry0, rx1 - rx0), dtype=bool)
    free = np.ones(len(b), dtype=bool)
    ok = _valid_rows(b)
    for t in np.flatnonzero(ok):
        if not hands[t]:
            continue
        cx, cy = (b[t, 0] + b[t, 2]) / 2, (b[t, 1] + b[t, 3]) / 2
        hw, hh = (b[t, 2] - b[t, 0]) * (1 + face_margin) / 2, (b[t, 3] - b[t, 1]) * (1 + face_margin) / 2
        fx0, fy0 = int(np.floor(cx - hw)), int(np.floor(cy - hh))
        fx1, fy1 = int(np.ceil(cx + hw)), int(np.ceil(cy + hh))
        for hand in hands[t]:
            hull, radius = hand_region(hand, dilate_frac)
            near = _raster_region(hull, radius, (fx0, fy0), (fy1 - fy0, fx1 - fx0))
            if not near.any():
                continue
            free[t] = False
            layer[t] |= _raster_region(hull, radius, (rx0, ry0), (ry1 - ry0, rx1 - rx0))
    k = max(int(neighbours), 0)
    if k and len(b):
        own, own_free = layer, free
        layer, free = own.copy(), free.copy()
        for d in range(1, k + 1):
            layer[d:] |= own[:-d]
            layer[:-d] |= own[d:]
            free[d:] &= own_free[:-d]
            free[:-d] &= own_free[d:]
    return layer, free


def _free_of_skin(layer: np.ndarray, boxes: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """(T,) bool: no pixel of the skin rule's hand layer (T, H, W) inside the face box scaled by
    1 + ``margin`` (``best_source_frame``'s test); True where no box."""
    b = np.asarray(boxes, dtype=np.float64)
    free = np.ones(len(b), dtype=bool)
    h, w = layer.shape[1:]
    for t in np.flatnonzero(_valid_rows(b)):
        x0, y0, x1, y1 = _scaled_box(b[t], 1 + margin, w, h)
        free[t] = not layer[t, y0:y1, x0:x1].any()
    return free


def neutral_source_frame(boxes: np.ndarray, scores: np.ndarray, hand_free: np.ndarray, features: np.ndarray,
                         key_frames: Sequence[int] | None = None,
                         min_score_frac: float = 0.8) -> tuple[int, str]:
    """The TPSMM source frame with a neutral face, and the rule that chose it.

    ``boxes`` (T, 4) are the detector's (NaN where it missed), ``scores`` (T,) its scores (not
    negative; NaN where unknown), ``hand_free`` (T,) True where no hand overlaps the face,
    ``features`` (T, k) the expression features of the original face's mesh
    (``landmarks.expression_features``; NaN rows where no confident mesh), ``key_frames`` the
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
    ok = _valid_rows(b)
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
    return landmarks.clip(o, fill_missing_boxes(_check_boxes(boxes, len(o))), kps, hands=hands,
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
    b = _check_boxes(boxes, t_len)
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
            keep_layer, free = layer[:, y0:y1, x0:x1], _free_of_skin(layer, filled)
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
    keep = np.stack([_keep_mask(keep_layer[t], hand_dilate_px) for t in range(t_len)])
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
    "FACE_OVAL", "best_source_frame", "crop", "enhance_clip", "face_mask", "fill_missing_boxes", "hand_layer",
    "hand_model_layer", "hand_region", "match_colour", "measure_original", "mesh_face_mask", "neutral_source_frame",
    "tube_box", "uncrop",
]
