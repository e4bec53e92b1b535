"""Landmark models where signers look: MediaPipe's face mesh (468 points, ``models.facemesh``) and
hands (palm detection, then 21 points per hand, ``models.hands``), run by OpenCV's TFLite importer on
the actor's CPU threads; their files and shared geometry are ``models.mediapipe_common``.

``Landmarks`` is what an actor holds (``build_landmarks`` from the config's ``landmarks`` section; its
network batch size, 16, has no config key); ``Landmarks.clip`` measures the face in given boxes and the
hands at chosen frames of one clip.

cv2 is imported inside the constructors and functions only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from corpus_anon.models.facemesh import MESH_POINTS, FaceMesh
from corpus_anon.models.hands import (HAND_DETECT_EVERY, HAND_DUPLICATE_IOU, Hand, HandLandmarker, box_iou, boxes_meet, hand_roi,
                                      hand_track_roi, near_face_zone, point_inside, roi_box, signing_space)
from corpus_anon.models.mediapipe_common import installed_mediapipe_file

log = logging.getLogger(__name__)


@dataclass
class ClipLandmarks:
    """Landmarks of one clip at the frames ``frames`` (indices into the clip): the face mesh of the
    given face per frame (NaN where no box or the mesh's face probability is below the threshold), its
    probability, and the hands per frame (None where hands were not looked for). ``hands_near_face``
    is None when every hand found was kept, else the scale of the face box (``near_face_zone``) that a
    hand's square had to meet: then hands away from the face are missing and the hands are not a
    measure of the whole signing space."""

    frames: np.ndarray  # (N,) int64, ascending
    face: np.ndarray  # (N, 468, 3) float32, NaN rows where no mesh
    face_score: np.ndarray  # (N,) float64, NaN where no box
    hands: list[list[Hand]] | None = None
    hand_model: str | None = None  # which hand model ran ("mediapipe-hands"), None when none did
    hands_near_face: float | None = None

    def at(self, t: int) -> int | None:
        """Position of clip frame ``t`` in these arrays, or None when it was not measured."""
        i = int(np.searchsorted(self.frames, t))
        return i if i < len(self.frames) and int(self.frames[i]) == int(t) else None




# ---- the bundle an actor holds -------------------------------------------------------------------
@dataclass
class Landmarks:
    """The landmark models of one actor: the face mesh, the hand model (None when hands are off), the
    face probability below which a mesh is not used, and where palms are looked for by default (None:
    the whole frame; a number: the ``signing_space`` of that many face heights around the face box)."""

    face_mesh: FaceMesh
    hands: HandLandmarker | None = None
    face_threshold: float = 0.5
    hand_space: float | None = None

    def clip(self, frames: Sequence[np.ndarray] | np.ndarray, boxes: np.ndarray,
             kps: Sequence[np.ndarray | None] | None = None, frames_idx: Sequence[int] | None = None,
             hands: bool = True, hand_space: float | None = None, near_face: float | None = None,
             track_hands: bool = False, detect_every: int = HAND_DETECT_EVERY,
             check: Callable[[], None] | None = None) -> ClipLandmarks:
        """Landmarks of one clip at the frames ``frames_idx`` (ascending indices into ``frames``; None =
        every frame): the mesh of the face in ``boxes[t]`` ((T, 4) frame pixels, a NaN row where there is
        no face; ``kps[t]`` its five keypoints or None), a NaN mesh row where the box is NaN or the face
        probability is below ``face_threshold``; and the hands when ``hands`` and this bundle has a hand
        model (else ``hands`` None): palms are looked for on the whole frame, or with ``hand_space`` (or
        the bundle's) in the ``signing_space`` of that many face heights around the frame's box (whole
        frame where the box is NaN).

        ``near_face`` (a scale, e.g. ``NEAR_FACE``) runs the hand landmark network only on palms (and
        tracked hands) whose square meets the frame's face box scaled by it (``near_face_zone``; every
        palm where the box is NaN). ``track_hands`` tracks hands as MediaPipe does over consecutive
        frames (``frames_idx`` must then be every frame): palms are detected on every ``detect_every``-th
        frame and on any frame where a tracked hand's presence falls below ``hand_threshold``; in
        between, each hand's square comes from its previous frame's points (``hand_track_roi``). Without
        it every requested frame is searched on its own (sparse frames, the metrics). ``check`` (e.g. a
        deadline's) is called between batches and, when tracking, between frames."""
        n = len(frames)
        b = np.asarray(boxes, dtype=np.float64)
        if b.shape != (n, 4):
            raise ValueError(f"clip needs one box row (x0, y0, x1, y1) per frame, (T, 4) = ({n}, 4), got {b.shape}.")
        if kps is not None and len(kps) != n:
            raise ValueError(f"clip needs keypoints (or None) for each of the {n} frames, got {len(kps)}.")
        idx = np.arange(n, dtype=np.int64) if frames_idx is None else np.asarray(frames_idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n or (np.diff(idx) <= 0).any()):
            raise ValueError(f"frames_idx must be strictly ascending indices into the clip's {n} frames, "
                             f"got {idx.tolist()[:8]}{'...' if len(idx) > 8 else ''}.")
        if track_hands and len(idx) != n:
            raise ValueError(f"track_hands follows hands from frame to frame and needs every one of the clip's {n} "
                             f"frames, got {len(idx)} frames_idx.")
        if int(detect_every) < 1:
            raise ValueError(f"detect_every must be at least 1 frame, got {detect_every}.")
        face = np.full((len(idx), MESH_POINTS, 3), np.nan, np.float32)
        score = np.full(len(idx), np.nan)
        with_box = [j for j, t in enumerate(idx) if np.isfinite(b[t]).all()]
        if with_box:
            ts = [int(idx[j]) for j in with_box]
            res = self.face_mesh.mesh([frames[t] for t in ts], [b[t] for t in ts],
                                      None if kps is None else [kps[t] for t in ts], check=check)
            for j, r in zip(with_box, res):
                score[j] = r.score
                if r.score >= self.face_threshold:
                    face[j] = r.points
        found = None
        if hands and self.hands is not None:
            found = self.find_hands(frames, b, idx, hand_space, near_face, track_hands, detect_every, check)
        return ClipLandmarks(frames=idx, face=face, face_score=score, hands=found,
                             hand_model=self.hands.name if found is not None else None,
                             hands_near_face=None if found is None or near_face is None else float(near_face))

    def find_hands(self, frames: Sequence[np.ndarray] | np.ndarray, boxes: np.ndarray, frames_idx: Sequence[int],
                   hand_space: float | None = None, near_face: float | None = None, track_hands: bool = False,
                   detect_every: int = HAND_DETECT_EVERY,
                   check: Callable[[], None] | None = None) -> list[list[Hand]]:
        """The hands at ``frames_idx`` as ``clip`` finds them (its hand part alone, without the face
        mesh; the arguments are ``clip``'s, already checked there or by the caller). Needs a hand model."""
        if self.hands is None:
            raise ValueError("find_hands needs a hand model (landmarks.hands is false).")
        b = np.asarray(boxes, dtype=np.float64)
        idx = [int(t) for t in frames_idx]
        regions = None
        space = hand_space if hand_space is not None else self.hand_space
        if space is not None:
            regions = [signing_space(b[t], np.shape(frames[t]), scale=space) for t in idx]
        near = None if near_face is None else [near_face_zone(b[t], near_face) for t in idx]
        sel = [frames[t] for t in idx]
        if track_hands:
            return self._track(sel, regions, near, int(detect_every), check)
        return self.hands.detect_batch(sel, regions, check, near)

    def _track(self, frames: Sequence[np.ndarray], regions: Sequence[np.ndarray | None] | None,
               near: Sequence[np.ndarray | None] | None, every: int,
               check: Callable[[], None] | None) -> list[list[Hand]]:
        """The hands of consecutive frames, tracked (``clip``'s ``track_hands``)."""
        hl = self.hands
        assert hl is not None
        n = len(frames)
        region = (lambda t: None) if regions is None else (lambda t: regions[t])
        zone = (lambda t: None) if near is None else (lambda t: near[t])
        sched = list(range(0, n, every))
        planned = dict(zip(sched, hl.palms([frames[t] for t in sched],
                                           None if regions is None else [regions[t] for t in sched], check)))
        out: list[list[Hand]] = []
        prev: list[Hand] = []
        for t in range(n):
            z = zone(t)
            kept: list[Hand] = []
            lost = False
            rois = [hand_track_roi(h.points) for h in prev]
            rois_in = [(h, r) for h, r in zip(prev, rois) if z is None or boxes_meet(roi_box(r), z)]
            if rois_in:
                pts, pres, handed = hl.landmarks([frames[t]] * len(rois_in), [r for _, r in rois_in])
                for (h, r), q, pr, hd in zip(rois_in, pts, pres, handed):
                    hand = Hand(q.astype(np.float32), float(pr), float(hd), h.palm_score, r)
                    if pr < hl.hand_threshold:
                        lost = True
                    elif all(box_iou(hand.box, k.box) <= HAND_DUPLICATE_IOU for k in kept):
                        kept.append(hand)
            if (t in planned or lost) and len(kept) < hl.max_hands:
                palms = planned[t] if t in planned else hl.palms([frames[t]], [region(t)])[0]
                cand = [p for p in palms if z is None or boxes_meet(roi_box(hand_roi(p)), z)]
                # a palm inside a hand already followed is that hand
                cand = [p for p in cand if not any(point_inside((p.box[:2] + p.box[2:]) / 2, k.box) for k in kept)]
                cand = cand[:2 * hl.max_hands]
                if cand:
                    rs = [hand_roi(p) for p in cand]
                    pts, pres, handed = hl.landmarks([frames[t]] * len(cand), rs)
                    for p, r, q, pr, hd in zip(cand, rs, pts, pres, handed):
                        if pr < hl.hand_threshold or len(kept) >= hl.max_hands:
                            continue
                        hand = Hand(q.astype(np.float32), float(pr), float(hd), p.score, r)
                        if all(box_iou(hand.box, k.box) <= HAND_DUPLICATE_IOU for k in kept):
                            kept.append(hand)
            out.append(kept)
            prev = kept
            if check is not None:
                check()
        return out


def mediapipe_paths(cfg: Any, storage: Any = None, hands: bool = True) -> dict[str, Path]:
    """The mediapipe model files a run loads (the face mesh; palm detection and hand landmarks when
    ``hands``), by file name, verified before anything loads them: the copies staged from
    ``models.store`` (checked against the store's lock, whose recording checked the pins), else the
    installed wheel's (checked against the pins)."""
    from corpus_anon.models import registry

    names = ["face_landmark.tflite"] + (["palm_detection_full.tflite", "hand_landmark_full.tflite"] if hands else [])
    m = cfg.models
    if not m.store:
        return {n: installed_mediapipe_file(n) for n in names}
    if storage is None:
        raise ValueError("staging the landmark models from models.store needs a Storage.")
    staged = registry.stage(m.profile, m.store, m.cache_dir, storage)
    locked = registry.verify_staged(staged, m.profile)
    missing = [registry.mediapipe_relpath(n) for n in names if registry.mediapipe_relpath(n) not in locked]
    if missing:
        raise registry.ModelStoreError(
            f"the landmark models need {', '.join(missing)} in the model store's lock; add them with "
            "`corpus-anon models add-mediapipe STORE` (or set landmarks.enabled: false)."
        )
    return {n: staged / registry.mediapipe_relpath(n) for n in names}


def build_landmarks(cfg: Any, storage: Any = None, batch_size: int = 16) -> Landmarks | None:
    """The landmark models the config's ``landmarks`` section asks for (None when it is disabled):
    the face mesh, and MediaPipe's hands unless ``landmarks.hands`` is false, with its thresholds."""
    lm = cfg.landmarks
    if not lm.enabled:
        return None
    paths = mediapipe_paths(cfg, storage, hands=lm.hands)
    mesh = FaceMesh(paths["face_landmark.tflite"], batch_size=batch_size)
    hands = None
    if lm.hands:
        hands = HandLandmarker(paths["palm_detection_full.tflite"], paths["hand_landmark_full.tflite"],
                               max_hands=lm.max_hands, palm_threshold=lm.palm_threshold,
                               hand_threshold=lm.hand_threshold, batch_size=batch_size)
    log.info("landmark models: %s%s", mesh.name, f" + {hands.name}" if hands else " (hands off)")
    return Landmarks(mesh, hands, face_threshold=lm.face_threshold, hand_space=lm.hand_space)


__all__ = ["ClipLandmarks", "Landmarks", "build_landmarks", "mediapipe_paths"]
