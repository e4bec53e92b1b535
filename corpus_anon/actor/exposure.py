"""The exposure check: is any original face — every person, not only the signer — still the same
person in the anonymized output, on any frame? (numpy and the face backend only.)

The signer-only identity metrics (`identity.FaceAnalyzer.evaluate`) sample a few frames of one
track; a burst of exposed frames, or a bystander the anonymizer missed, passes them. This check:

1. links the original's detections on every frame into tracks of all people
   (`facetrack.build_tracks`); inside a track's span a frame the detector missed gets the box (and
   keypoints) interpolated between its neighbouring detections — a face missed for a few frames,
   behind a hand or an occluder, is still a face there;
2. per track, chooses the frames to check: every frame of its span the detector missed (the frames
   an anonymizer's own detector most likely missed too), both ends, detected frames spaced so that
   at most `max_gap` frames lie between two checked frames, and every frame where the detector
   finds a face in the output overlapping the track's box;
3. at each chosen frame embeds the original at its face and the output *at the same place*
   (box and keypoints of the original) and judges them with the backend's own same-person rule:
   a match is an **exposed** frame. Around an exposed frame every neighbouring frame is checked
   too, so a run of exposed frames is counted whole, not once per sampling step;
4. beyond a track's span (before its first, after its last detection) its end box is held for as
   long as the original's picture there stays what it was (`facetrack.still_until`: a face the
   detector found late, or lost early, is still there while its place looks the same — the rule
   pixelate hides by), and those frames are checked alike. (The embedder cannot decide this: on
   hair or background it calls almost anything the same person.)

Exposed frames mean the clip is `leak` (gate.py). A place the detector took for a face in the
original and the anonymizer left untouched compares as the same person too: the check fails closed.
Original-face embeddings never leave this module: only counts and scores do.

Per-clip columns (`Exposure.metrics`): `faces_tracked` (original face tracks, all people),
`frames_checked` (frames where at least one face was compared), `exposed_frames`, `max_exposed_run`
(longest run of consecutive exposed frames), `exposure_covered` (every track compared with at most
`max_gap` frames between two compared frames over its whole span) and `id_worst` (the most alike
pair over every compared face and frame: the smallest distance or the largest cosine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from corpus_anon.models import facetrack

log = logging.getLogger(__name__)

# An output detection overlapping an original face box by at least this IoU marks the frame for
# checking (the output's detector may place a pixelated or replaced face a little differently).
OVERLAP_IOU = 0.2

COLUMNS = ("faces_tracked", "frames_checked", "exposed_frames", "max_exposed_run", "exposure_covered")


@dataclass
class TrackExposure:
    """One original face track's result (private detail: no embeddings)."""

    span: tuple[int, int]
    detected: int
    checked: list[int] = field(default_factory=list)
    exposed: list[int] = field(default_factory=list)
    worst: float | None = None
    covered: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"span": list(self.span), "detected": self.detected, "checked": len(self.checked),
                "exposed": len(self.exposed), "worst": self.worst, "covered": self.covered}


@dataclass
class Exposure:
    """A clip's exposure result: per-clip metric columns (`metrics`), exposed frame indices, tracks."""

    metrics: dict[str, Any]
    exposed: list[int]
    tracks: list[TrackExposure]

    @property
    def leak(self) -> bool:
        return int(self.metrics["exposed_frames"]) > 0


@dataclass
class _Track:
    lo: int
    hi: int
    boxes: np.ndarray  # (n, 4): interpolated in [lo, hi], the end boxes held outside
    kps: np.ndarray | None  # (n, K, 2) likewise, or None when a detection had no keypoints
    detected: np.ndarray  # (n,) bool


def gap_ok(frames: Iterable[int], lo: int, hi: int, max_gap: int) -> bool:
    """Whether `frames` cover [lo, hi]: both ends in it and at most `max_gap` frames between two
    consecutive ones."""
    f = sorted({int(t) for t in frames if lo <= t <= hi})
    if not f or f[0] != lo or f[-1] != hi:
        return False
    return all(b - a - 1 <= max_gap for a, b in zip(f, f[1:]))


def sample_frames(lo: int, hi: int, detected: np.ndarray, max_gap: int) -> list[int]:
    """Frames of [lo, hi] to check: every frame the detector missed (its box is interpolated: the
    frames an anonymizer's own detector most likely missed too), both ends, and detected frames
    spaced so that at most `max_gap` frames lie between two checked frames."""
    step = max(0, int(max_gap)) + 1
    must = sorted({lo, hi} | {t for t in range(lo, hi + 1) if not detected[t]})
    out = []
    for a, b in zip(must, must[1:] + [None]):
        out.append(a)
        if b is not None:
            out.extend(range(a + step, b, step))
    return out


def longest_run(frames: Iterable[int]) -> int:
    """Length of the longest run of consecutive frame indices."""
    best = run = 0
    prev = None
    for t in sorted(set(int(x) for x in frames)):
        run = run + 1 if prev is not None and t == prev + 1 else 1
        best = max(best, run)
        prev = t
    return best


def _interp_kps(track: facetrack.Track, faces: list[Any], n: int) -> np.ndarray | None:
    pts = [f.kps for f in faces]
    if any(p is None for p in pts) or len({np.shape(p) for p in pts}) != 1:
        return None
    fr = np.asarray(track.frames)
    k = np.asarray(pts, dtype=np.float64)  # (m, K, 2)
    out = np.empty((n, *k.shape[1:]))
    span = np.arange(n)
    for i in range(k.shape[1]):
        for j in range(2):
            out[:, i, j] = np.interp(span, fr, k[:, i, j])  # held (constant) outside [lo, hi]
    return out


def _tracks(dets: list[list[Any]], n: int) -> list[_Track]:
    boxes = [np.array([f.box for f in d], dtype=np.float64).reshape(-1, 4) for d in dets]
    out = []
    # A track stays open across any gap, as pixelate links them: the frames between are a face to check.
    for tr in facetrack.build_tracks(boxes, max_gap=n):
        faces = []
        for t, box in zip(tr.frames, tr.boxes):
            faces.append(next(f for f in dets[t] if np.array_equal(np.asarray(f.box, np.float64), box)))
        detected = np.zeros(n, dtype=bool)
        detected[tr.frames] = True
        lo, hi = tr.span()
        out.append(_Track(lo, hi, facetrack.fill_boxes(tr, n, hold=None), _interp_kps(tr, faces, n), detected))
    return out


class ExposureCheck:
    """The check for one original clip. Original embeddings are cached, so re-checking another
    output of the same clip (a re-seeded `diffslva` attempt) embeds only the output again."""

    def __init__(self, backend: Any, orig: np.ndarray, detections: list[list[Any]], max_gap: int = 4,
                 overlap_iou: float = OVERLAP_IOU) -> None:
        if len(detections) != len(orig):
            raise ValueError(f"the exposure check needs detections for each of the {len(orig)} frames, "
                             f"got {len(detections)}.")
        self.backend = backend
        self.orig = orig
        self.max_gap = int(max_gap)
        self.overlap_iou = overlap_iou
        self.tracks = _tracks(detections, len(orig))
        self._orig_emb: dict[tuple[int, int], np.ndarray | None] = {}
        self._hold: dict[int, tuple[int, int]] = {}

    # ---- embedding at a track's place -----------------------------------------------------------
    def _place(self, tr: _Track, t: int) -> np.ndarray:
        """Where the face is at frame t: its keypoints when known, else its box."""
        return tr.kps[t] if tr.kps is not None else tr.boxes[t]

    def _orig(self, k: int, t: int) -> np.ndarray | None:
        key = (k, t)
        if key not in self._orig_emb:
            from corpus_anon.models.faces import Face

            tr = self.tracks[k]
            face = Face(box=tr.boxes[t], score=1.0, kps=None if tr.kps is None else tr.kps[t].astype(np.float32))
            try:
                self._orig_emb[key] = np.asarray(self.backend.embed(self.orig[t], [face])[0])
            except (ValueError, RuntimeError) as e:
                log.debug("exposure: no original embedding of track %d at frame %d (%s)", k, t, e)
                self._orig_emb[key] = None
        return self._orig_emb[key]

    def _held(self, k: int) -> tuple[int, int]:
        """The frames a track is held over beyond its span: while the original's picture at its end
        box stays what it was (`facetrack.still_until`, the rule pixelate hides by). The embedder is
        no judge of that: on hair or background it calls anything the same person."""
        if k not in self._hold:
            tr = self.tracks[k]
            self._hold[k] = (facetrack.still_until(self.orig, tr.boxes[tr.lo], tr.lo, -1),
                             facetrack.still_until(self.orig, tr.boxes[tr.hi], tr.hi, 1))
        return self._hold[k]

    def _judge(self, k: int, t: int, anon: np.ndarray) -> float | None:
        """The score of the original face vs the output at the same place; None when unmeasurable."""
        o = self._orig(k, t)
        if o is None:
            return None
        tr = self.tracks[k]
        place = self._place(tr, t)
        try:
            a = np.asarray(self.backend.embed_at(anon[t], place))
        except (ValueError, RuntimeError) as e:
            log.debug("exposure: no output embedding of track %d at frame %d (%s)", k, t, e)
            return None
        return float(self.backend.score(o, a))

    # ---- the check ------------------------------------------------------------------------------
    def _overlap_frames(self, tr: _Track, anon_dets: list[list[Any]]) -> list[int]:
        return [t for t, d in enumerate(anon_dets)
                if any(facetrack.iou(tr.boxes[t], np.asarray(f.box, np.float64)) >= self.overlap_iou for f in d)]

    def run(self, anon: np.ndarray, anon_detections: list[list[Any]], check: Callable[[], None] | None = None) -> Exposure:
        """Check one anonymized output (same shape as the original) with its detections."""
        if anon.shape != self.orig.shape:
            raise ValueError(f"the output {anon.shape} and the original {self.orig.shape} differ in shape.")
        if len(anon_detections) != len(anon):
            raise ValueError(f"the exposure check needs output detections for each of the {len(anon)} frames, "
                             f"got {len(anon_detections)}.")
        n = len(anon)
        be = self.backend
        results: list[TrackExposure] = []
        checked_all: set[int] = set()
        exposed_all: set[int] = set()
        scores: list[float] = []
        calls = 0
        for k, tr in enumerate(self.tracks):
            res = TrackExposure((tr.lo, tr.hi), int(tr.detected.sum()))
            judged: dict[int, float | None] = {}
            todo = sample_frames(tr.lo, tr.hi, tr.detected, self.max_gap) + self._overlap_frames(tr, anon_detections)
            # Beyond the span: the frames it is held over (its place still looks the same), sampled alike.
            held_lo, held_hi = self._held(k)
            step = self.max_gap + 1
            todo += [held_lo, held_hi, *range(tr.lo - step, held_lo, -step), *range(tr.hi + step, held_hi, step)]
            while todo:
                t = todo.pop()
                if t in judged or not held_lo <= t <= held_hi:
                    continue
                s = self._judge(k, t, anon)
                judged[t] = s
                calls += 1
                if check is not None and calls % 8 == 0:
                    check()
                if s is not None and be.same_person(s):
                    # Count the whole run: check the neighbours of every exposed frame.
                    todo.extend((t - 1, t + 1))
            ok = {t: s for t, s in judged.items() if s is not None}
            res.checked = sorted(ok)
            res.exposed = sorted(t for t, s in ok.items() if be.same_person(s))
            if ok:
                vals = np.asarray(list(ok.values()), dtype=np.float64)
                res.worst = float(vals.max() if be.score_kind == "cosine" else vals.min())
                scores.append(res.worst)
            res.covered = gap_ok(ok, tr.lo, tr.hi, self.max_gap)
            checked_all.update(ok)
            exposed_all.update(res.exposed)
            results.append(res)
        worst = None
        if scores:
            worst = max(scores) if be.score_kind == "cosine" else min(scores)
        metrics = {
            "faces_tracked": len(self.tracks),
            "frames_checked": len(checked_all),
            "exposed_frames": len(exposed_all),
            "max_exposed_run": longest_run(exposed_all),
            "exposure_covered": all(r.covered for r in results),
            "id_worst": None if worst is None else round(worst, 4),
        }
        if exposed_all:
            log.info("exposure: %d exposed frame(s), longest run %d; tracks %s", len(exposed_all),
                     metrics["max_exposed_run"], [r.as_dict() for r in results if r.exposed])
        return Exposure(metrics, sorted(exposed_all), results)


def more_alike(a: float | None, b: float | None, kind: str) -> float | None:
    """The more alike of two scores (max cosine, min distance), ignoring None."""
    vals = [v for v in (a, b) if v is not None]
    if not vals:
        return None
    return max(vals) if kind == "cosine" else min(vals)


__all__ = ["COLUMNS", "Exposure", "ExposureCheck", "TrackExposure", "gap_ok", "longest_run", "more_alike",
           "sample_frames"]
