"""MediaPipe's hand models: palm detection, then 21 points per hand, and tracking hands between
palm detections.

Hands (``HandLandmarker``), as MediaPipe's hand graph does them: the palm detector (an SSD on the frame,
or a part of it, letterboxed to 192 x 192, 2016 anchors, weighted non-maximum suppression) finds palms
with seven keypoints; each palm gives a square turned so that the wrist -> middle-knuckle direction
points up, 2.6 times the palm's size and shifted towards the fingers, resized to 224 x 224, on which the
hand landmark network returns 21 (x, y, z) points, a hand presence and the handedness. OpenCV 4.14's
importer stacks a batch's palm outputs layer by layer; the layout is found once when the model loads.
Over consecutive frames hands can be tracked (``Landmarks.clip(track_hands=True)``): palms every
``HAND_DETECT_EVERY`` frames and wherever a followed hand is lost, in between each hand's square from
its previous landmarks (``hand_track_roi``), and, with ``near_face``, only the hands whose square meets
the face's surroundings (``near_face_zone``) measured at all: what the face module needs, at about a
third of the every-frame cost.

cv2 is imported inside functions only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from corpus_anon.models.mediapipe_common import Roi, apply_affine, check_frame, warp_square

log = logging.getLogger(__name__)


# ---- hands (data) --------------------------------------------------------------------------------
HAND_POINTS = 21


WRIST = 0


MIDDLE_MCP = 9


@dataclass
class Hand:
    """One hand: 21 points (x, y in frame pixels; z in the same pixel scale, relative to the wrist),
    the landmark network's hand presence and handedness (probability that it is a right hand), the
    palm detector's score, and the square the landmarks were read from."""

    points: np.ndarray  # (21, 3) float32
    presence: float
    handedness: float
    palm_score: float
    roi: Roi | None = None

    @property
    def box(self) -> np.ndarray:
        """(x0, y0, x1, y1) around the points."""
        xy = self.points[:, :2]
        return np.array([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()], dtype=np.float64)

    @property
    def size(self) -> float:
        """The hand's size in pixels: the diagonal of its points' box (what hand errors are divided by)."""
        b = self.box
        return float(math.hypot(b[2] - b[0], b[3] - b[1]))


# ---- hands (models) ------------------------------------------------------------------------------
# MediaPipe's palm detector: an SSD on a 192 x 192 letterboxed frame; its anchors as MediaPipe's palm
# graph generates them (strides 8, 16, 16, 16, two anchors per layer and location, offset 0.5, fixed
# size 1): 24 x 24 x 2 + 12 x 12 x 6 = 2016. Each anchor's 18 numbers are a box (cx, cy, w, h) and
# seven keypoints (x, y), in input pixels relative to the anchor's centre; its score is a logit.
PALM_SIZE = 192
PALM_WRIST, PALM_MIDDLE_MCP = 0, 2  # the palm keypoints the hand's direction is read from


PALM_STRIDES: tuple[int, ...] = (8, 16, 16, 16)


PALM_ANCHORS_PER_LAYER = 2


PALM_KEYPOINTS = 7


PALM_NMS_IOU = 0.3


# The hand landmark network's square around a palm (MediaPipe's palm-to-ROI rule): turned so the hand
# points up, shifted half the palm's height towards the fingers, the palm box's long side x 2.6.
HAND_SIZE = 224


HAND_ROI_SCALE = 2.6


HAND_ROI_SHIFT = -0.5


HAND_DUPLICATE_IOU = 0.5  # two hands whose point boxes overlap more are one hand found twice


# The signing space (``signing_space``): a square of 6 face heights, its centre 1.5 face heights below
# the face's. On t1.jpg, palm detection in it finds hands that the whole frame shrinks below ~18 px.
SIGNING_SPACE = 6.0


SIGNING_SPACE_DROP = 1.5


def _stride_groups(strides: Sequence[int]) -> list[tuple[int, int]]:
    """(stride, number of layers) for each run of equal strides: the layers that share a feature map."""
    out: list[tuple[int, int]] = []
    for s in strides:
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def palm_anchors(size: int = PALM_SIZE, strides: Sequence[int] = PALM_STRIDES,
                 per_layer: int = PALM_ANCHORS_PER_LAYER, offset: float = 0.5) -> np.ndarray:
    """(A, 2) float64 anchor centres (x, y) as fractions of the input side, in the detector's output
    order: layers of one stride share a feature map and stack their anchors at each location, row by
    row. A = 2016 for the palm detector."""
    out = []
    for stride, layers in _stride_groups(strides):
        n = math.ceil(size / stride)
        ys, xs = np.meshgrid((np.arange(n) + offset) / n, (np.arange(n) + offset) / n, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        out.append(np.repeat(centres, per_layer * layers, axis=0))
    return np.concatenate(out)


def decode_palms(raw: np.ndarray, logits: np.ndarray, anchors: np.ndarray, threshold: float,
                 size: int = PALM_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The palm detector's output for one frame, decoded: boxes (n, 4) as (x0, y0, x1, y1), keypoints
    (n, 7, 2), both in input pixels, and scores (n,) (sigmoid of the logit), for the n anchors whose
    score reaches ``threshold`` and whose box has a positive size."""
    raw = np.asarray(raw, dtype=np.float64).reshape(len(anchors), 4 + 2 * PALM_KEYPOINTS)
    scores = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, dtype=np.float64).reshape(-1), -100.0, 100.0)))
    keep = np.flatnonzero((scores >= threshold) & (raw[:, 2] > 0) & (raw[:, 3] > 0))
    a = anchors[keep] * size
    r = raw[keep]
    cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
    w, h = r[:, 2], r[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    kps = r[:, 4:].reshape(-1, PALM_KEYPOINTS, 2) + a[:, None, :]
    return boxes, kps, scores[keep]


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou: float = PALM_NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression: the best remaining detection and every other whose
    IoU with it exceeds ``iou`` become one, their boxes and keypoints averaged with the scores as
    weights, the best score kept. Returns (boxes, keypoints, scores), highest score first."""
    order = np.argsort(-scores, kind="stable")
    area = np.maximum(0.0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0.0, boxes[:, 3] - boxes[:, 1])
    ob, ok, os_ = [], [], []
    while len(order):
        i = order[0]
        lo = np.maximum(boxes[i, :2], boxes[order, :2])
        hi = np.minimum(boxes[i, 2:], boxes[order, 2:])
        inter = np.prod(np.maximum(0.0, hi - lo), axis=1)
        overlap = inter / np.maximum(area[i] + area[order] - inter, 1e-12)
        group = order[overlap > iou]
        group = group if len(group) else order[:1]
        w = scores[group] / scores[group].sum()
        ob.append(w @ boxes[group])
        ok.append(np.tensordot(w, keypoints[group], axes=1))
        os_.append(scores[i])
        order = order[overlap <= iou]
        order = order[order != i]
    if not ob:
        return np.zeros((0, 4)), np.zeros((0, PALM_KEYPOINTS, 2)), np.zeros(0)
    return np.array(ob), np.array(ok), np.array(os_)


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame scaled to fit a size x size square (aspect kept, INTER_AREA) and centred on black,
    and the 2 x 3 affine map from that square's continuous coordinates (0 .. size) back to the frame's
    pixel coordinates (pixel centres at integers, as cv2.warpAffine has them)."""
    import cv2

    h, w = frame.shape[:2]
    k = size / max(h, w)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    px, py = (size - nw) // 2, (size - nh) // 2
    small = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    out = np.zeros((size, size, 3), np.uint8)
    out[py:py + nh, px:px + nw] = small
    sx, sy = w / nw, h / nh
    return out, np.array([[sx, 0.0, -px * sx - 0.5], [0.0, sy, -py * sy - 0.5]])


def _palm_rows(rows: np.ndarray, n: int, layout: str) -> np.ndarray:
    """(n, 2016, C) from the palm detector's (n * 2016, C) output rows for n frames laid out by
    ``layout`` ("frame", "single": frame after frame; "layer": every frame's rows of one anchor layer,
    then the next layer's)."""
    if layout != "layer":
        return rows.reshape(n, -1, rows.shape[1])
    groups = [math.ceil(PALM_SIZE / s) ** 2 * PALM_ANCHORS_PER_LAYER * c for s, c in _stride_groups(PALM_STRIDES)]
    parts, at = [], 0
    for g in groups:
        parts.append(rows[at:at + n * g].reshape(n, g, rows.shape[1]))
        at += n * g
    return np.concatenate(parts, axis=1)


def signing_space(face_box: Sequence[float], frame_shape: Sequence[int], scale: float = SIGNING_SPACE,
                  drop: float = SIGNING_SPACE_DROP) -> np.ndarray | None:
    """(x0, y0, x1, y1) int64 frame pixels where a signer's hands are looked for: a square of ``scale``
    face heights on a side, centred ``drop`` face heights below the centre of ``face_box``, cut to the
    frame (``frame_shape`` (H, W, ...)). None when the box is not finite or has no height."""
    b = np.asarray(face_box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all() or b[3] <= b[1]:
        return None
    h, w = int(frame_shape[0]), int(frame_shape[1])
    fh = b[3] - b[1]
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2 + drop * fh
    half = scale * fh / 2
    x0, y0 = max(0, int(math.floor(cx - half))), max(0, int(math.floor(cy - half)))
    x1, y1 = min(w, int(math.ceil(cx + half))), min(h, int(math.ceil(cy + half)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return np.array([x0, y0, x1, y1], dtype=np.int64)


@dataclass
class Palm:
    """One palm detection in frame pixels: its box (x0, y0, x1, y1), seven keypoints (7, 2; 0 the
    wrist's centre, 2 the middle finger's knuckle) and score (probability)."""

    box: np.ndarray
    keypoints: np.ndarray
    score: float


def hand_roi(palm: Palm, scale: float = HAND_ROI_SCALE, shift: float = HAND_ROI_SHIFT) -> Roi:
    """The hand landmark network's square for a palm (MediaPipe's rule): turned so that the wrist ->
    middle-knuckle direction points up in the square, moved ``shift`` of the palm box's height along the
    square's y axis (negative: towards the fingers), the box's longer side times ``scale``."""
    x0, y0, x1, y1 = (float(v) for v in palm.box)
    d = np.asarray(palm.keypoints[PALM_MIDDLE_MCP], np.float64) - np.asarray(palm.keypoints[PALM_WRIST], np.float64)
    # The square's y axis in the frame is (-sin a, cos a); "up" (its -y) along d gives a = atan2(dx, -dy).
    angle = math.atan2(d[0], -d[1])
    w, h = x1 - x0, y1 - y0
    c, s = math.cos(angle), math.sin(angle)
    cx = (x0 + x1) / 2 - s * shift * h
    cy = (y0 + y1) / 2 + c * shift * h
    return Roi(cx, cy, max(w, h) * scale, angle)


class HandLandmarker:
    """MediaPipe's hands on OpenCV's TFLite importer: palm detection on the whole frame (batched over
    frames), then 21 landmarks per palm in a square turned upright around it (batched over all palms).

    Per frame, at most ``max_hands`` hands, the best palm scores among those whose landmark network
    gives a presence of at least ``hand_threshold``. Presence and handedness come out of the network as
    probabilities; handedness is that of a right hand in a camera image as recorded (not mirrored: on
    t1.jpg's players, the hand on the image's left of a person facing the camera scores near 1)."""

    name = "mediapipe-hands"

    def __init__(self, palm_path: str | Path, hand_path: str | Path, max_hands: int = 2,
                 palm_threshold: float = 0.5, hand_threshold: float = 0.5, batch_size: int = 16) -> None:
        import cv2

        if int(max_hands) < 1:
            raise ValueError(f"max_hands must be at least 1, got {max_hands}.")
        for label, v in (("palm_threshold", palm_threshold), ("hand_threshold", hand_threshold)):
            if not 0.0 < float(v) < 1.0:
                raise ValueError(f"{label} must be between 0 and 1 (exclusive), got {v}.")
        self._cv2 = cv2
        self.max_hands = int(max_hands)
        self.palm_threshold = float(palm_threshold)
        self.hand_threshold = float(hand_threshold)
        self.batch_size = max(1, int(batch_size))
        self.anchors = palm_anchors()
        self.palm_net = cv2.dnn.readNetFromTFLite(str(palm_path))
        self._palm_outs = list(self.palm_net.getUnconnectedOutLayersNames())
        self.hand_net = cv2.dnn.readNetFromTFLite(str(hand_path))
        self._hand_outs = list(self.hand_net.getUnconnectedOutLayersNames())
        # Which output is which, by size on a blank input: the palm detector gives 2016 x 18 box numbers
        # and 2016 scores; the hand network 63 image coordinates (input pixels), 63 world coordinates
        # (metres, far smaller), and two single numbers, presence and handedness, told apart by name.
        palm = self._forward(self.palm_net, self._palm_outs, [np.zeros((PALM_SIZE, PALM_SIZE, 3), np.uint8)],
                             PALM_SIZE)
        sizes = sorted(o.size for o in palm)
        if sizes != [len(self.anchors), len(self.anchors) * 18]:
            raise ValueError(f"{palm_path} is not MediaPipe's palm detector (outputs of 2016 and 36288 numbers), "
                             f"got outputs of sizes {sizes}.")
        self._palm_box = next(i for i, o in enumerate(palm) if o.size == len(self.anchors) * 18)
        self._palm_score = 1 - self._palm_box
        self._palm_layout = self._palm_batch_layout()
        hand = self._forward(self.hand_net, self._hand_outs, [np.zeros((HAND_SIZE, HAND_SIZE, 3), np.uint8)],
                             HAND_SIZE)
        sizes = sorted(o.size for o in hand)
        names = {n.split(":")[0] for n in self._hand_outs}
        if sizes != [1, 1, 63, 63] or names != {"Identity", "Identity_1", "Identity_2", "Identity_3"}:
            raise ValueError(f"{hand_path} is not MediaPipe's hand landmark network (outputs Identity..Identity_3 of "
                             f"63, 1, 1 and 63 numbers), got {sorted(self._hand_outs)} of sizes {sizes}.")
        big = [i for i, o in enumerate(hand) if o.size == 63]
        self._hand_points = max(big, key=lambda i: float(np.abs(hand[i]).mean()))
        self._hand_presence = self._hand_outs.index("Identity_1")
        self._hand_handedness = self._hand_outs.index("Identity_2")
        log.info("hand models: palm detector %s -> %s; hand landmarks %s -> %s", Path(palm_path).name,
                 [o.shape for o in palm], Path(hand_path).name,
                 {n: o.shape for n, o in zip(self._hand_outs, hand)})

    def _forward(self, net: Any, outs: list[str], images: list[np.ndarray], size: int) -> list[np.ndarray]:
        blob = self._cv2.dnn.blobFromImages(images, 1.0 / 255.0, (size, size), swapRB=False, crop=False)
        net.setInput(blob)
        return net.forward(outs)

    def _palm_batch_layout(self) -> str:
        """How the palm detector's batched output is laid out, found by running two different frames
        alone and together: "frame" (frame after frame), "layer" (OpenCV 4.14's importer: each
        anchor layer's rows for every frame, then the next layer's), or "single" (neither: one frame a call)."""
        rng = np.random.default_rng(0)
        ims = [rng.integers(0, 256, (PALM_SIZE, PALM_SIZE, 3), dtype=np.uint8) for _ in range(2)]
        alone = [self._forward(self.palm_net, self._palm_outs, [im], PALM_SIZE)[self._palm_box] for im in ims]
        both = self._forward(self.palm_net, self._palm_outs, ims, PALM_SIZE)[self._palm_box]
        want = np.stack([a.reshape(len(self.anchors), -1) for a in alone])
        for layout in ("frame", "layer"):
            got = _palm_rows(both.reshape(-1, want.shape[2]), 2, layout)
            if np.allclose(got, want, atol=1e-4):
                return layout
        log.warning("the palm detector's batched output matches neither known layout; it runs one frame a call")
        return "single"

    def palms(self, frames: Sequence[np.ndarray], regions: Sequence[Sequence[int] | None] | None = None,
              check: Callable[[], None] | None = None) -> list[list[Palm]]:
        """Every palm in each uint8 RGB frame whose score reaches ``palm_threshold``, after weighted
        non-maximum suppression, in frame pixels, highest score first. ``regions[i]`` (x0, y0, x1, y1
        integer frame pixels, e.g. ``signing_space``) limits frame i's search to that part, which the
        detector then sees larger; None (or no ``regions``) searches the whole frame. ``check`` is
        called after each batch."""
        frames = [check_frame(f) for f in frames]
        if regions is not None and len(regions) != len(frames):
            raise ValueError(f"palms needs one region (or None) per frame, got {len(frames)} frames and "
                             f"{len(regions)} regions.")
        parts = []
        for i, f in enumerate(frames):
            r = None if regions is None else regions[i]
            if r is None:
                parts.append((f, 0, 0))
                continue
            x0, y0, x1, y1 = (int(v) for v in r)
            if not (0 <= x0 < x1 <= f.shape[1] and 0 <= y0 < y1 <= f.shape[0]):
                raise ValueError(f"region {i} must be integer (x0, y0, x1, y1) inside the {f.shape[1]}x{f.shape[0]} "
                                 f"frame with x0 < x1 and y0 < y1, got {tuple(r)}.")
            parts.append((f[y0:y1, x0:x1], x0, y0))
        out: list[list[Palm]] = []
        step = 1 if self._palm_layout == "single" else self.batch_size
        for start in range(0, len(parts), step):
            chunk = parts[start:start + step]
            boxed = []
            for f, x0, y0 in chunk:
                img, m = letterbox(f, PALM_SIZE)
                boxed.append((img, m + np.array([[0.0, 0.0, x0], [0.0, 0.0, y0]])))
            res = self._forward(self.palm_net, self._palm_outs, [b[0] for b in boxed], PALM_SIZE)
            raw = _palm_rows(res[self._palm_box].reshape(-1, 18), len(chunk), self._palm_layout)
            logit = _palm_rows(res[self._palm_score].reshape(-1, 1), len(chunk), self._palm_layout)[:, :, 0]
            for (_, m), r, lg in zip(boxed, raw, logit):
                boxes, kps, scores = weighted_nms(*decode_palms(r, lg, self.anchors, self.palm_threshold))
                corners = apply_affine(m, boxes.reshape(-1, 2)).reshape(-1, 4)
                points = apply_affine(m, kps.reshape(-1, 2)).reshape(-1, PALM_KEYPOINTS, 2)
                out.append([Palm(b, k, float(s)) for b, k, s in zip(corners, points, scores)])
            if check is not None:
                check()
        return out

    def landmarks(self, frames: Sequence[np.ndarray], rois: Sequence[Roi],
                  check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The hand landmark network on the square ``rois[i]`` of ``frames[i]``, batched: points
        (N, 21, 3) in frame pixels (z in the same scale, relative to the wrist, smaller = nearer),
        presence (N,) and handedness (N,, probability of a right hand), both probabilities. ``check``
        is called after each batch."""
        if len(frames) != len(rois):
            raise ValueError(f"landmarks needs one square per frame, got {len(frames)} frames and {len(rois)} squares.")
        pts, pres, hand = [], [], []
        for start in range(0, len(rois), self.batch_size):
            fr, rs = frames[start:start + self.batch_size], rois[start:start + self.batch_size]
            crops = [warp_square(check_frame(f), r, HAND_SIZE) for f, r in zip(fr, rs)]
            res = self._forward(self.hand_net, self._hand_outs, crops, HAND_SIZE)
            p = res[self._hand_points].reshape(len(rs), HAND_POINTS, 3).astype(np.float64)
            for q, r in zip(p, rs):
                # The network's coordinates are continuous (0 .. 224); cv2's warp puts pixel centres at integers.
                q[:, :2] = apply_affine(r.to_frame(HAND_SIZE), q[:, :2] - 0.5)
                q[:, 2] *= r.side / HAND_SIZE
            pts.append(p)
            pres.append(res[self._hand_presence].reshape(-1))
            hand.append(res[self._hand_handedness].reshape(-1))
            if check is not None:
                check()
        if not pts:
            return np.zeros((0, HAND_POINTS, 3)), np.zeros(0), np.zeros(0)
        return (np.concatenate(pts), np.concatenate(pres).astype(np.float64),
                np.concatenate(hand).astype(np.float64))

    def detect_batch(self, frames: Sequence[np.ndarray], regions: Sequence[Sequence[int] | None] | None = None,
                     check: Callable[[], None] | None = None,
                     near: Sequence[np.ndarray | None] | None = None) -> list[list[Hand]]:
        """The hands in each uint8 RGB frame, in frame pixels: the landmark network runs on the
        2 x ``max_hands`` best palms, hands with a presence below ``hand_threshold`` or landing on a hand
        already kept (their boxes' IoU above 0.5) are dropped, and the ``max_hands`` best palm scores stay.
        ``regions`` limits each frame's palm search as in ``palms``; the landmarks may reach past it.
        ``near[i]`` (x0, y0, x1, y1 frame pixels, or None: anywhere) keeps only the palms whose square
        (``hand_roi``) meets it, before the landmark network runs. ``check`` is called between batches."""
        if near is not None and len(near) != len(frames):
            raise ValueError(f"detect_batch needs one near-zone (or None) per frame, got {len(frames)} frames and "
                             f"{len(near)} zones.")
        palms = self.palms(frames, regions, check)
        owner, rois, kept = [], [], []
        for i, ps in enumerate(palms):
            if near is not None and near[i] is not None:
                ps = [p for p in ps if boxes_meet(roi_box(hand_roi(p)), near[i])]
            for p in ps[:2 * self.max_hands]:
                owner.append(i)
                rois.append(hand_roi(p))
                kept.append(p)
        pts, pres, handed = self.landmarks([frames[i] for i in owner], rois, check)
        out: list[list[Hand]] = [[] for _ in frames]
        for i, p, q, pr, hd, r in zip(owner, kept, pts, pres, handed, rois):
            if pr < self.hand_threshold or len(out[i]) >= self.max_hands:
                continue
            hand = Hand(q.astype(np.float32), float(pr), float(hd), p.score, r)
            if all(box_iou(hand.box, h.box) <= HAND_DUPLICATE_IOU for h in out[i]):
                out[i].append(hand)
        return out


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.maximum(0.0, hi - lo)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / union if union > 0 else 0.0


def roi_box(roi: Roi) -> np.ndarray:
    """(x0, y0, x1, y1) frame pixels around the turned square ``roi``."""
    half = roi.side / 2 * (abs(math.cos(roi.angle)) + abs(math.sin(roi.angle)))
    return np.array([roi.cx - half, roi.cy - half, roi.cx + half, roi.cy + half])


def point_inside(point: np.ndarray, box: np.ndarray) -> bool:
    """Whether the (x, y) ``point`` lies in the (x0, y0, x1, y1) ``box``."""
    return bool(box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])


def boxes_meet(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (x0, y0, x1, y1) boxes overlap."""
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


# MediaPipe's hand tracking square from the previous frame's landmarks (its hand-landmarks-to-rect rule):
# the points at the wrist and the fingers' first two joints (not the tips, which jump), turned so the
# wrist -> knuckles direction points up, their box in that orientation, moved a tenth of its height
# towards the fingers and squared to twice its longer side.
HAND_TRACK_POINTS = (0, 1, 2, 3, 5, 6, 9, 10, 13, 14, 17, 18)


HAND_TRACK_SCALE = 2.0


HAND_TRACK_SHIFT = -0.1


# Tracking (``Landmarks.clip(track_hands=True)``): palms are detected every this many frames, and on any
# frame where a tracked hand is lost; in between each hand's square comes from its previous landmarks.
HAND_DETECT_EVERY = 4


# Near the face (``Landmarks.clip(near_face=...)``): the face box scaled by this about its centre. A hand
# whose square meets it can reach the face by the next palm detection; enhancement uses this zone.
NEAR_FACE = 2.0


def hand_track_roi(points: np.ndarray, scale: float = HAND_TRACK_SCALE, shift: float = HAND_TRACK_SHIFT) -> Roi:
    """The hand landmark network's square for the next frame from this frame's 21 points (frame
    pixels): turned so that the wrist -> knuckles direction (the middle knuckle averaged with the mean
    of the index and ring knuckles) points up, around the box of ``HAND_TRACK_POINTS`` in that
    orientation, moved ``shift`` of the box's height along the square's y axis, ``scale`` times the
    box's longer side."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    if p.shape != (HAND_POINTS, 2) or not np.isfinite(p).all():
        raise ValueError(f"hand_track_roi needs 21 finite hand landmarks, got shape {np.asarray(points).shape}.")
    knuckles = ((p[5] + p[13]) / 2 + p[MIDDLE_MCP]) / 2
    d = knuckles - p[WRIST]
    angle = math.atan2(d[0], -d[1])  # as hand_roi: the square's -y axis along d
    c, s = math.cos(angle), math.sin(angle)
    q = p[list(HAND_TRACK_POINTS)]
    rx, ry = q @ np.array([c, s]), q @ np.array([-s, c])  # coordinates along the square's x and y axes
    w, h = rx.max() - rx.min(), ry.max() - ry.min()
    mx, my = (rx.max() + rx.min()) / 2, (ry.max() + ry.min()) / 2 + shift * h
    centre = mx * np.array([c, s]) + my * np.array([-s, c])
    return Roi(float(centre[0]), float(centre[1]), float(max(w, h)) * scale, angle)


def near_face_zone(face_box: Sequence[float], scale: float = NEAR_FACE) -> np.ndarray | None:
    """(x0, y0, x1, y1) frame pixels: ``face_box`` scaled by ``scale`` about its centre; None when the
    box is not finite."""
    b = np.asarray(face_box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all():
        return None
    c, half = (b[:2] + b[2:]) / 2, (b[2:] - b[:2]) * scale / 2
    return np.concatenate([c - half, c + half])
