"""Face analysis of one anonymized clip in the actor and the leak gate: the signer's track,
enhancement, the identity evaluation, re-seeding a leaking `diffslva` clip, the clip's status and
its private artifacts (tracks, embeddings). Called by `worker.ClipProcessor.assess` with the model
lock held."""

from __future__ import annotations

import logging
import time
from typing import Any

from corpus_anon.errors import ClipError

log = logging.getLogger(__name__)


def assess_clip(proc: Any, p: Any, ctx: dict[str, Any], result: Any) -> tuple[Any, dict[str, Any], str, dict[str, bytes]]:
    """Face analysis and the leak gate: (result, metrics, status, private artifacts).

    A leaking clip from an anonymizer that synthesizes a face is re-run with the seed
    hash(row seed, attempt) up to `gate.max_reseeds` times; if it still leaks it is `leak`."""
    if proc.faces is None:
        return result, {}, "ok", {}
    from corpus_anon.anonymize import enhance_expressions
    from corpus_anon.identity import track_from_parquet
    from corpus_anon.secret import reseed

    t0 = time.monotonic()
    frames, check, gate = p.clip.frames, p.deadline.check, proc.cfg.gate
    synth = proc.anonymizer.name == "diffslva"
    work_h, work_w = frames.shape[1:3]
    to_src = (p.clip.src_width / work_w, p.clip.src_height / work_h)
    if p.face_boxes is not None:
        try:
            track = track_from_parquet(p.face_boxes, len(frames), (1 / to_src[0], 1 / to_src[1]))
        except ValueError as e:
            raise ClipError(str(e)) from None
    else:
        track = proc.faces.track(frames, check)
    result = enhance_expressions(proc.anonymizer, frames, result, track)
    ev = proc.faces.evaluate(frames, result.frames, track, synth, gate.max_match_rate, check)
    # Seed attempts go on from where an earlier run stopped (a refresh re-running a `leak`
    # clip), up to gate.max_reseeds in this run and refresh.max_reseeds in all.
    attempt = start = int(ctx.get("seed_start") or 0)
    last = start + gate.max_reseeds if start == 0 else min(start + gate.max_reseeds, proc.cfg.refresh.max_reseeds)
    base = ctx.get("base_seed", ctx.get("seed"))
    while gate.enabled and ev.leak and synth and attempt < last and base is not None:
        attempt += 1
        log.info("clip %s leaks identity; re-seeding (attempt %d)", p.row["clip_id"], attempt)
        result = proc.anonymizer.anonymize(frames, dict(ctx, seed=reseed(int(base), attempt)), check)
        result = enhance_expressions(proc.anonymizer, frames, result, track)
        ev = proc.faces.evaluate(frames, result.frames, track, synth, gate.max_match_rate, check)
    status = "leak" if (gate.enabled and ev.leak) else "ok"
    extra = dict(ev.metrics, leak=bool(ev.leak), faces_tracks=track.n_tracks,
                 face_boxes="given" if p.face_boxes is not None else "detected",
                 t_faces_s=round(time.monotonic() - t0, 4))
    if synth:
        extra["seed_attempt"] = attempt
    artifacts = {"tracks": proc.faces.tracks_parquet(track, to_src)}
    if ev.embeddings:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **ev.embeddings, kind=np.array(proc.faces.kind))
        artifacts["embeddings"] = buf.getvalue()
    return result, extra, status, artifacts
