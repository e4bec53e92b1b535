"""Face tracks over a clip, and the one rule that picks the signer (numpy only).

The signer is the largest, most central face track over the clip: each track scores the sum over
its detected frames of (box area / frame area) x (1 - distance of the box centre from the frame
centre / half the frame diagonal). Long, large, central tracks win; a face passing by the edge loses.
Every module that needs "the signer" calls `signer_track`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / ua) if ua > 0 else 0.0


@dataclass
class Track:
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)

    @property
    def last(self) -> np.ndarray:
        return self.boxes[-1]

    def span(self) -> tuple[int, int]:
        return self.frames[0], self.frames[-1]


def build_tracks(
    detections: list[np.ndarray], iou_threshold: float = 0.2, max_gap: int = 15
) -> list[Track]:
    """Link per-frame boxes into tracks greedily by IoU with each track's last box.

    `detections[t]` is an (k, 4) array of boxes for frame t (empty when the detector did not run
    or found nothing). A track that has not matched for `max_gap` frames is closed.
    """
    open_tracks: list[Track] = []
    closed: list[Track] = []
    for t, boxes in enumerate(detections):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        still_open = []
        for tr in open_tracks:
            (closed if t - tr.frames[-1] > max_gap else still_open).append(tr)
        open_tracks = still_open
        used: set[int] = set()
        pairs = sorted(
            ((iou(tr.last, b), ti, bi) for ti, tr in enumerate(open_tracks) for bi, b in enumerate(boxes)),
            reverse=True,
        )
        matched_tracks: set[int] = set()
        for score, ti, bi in pairs:
            if score < iou_threshold or ti in matched_tracks or bi in used:
                continue
            open_tracks[ti].frames.append(t)
            open_tracks[ti].boxes.append(boxes[bi])
            matched_tracks.add(ti)
            used.add(bi)
        for bi, b in enumerate(boxes):
            if bi not in used:
                open_tracks.append(Track([t], [b]))
    return sorted(closed + open_tracks, key=lambda tr: tr.frames[0])


def track_score(track: Track, width: int, height: int) -> float:
    area = float(width * height)
    half_diag = 0.5 * float(np.hypot(width, height))
    cx0, cy0 = width / 2.0, height / 2.0
    score = 0.0
    for b in track.boxes:
        a = max(0.0, (b[2] - b[0]) * (b[3] - b[1])) / area
        d = np.hypot((b[0] + b[2]) / 2 - cx0, (b[1] + b[3]) / 2 - cy0) / half_diag
        score += a * max(0.0, 1.0 - d)
    return score


def signer_track(tracks: list[Track], width: int, height: int) -> int | None:
    """Index of the signer's track (largest, most central over the clip), or None without faces."""
    if not tracks:
        return None
    scores = [track_score(tr, width, height) for tr in tracks]
    return int(np.argmax(scores))


def fill_boxes(track: Track, n_frames: int, hold: int | None = None) -> np.ndarray:
    """Per-frame boxes for a track: linear interpolation between detections, held past its ends.

    `hold=None` holds the first/last box to the clip's ends (the signer: fail closed); otherwise
    for at most `hold` frames. Frames without a box are NaN.
    """
    out = np.full((n_frames, 4), np.nan)
    fr = np.asarray(track.frames)
    bx = np.asarray(track.boxes, dtype=np.float64)
    lo, hi = fr[0], fr[-1]
    span = np.arange(lo, hi + 1)
    for k in range(4):
        out[lo : hi + 1, k] = np.interp(span, fr, bx[:, k])
    a = 0 if hold is None else max(0, lo - hold)
    b = n_frames - 1 if hold is None else min(n_frames - 1, hi + hold)
    out[a:lo] = bx[0]
    out[hi + 1 : b + 1] = bx[-1]
    return out


def cover_boxes(tracks: list[Track], n_frames: int, hold: int, whole: int | None = None,
                smooth: int = 5) -> list[np.ndarray]:
    """Per track, the (n_frames, 4) boxes to hide (NaN where none): every track over its whole span,
    interpolated across its gaps and held `hold` frames past both ends, then smoothed; track
    `whole` (the signer) is held to both ends of the clip. One-detection tracks count like any other:
    a false positive costs a patch, a miss costs a face."""
    return [smooth_boxes(fill_boxes(tr, n_frames, hold=None if i == whole else hold), smooth)
            for i, tr in enumerate(tracks)]


STILL_SIDE = 24  # grey patches are compared at this size
STILL_ZNCC = 0.6  # a patch at least this correlated with the reference shows the same thing


def _still_patch(frame: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The zero-mean, unit-norm grey patch of `frame` inside `box` (None when it is empty or flat)."""
    import cv2

    h, w = frame.shape[:2]
    x0, y0, x1, y1 = expand_box(box, 1.0, w, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    g = cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    p = cv2.resize(g, (STILL_SIDE, STILL_SIDE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    p -= p.mean()
    norm = float(np.linalg.norm(p))
    return p / norm if norm > 1e-6 else None


def still_until(frames: np.ndarray, box: np.ndarray, ref: int, step: int) -> int:
    """Walking from frame `ref` by `step` (-1 or +1), the farthest frame whose picture inside `box`
    still correlates with frame `ref`'s (zero-mean normalised correlation of small grey patches >=
    STILL_ZNCC, every frame on the way included); `ref` itself when the next one already differs.
    A face whose place looks the same is taken to be still there, detected or not."""
    base = _still_patch(frames[ref], box)
    last = ref
    if base is None:
        return last
    t = ref + step
    while 0 <= t < len(frames):
        cur = _still_patch(frames[t], box)
        if cur is None or float(base @ cur) < STILL_ZNCC:
            break
        last = t
        t += step
    return last


def smooth_boxes(boxes: np.ndarray, window: int = 5) -> np.ndarray:
    """Centred moving average over time (NaN rows stay NaN), to keep boxes from jittering."""
    if window <= 1 or len(boxes) < 2:
        return boxes
    out = boxes.copy()
    valid = ~np.isnan(boxes[:, 0])
    r = window // 2
    for t in np.flatnonzero(valid):
        a, b = max(0, t - r), min(len(boxes), t + r + 1)
        seg = boxes[a:b][valid[a:b]]
        out[t] = seg.mean(axis=0)
    return out


def expand_box(box: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Scale a box about its centre and clip it to the frame; integer (x0, y0, x1, y1)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * scale / 2, (box[3] - box[1]) * scale / 2
    x0, y0 = int(max(0, np.floor(cx - hw))), int(max(0, np.floor(cy - hh)))
    x1, y1 = int(min(width, np.ceil(cx + hw))), int(min(height, np.ceil(cy + hh)))
    return x0, y0, x1, y1
