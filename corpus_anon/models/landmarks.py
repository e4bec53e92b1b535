"""Landmark models where signers look: MediaPipe's face mesh (468 points) and hands (palm detection,
then 21 points per hand), run by OpenCV's TFLite importer on the actor's CPU threads.

Real weights: the ``.tflite`` files that ship inside the ``mediapipe`` 0.10.21 wheel on PyPI
(Apache-2.0; newer wheels ship none). The wheel is installed with ``--no-deps`` and only its files are
used, found without importing the package and checked against the sha256 pins below; or the copies
staged from the model store (``mediapipe/<file>``, checked against its lock). OpenCV's
``cv2.dnn.readNetFromTFLite`` loads them; input goes through ``cv2.dnn.blobFromImages`` (NCHW RGB in
[0, 1]; the importer refuses NHWC).

Face mesh (``FaceMesh``): the face is cut out of the frame as a square region of interest, rotated so
the eyes are level (from the detector's five keypoints when given), 1.5 times the face's size, and
resized to 192 x 192; the network returns 468 (x, y, z) points in that square and a face logit. The
points are mapped back to the frame. With ``refine`` the region is recomputed from the first pass's
points (their bounding box and eye line, as MediaPipe's own tracking does) and the mesh run again,
which makes it independent of how tight the detector's box is.

cv2 is imported inside the constructors and functions only.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

MEDIAPIPE_VERSION = "0.10.21"
# The wheel's files (path inside the installed package) and their sha256.
MEDIAPIPE_FILES: dict[str, str] = {
    "face_landmark.tflite": "modules/face_landmark/face_landmark.tflite",
    "palm_detection_full.tflite": "modules/palm_detection/palm_detection_full.tflite",
    "hand_landmark_full.tflite": "modules/hand_landmark/hand_landmark_full.tflite",
}
MEDIAPIPE_SHA256: dict[str, str] = {
    "face_landmark.tflite": "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
    "palm_detection_full.tflite": "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54",
    "hand_landmark_full.tflite": "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3",
}

MESH_SIZE = 192
MESH_POINTS = 468
# Mesh indices (the subject's right is the image's left in a frontal view).
EYE_OUTER = (33, 263)  # right eye outer corner, left eye outer corner
NOSE_TIP = 1
CHIN = 152
FOREHEAD = 10


def installed_mediapipe_file(name: str) -> Path:
    """One of the mediapipe wheel's model files (found without importing mediapipe), checked against its pin."""
    from corpus_anon.models.registry import ModelIntegrityError
    from corpus_anon.storage import sha256_file

    if name not in MEDIAPIPE_FILES:
        raise ValueError(f"{name!r} is not one of the mediapipe model files used here ({', '.join(MEDIAPIPE_FILES)}).")
    spec = importlib.util.find_spec("mediapipe")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The landmark models' weights come from the mediapipe wheel, which is not installed; install it with "
            f"`pip install --no-deps mediapipe=={MEDIAPIPE_VERSION}` (as `make setup` does), stage them in the model "
            "store (`corpus-anon models add-mediapipe STORE`) or set landmarks.enabled: false."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MEDIAPIPE_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"The installed mediapipe package has no {MEDIAPIPE_FILES[name]} ({path}); only the "
                                f"{MEDIAPIPE_VERSION} wheel ships it: `pip install --no-deps mediapipe=={MEDIAPIPE_VERSION}`.")
    got = sha256_file(str(path))
    if got != MEDIAPIPE_SHA256[name]:
        raise ModelIntegrityError(
            f"{path} has sha256 {got[:12]}..., not mediapipe {MEDIAPIPE_VERSION}'s {MEDIAPIPE_SHA256[name][:12]}...; "
            f"reinstall it with `pip install --no-deps mediapipe=={MEDIAPIPE_VERSION}`."
        )
    return path


# ---- regions of interest -------------------------------------------------------------------------
@dataclass(frozen=True)
class Roi:
    """A rotated square in frame pixels: centre (cx, cy), side, angle (radians, of the square's x axis
    in the frame, y down)."""

    cx: float
    cy: float
    side: float
    angle: float

    def to_input(self, size: int) -> np.ndarray:
        """2 x 3 affine map from frame pixels to the network's size x size input."""
        k = size / self.side
        c, s = math.cos(self.angle), math.sin(self.angle)
        # q = k R(-angle) (p - centre) + size / 2
        a = k * np.array([[c, s], [-s, c]])
        t = np.array([size / 2, size / 2]) - a @ np.array([self.cx, self.cy])
        return np.hstack([a, t[:, None]])

    def to_frame(self, size: int) -> np.ndarray:
        """2 x 3 affine map from the network's input back to frame pixels."""
        m = self.to_input(size)
        inv = np.linalg.inv(m[:, :2])
        return np.hstack([inv, (-inv @ m[:, 2])[:, None]])


def face_roi(box: Sequence[float], kps: np.ndarray | None = None, scale: float = 1.5) -> Roi:
    """The mesh's input square for a detector box: centred on the box, ``scale`` times its longer side,
    rotated so the eyes (the first two of five keypoints, when given) are level."""
    x0, y0, x1, y1 = (float(v) for v in box)
    angle = 0.0
    if kps is not None:
        k = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
        if len(k) >= 2 and np.isfinite(k[:2]).all():
            d = k[1] - k[0]
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


def _warp(frame: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    import cv2

    return cv2.warpAffine(frame, roi.to_input(size), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _check_frame(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = getattr(rgb, "shape", None), getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"A landmark model takes uint8 RGB frames (H, W, 3), got shape/dtype {got}.")
    return rgb


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
    size and position: brow raise (brow-to-eye distance over face height, both brows), eye openness
    (lid gap over eye width, both eyes), mouth openness (inner-lip gap over face height) and mouth
    width (corner to corner over face width). Face height is forehead (10) to chin (152), face width
    cheek to cheek (234, 454). NaN for a degenerate mesh."""
    p = np.asarray(points, dtype=np.float64)[:, :2]
    if p.shape != (MESH_POINTS, 2):
        raise ValueError(f"expression_features needs one mesh (468, 2 or 3), got {np.asarray(points).shape}.")

    def dist(i: int, j: int) -> float:
        return float(np.linalg.norm(p[i] - p[j]))

    height, width = dist(FOREHEAD, CHIN), dist(*CHEEKS)
    if not (height > 1e-6 and width > 1e-6):
        return np.full(len(EXPRESSION_FEATURES), np.nan)
    brows = []
    for brow, eye in ((BROW_RIGHT, EYE_RIGHT), (BROW_LEFT, EYE_LEFT)):
        centre = (p[eye["upper"]] + p[eye["lower"]] + p[eye["outer"]] + p[eye["inner"]]) / 4
        brows.append(float(np.linalg.norm(p[list(brow)].mean(axis=0) - centre)))
    eyes = [dist(e["upper"], e["lower"]) / max(dist(e["outer"], e["inner"]), 1e-6) for e in (EYE_RIGHT, EYE_LEFT)]
    return np.array([np.mean(brows) / height, np.mean(eyes), dist(*LIPS_INNER) / height,
                     dist(*MOUTH_CORNERS) / width])


# ---- hands (data) --------------------------------------------------------------------------------
HAND_POINTS = 21
WRIST, MIDDLE_MCP = 0, 9


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


@dataclass
class ClipLandmarks:
    """Landmarks of one clip at the frames ``frames`` (indices into the clip): the face mesh of the
    given face per frame (NaN where no box or the mesh's face probability is below the threshold), its
    probability, and the hands per frame (None where hands were not looked for)."""

    frames: np.ndarray  # (N,) int64, ascending
    face: np.ndarray  # (N, 468, 3) float32, NaN rows where no mesh
    face_score: np.ndarray  # (N,) float64, NaN where no box
    hands: list[list[Hand]] | None = None
    hand_model: str | None = None  # which hand model ran ("mediapipe-hands"), None when none did

    def at(self, t: int) -> int | None:
        """Position of clip frame ``t`` in these arrays, or None when it was not measured."""
        i = int(np.searchsorted(self.frames, t))
        return i if i < len(self.frames) and int(self.frames[i]) == int(t) else None


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

    def _run(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 468, 3) points in input pixels and (N,) face probabilities, for N crops of 192 x 192."""
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
        p = np.concatenate(pts) if pts else np.zeros((0, MESH_POINTS, 3), np.float32)
        lg = np.concatenate(logit) if logit else np.zeros(0, np.float32)
        return p.astype(np.float64), 1.0 / (1.0 + np.exp(-lg.astype(np.float64)))

    def _pass(self, frames: Sequence[np.ndarray], rois: list[Roi]) -> list[FaceMeshResult]:
        crops = [_warp(f, r, MESH_SIZE) for f, r in zip(frames, rois)]
        pts, prob = self._run(crops)
        out = []
        for p, s, r in zip(pts, prob, rois):
            m = r.to_frame(MESH_SIZE)
            xy = _apply(m, p[:, :2])
            z = p[:, 2] * (r.side / MESH_SIZE)
            out.append(FaceMeshResult(np.hstack([xy, z[:, None]]).astype(np.float32), float(s), r))
        return out

    def mesh(self, frames: Sequence[np.ndarray], boxes: Sequence[Sequence[float]],
             kps: Sequence[np.ndarray | None] | None = None) -> list[FaceMeshResult]:
        """One mesh per (frame, box) pair: ``frames[i]`` is uint8 RGB, ``boxes[i]`` the face's
        (x0, y0, x1, y1) in its pixels, ``kps[i]`` its five keypoints or None. Faces are batched."""
        if len(frames) != len(boxes) or (kps is not None and len(kps) != len(boxes)):
            raise ValueError(f"mesh needs one box (and keypoints) per frame, got {len(frames)} frames, "
                             f"{len(boxes)} boxes{'' if kps is None else f', {len(kps)} keypoint sets'}.")
        fr = [_check_frame(f) for f in frames]
        rois = []
        for i, b in enumerate(boxes):
            bb = np.asarray(b, dtype=np.float64).reshape(-1)
            if bb.shape != (4,) or not np.isfinite(bb).all() or bb[2] <= bb[0] or bb[3] <= bb[1]:
                raise ValueError(f"face box {i} is not a finite (x0, y0, x1, y1) of positive size: {b}.")
            rois.append(face_roi(bb, None if kps is None else kps[i]))
        res = self._pass(fr, rois)
        if self.refine and res:
            res = self._pass(fr, [mesh_roi(r.points) for r in res])
        return res


__all__ = [
    "ClipLandmarks", "EXPRESSION_FEATURES", "Hand", "expression_features", "EYE_OUTER", "FaceMesh", "FaceMeshResult", "MEDIAPIPE_FILES", "MEDIAPIPE_SHA256", "MEDIAPIPE_VERSION", "Roi",
    "face_roi", "installed_mediapipe_file", "mesh_roi",
]
