"""The report's thumbnails: a few frames of each clip (original and anonymized) decoded with PyAV
and encoded as small JPEGs, read only from URIs the report is allowed to open."""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from typing import Any, Sequence

from corpus_anon.errors import one_sentence
from corpus_anon.io.storage import PolicyError, Storage, normalize_uri
from corpus_anon.run.html import num

log = logging.getLogger(__name__)


THUMB_HEIGHT = 160


JPEG_QSCALE = 5  # FFmpeg MJPEG qscale (2 = best .. 31); about quality 70 of libjpeg


FRACTIONS = (1 / 6, 1 / 2, 5 / 6)  # where in each clip the thumbnails are taken


# ---- thumbnails -----------------------------------------------------------------------------------
def _jpeg(frame: Any, height: int) -> bytes:
    """One decoded PyAV frame as a JPEG `height` px high, in its displayed orientation."""
    import av
    import numpy as np

    rot = int(getattr(frame, "rotation", 0) or 0) % 360
    cw, ch = frame.width, frame.height
    dw, dh = (ch, cw) if rot in (90, 270) else (cw, ch)
    th = max(2, height - height % 2)
    tw = min(4 * th, max(2, int(round(dw * th / dh / 2)) * 2))
    coded = (th, tw) if rot in (90, 270) else (tw, th)
    rgb = frame.reformat(width=coded[0], height=coded[1], format="rgb24", interpolation="AREA").to_ndarray()
    if rot:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rot // 90))
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = rgb.shape[1], rgb.shape[0]
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    ctx.qmin = ctx.qmax = JPEG_QSCALE
    vf = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*ctx.encode(vf), *ctx.encode(None)])


def _frame_time(frame: Any, tb: Any) -> float | None:
    if frame.pts is not None and tb is not None:
        return float(frame.pts * tb)
    return float(frame.time) if frame.time is not None else None


def _grab(src: Any, offset: float, length: float | None, fractions: Sequence[float], height: int) -> list[bytes | None]:
    """JPEGs of the frames nearest `offset + f * length` (seconds, stream time) for each fraction."""
    import av

    from corpus_anon.io.video import open_source  # the allow-list: originals are files from elsewhere

    out: list[bytes | None] = [None] * len(fractions)
    with open_source(src) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        tb = vs.time_base
        if length is None:
            if vs.duration is not None and tb is not None:
                total = float(vs.duration * tb)
            elif c.duration is not None:
                total = c.duration / 1_000_000
            else:
                total = offset + 1.0
            length = max(0.0, total - offset)
        for k, f in enumerate(fractions):
            target = offset + f * length
            try:
                c.seek(max(0, int(target / tb)) if tb else 0, stream=vs, backward=True, any_frame=False)
            except av.FFmpegError:
                c.seek(0, stream=vs)
            prev, prev_t, best = None, None, None
            for i, fr in enumerate(c.decode(vs)):
                t = _frame_time(fr, tb)
                t = float(i) if t is None else t
                if t >= target - 1e-6:
                    best = prev if prev is not None and abs(prev_t - target) < abs(t - target) else fr
                    break
                prev, prev_t = fr, t
            best = best if best is not None else prev
            if best is not None:
                out[k] = _jpeg(best, height)
    if all(b is None for b in out):
        raise ValueError("no frame could be decoded")
    return out


def thumbnails(storage: Storage, uri: Any, offset: float, length: float | None,
               height: int) -> tuple[list[bytes | None], str | None]:
    """(JPEGs per time point, None) or ([], why) for an object that cannot be read."""
    if not uri:
        return [], "not produced"
    try:
        norm = normalize_uri(str(uri))
        storage.check_read(norm)
        if norm.startswith("file://"):
            path = norm[len("file://"):]
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            return _grab(path, offset, length, FRACTIONS, height), None
        fs, path = storage.filesystem(norm)
        with fs.open(path, "rb") as f:  # ranged reads: a long session recording is not downloaded whole
            return _grab(f, offset, length, FRACTIONS, height), None
    except Exception as e:  # noqa: BLE001 - one unreadable clip must not stop the report
        why = ("not found" if isinstance(e, FileNotFoundError) else
               "outside storage.allowed_prefixes.read" if isinstance(e, PolicyError) else one_sentence(e))
        log.warning("report: no thumbnails from %s (%s)", uri, one_sentence(e))
        return [], why


def clip_thumbs(storage: Storage, r: dict[str, Any], variants: Sequence[tuple[str, str]],
                height: int) -> dict[str, tuple[list[bytes | None], str | None]]:
    start = num(r.get("start_s")) or 0.0
    end = num(r.get("end_s"))
    length = num(r.get("duration_s"))
    if length is None and end is not None:
        length = max(0.0, end - start)
    out = {}
    for _, col in variants:
        offset = start if col == "video_uri" else 0.0
        out[col] = thumbnails(storage, r.get(col), offset, length, height)
    return out
