"""MediaPipe's face mesh (468 points) and the expression features read from it.

Face mesh (``FaceMesh``): the face is cut out of the frame as a square region of interest, rotated so
the eyes are level (from the detector's five keypoints when given), 1.5 times the face's size, and
resized to 192 x 192; the network returns 468 (x, y, z) points in that square and a face logit. The
points are mapped back to the frame. With ``refine`` the region is recomputed from the first pass's
points (their bounding box and eye line, as MediaPipe's own tracking does) and the mesh run again,
which makes it independent of how tight the detector's box is.

``expression_features`` turns a mesh into the four non-manual-marker series the fidelity metrics
compare (brow raise, eye openness, mouth openness, mouth width). cv2 is imported inside functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from corpus_anon.models.mediapipe_common import Roi, apply_affine, check_frame, warp_square


MESH_SIZE = 192


MESH_POINTS = 468


# Mesh indices (the subject's right is the image's left in a frontal view).
EYE_OUTER = (33, 263)  # right eye outer corner, left eye outer corner


NOSE_TIP = 1


CHIN = 152


FOREHEAD = 10


def face_roi(box: Sequence[float], kps: np.ndarray | None = None, scale: float = 1.5) -> Roi:
    """The mesh's input square for a detector box: centred on the box, ``scale`` times its longer side,
    rotated so the line through the first two of five keypoints (when given) is level. That line is
    taken left to right in the image, so it serves both layouts: the two eye centres in ArcFace's
    order (CenterFace, SCRFD) and one eye's two corners in dlib's 5-point order (read right to left
    as given, it would turn the square upside down)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    angle = 0.0
    if kps is not None:
        k = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
        if len(k) >= 2 and np.isfinite(k[:2]).all():
            d = k[1] - k[0]
            if d[0] < 0:
                d = -d
            angle = math.atan2(d[1], d[0])
    return Roi((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale, angle)


def mesh_roi(points: np.ndarray, scale: float = 1.5) -> Roi:
    """The mesh's input square from a previous mesh: level with the outer eye corners, around the
    points' bounding box in that orientation, ``scale`` times its longer side."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    d = p[EYE_OUTER[1]] - p[EYE_OUTER[0]]
    angle = math.atan2(d[1], d[0])
    c, s = math.cos(angle), math.sin(angle)
    r = p @ np.array([[c, -s], [s, c]])  # the points in the rotated frame (R(-angle) applied)
    lo, hi = r.min(axis=0), r.max(axis=0)
    mid = (lo + hi) / 2
    centre = np.array([[c, -s], [s, c]]) @ mid  # back to the frame (R(angle))
    return Roi(float(centre[0]), float(centre[1]), float(max(hi - lo)) * scale, angle)


# ---- expression features -------------------------------------------------------------------------
# Mesh indices of the non-manual markers (MediaPipe's topology; "right" is the subject's right).
BROW_RIGHT = (63, 105, 66)


BROW_LEFT = (293, 334, 296)


EYE_RIGHT = {"upper": 159, "lower": 145, "outer": 33, "inner": 133}


EYE_LEFT = {"upper": 386, "lower": 374, "outer": 263, "inner": 362}


LIPS_INNER = (13, 14)  # upper, lower inner lip at the midline


MOUTH_CORNERS = (61, 291)


CHEEKS = (234, 454)


EXPRESSION_FEATURES = ("brow_raise", "eye_open", "mouth_open", "mouth_width")


def expression_features(points: np.ndarray) -> np.ndarray:
    """(4,) float64, the non-manual-marker measures of one mesh (468, 2 or 3), each free of the face's
    size and position: brow raise, eye openness (lid gap over eye width, both eyes), mouth openness
    (inner-lip gap over face height, forehead 10 to chin 152) and mouth width (corner to corner over
    face width, cheek 234 to cheek 454). NaN for a degenerate mesh.

    Brow raise is each brow's distance (the mean of three brow points) from the midpoint of its eye's
    two corners (33/133, 263/362), averaged over both sides and divided by the outer-eye distance
    (33 to 263). Neither the corners nor that distance move when the eyes blink or the jaw drops, so
    mouthing and blinking leave it alone (the face height would shrink it as the chin drops; the lids'
    centre would move it with a blink)."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    if p.shape != (MESH_POINTS, 2):
        raise ValueError(f"expression_features needs one mesh (468, 2 or 3), got {np.asarray(points).shape}.")

    def dist(i: int, j: int) -> float:
        return float(np.linalg.norm(p[i] - p[j]))

    height, width, eyes_apart = dist(FOREHEAD, CHIN), dist(*CHEEKS), dist(*EYE_OUTER)
    if not (height > 1e-6 and width > 1e-6 and eyes_apart > 1e-6):
        return np.full(len(EXPRESSION_FEATURES), np.nan)
    brows = []
    for brow, eye in ((BROW_RIGHT, EYE_RIGHT), (BROW_LEFT, EYE_LEFT)):
        corners = (p[eye["outer"]] + p[eye["inner"]]) / 2
        brows.append(float(np.linalg.norm(p[list(brow)].mean(axis=0) - corners)))
    eyes = [dist(e["upper"], e["lower"]) / max(dist(e["outer"], e["inner"]), 1e-6) for e in (EYE_RIGHT, EYE_LEFT)]
    return np.array([np.mean(brows) / eyes_apart, np.mean(eyes), dist(*LIPS_INNER) / height,
                     dist(*MOUTH_CORNERS) / width])


# ---- face mesh -----------------------------------------------------------------------------------
@dataclass
class FaceMeshResult:
    """468 mesh points (x, y in frame pixels; z in the same pixel scale, smaller = nearer the camera),
    the network's face probability, and the square it was read from."""

    points: np.ndarray  # (468, 3) float32
    score: float
    roi: Roi


class FaceMesh:
    """MediaPipe's face landmark network on OpenCV's TFLite importer, batched over faces."""

    name = "mediapipe-face-mesh"

    def __init__(self, model_path: str | Path, batch_size: int = 16, refine: bool = True) -> None:
        import cv2

        self._cv2 = cv2
        self.net = cv2.dnn.readNetFromTFLite(str(model_path))
        outs = self.net.getUnconnectedOutLayersNames()
        if len(outs) != 2:
            raise ValueError(f"{model_path} is not MediaPipe's face landmark network (two outputs, got {len(outs)}).")
        self._outs = list(outs)
        self.batch_size = max(1, int(batch_size))
        self.refine = bool(refine)

    def _run(self, crops: list[np.ndarray], check: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, 468, 3) points in input pixels and (N,) face probabilities, for N crops of 192 x 192;
        ``check`` (e.g. a deadline's) is called after each batch."""
        pts, logit = [], []
        for a in range(0, len(crops), self.batch_size):
            chunk = crops[a : a + self.batch_size]
            blob = self._cv2.dnn.blobFromImages(chunk, 1.0 / 255.0, (MESH_SIZE, MESH_SIZE), swapRB=False, crop=False)
            self.net.setInput(blob)
            outs = self.net.forward(self._outs)
            by_size = {o.size // len(chunk): o.reshape(len(chunk), -1) for o in outs}
            if set(by_size) != {MESH_POINTS * 3, 1}:
                raise ValueError(f"the face mesh returned outputs of sizes {sorted(by_size)}, not 1404 and 1.")
            pts.append(by_size[MESH_POINTS * 3].reshape(len(chunk), MESH_POINTS, 3))
            logit.append(by_size[1][:, 0])
            if check is not None:
                check()
        p = np.concatenate(pts) if pts else np.zeros((0, MESH_POINTS, 3), np.float32)
        lg = np.concatenate(logit) if logit else np.zeros(0, np.float32)
        return p.astype(np.float64), 1.0 / (1.0 + np.exp(-lg.astype(np.float64)))

    def _pass(self, frames: Sequence[np.ndarray], rois: list[Roi],
              check: Callable[[], None] | None = None) -> list[FaceMeshResult]:
        crops = [warp_square(f, r, MESH_SIZE) for f, r in zip(frames, rois)]
        pts, prob = self._run(crops, check)
        out = []
        for p, s, r in zip(pts, prob, rois):
            m = r.to_frame(MESH_SIZE)
            # the network's points are continuous (a pixel spans [i, i + 1]); warpAffine's are pixel centres
            xy = apply_affine(m, p[:, :2] - 0.5)
            z = p[:, 2] * (r.side / MESH_SIZE)
            out.append(FaceMeshResult(np.hstack([xy, z[:, None]]).astype(np.float32), float(s), r))
        return out

    def mesh(self, frames: Sequence[np.ndarray], boxes: Sequence[Sequence[float]],
             kps: Sequence[np.ndarray | None] | None = None,
             check: Callable[[], None] | None = None) -> list[FaceMeshResult]:
        """One mesh per (frame, box) pair: ``frames[i]`` is uint8 RGB, ``boxes[i]`` the face's
        (x0, y0, x1, y1) in its pixels, ``kps[i]`` its five keypoints or None. Faces are batched;
        ``check`` is called after each batch."""
        if len(frames) != len(boxes) or (kps is not None and len(kps) != len(boxes)):
            raise ValueError(f"mesh needs one box (and keypoints) per frame, got {len(frames)} frames, "
                             f"{len(boxes)} boxes{'' if kps is None else f', {len(kps)} keypoint sets'}.")
        fr = [check_frame(f) for f in frames]
        rois = []
        for i, b in enumerate(boxes):
            bb = np.asarray(b, dtype=np.float64).reshape(-1)
            if bb.shape != (4,) or not np.isfinite(bb).all() or bb[2] <= bb[0] or bb[3] <= bb[1]:
                raise ValueError(f"face box {i} is not a finite (x0, y0, x1, y1) of positive size: {b}.")
            rois.append(face_roi(bb, None if kps is None else kps[i]))
        res = self._pass(fr, rois, check)
        if self.refine and res:
            res = self._pass(fr, [mesh_roi(r.points) for r in res], check)
        return res
