"""Face detection and identity embeddings behind one interface, with two backends (METHOD.md §9).

- ``insightface``: buffalo_l through insightface's own model zoo — SCRFD ``det_10g`` (boxes and
  five keypoints), ``norm_crop`` to the 112x112 ArcFace template, ``w600k_r50`` 512-d embeddings
  compared by cosine similarity. No package ships these weights (they are licensed for
  non-commercial research); they are staged under ``<model_root>/models/buffalo_l/``.
- ``dlib``: the HOG frontal detector, the 5-point shape predictor and the 128-d ResNet descriptor
  from the ``face_recognition_models`` package, compared by Euclidean distance. Real weights that
  install offline from PyPI (``dlib-bin``, ``face_recognition_models``).

Keypoints are in each backend's own layout (insightface: eye centres, nose tip, mouth corners;
dlib: the four eye corners and the base of the nose), so ``embed_at`` takes the ``kps`` that the
same backend's ``detect`` returned. ``embed_at`` embeds whatever is at a given place: the
identity check embeds an anonymized frame at the original face's keypoints, so a detector that
misses the anonymized face can never hide a leak.

Heavy libraries (insightface, onnxruntime, cv2, dlib) are imported inside the backend
constructors only; this module imports numpy and ``corpus_anon.models.facetrack`` at load time.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from corpus_anon.models import facetrack

log = logging.getLogger(__name__)

BACKENDS = ("insightface", "dlib")
KINDS = ("cosine", "euclidean")

# insightface buffalo_l (ArcFace R50, WebFace600K), cosine similarity: "same person" at >= 0.45.
# Source: deepface's pre-tuned threshold for `Buffalo_L` is cosine *distance* 0.55, i.e. similarity
# 1 - 0.55 = 0.45 (METHOD.md §9). Model- and preprocessing-specific: calibrate on in-domain pairs.
INSIGHTFACE_THRESHOLD = 0.45
# dlib ResNet descriptor, Euclidean distance: "same person" when < 0.6 — dlib's documented rule
# (dnn_face_recognition_ex; 99.38 % on LFW). Do not use cosine on these descriptors: unrelated
# people still measure cosine 0.8-0.9.
DLIB_THRESHOLD = 0.6

BUFFALO = "buffalo_l"
# The five ArcFace template points (insightface face_align.arcface_dst) as fractions of the
# 112x112 aligned crop; used to place keypoints in a box when only a box is known.
ARCFACE_KPS_FRACTIONS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
) / 112.0

DLIB_SHAPE_5 = "shape_predictor_5_face_landmarks.dat"
DLIB_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
# The 68-point predictor is trained on iBUG 300-W, whose licence excludes commercial use; it only
# fills `Face.landmarks` and is optional.
DLIB_SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
DLIB_FILES = {"shape_predictor_5": DLIB_SHAPE_5, "recognition": DLIB_RESNET, "shape_predictor_68": DLIB_SHAPE_68}
DLIB_REQUIRED = ("shape_predictor_5", "recognition")


@dataclass
class Face:
    """One detected face: box (x0, y0, x1, y1), detector score, keypoints, optional landmarks."""

    box: np.ndarray
    score: float
    kps: np.ndarray | None = None
    landmarks: np.ndarray | None = None


@runtime_checkable
class FaceBackend(Protocol):
    """A face detector plus identity embedder with its own comparison rule."""

    name: str
    score_kind: str
    threshold: float
    dim: int

    def detect(self, rgb: np.ndarray) -> list[Face]: ...

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray: ...

    def embed_at(self, rgb: np.ndarray, kps_or_box: np.ndarray) -> np.ndarray: ...

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | float: ...

    def same_person(self, score: np.ndarray | float) -> np.ndarray | bool: ...


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = getattr(rgb, "shape", None), getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"A face backend takes one uint8 RGB frame (H, W, 3), got shape/dtype {got}.")
    return rgb


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown embedding score kind {kind!r}; expected one of {KINDS}.")


def _as_float(x: np.ndarray) -> np.ndarray | float:
    return float(x) if np.ndim(x) == 0 else x


def score_embeddings(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray | float:
    """Cosine similarity or Euclidean distance over the last axis, broadcasting the rest.

    (D,) vs (D,) gives a float; (n, D) vs (D,) gives (n,); (n, D) vs (n, D) pairs rows;
    ``a[:, None]`` vs ``b[None]`` gives the (n, m) matrix.
    """
    check_kind(kind)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if kind == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return _as_float(np.sum(an * bn, axis=-1))
    return _as_float(np.linalg.norm(a - b, axis=-1))


def same_person_rule(score: np.ndarray | float, kind: str, threshold: float) -> np.ndarray | bool:
    """Cosine: similarity >= threshold; Euclidean: distance < threshold."""
    check_kind(kind)
    s = np.asarray(score, dtype=np.float64)
    out = s >= threshold if kind == "cosine" else s < threshold
    return bool(out) if out.ndim == 0 else out


def mean_embedding(embs: np.ndarray, kind: str) -> np.ndarray:
    """One embedding for a set (a clip): cosine -> L2-normalised mean of L2-normalised rows;
    euclidean -> plain mean (dlib descriptors are compared unnormalised)."""
    check_kind(kind)
    e = np.asarray(embs, dtype=np.float64)
    if e.ndim != 2 or len(e) == 0:
        raise ValueError(f"mean_embedding needs a non-empty (n, D) array, got shape {e.shape}.")
    if kind == "euclidean":
        return e.mean(axis=0)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = e.mean(axis=0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def box_to_kps(box: np.ndarray) -> np.ndarray:
    """Five ArcFace-layout keypoints placed in a box where the template puts them in a crop."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    kps = ARCFACE_KPS_FRACTIONS * [x1 - x0, y1 - y0] + [x0, y0]
    return kps.astype(np.float32)


class _BackendBase:
    """Shared scoring for both backends."""

    name: str
    score_kind: str
    threshold: float
    dim: int

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
        """Cosine similarity or Euclidean distance per `score_kind` (see `score_embeddings`)."""
        return score_embeddings(a, b, self.score_kind)

    def same_person(self, score: np.ndarray | float) -> np.ndarray | bool:
        """This backend's rule on a score (or array of scores) from `score`."""
        return same_person_rule(score, self.score_kind, self.threshold)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)


class InsightFaceBackend(_BackendBase):
    """buffalo_l: SCRFD detection, ArcFace-template alignment, normed 512-d embeddings (cosine)."""

    name = "insightface"
    score_kind = "cosine"
    dim = 512

    def __init__(
        self,
        model_root: str | Path,
        device: str = "cpu",
        det_thresh: float = 0.5,
        det_size: tuple[int, int] = (640, 640),
        landmarks: bool = True,
        threshold: float | None = None,
    ) -> None:
        root = Path(model_root).expanduser()
        pack = root / "models" / BUFFALO
        # FaceAnalysis downloads when this folder is missing: never let it get that far.
        if not pack.is_dir() or not any(pack.glob("*.onnx")):
            raise FileNotFoundError(
                f"The insightface backend needs buffalo_l's ONNX files in {pack}, which does not exist or "
                "holds no *.onnx file."
            )
        try:
            from insightface.app import FaceAnalysis
            from insightface.app.common import Face as InsightFace
            from insightface.utils import face_align
        except ImportError as e:
            raise ImportError(
                "The insightface face backend needs the insightface package (pip install --no-deps "
                f"insightface==2.1) and onnxruntime: {e}."
            ) from e
        self._norm_crop = face_align.norm_crop
        self._insight_face = InsightFace
        self.threshold = INSIGHTFACE_THRESHOLD if threshold is None else float(threshold)
        cuda = device.startswith("cuda")
        device_id = int(device.split(":", 1)[1]) if cuda and ":" in device else 0
        providers: list[Any] = (
            [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
            if cuda else ["CPUExecutionProvider"]
        )
        modules = ["detection", "recognition"] + (["landmark_2d_106"] if landmarks else [])
        try:
            app = FaceAnalysis(name=BUFFALO, root=str(root), allowed_modules=modules, providers=providers)
        except AssertionError as e:  # insightface asserts that a detector was found
            raise FileNotFoundError(f"{pack} holds no SCRFD detector ONNX file that insightface recognises.") from e
        if "recognition" not in app.models:
            raise FileNotFoundError(f"{pack} holds no ArcFace recognition ONNX file that insightface recognises.")
        app.prepare(ctx_id=device_id if cuda else -1, det_thresh=det_thresh, det_size=tuple(det_size))
        self._app = app
        self._det = app.models["detection"]
        self._rec = app.models["recognition"]
        self._lmk = app.models.get("landmark_2d_106")
        self._crop = int(self._rec.input_size[0])
        log.info("insightface backend: %s on %s (modules %s)", pack, providers[0], sorted(app.models))

    def detect(self, rgb: np.ndarray, input_size: tuple[int, int] | None = None,
               threshold: float | None = None) -> list[Face]:
        """SCRFD boxes, scores and five keypoints (+ 106 landmarks when 2d106det is staged);
        `input_size` (w, h, multiples of 32) and `threshold` override those set at load time."""
        bgr = np.ascontiguousarray(_check_rgb(rgb)[:, :, ::-1])
        boxes, kpss = self._det.detect(bgr, input_size=input_size, max_num=0, det_thresh=threshold)
        faces = []
        for i in range(len(boxes)):
            kps = None if kpss is None else np.asarray(kpss[i], dtype=np.float32)
            face = Face(box=np.asarray(boxes[i, :4], dtype=np.float64), score=float(boxes[i, 4]), kps=kps)
            if self._lmk is not None:
                # insightface's Landmark.get reads the bbox of, and writes into, its own Face (a dict).
                pred = self._lmk.get(bgr, self._insight_face(bbox=boxes[i, :4]))
                face.landmarks = np.asarray(pred, dtype=np.float32)
            faces.append(face)
        return faces

    def _aligned(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # insightface's estimate_norm calls skimage's deprecated SimilarityTransform.estimate.
            warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
            return self._norm_crop(bgr, np.asarray(kps, dtype=np.float32).reshape(5, 2), self._crop)

    def _embed_kps(self, rgb: np.ndarray, kpss: list[np.ndarray]) -> np.ndarray:
        if not kpss:
            return self._empty()
        bgr = np.ascontiguousarray(_check_rgb(rgb)[:, :, ::-1])
        crops = [self._aligned(bgr, k) for k in kpss]
        feats = np.asarray(self._rec.get_feat(crops), dtype=np.float32).reshape(len(crops), -1)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """(n, 512) unit-norm embeddings of the faces' aligned crops, in one recognizer batch."""
        return self._embed_kps(rgb, [f.kps if f.kps is not None else box_to_kps(f.box) for f in faces])

    def embed_at(self, rgb: np.ndarray, kps_or_box: np.ndarray) -> np.ndarray:
        """(512,) embedding of whatever is at five keypoints (5, 2) or a box (4,)."""
        return self._embed_kps(rgb, [_insightface_kps(kps_or_box)])[0]

    def landmarks_at(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """insightface's 106-point layout does not map onto the 68-point expression groups."""
        return None


def _insightface_kps(kps_or_box: np.ndarray) -> np.ndarray:
    a = np.asarray(kps_or_box, dtype=np.float32)
    if a.shape == (5, 2):
        return a
    if a.size == 4:
        return box_to_kps(a)
    raise ValueError(f"embed_at takes five keypoints (5, 2) or a box (4,), got shape {a.shape}.")


def dlib_model_dir() -> Path:
    """The `models` folder of the installed face_recognition_models package (found without
    importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The dlib face backend's weights come from the face_recognition_models package "
            "(pip install face_recognition_models==0.3.0), which is not installed."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib_model_files() -> dict[str, Path]:
    """The dlib .dat files inside the installed face_recognition_models package, by role."""
    d = dlib_model_dir()
    files = {role: d / fname for role, fname in DLIB_FILES.items()}
    missing = [str(p) for role, p in files.items() if role in DLIB_REQUIRED and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"The face_recognition_models package lacks {', '.join(missing)}.")
    return {role: p for role, p in files.items() if p.is_file()}


def stage_dlib_models(dest: str | Path, landmarks_68: bool = True) -> dict[str, Path]:
    """Copy the dlib .dat files into `dest` (a model root for `build_face_backend("dlib", dest)`)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for role, src in dlib_model_files().items():
        if role == "shape_predictor_68" and not landmarks_68:
            continue
        target = dest / src.name
        if not target.is_file() or target.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, target)
        out[role] = target
    return out


class DlibBackend(_BackendBase):
    """dlib: HOG frontal detector, 5-point alignment, 128-d ResNet descriptors (Euclidean)."""

    name = "dlib"
    score_kind = "euclidean"
    dim = 128

    def __init__(
        self,
        model_root: str | Path,
        device: str = "cpu",
        upsample: int = 1,
        landmarks: bool = True,
        num_jitters: int = 0,
        threshold: float | None = None,
    ) -> None:
        root = Path(model_root).expanduser()
        paths = {role: root / fname for role, fname in DLIB_FILES.items()}
        missing = [paths[r].name for r in DLIB_REQUIRED if not paths[r].is_file()]
        if missing:
            raise FileNotFoundError(
                f"The dlib backend needs {' and '.join(missing)} in {root} (stage_dlib_models copies them)."
            )
        try:
            import dlib
        except ImportError as e:
            raise ImportError(
                f"The dlib face backend needs dlib (pip install dlib-bin==20.0.1.post1): {e}."
            ) from e
        if device.startswith("cuda"):
            log.info("dlib backend runs on the CPU (the dlib-bin wheel has no CUDA); device %s ignored", device)
        self._dlib = dlib
        self.threshold = DLIB_THRESHOLD if threshold is None else float(threshold)
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self._detector = dlib.get_frontal_face_detector()
        self._sp5 = dlib.shape_predictor(str(paths["shape_predictor_5"]))
        self._rec = dlib.face_recognition_model_v1(str(paths["recognition"]))
        self._sp68 = (
            dlib.shape_predictor(str(paths["shape_predictor_68"]))
            if landmarks and paths["shape_predictor_68"].is_file() else None
        )
        log.info("dlib backend: %s (68-point landmarks: %s)", root, self._sp68 is not None)

    def _rect(self, box: np.ndarray) -> Any:
        """Box with exclusive ends (x0, y0, x1, y1) -> dlib rectangle (inclusive ends)."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(box).reshape(4))
        return self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)

    def _shape(self, rgb: np.ndarray, kps: np.ndarray | None, box: np.ndarray | None) -> Any:
        if kps is None:
            return self._sp5(rgb, self._rect(box))
        pts = np.rint(np.asarray(kps, dtype=np.float64)).astype(int)
        if box is None:
            box = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max() + 1, pts[:, 1].max() + 1])
        return self._dlib.full_object_detection(self._rect(box), [self._dlib.point(int(x), int(y)) for x, y in pts])

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """HOG boxes (score = detector margin), dlib 5-point keypoints, 68 landmarks if staged."""
        img = np.ascontiguousarray(_check_rgb(rgb))
        rects, scores, _ = self._detector.run(img, self.upsample, 0.0)
        faces = []
        for r, s in sorted(zip(rects, scores), key=lambda rs: -rs[1]):
            shape = self._sp5(img, r)
            face = Face(
                box=np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64),
                score=float(s),
                kps=np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32),
            )
            if self._sp68 is not None:
                face.landmarks = np.array([(p.x, p.y) for p in self._sp68(img, r).parts()], dtype=np.float32)
            faces.append(face)
        return faces

    def kps_at(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's five keypoints (eye corners, base of the nose) that the 5-point predictor places
        inside a box from any detector: the layout `embed_at` and `embed` expect from this backend."""
        img = np.ascontiguousarray(_check_rgb(rgb))
        return np.array([(p.x, p.y) for p in self._sp5(img, self._rect(box)).parts()], dtype=np.float32)

    def landmarks_at(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """The 68 landmarks the predictor places inside a given box (None without the 68-point
        model, whose training data excludes commercial use)."""
        if self._sp68 is None:
            return None
        img = np.ascontiguousarray(_check_rgb(rgb))
        return np.array([(p.x, p.y) for p in self._sp68(img, self._rect(box)).parts()], dtype=np.float32)

    def _descriptors(self, img: np.ndarray, shapes: list[Any]) -> np.ndarray:
        if not shapes:
            return self._empty()
        out = self._rec.compute_face_descriptor(img, self._dlib.full_object_detections(shapes), self.num_jitters)
        return np.asarray([np.asarray(v) for v in out], dtype=np.float32).reshape(len(shapes), self.dim)

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """(n, 128) descriptors at the faces' 5-point keypoints (or the predictor's, in the box)."""
        img = np.ascontiguousarray(_check_rgb(rgb))
        return self._descriptors(img, [self._shape(img, f.kps, f.box) for f in faces])

    def embed_at(self, rgb: np.ndarray, kps_or_box: np.ndarray) -> np.ndarray:
        """(128,) descriptor of whatever is at dlib keypoints (5 or 68, 2) or in a box (4,)."""
        img = np.ascontiguousarray(_check_rgb(rgb))
        a = np.asarray(kps_or_box, dtype=np.float64)
        if a.ndim == 2 and a.shape[1] == 2 and a.shape[0] in (5, 68):
            shape = self._shape(img, a, None)
        elif a.size == 4:
            shape = self._shape(img, None, a)
        else:
            raise ValueError(f"embed_at takes dlib keypoints (5 or 68, 2) or a box (4,), got shape {a.shape}.")
        return self._descriptors(img, [shape])[0]


def build_face_backend(name: str, model_root: str | Path, device: str = "cpu", **options: Any) -> FaceBackend:
    """Load a face backend: "insightface" wants `<root>/models/buffalo_l/*.onnx`; "dlib" wants the
    .dat files in `root` (see `stage_dlib_models`). `options` go to the backend's constructor."""
    if name == "insightface":
        return InsightFaceBackend(model_root, device=device, **options)
    if name == "dlib":
        return DlibBackend(model_root, device=device, **options)
    raise ValueError(f"Unknown face backend {name!r}; expected one of {BACKENDS}.")


def signer_faces(
    backend: FaceBackend, frames: list[np.ndarray], iou_threshold: float = 0.2, max_gap: int = 15
) -> list[Face | None]:
    """Per frame, the signer's detected face (None where the signer's track has no detection).

    Detects every frame, links the boxes with `facetrack.build_tracks` and picks the track with
    `facetrack.signer_track` (the project's one signer rule).
    """
    if not frames:
        return []
    h, w = frames[0].shape[:2]
    dets = [backend.detect(f) for f in frames]
    boxes = [np.array([f.box for f in d], dtype=np.float64).reshape(-1, 4) for d in dets]
    tracks = facetrack.build_tracks(boxes, iou_threshold=iou_threshold, max_gap=max_gap)
    k = facetrack.signer_track(tracks, w, h)
    out: list[Face | None] = [None] * len(frames)
    if k is None:
        return out
    for t, box in zip(tracks[k].frames, tracks[k].boxes):
        j = int(np.argmin(np.abs(boxes[t] - box).sum(axis=1)))
        out[t] = dets[t][j]
    return out


def face_model_root(cfg: Any, storage: Any = None) -> str:
    """Where the face backend's files are, verified before anything loads them:

    - `faces.model_root` when set (a folder you manage; logged as not checked against a lock);
    - else the model store (`models.store`): the backend's files staged from it and checked
      against its lock file like every other model (`dlib/`, `insightface/models/buffalo_l/`);
    - else, for `dlib` only, the installed face_recognition_models package, its files checked
      against their published sha256.
    """
    from corpus_anon.models import registry

    f, m = cfg.faces, cfg.models
    if f.model_root:
        log.warning("faces.model_root %s is used as it is: its files are not checked against a lock file",
                    f.model_root)
        return f.model_root
    if m.store:
        if storage is None:
            raise ValueError("staging face models from models.store needs a Storage.")
        staged = registry.stage(m.profile, m.store, m.cache_dir, storage)
        paths = registry.staged_paths(staged, m.profile)
        root = paths.dlib if f.backend == "dlib" else paths.insightface
        if root is None:
            where = "dlib/" if f.backend == "dlib" else "insightface/models/buffalo_l/"
            raise registry.ModelStoreError(
                f"faces.backend '{f.backend}' needs its files under {where} in the model store's lock; "
                f"stage them (see README, Models) or set faces.backend: none."
            )
        return str(root)
    if f.backend == "dlib":
        files = dlib_model_files()
        for path in files.values():
            want = registry.DLIB_SHA256.get(path.name)
            if want and registry.sha256_file(str(path)) != want:
                raise registry.ModelIntegrityError(
                    f"{path} does not match face_recognition_models 0.3.0's published file; "
                    "reinstall face_recognition_models==0.3.0."
                )
        return str(dlib_model_dir())
    raise ValueError("faces.backend 'insightface' needs models.store (with insightface/models/buffalo_l/ "
                     "in its lock) or faces.model_root (a root holding models/buffalo_l/).")


def best_index(scores: np.ndarray, kind: str) -> int:
    """Index of the most alike score: the largest cosine similarity, the smallest distance."""
    return int(np.argmax(scores)) if kind == "cosine" else int(np.argmin(scores))
