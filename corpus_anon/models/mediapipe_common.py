"""What MediaPipe's landmark models share: their files, and the rotated squares their networks read.

Real weights: the ``.tflite`` files that ship inside the ``mediapipe`` 0.10.21 wheel on PyPI
(Apache-2.0; newer wheels ship none). The wheel is installed with ``--no-deps`` and only its files are
used, found without importing the package and checked against their sha256 pins (kept with the model
store's, ``registry.MEDIAPIPE_SHA256``); or the copies staged from the model store (``mediapipe/<file>``,
checked against its lock). OpenCV's ``cv2.dnn.readNetFromTFLite`` loads them; input goes through
``cv2.dnn.blobFromImages`` (NCHW RGB in [0, 1]; the importer refuses NHWC).

A region of interest (``Roi``) is a rotated square in frame pixels; ``warp_square`` cuts it out at a
network's input size and ``apply_affine`` maps points back. cv2 is imported inside functions only.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corpus_anon.models.registry import MEDIAPIPE_SHA256


MEDIAPIPE_VERSION = "0.10.21"


# The wheel's files (path inside the installed package); their sha256 pins live with the model store's
# (registry.MEDIAPIPE_SHA256).
MEDIAPIPE_FILES: dict[str, str] = {
    "face_landmark.tflite": "modules/face_landmark/face_landmark.tflite",
    "palm_detection_full.tflite": "modules/palm_detection/palm_detection_full.tflite",
    "hand_landmark_full.tflite": "modules/hand_landmark/hand_landmark_full.tflite",
}


def installed_mediapipe_file(name: str) -> Path:
    """One of the mediapipe wheel's model files (found without importing mediapipe), checked against its pin."""
    from corpus_anon.models.registry import ModelIntegrityError
    from corpus_anon.io.storage import sha256_file

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


def warp_square(frame: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    import cv2

    return cv2.warpAffine(frame, roi.to_input(size), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def check_frame(rgb: Any) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = getattr(rgb, "shape", None), getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"A landmark model takes uint8 RGB frames (H, W, 3), got shape/dtype {got}.")
    return rgb
