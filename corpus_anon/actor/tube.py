"""The face tube of the face module (METHOD.md §6.2): one fixed box per clip, the union of the
signer's face boxes enlarged aspect-preservingly (frames without a box take their neighbours'), so
head translation and head shakes stay in the driving signal; both clips are cropped with it to the
reenactment network's size and the prediction goes back at box size."""

from __future__ import annotations

import math

import numpy as np
import torch


# Boxes are compared against float edges; this keeps 22.000000000000004 from rounding out to 23.
_EDGE_TOL = 1e-6


def valid_rows(boxes: np.ndarray) -> np.ndarray:
    """Rows that hold a finite box of positive width and height."""
    b = np.asarray(boxes, dtype=np.float64)
    ok = np.isfinite(b).all(axis=1)
    ok[ok] = (b[ok, 2] > b[ok, 0]) & (b[ok, 3] > b[ok, 1])
    return ok


def check_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape != (n, 4):
        raise ValueError(f"boxes must be (T, 4) = ({n}, 4), got {b.shape}.")
    return b


def scaled_box(box: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
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
    ok = valid_rows(b)
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
    ok = valid_rows(b)
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


def resize_rgb(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
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
        out[t] = resize_rgb(region, size, size)
    return torch.from_numpy(np.clip(out, 0.0, 1.0)).permute(0, 3, 1, 2).contiguous()


def uncrop(pred: torch.Tensor, box: tuple[int, int, int, int]) -> np.ndarray:
    """(T, y1 - y0, x1 - x0, 3) float32 in [0, 1]: square predictions (T, 3, S, S) resized back to the
    box they were cropped from."""
    x0, y0, x1, y1 = box
    p = pred.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    out = np.empty((len(p), y1 - y0, x1 - x0, 3), dtype=np.float32)
    for t in range(len(p)):
        out[t] = resize_rgb(np.ascontiguousarray(p[t]), x1 - x0, y1 - y0)
    return np.clip(out, 0.0, 1.0)
