"""Face analysis of one anonymized clip in the actor and the leak gate: the signer's track,
enhancement, the identity evaluation, the exposure check of every original face, re-seeding a
leaking `diffslva` clip, the clip's status and its private artifacts (tracks, embeddings). Called
by `worker.ClipProcessor.assess` with the model lock held.

A clip leaks when the signer's identity metrics say so (`metrics.leaks`) or when the exposure check
(`exposure.ExposureCheck`) finds any original face — every person, on any frame — still judged
the same person in the output (`exposed_frames > 0`). Faces are detected once per video on the
original (the same detections give the signer's track and the tracks of everyone else) and once
per output.

Test hook (fault injection, inert by default): `CORPUS_ANON_FAULT_EXPOSE`, read only in the worker
process: `clip_id:frame,frame,...` (several clips separated by `;`). On the listed frames of a
listed clip the output gets the original's pixels back before it is checked and published, as an
anonymizer that missed a face there would leave them. It exists for tests/e2e/test_gate.py; never
set it in a real run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from corpus_anon.errors import ClipError

log = logging.getLogger(__name__)

FAULT_EXPOSE_ENV = "CORPUS_ANON_FAULT_EXPOSE"


def fault_expose_frames(clip_id: str, n_frames: int) -> list[int]:
    """The frames the test hook (see the module docstring) exposes in this clip; [] when unset."""
    spec = os.environ.get(FAULT_EXPOSE_ENV)
    if not spec:
        return []
    for part in spec.split(";"):
        cid, _, frames = part.partition(":")
        if cid.strip() == clip_id:
            return sorted({int(f) for f in frames.split(",") if f.strip() and 0 <= int(f) < n_frames})
    return []


def _fault_expose(clip_id: str, orig: np.ndarray, result: Any) -> Any:
    frames = fault_expose_frames(clip_id, len(orig))
    if not frames:
        return result
    log.error("fault injection (%s): clip %s shows its original frames %s", FAULT_EXPOSE_ENV, clip_id, frames)
    out = result.frames.copy()
    out[frames] = orig[frames]
    return dataclasses.replace(result, frames=out)


def _with_track(dets: list[list[Any]], track: Any) -> list[list[Any]]:
    """The detections plus the signer's given boxes (`face_boxes_uri`) where no detection covers
    them: a face the user marked is an original face to check."""
    from corpus_anon.models import facetrack

    out = [list(d) for d in dets]
    for t, face in enumerate(track.faces):
        if face is not None and not any(facetrack.iou(face.box, d.box) > 0.3 for d in out[t]):
            out[t].append(face)
    return out


def assess_clip(proc: Any, p: Any, ctx: dict[str, Any], result: Any) -> tuple[Any, dict[str, Any], str, dict[str, bytes]]:
    """Face analysis and the leak gate: (result, metrics, status, private artifacts).

    A leaking clip from an anonymizer that synthesizes a face is re-run with the seed
    hash(row seed, attempt) up to `gate.max_reseeds` times; if it still leaks it is `leak`.
    `pixelate` cannot be re-run into another result, so a leaking pixelated clip is `leak`."""
    if proc.faces is None:
        return result, {}, "ok", {}
    from corpus_anon.actor.anonymize import enhance_expressions
    from corpus_anon.actor.exposure import ExposureCheck, more_alike
    from corpus_anon.actor.identity import track_from_parquet
    from corpus_anon.secret import reseed

    t0 = time.monotonic()
    frames, check, gate = p.clip.frames, p.deadline.check, proc.cfg.gate
    clip_id = str(p.row["clip_id"])
    synth = proc.anonymizer.name == "diffslva"
    work_h, work_w = frames.shape[1:3]
    to_src = (p.clip.src_width / work_w, p.clip.src_height / work_h)
    dets = proc.faces.detect_all(frames, check)
    if p.face_boxes is not None:
        try:
            track = track_from_parquet(p.face_boxes, len(frames), (1 / to_src[0], 1 / to_src[1]))
        except ValueError as e:
            raise ClipError(str(e)) from None
        dets = _with_track(dets, track)
    else:
        track = proc.faces.track(frames, check, detections=dets)
    exposure = ExposureCheck(proc.faces.backend, frames, dets, gate.max_gap_frames)
    t_exposure = 0.0

    measured: list[Any] = []
    # The mesh levels the eyes from the first two keypoints: only the ArcFace order (CenterFace, SCRFD)
    # has the two eyes there; dlib's five points start with one eye's two corners, so dlib gives none
    # (the mesh's refine pass levels the eyes from its own points).
    use_kps = getattr(getattr(proc.faces, "backend", None), "name", None) != "dlib"

    def original_landmarks() -> Any:
        """The original's face mesh on every frame and the hands near the face, measured once for
        every attempt's face module (None when no landmark model or no face module)."""
        if getattr(proc.faces, "landmarks", None) is None or getattr(proc.anonymizer, "reenactor", None) is None:
            return None
        if not measured:
            from corpus_anon.actor.enhance import measure_original

            kps = [None if f is None else f.kps for f in track.faces] if use_kps else None
            measured.append(measure_original(proc.faces.landmarks, frames, track.boxes(), kps, check=check))
            check()
        return measured[0]

    def judge(result: Any) -> tuple[Any, Any, Any]:
        nonlocal t_exposure
        result = _fault_expose(clip_id, frames, enhance_expressions(proc.anonymizer, frames, result, track,
                                                                    landmarks=getattr(proc.faces, "landmarks", None),
                                                                    clip_landmarks=original_landmarks(),
                                                                    use_kps=use_kps))
        t1 = time.monotonic()
        anon_dets = proc.faces.detect_all(result.frames, check)  # once: the exposure check and face_frac_anon
        ex = exposure.run(result.frames, anon_dets, check)
        t_exposure += time.monotonic() - t1
        # the face module's every-frame mesh of the original, when it ran, saves meshing it again
        ev = proc.faces.evaluate(frames, result.frames, track, synth, gate.max_match_rate, check,
                                 anon_detections=anon_dets, orig_landmarks=measured[0] if measured else None)
        return result, ev, ex

    result, ev, ex = judge(result)
    # Seed attempts go on from where an earlier run stopped (a refresh re-running a `leak`
    # clip), up to gate.max_reseeds in this run and refresh.max_reseeds in all.
    attempt = start = int(ctx.get("seed_start") or 0)
    last = start + gate.max_reseeds if start == 0 else min(start + gate.max_reseeds, proc.cfg.refresh.max_reseeds)
    base = ctx.get("base_seed", ctx.get("seed"))
    while gate.enabled and (ev.leak or ex.leak) and synth and attempt < last and base is not None:
        attempt += 1
        log.info("clip %s leaks identity (%d exposed frames); re-seeding (attempt %d)", clip_id,
                 ex.metrics["exposed_frames"], attempt)
        result, ev, ex = judge(proc.anonymizer.anonymize(frames, dict(ctx, seed=reseed(int(base), attempt)), check))
    leak = bool(ev.leak or ex.leak)
    status = "leak" if (gate.enabled and leak) else "ok"
    # id_worst: the most alike original/output pair over every checked face and frame; the signer's
    # sampled frames alone keep their own column (the other id_* columns are the signer's).
    extra = dict(ev.metrics, **ex.metrics, id_worst_signer=ev.metrics.get("id_worst"),
                 leak=leak, faces_tracks=track.n_tracks,
                 face_boxes="given" if p.face_boxes is not None else "detected",
                 t_exposure_s=round(t_exposure, 4), t_faces_s=round(time.monotonic() - t0, 4))
    extra["id_worst"] = more_alike(ev.metrics.get("id_worst"), ex.metrics["id_worst"], proc.faces.kind)
    if synth:
        extra["seed_attempt"] = attempt
    artifacts = {"tracks": proc.faces.tracks_parquet(track, to_src)}
    if ev.embeddings:
        import io

        buf = io.BytesIO()
        np.savez(buf, **ev.embeddings, kind=np.array(proc.faces.kind))
        artifacts["embeddings"] = buf.getvalue()
    return result, extra, status, artifacts
