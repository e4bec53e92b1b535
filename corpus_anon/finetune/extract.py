"""Face-crop chunks for TPSMM fine-tuning (`corpus-anon faces extract`): a Ray Data job over the
run's own manifest that tracks the signer's face and cuts fixed-box square "tube" crops.

Per clip, following the crops TPSMM was trained on (METHOD.md §8.6, FOMM's crop-video and
video-preprocessing's crop_vox): every frame is detected at `faces.detect_side`, boxes are linked
into IoU tracks and the signer's track is picked (`facetrack.signer_track`, the rule everything
uses). The track is split into segments of consecutive detected frames; gaps of up to
`MAX_GAP_FRAMES` undetected frames are bridged (the box is held over them), and a segment also
ends where the face has moved so far that its box overlaps the segment's first box by less than
`MIN_IOU_WITH_INITIAL` (FOMM's `iou_with_initial`), so one crop never spans a large head move.
Segments shorter than `finetune.min_chunk_frames` are dropped; longer than `max_chunk_frames`
are cut into balanced chunks, each starting and ending on a detected frame. Each chunk gets one
fixed box: the union of its face boxes, made
square around its centre with side (1 + 2 `crop_increase`) x its longer side (the rule
`actor.tube.tube_box` uses), shifted (not shrunk) to stay inside the frame. Every frame of the chunk
is cut with that box from the source-resolution frame and resized to `crop_size`, so the head
moves inside the crop as it did in the video. A chunk is an H.264 MP4 at the source frame rate.

Output under OUT:

    chunks/{clip_key}/{k}.mp4   the crops of chunk k of one clip
    parts/{clip_key}.parquet    the clip's index rows, written after its chunks are verified: the
                                clip's done marker; its metadata holds the row and settings
                                fingerprints, the clip's status and its error
    attempts/{clip_key}.json    attempts counted before each try (a clip that kills its worker
                                every time is given up after `resources.max_attempts`)
    index.parquet               every chunk of the manifest's clips, one row each (`INDEX_COLUMNS`)
    extract.json                settings, counts, when

`clip_key` is the clip id, as the run's own outputs are named (`clips/{clip_id}-{row_fp}.mp4`;
manifest validation keeps ids safe as file names). A crop set is private training data: it
carries clip and signer ids and faces, like a run's output, and is never part of a release.

A rerun skips every clip whose fragment has the same row fingerprint (source object version,
segment, given face boxes) and extraction settings, and rewrites index.parquet; a clip whose
video is bad is an `error` fragment with a one-sentence reason, retried by later runs until
`resources.max_attempts`. The driver side imports no torch, cv2, insightface or onnxruntime.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from corpus_anon import __version__
from corpus_anon.config import Config, ConfigError, resolve_endpoint
from corpus_anon.errors import ClipError, ClipTimeout, one_sentence
from corpus_anon.models.facetrack import iou
from corpus_anon.io.records import now_iso, row_fingerprint, row_value, source_inputs
from corpus_anon.actor.worker import download_source, read_face_boxes
from corpus_anon.finetune.crops import CropLayout, clip_key, fragment_bytes, index_table, purge_clips, read_fragment
from corpus_anon.io.storage import Storage, StorageSettings, join, normalize_uri

log = logging.getLogger(__name__)

# Undetected frames bridged inside a segment (the box is held over them).
MAX_GAP_FRAMES = 5
# A segment ends where the face box overlaps the segment's first box by less than this.
MIN_IOU_WITH_INITIAL = 0.25
# Bumped when the extraction rule changes, so that earlier crop sets are redone.
EXTRACT_VERSION = 1
STATUSES = ("ok", "no_face", "short", "error")
_WORK_COLUMNS = ("clip_id", "video_uri", "signer_id", "start_s", "end_s", "face_boxes_uri")


# ---- the rule: segments, chunks, boxes (numpy only) -----------------------------------------------
@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: frames [start, end) of the clip, cut with one box (x0, y0, x1, y1)."""

    start: int
    end: int
    box: tuple[int, int, int, int]

    @property
    def frames(self) -> int:
        return self.end - self.start


def _valid(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ok = np.isfinite(b).all(axis=1)
    ok[ok] = (b[ok, 2] > b[ok, 0]) & (b[ok, 3] > b[ok, 1])
    return ok


def track_segments(boxes: np.ndarray, max_gap: int = MAX_GAP_FRAMES,
                   min_iou: float = MIN_IOU_WITH_INITIAL) -> list[tuple[int, int]]:
    """Segments [start, end) of a per-frame track (rows of NaN where the face was not detected).

    A segment starts and ends on detected frames; up to `max_gap` undetected frames in a row are
    bridged, a longer gap ends it. A detected box overlapping the segment's first box by less than
    `min_iou` starts a new segment (0 turns that off)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    detected = np.flatnonzero(_valid(b))
    out: list[tuple[int, int]] = []
    start = last = None
    for t in detected:
        t = int(t)
        if start is not None and (t - last - 1 > max_gap or (min_iou > 0 and iou(b[start], b[t]) < min_iou)):
            out.append((start, last + 1))
            start = None
        if start is None:
            start = t
        last = t
    if start is not None:
        out.append((start, last + 1))
    return out


def split_chunks(start: int, end: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """[start, end) cut into the fewest chunks of at most `max_frames`, as equal as possible;
    chunks shorter than `min_frames` are dropped (a segment shorter than it gives none)."""
    n = end - start
    if n < min_frames or n <= 0:
        return []
    k = math.ceil(n / max_frames)
    bounds = [start + (n * i) // k for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b - a >= min_frames]


def square_box(boxes: np.ndarray, increase: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The fixed crop box of a chunk: the union of its valid face boxes (clipped to the frame),
    made square around its centre with side (1 + 2 `increase`) x its longer side (integer edges
    that cover it), then shifted to lie inside the frame. A side larger than the frame's shorter
    side is cut to it (the box is then centred on the union as far as the frame allows).
    Returns integer (x0, y0, x1, y1) with x1 - x0 == y1 - y0, or None without a valid box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ok = _valid(b)
    if not ok.any() or width <= 0 or height <= 0:
        return None
    v = b[ok]
    left, top = max(0.0, v[:, 0].min()), max(0.0, v[:, 1].min())
    right, bot = min(float(width), v[:, 2].max()), min(float(height), v[:, 3].max())
    if right <= left or bot <= top:
        return None
    cx, cy = (left + right) / 2, (top + bot) / 2
    half = (1 + 2 * increase) * max(right - left, bot - top) / 2
    eps = 1e-6  # 22.000000000000004 must not round out to 23
    spans = []
    for c in (cx, cy):
        lo, hi = math.floor(c - half + eps), math.ceil(c + half - eps)
        spans.append((lo, hi))
    side = min(max(hi - lo for lo, hi in spans), int(width), int(height))
    out = []
    for (lo, hi), limit in zip(spans, (int(width), int(height))):
        start = lo - (side - (hi - lo)) // 2 if side >= hi - lo else int(round((lo + hi - side) / 2))
        out.append(min(max(start, 0), limit - side))
    x0, y0 = out
    return int(x0), int(y0), int(x0 + side), int(y0 + side)


def plan_chunks(boxes: np.ndarray, width: int, height: int, increase: float, min_frames: int,
                max_frames: int, max_gap: int = MAX_GAP_FRAMES,
                min_iou: float = MIN_IOU_WITH_INITIAL) -> list[ChunkPlan]:
    """Every chunk of one clip from its signer's per-frame boxes (source pixels, NaN = none)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ok = _valid(b)
    out = []
    for s, e in track_segments(b, max_gap, min_iou):
        for a, z in split_chunks(s, e, min_frames, max_frames):
            while a < z and not ok[a]:  # a cut inside a bridged gap: start and end on a face
                a += 1
            while z > a and not ok[z - 1]:
                z -= 1
            if z - a < min_frames:
                continue
            box = square_box(b[a:z], increase, width, height)
            if box is not None:
                out.append(ChunkPlan(a, z, box))
    return out


def settled(meta: dict[str, Any] | None, row_fp: str, settings_fp: str, max_attempts: int) -> bool:
    """Whether a clip's fragment stands for this run: same inputs and settings, and finished
    (`ok`, `no_face`, `short`) or an `error` whose attempts reached `max_attempts`."""
    if not meta or meta.get("row_fp") != row_fp or meta.get("settings_fp") != settings_fp:
        return False
    if meta.get("status") == "error":
        return int(meta.get("attempts") or 0) >= max_attempts
    return meta.get("status") in STATUSES


def extract_settings(cfg: Config, models: str | None = None) -> dict[str, Any]:
    """Everything that changes a crop set's chunks (a change redoes every clip)."""
    f, v = cfg.finetune, cfg.video
    out = {
        "version": EXTRACT_VERSION,
        "crop_size": f.crop_size, "crop_increase": f.crop_increase,
        "min_chunk_frames": f.min_chunk_frames, "max_chunk_frames": f.max_chunk_frames,
        "max_gap_frames": MAX_GAP_FRAMES, "min_iou_with_initial": MIN_IOU_WITH_INITIAL,
        "face_backend": cfg.faces.backend, "detect_side": cfg.faces.detect_side,
        "crf": v.crf, "preset": v.preset, "models": models,
    }
    if v.threads:
        out["threads"] = v.threads
    return out


def face_models_digest(cfg: Config, storage: Storage) -> str | None:
    """A digest of the face backend's entries in the model store's lock (None when its files do
    not come from the store). Only those: adding a TPSMM checkpoint to the store must not redo
    the crops it is fine-tuned on. The run's own checks of the lock come first."""
    from corpus_anon.models.registry import LOCK_NAME
    from corpus_anon.run.pipeline import _uses_store, model_lock_digest

    if not cfg.models.store or not _uses_store(cfg):
        return None
    model_lock_digest(cfg, storage)  # the lock exists and lists the backend's files, or ConfigError
    files = json.loads(storage.read_bytes(join(normalize_uri(cfg.models.store), LOCK_NAME)))["files"]
    prefixes = [{"dlib": "dlib/", "insightface": "insightface/"}[cfg.faces.backend]]
    if cfg.faces.detector == "centerface":
        prefixes.append("centerface/")
    mine = {k: v for k, v in sorted(files.items()) if k.startswith(tuple(prefixes))}
    return hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:12]


def settings_fingerprint(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---- Ray Data stages ------------------------------------------------------------------------------
class ExtractSettleStage:
    """Ray Data stage: each clip's row fingerprint and its fragment decide skip or run."""

    def __init__(self, storage: StorageSettings, layout: CropLayout, settings_fp: str, max_attempts: int) -> None:
        self.storage = Storage(storage)
        self.layout = layout
        self.settings_fp = settings_fp
        self.max_attempts = max_attempts

    def row_fp(self, row: dict[str, Any]) -> str:
        """The run's row fingerprint without prompt and seed (they change no crop)."""
        ident, boxes_digest = source_inputs(self.storage, row)
        return row_fingerprint(ident, row_value(row, "start_s"), row_value(row, "end_s"), None, None, boxes_digest)

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        fp = self.row_fp(row)
        meta, rows = None, []
        try:
            meta, rows = read_fragment(self.storage.read_bytes(self.layout.part(row["clip_id"])))
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warning("clip %s: its fragment is unreadable and the clip is redone (%s)", row["clip_id"], e)
        if settled(meta, fp, self.settings_fp, self.max_attempts):
            return {"row_fp": fp, "action": "skip", "result": json.dumps({"meta": meta, "rows": rows})}
        return {"row_fp": fp, "action": "run", "result": ""}

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(self.one, rows))
        return pa.table({"clip_id": [r["clip_id"] for r in rows], "row_fp": [o["row_fp"] for o in out],
                         "action": [o["action"] for o in out], "result": [o["result"] for o in out]})


@dataclass
class _Prepared:
    row: dict[str, Any]
    attempt: int
    deadline: Any
    clip: Any = None  # video.DecodedClip at the detection resolution
    local: str = ""
    face_boxes: bytes | None = None
    t_fetch_s: float = 0.0
    n_frames: int = 0
    boxes: Any = None  # the signer's box per frame in source pixels, once tracked
    result: dict[str, Any] | None = None  # set when the clip is already settled or failed


class CropExtractor:
    """Fetch → decode → track → cut → encode → publish for one clip at a time; no Ray in here."""

    def __init__(self, cfg: Config, storage: Storage, layout: CropLayout, settings_fp: str,
                 device: str = "cpu") -> None:
        from corpus_anon.actor.identity import FaceAnalyzer

        self.cfg = cfg
        self.storage = storage
        self.layout = layout
        self.settings_fp = settings_fp
        self.faces = FaceAnalyzer(cfg, device, storage, with_landmarks=False)  # extraction measures no fidelity
        self.tmp = tempfile.mkdtemp(prefix="corpus-anon-crops-")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def attempts(self, row: dict[str, Any]) -> int:
        try:
            data = json.loads(self.storage.read_text(self.layout.attempts(row["clip_id"])))
        except FileNotFoundError:
            return 0
        same = data.get("row_fp") == row["row_fp"] and data.get("settings_fp") == self.settings_fp
        return int(data.get("attempts", 0)) if same else 0

    def finish(self, row: dict[str, Any], status: str, attempt: int, rows: list[dict[str, Any]] | None = None,
                error: str | None = None, **extra: Any) -> dict[str, Any]:
        """Write the clip's fragment (its done marker) and return what the driver gets."""
        # identity_id even without rows: a takedown finds every clip of a withdrawn signer by it
        meta = {"clip_id": row["clip_id"], "identity_id": row.get("signer_id"), "status": status, "error": error,
                "row_fp": row["row_fp"], "settings_fp": self.settings_fp, "attempts": attempt, "finished_at": now_iso(), **extra}
        self.storage.write_bytes(self.layout.part(row["clip_id"]), fragment_bytes(rows or [], meta))
        if status == "error":
            log.warning("clip %s failed: %s", row["clip_id"], error)
        else:
            # The counter holds attempts that failed or never finished; a finished clip starts afresh
            # if its fragment is ever lost.
            self.storage.delete(self.layout.attempts(row["clip_id"]))
        return {"meta": meta, "rows": rows or []}

    # ---- the steps ------------------------------------------------------------------------------
    def prepare(self, row: dict[str, Any]) -> _Prepared:
        """Count the attempt durably, then fetch and decode at the detection size (an I/O thread)."""
        from corpus_anon.io import video
        from corpus_anon.actor.worker import Deadline

        timeout = self.cfg.resources.clip_timeout_s
        p = _Prepared(row, 0, Deadline(time.monotonic() + timeout, timeout))
        try:
            meta, rows = read_fragment(self.storage.read_bytes(self.layout.part(row["clip_id"])))
        except (FileNotFoundError, ValueError):
            meta, rows = None, []
        before = self.attempts(row)
        if meta is not None and meta.get("status") != "error" and settled(meta, row["row_fp"], self.settings_fp, 1) \
                and int(meta.get("attempts") or 0) >= before:
            # Finished by an earlier try of this batch whose actor then died (Ray retries the batch).
            p.result = {"meta": meta, "rows": rows}
            return p
        max_attempts = self.cfg.resources.max_attempts
        if before >= max_attempts:
            p.result = self.finish(row, "error", before, error=f"gave up after {before} attempts that never "
                                   "finished (the worker crashed or was killed during each).")
            return p
        p.attempt = before + 1
        self.storage.write_text(self.layout.attempts(row["clip_id"]), json.dumps(
            {"clip_id": row["clip_id"], "identity_id": row.get("signer_id"), "row_fp": row["row_fp"],
             "settings_fp": self.settings_fp, "attempts": p.attempt, "started_at": now_iso()}))
        t0 = time.monotonic()
        p.local = os.path.join(self.tmp, f"{secrets.token_hex(16)}.src")  # unguessable (see worker._source_path)
        try:
            v = self.cfg.video
            download_source(self.storage, row["video_uri"], p.local, v.max_bytes)
            p.deadline.check()
            p.clip = video.decode_segment(
                p.local, row_value(row, "start_s"), row_value(row, "end_s"), short_side=self.cfg.faces.detect_side,
                max_clip_s=v.max_clip_s, max_pixels=v.max_pixels, max_aspect=v.max_aspect, max_fps=v.max_fps,
                check=p.deadline.check, threads=v.threads)
            p.face_boxes = read_face_boxes(self.storage, row)
        except Exception as e:  # noqa: BLE001 - a bad clip is a row
            self.discard(p)
            p.result = self.finish(row, "error", p.attempt, error=one_sentence(e))
        p.t_fetch_s = time.monotonic() - t0
        return p

    def discard(self, p: _Prepared) -> None:
        if p.local and os.path.exists(p.local):
            os.remove(p.local)

    def source_boxes(self, p: _Prepared) -> np.ndarray:
        """The signer's box per frame in source pixels (NaN rows where there is none)."""
        from corpus_anon.actor.identity import track_from_parquet

        clip = p.clip
        n, work_h, work_w = clip.frames.shape[:3]
        sx, sy = clip.src_width / work_w, clip.src_height / work_h
        if p.face_boxes is not None:
            try:
                track = track_from_parquet(p.face_boxes, n, (1 / sx, 1 / sy))
            except ValueError as e:
                raise ClipError(str(e)) from None
        else:
            track = self.faces.track(clip.frames, p.deadline.check)
        return track.boxes() * np.array([sx, sy, sx, sy])

    def plan(self, p: _Prepared) -> list[ChunkPlan]:
        f = self.cfg.finetune
        p.n_frames = p.clip.n_frames
        p.boxes = boxes = self.source_boxes(p)
        return plan_chunks(boxes, p.clip.src_width, p.clip.src_height, f.crop_increase,
                           f.min_chunk_frames, f.max_chunk_frames)

    def publish(self, p: _Prepared, plans: list[ChunkPlan], t_track_s: float) -> dict[str, Any]:
        """Cut, encode, upload and verify every chunk, then write the fragment (an I/O thread)."""
        from corpus_anon.io import video
        from corpus_anon.io.storage import sha256_file

        row, clip, f = p.row, p.clip, self.cfg.finetune
        t0 = time.monotonic()
        try:
            # Chunks of an earlier extraction of this clip (other inputs or settings) go first.
            for uri in self.storage.list(self.layout.chunks_prefix(row["clip_id"])):
                self.storage.delete(uri)
            rows: list[dict[str, Any]] = []
            if plans:
                v = self.cfg.video
                fps = float(clip.fps)
                out_local = os.path.join(self.tmp, f"{clip_key(row['clip_id'])}.chunk.mp4")
                for k, (plan, crops) in enumerate(cut_chunks(p.local, clip, plans, f.crop_size, p.deadline.check)):
                    ts = clip.timestamps[plan.start : plan.end]
                    video.encode_mp4(crops, ts - ts[0], clip.fps, (f.crop_size, f.crop_size), out_local,
                                     crf=v.crf, preset=v.preset, check=p.deadline.check, threads=v.threads)
                    digest, size = sha256_file(out_local), os.path.getsize(out_local)
                    uri = self.layout.chunk(row["clip_id"], k)
                    self.storage.upload(out_local, uri)
                    self.storage.verify(uri, size, digest)
                    os.remove(out_local)
                    rows.append({
                        "clip_id": row["clip_id"], "identity_id": row["signer_id"],
                        "chunk_uri": self.layout.chunk_rel(row["clip_id"], k), "frames": plan.frames,
                        "box": list(plan.box), "chunk": k, "start_frame": plan.start,
                        "start_s": round(float(clip.start_s + clip.timestamps[plan.start]), 6),
                        "fps": round(fps, 6), "crop_size": f.crop_size, "src_width": clip.src_width,
                        "src_height": clip.src_height, "sha256": digest, "bytes": size, "row_fp": row["row_fp"],
                    })
            detected = int(np.isfinite(p.boxes[:, 0]).sum())
            status = "ok" if rows else ("no_face" if detected == 0 else "short")
            return self.finish(row, status, p.attempt, rows, n_frames=p.n_frames, face_frames=detected,
                               t_fetch_s=round(p.t_fetch_s, 3), t_track_s=round(t_track_s, 3),
                               t_publish_s=round(time.monotonic() - t0, 3))
        except Exception as e:  # noqa: BLE001 - a bad clip is a row
            return self.finish(row, "error", p.attempt, error=one_sentence(e))
        finally:
            self.discard(p)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Area averaging when shrinking (no aliasing), bilinear when enlarging."""
    import cv2

    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def iter_source_frames(path: str, start_s: float, end_s: float | None,
                       threads: int = 0) -> Iterator[tuple[int, Any]]:
    """(index, PyAV frame) of the frames `video.decode_segment` keeps (start_s <= t < end_s), in
    order, undecoded to pixels: the same selection rule, so index i is its frame i."""
    from corpus_anon.io.video import frame_time, open_source, start_stream

    eps = 1e-9
    with open_source(path) as c:
        vs = c.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate
        start_stream(c, vs, start_s, threads)
        kept = 0
        for i, frame in enumerate(c.decode(vs)):
            t = frame_time(frame, i, vs.time_base, rate)
            if t < start_s - eps:
                continue
            if end_s is not None and t >= end_s - eps:
                break
            yield kept, frame
            kept += 1


def cut_chunks(path: str, clip: Any, plans: list[ChunkPlan], size: int,
               check: Callable[[], None] | None = None) -> Iterator[tuple[ChunkPlan, np.ndarray]]:
    """(plan, (T, size, size, 3) uint8 crops) per chunk, from one streaming pass over the source at
    its own resolution; only one chunk's crops are held at a time."""
    if not plans:
        return
    order = sorted(plans, key=lambda c: c.start)
    j, crops = 0, []
    for i, frame in iter_source_frames(path, clip.start_s, clip.end_s):
        while j < len(order) and i >= order[j].end:
            j += 1
        if j >= len(order):
            break
        plan = order[j]
        if i < plan.start:
            continue
        rgb = frame.to_ndarray(format="rgb24")
        if clip.rotation:
            rgb = np.rot90(rgb, k=clip.rotation // 90)
        x0, y0, x1, y1 = plan.box
        crops.append(_resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), size))
        if check is not None and len(crops) % 16 == 0:
            check()
        if i == plan.end - 1:
            yield plan, np.stack(crops)
            crops = []
            j += 1
    if j < len(order):
        raise ClipError(f"the source gave fewer frames on the second pass than on the first "
                        f"({order[j].start + len(crops)} of {order[-1].end}).")


class FaceCropWorker:
    """The Ray Data actor: `map_batches(FaceCropWorker, batch_format="pyarrow", ...)`; the face
    backend loads once, the next clip is fetched and decoded while this one is tracked, and
    chunks are cut, encoded and uploaded behind it."""

    def __init__(self, cfg: dict[str, Any], storage: StorageSettings, layout: CropLayout, settings_fp: str,
                 use_gpu: bool = False) -> None:
        from corpus_anon.config import config_from_dict
        from corpus_anon.actor.worker import _cuda_or_cpu

        self.cfg = config_from_dict(cfg)
        device = _cuda_or_cpu(self.cfg.device if use_gpu else "cpu")
        self.proc = CropExtractor(self.cfg, Storage(storage), layout, settings_fp, device)
        self.pool = ThreadPoolExecutor(self.cfg.resources.io_threads, thread_name_prefix="crops-io")

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = self.process(batch.to_pylist())
        return pa.table({"clip_id": [o["meta"]["clip_id"] for o in out],
                         "result": [json.dumps(o, sort_keys=True, default=str) for o in out]})

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        timeout = self.cfg.resources.clip_timeout_s
        prepared: list[Future] = []
        published: list[tuple[_Prepared | None, Future | dict]] = []
        for i, row in enumerate(rows):
            while len(prepared) < min(len(rows), i + 2):
                prepared.append(self.pool.submit(self.proc.prepare, rows[len(prepared)]))
            try:
                p = prepared[i].result(timeout=timeout)
            except FutureTimeout:
                published.append((None, self.proc.finish(row, "error", self.proc.attempts(row), error=one_sentence(
                    ClipTimeout(f"fetching the clip ran past resources.clip_timeout_s ({timeout:g} s).")))))
                continue
            if p.result is not None:
                published.append((p, p.result))
                continue
            t0 = time.monotonic()
            try:
                plans = self.proc.plan(p)
            except Exception as e:  # noqa: BLE001 - a bad clip is a row
                self.proc.discard(p)
                published.append((p, self.proc.finish(row, "error", p.attempt, error=one_sentence(e))))
                continue
            # The detection frames are not needed any more (a fresh array: a slice would keep them alive).
            p.clip.frames = np.empty((0, *p.clip.frames.shape[1:]), np.uint8)
            published.append((p, self.pool.submit(self.proc.publish, p, plans, time.monotonic() - t0)))
        out = []
        for p, fut in published:
            if isinstance(fut, dict):
                out.append(fut)
                continue
            try:
                out.append(fut.result(timeout=max(1.0, p.deadline.remaining())))
            except FutureTimeout:
                out.append(self.proc.finish(p.row, "error", p.attempt, error=one_sentence(ClipTimeout(
                    f"the clip ran past resources.clip_timeout_s ({p.deadline.seconds:g} s) while publishing."))))
        return out


# ---- the driver -----------------------------------------------------------------------------------
def check_extract_config(cfg: Config) -> None:
    """What `faces extract` needs beyond a valid config; ConfigError, one sentence per problem."""
    f = cfg.finetune
    problems = []
    if cfg.faces.backend == "none":
        problems.append("faces extract needs a face detector; faces.backend is 'none' (use dlib or insightface).")
    if f.min_chunk_frames > f.max_chunk_frames:
        problems.append(f"finetune.min_chunk_frames ({f.min_chunk_frames}) is larger than "
                        f"finetune.max_chunk_frames ({f.max_chunk_frames}).")
    if problems:
        raise ConfigError("\n".join(problems))


def _extract_gpus(cfg: Config, ray: Any) -> tuple[bool, float]:
    """(use_gpu, gpus per actor): only insightface detection uses a GPU; dlib's HOG runs on CPUs."""
    from corpus_anon.run.pipeline import RunError

    cluster = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.faces.backend == "insightface" and (cfg.device == "cuda" or (cfg.device == "auto" and cluster > 0))
    if use_gpu and cfg.device == "cuda" and cluster <= 0:
        raise RunError("device is 'cuda' but the Ray cluster has no GPU resources; add GPU workers or set device: cpu.")
    # A run config's gpus_per_actor does not make CPU-only detection (dlib) hold GPUs.
    gpus = (1.0 if cfg.resources.gpus_per_actor is None else cfg.resources.gpus_per_actor) if use_gpu else 0.0
    if gpus > cluster:
        raise RunError(f"resources.gpus_per_actor is {gpus:g} but the cluster has {cluster:g} GPU(s).")
    return use_gpu, gpus


def _blocks(table: Any, rows: int) -> list[Any]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def extract_faces(cfg: Config, out_uri: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Cut the signer's face crops of every manifest clip into `out_uri` (default
    `finetune.crops_uri`; see the module docstring).

    Returns the summary also written to extract.json: `seen` (manifest clips), `skipped` (settled
    by an earlier run), `done` (processed now without error), `failed` (clips in error), `no_face`
    (no signer face found), `short` (a face, but no segment of `min_chunk_frames`), `chunks` and
    `frames` (in the index), `seconds`. `limit`: only the first N manifest rows; their index goes
    to `index-first-N.parquet`, leaving `index.parquet` as it was. Raises ConfigError/ManifestError before any work, RunError when the job
    cannot start or finish."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from corpus_anon.run.pipeline import RunError, checked_manifest, ensure_ray

    t_start = time.time()
    check_extract_config(cfg)
    out_uri = out_uri or cfg.finetune.crops_uri
    if not out_uri:
        raise ConfigError("no output given for the face crops: pass --out or set finetune.crops_uri.")
    # The crops need only the face detector: check the manifest and the model store as a face-only
    # (pixelate) run into `out_uri` would, whatever anonymizer the config runs.
    xcfg = cfg.model_copy(deep=True)
    xcfg.anonymizer.kind = "pixelate"
    xcfg.output.uri = out_uri
    from corpus_anon.release.tombstones import private_uri

    xcfg.release.private_uri = private_uri(cfg) or xcfg.release.private_uri  # the run's tombstones, not the crops'
    settings = StorageSettings.from_config(cfg, resolve_endpoint(cfg))
    storage = Storage(settings)
    root, table, withdrawn = checked_manifest(xcfg, storage)
    extract = extract_settings(cfg, face_models_digest(xcfg, storage))
    settings_fp = settings_fingerprint(extract)
    layout = CropLayout(root)
    try:
        storage.probe_write(root)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"cannot write to the output {root} ({one_sentence(e).rstrip('.')}).") from None
    if withdrawn:  # takedowns: the withdrawn clips' crops go too, not only their index rows
        from corpus_anon.run.manifest import read_manifest

        kept = set(table.column("clip_id").to_pylist())
        gone = [c for c in read_manifest(xcfg.manifest.uri, storage).column("clip_id").to_pylist() if c not in kept]
        n = purge_clips(storage, layout, gone)
        if n:
            log.info("deleted %d crop-set objects of %d withdrawn clips", n, len(gone))
    if limit is not None:
        table = table.slice(0, limit)
    planned = table.num_rows
    log.info("faces extract %s: %d clips -> %s", settings_fp, planned, root)

    ray = ensure_ray()
    use_gpu, gpus = _extract_gpus(cfg, ray)
    from ray.data import ActorPoolStrategy

    from corpus_anon.run.pipeline import configure_data_context

    configure_data_context()
    res = cfg.resources
    work = table.select([c for c in _WORK_COLUMNS if c in table.column_names])
    refs = (ray.data.from_arrow(_blocks(work, 64))
            .map_batches(ExtractSettleStage, fn_constructor_kwargs={"storage": settings, "layout": layout,
                                                                    "settings_fp": settings_fp,
                                                                    "max_attempts": res.max_attempts},
                         batch_format="pyarrow", batch_size=64, num_cpus=0.25, compute=ActorPoolStrategy(size=1))
            .to_arrow_refs())
    decisions = {r["clip_id"]: r for t in ray.get(refs) for r in t.to_pylist()}
    results: dict[str, dict[str, Any]] = {c: json.loads(d["result"]) for c, d in decisions.items()
                                          if d["action"] == "skip"}
    run_ids = [c for c, d in decisions.items() if d["action"] == "run"]
    log.info("%d clips extracted earlier are skipped; %d to process", len(results), len(run_ids))

    failed_now = 0
    if run_ids:
        todo = work.filter(pc.is_in(work.column("clip_id"), value_set=pa.array(run_ids)))
        todo = todo.append_column("row_fp", pa.array([decisions[c]["row_fp"] for c in todo.column("clip_id").to_pylist()]))
        ds = ray.data.from_arrow(_blocks(todo, res.batch_size)).map_batches(
            FaceCropWorker,
            fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "storage": settings, "layout": layout,
                                   "settings_fp": settings_fp, "use_gpu": use_gpu},
            compute=ActorPoolStrategy(size=res.actors), batch_format="pyarrow", batch_size=res.batch_size,
            num_cpus=res.cpus_per_actor, num_gpus=gpus,
            # A dead actor is restarted and its batch retried (Ray Data's defaults); a clip that kills it
            # every time is given up by its durable attempt counter (resources.max_attempts).
        )
        n = 0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for cid, raw in zip(batch.column("clip_id").to_pylist(), batch.column("result").to_pylist()):
                r = json.loads(raw)
                results[cid] = r
                n += 1
                m = r["meta"]
                failed_now += m["status"] == "error"
                secs = sum(float(m.get(k) or 0.0) for k in ("t_fetch_s", "t_track_s", "t_publish_s"))
                what = f"{len(r['rows'])} chunks, {sum(x['frames'] for x in r['rows'])} frames" if r["rows"] else ""
                log.info("[%d/%d] %s %s%s in %.1f s", n, len(run_ids), cid, m["status"],
                         f": {m['error']}" if m.get("error") else (f", {what}" if what else ""), secs)

    ids = table.column("clip_id").to_pylist()
    missing = [c for c in ids if c not in results]
    if missing:
        raise RunError(f"{len(missing)} clip(s) came back without a result (first: {missing[0]}).")
    rows = [row for c in ids for row in sorted(results[c]["rows"], key=lambda x: x["chunk"])]
    buf = io.BytesIO()
    pq.write_table(index_table(rows), buf)
    index_uri = layout.index
    if limit is not None:  # a trial run must not shrink the crop set that fine-tuning reads
        index_uri = join(layout.root, f"index-first-{limit}.parquet")
        log.info("--limit %d: the index of these clips goes to %s; index.parquet is left as it was", limit, index_uri)
    storage.write_bytes(index_uri, buf.getvalue())
    counts = {s: 0 for s in STATUSES}
    for c in ids:
        counts[results[c]["meta"]["status"]] += 1
    summary = {
        "seen": planned, "skipped": len(results) - len(run_ids), "done": len(run_ids) - failed_now,
        "failed": counts["error"], "no_face": counts["no_face"], "short": counts["short"],
        "chunks": len(rows), "frames": int(sum(r["frames"] for r in rows)),
        "seconds": round(time.time() - t_start, 3),
        "index": index_uri, "settings_fp": settings_fp, "settings": extract, "counts": counts,
        "manifest": cfg.manifest.uri, "withdrawn": withdrawn, "finished_at": now_iso(), "version": __version__,
    }
    storage.write_text(layout.summary, json.dumps(summary, indent=2, sort_keys=True))
    log.info("faces extract: %d clips (%d processed, %d skipped earlier): %d chunks, %d frames, %d failed, "
             "%d without a face, %d too short -> %s", planned, len(run_ids), summary["skipped"], summary["chunks"],
             summary["frames"], summary["failed"], summary["no_face"], summary["short"], layout.index)
    return summary
