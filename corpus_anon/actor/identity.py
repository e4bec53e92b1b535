"""Face analysis of one clip inside the actor: the signer's track on the original, identity and
fidelity metrics of the anonymized clip against it, the leak decision, and the private embeddings.

Identity is measured by embedding the anonymized frame *at the original face's keypoints*, so a
detector that misses a pixelated or distorted face can never hide a leak. Linguistic fidelity is
measured the same way: the face mesh reads the anonymized frame *at the original face's box*, so the
markers are looked for where the signer's face is (``landmark_fidelity``). Original-face
embeddings are biometric data: they go only to the run's private `embeddings/` artifact.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from corpus_anon.models import facetrack

from corpus_anon.actor import metrics

if TYPE_CHECKING:
    from corpus_anon.models.landmarks import ClipLandmarks

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


LANDMARK_COLUMNS = (*metrics.NMM_COLUMNS, "nmm_anon_score", *metrics.HAND_COLUMNS, "landmark_frames",
                    "landmark_note", "hand_model", "nmm_series")


def metric_frames(n_frames: int, n: int) -> np.ndarray:
    """(k,) int64: ``n`` frame indices spread evenly over a clip of ``n_frames`` frames, first and last
    included (every frame when ``n`` is 0 or at least ``n_frames``)."""
    if n_frames <= 0:
        return np.zeros(0, np.int64)
    if n <= 0 or n >= n_frames:
        return np.arange(n_frames, dtype=np.int64)
    return np.unique(np.linspace(0, n_frames - 1, n).round().astype(np.int64))


def no_landmarks(reason: str) -> dict[str, Any]:
    """The landmark fidelity columns of a clip measured without landmark models: None, and the reason."""
    out: dict[str, Any] = {c: None for c in LANDMARK_COLUMNS}
    out.update(landmark_frames=0, landmark_note=reason)
    return out


def _features(points: np.ndarray) -> np.ndarray:
    from corpus_anon.models.facemesh import expression_features

    rows = [expression_features(p) if np.isfinite(p).all() else np.full(len(metrics.NMM_SERIES), np.nan)
            for p in points]
    return np.array(rows, dtype=np.float64).reshape(len(points), len(metrics.NMM_SERIES))


def hands_at(model: Any, frames: list[np.ndarray], orig_hands: list[list[Any]],
             check: Any = None) -> list[list[Any]]:
    """The anonymized hands where the original's are: the hand landmark network (``model``, a
    ``HandLandmarker``) on ``frames[i]`` at the square each hand of ``orig_hands[i]`` was read from,
    kept when its hand presence reaches ``model.hand_threshold``. Like the face mesh at the original's
    box, this asks whether the hand is still there and where its points are, without the palm detector
    (whose hits on a frame flicker with a re-encode's noise, and which costs twice the landmarks).
    ``check`` is called between batches."""
    from corpus_anon.models.hands import Hand

    owner = [i for i, hs in enumerate(orig_hands) for h in hs if h.roi is not None]
    rois = [h.roi for hs in orig_hands for h in hs if h.roi is not None]
    out: list[list[Any]] = [[] for _ in frames]
    if not rois:
        return out
    pts, presence, handedness = model.landmarks([frames[i] for i in owner], rois, check)
    for i, p, pr, hd, r in zip(owner, pts, presence, handedness, rois):
        if pr >= model.hand_threshold:
            out[i].append(Hand(p.astype(np.float32), float(pr), float(hd), float("nan"), r))
    return out


def original_at(measured: Any, boxes: np.ndarray, frames_idx: np.ndarray) -> Any:
    """The face-mesh rows of ``measured`` (a ``ClipLandmarks`` of the original that holds every frame of
    ``frames_idx``, such as ``enhance.measure_original``'s, meshed in boxes with the gaps filled) at
    ``frames_idx``, as a ``ClipLandmarks`` without hands (``hands`` None): a NaN row (and NaN score)
    where ``boxes[t]``, the raw track box, is NaN, so the metrics compare the frames where the face was
    detected, as when they mesh the original themselves."""
    from corpus_anon.models.landmarks import ClipLandmarks

    idx = np.asarray(frames_idx, dtype=np.int64).reshape(-1)
    pos = [measured.at(int(t)) for t in idx]
    missing = [int(t) for t, i in zip(idx, pos) if i is None]
    if missing:
        raise ValueError(f"the original's landmarks must hold every metric frame, got none for frames "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}.")
    at = np.array(pos, dtype=np.int64)
    face = np.array(measured.face, dtype=np.float32)[at]
    score = np.array(measured.face_score, dtype=np.float64)[at]
    no_box = ~np.isfinite(np.asarray(boxes, dtype=np.float64)[idx]).all(axis=1)
    face[no_box] = np.nan
    score[no_box] = np.nan
    return ClipLandmarks(frames=idx, face=face, face_score=score)


def original_hands(landmarks: Any, orig: np.ndarray, boxes: np.ndarray, frames_idx: np.ndarray,
                   check: Any = None) -> list[list[Any]]:
    """The original's hands at ``frames_idx`` as ``Landmarks.clip`` finds them (palms in the signing
    space of ``landmarks.hand_space`` face heights around the raw box, the whole frame where the box is
    NaN or without ``hand_space``), without meshing the face again; ``landmarks.hands`` must be set.
    ``check`` is called between batches."""
    return landmarks.find_hands(orig, boxes, frames_idx, check=check)


def landmark_fidelity(landmarks: Any, orig: np.ndarray, anon: np.ndarray, boxes: np.ndarray,
                      kps: list[np.ndarray | None] | None, n_frames: int,
                      orig_lm: Any = None, measured: Any = None, check: Any = None) -> tuple[dict[str, Any], Any]:
    """The linguistic-fidelity columns of one clip, original vs anonymized at the same frames.

    ``landmarks`` is a ``models.landmarks.Landmarks``; ``orig`` and ``anon`` (T, H, W, 3) uint8 RGB;
    ``boxes`` (T, 4) the signer's face box in the original per frame (NaN rows where none), ``kps`` its
    five keypoints per frame in the ArcFace order (or None). ``n_frames`` frames are sampled evenly over
    the clip (0 = all). The original is measured by ``landmarks.clip`` (mesh where its face probability
    passes ``face_threshold``, hands as ``clip`` looks for them) unless ``measured``, the original's
    landmarks on every frame (``enhance.measure_original``, meshed with the same ``kps``), gives its
    face-mesh rows (``original_at``; its hands, which enhancement may have looked for near the face
    only, are not reused: ``original_hands`` finds them here). The anonymized frame is measured by the
    face mesh at the ORIGINAL's box, whatever its face probability (a face the mesh barely sees is a
    marker lost, not a frame skipped; its median probability is ``nmm_anon_score``), and by the hand
    landmark network at the squares of the ORIGINAL's hands (``hands_at``; a hand the output adds
    elsewhere is not looked for). Returns the columns (``metrics.nmm_agreement``, ``metrics.hand_agreement``,
    ``nmm_anon_score``, ``landmark_frames``, ``landmark_note``, ``hand_model``, ``nmm_series`` as
    ``metrics.nmm_series_json``) and the original's ``ClipLandmarks`` at the sampled frames (pass it
    back as ``orig_lm`` to measure another anonymization of the same original without measuring it
    again). ``check`` (a deadline's) is called between the models' batches."""
    idx = metric_frames(len(orig), n_frames)
    if orig_lm is None or not np.array_equal(orig_lm.frames, idx):
        if measured is None:
            orig_lm = landmarks.clip(orig, boxes, kps, frames_idx=idx, hands=True, check=check)
        else:
            orig_lm = original_at(measured, boxes, idx)
            if getattr(landmarks, "hands", None) is not None:
                orig_lm.hands = original_hands(landmarks, orig, boxes, idx, check)
                orig_lm.hand_model = landmarks.hands.name
    o_pts = np.asarray(orig_lm.face, dtype=np.float64)
    has = np.isfinite(o_pts).all(axis=(1, 2))
    a_pts = np.full_like(o_pts, np.nan)
    a_score = []
    if has.any():
        at = idx[has]
        res = landmarks.face_mesh.mesh([anon[t] for t in at], [boxes[t] for t in at],
                                       None if kps is None else [kps[t] for t in at], check=check)
        a_pts[has] = np.stack([r.points for r in res])
        a_score = [r.score for r in res]
    o_feat, a_feat = _features(o_pts), _features(a_pts)
    out: dict[str, Any] = {k: (round(v, 4) if isinstance(v, float) else v)
                           for k, v in metrics.nmm_agreement(o_feat, a_feat).items()}
    out["nmm_anon_score"] = round(float(np.median(a_score)), 4) if a_score else None
    notes = []
    if not has.any():
        notes.append("no original face mesh at the sampled frames")
    if orig_lm.hands is not None and getattr(landmarks, "hands", None) is not None:
        anon_hands = hands_at(landmarks.hands, [anon[t] for t in idx], orig_lm.hands, check)
        hand = metrics.hand_agreement(orig_lm.hands, anon_hands)
        out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in hand.items()})
        out["hand_model"] = orig_lm.hand_model
        if hand["hand_frames_orig"] == 0:
            notes.append("the hand model found no hand in the original at the sampled frames")
    else:
        out.update({c: None for c in metrics.HAND_COLUMNS})
        out["hand_model"] = None
        notes.append("no hand model ran (landmarks.hands is false)")
    out["landmark_frames"] = int(len(idx))
    out["landmark_note"] = "; ".join(notes)
    out["nmm_series"] = metrics.nmm_series_json(idx, o_feat, a_feat)
    return out, orig_lm


class FaceAnalyzer:
    """One face backend and one face detector per actor (loaded once), and the per-clip analysis
    built on them."""

    # frames per detector call (CenterFace batches them); `check` runs between batches
    batch_frames = 8

    def __init__(self, cfg: Any, device: str = "cpu", storage: Any = None, with_landmarks: bool = True) -> None:
        """``with_landmarks`` false leaves the landmark models out (``self.landmarks`` None) for callers
        that never evaluate a clip, such as fine-tuning data extraction."""
        from corpus_anon.models import faces as facelib
        from corpus_anon.models.detect import build_detector
        from corpus_anon.models.landmarks import build_landmarks

        f = cfg.faces
        self.cfg = cfg
        root = facelib.face_model_root(cfg, storage)
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
        # MediaPipe's face mesh and hands (None when landmarks.enabled is false): the fidelity metrics.
        self.landmarks = build_landmarks(cfg, storage) if with_landmarks else None
        self.metric_frames = int(cfg.landmarks.metric_frames)
        self._orig_lm: tuple[tuple[Any, ...], Any] | None = None  # the last original measured

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
    def landmark_metrics(self, orig: np.ndarray, anon: np.ndarray, track: SignerTrack,
                         orig_landmarks: ClipLandmarks | None = None, check: Any = None) -> dict[str, Any]:
        """The linguistic-fidelity columns (``landmark_fidelity``) and ``t_landmarks_s``, the seconds
        they took; None columns and a reason without landmark models. ``orig_landmarks``, the original
        measured on every frame (``enhance.measure_original``), gives the original's face mesh instead
        of meshing it again. The original's landmarks are kept for the next call, so a re-seeded attempt
        on the same clip measures only its output. ``check`` is called between the models' batches."""
        if self.landmarks is None:
            return dict(no_landmarks("landmarks.enabled is false: no landmark model ran"), t_landmarks_s=0.0)
        t0 = time.monotonic()
        boxes = track.boxes()
        # The mesh levels the eyes from the first two keypoints: only the ArcFace order (CenterFace,
        # SCRFD) has the two eyes there; dlib's five points start with one eye's two corners.
        kps = None if self.backend.name == "dlib" else [None if f is None else f.kps for f in track.faces]
        key = (id(orig), orig.shape, boxes.tobytes(), orig[:, ::37, ::37].tobytes())
        cached = self._orig_lm[1] if self._orig_lm is not None and self._orig_lm[0] == key else None
        out, orig_lm = landmark_fidelity(self.landmarks, orig, anon, boxes, kps, self.metric_frames, cached,
                                         measured=orig_landmarks, check=check)
        self._orig_lm = (key, orig_lm)
        out["t_landmarks_s"] = round(time.monotonic() - t0, 4)
        return out

    def sample(self, track: SignerTrack) -> np.ndarray:
        idx = np.flatnonzero(track.present)
        if len(idx) > self.id_frames:
            idx = idx[np.linspace(0, len(idx) - 1, self.id_frames).round().astype(int)]
        return idx

    def evaluate(self, orig: np.ndarray, anon: np.ndarray, track: SignerTrack, synthesizes_face: bool,
                 max_match_rate: float, check: Any = None,
                 anon_detections: list[list[Any]] | None = None,
                 orig_landmarks: ClipLandmarks | None = None) -> Evaluation:
        """Every per-clip metric of an anonymized clip against its original, and the leak decision.
        `anon_detections` (from `detect_all` on `anon`) saves detecting the sampled frames again;
        `orig_landmarks` (the gate's `enhance.measure_original` of `orig`: the face mesh on every frame
        in the track's boxes, gaps filled, with the keypoints `landmark_metrics` uses, None for dlib)
        saves meshing the original again: the landmark metrics take its rows at their sampled frames
        (NaN where the track has no box) and look for the original's hands themselves."""
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
        out.update(self.landmark_metrics(orig, anon, track, orig_landmarks, check))
        leak = metrics.leaks(ident, max_match_rate)
        emb: dict[str, np.ndarray] = {}
        if len(idx):
            from corpus_anon.models.faces import mean_embedding

            emb = {"orig": mean_embedding(o_emb, self.kind), "anon": mean_embedding(a_emb, self.kind)}
        return Evaluation(out, emb, leak)
