"""Where the reenacted face is pasted, and how its colour meets the frame (the face module, METHOD.md
§6.2). Without landmarks, a feathered ellipse in the face box (`face_mask`); with MediaPipe's face
mesh, the mesh's face oval stretched up over the forehead and down over the chin, 1 there and
feathered outward (`mesh_face_mask`), so the brows and the chin are pasted at full weight where the
box ellipse left them half-blended or out. The prediction is colour-matched to the anonymized face
(Reinhard in Lab, statistics smoothed over time so it does not flicker: `match_colour`)."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


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


_FOREHEAD = 10


_CHIN = 152


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
    dist, (x0, y0) = outside_distance(oval, margin + feather)
    x = np.clip((dist - margin) / feather, 0.0, 1.0)
    return paste_window(1.0 - x * x * (3.0 - 2.0 * x), (x0, y0), (0, 0), (hgt, wid)).astype(np.float32)


def outside_distance(poly: np.ndarray, reach: float) -> tuple[np.ndarray, tuple[int, int]]:
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


def paste_window(window: np.ndarray, at: tuple[int, int], origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
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
