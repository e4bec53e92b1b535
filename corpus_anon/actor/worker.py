"""The anonymize actor: one per GPU (or CPU slot), models loaded once, I/O overlapped on threads.

For each batch of manifest rows, a small thread pool fetches and decodes the next clip while the
anonymizer works on the current one, and encodes, uploads and verifies finished clips behind it.
Decoded frames never leave the actor; the rows it returns carry only the clip id and its record.

Ray Data runs two batches in each actor at once (`resources.concurrent_batches`; pipeline.py).
Only one of them holds the model (`model_lock`: anonymization, face analysis and the gate); the
other fetches and decodes its first clips or publishes its last ones meanwhile. A batch of crash
suspects (below) runs alone in the actor (`BatchGate`). Without that, every batch
boundary idles the model for one fetch + decode and one encode + upload (benchmarks/overlap.py).

This module is imported by the driver (Ray pickles the class by reference), so everything heavy
is imported inside the methods that run on the worker.

Crashes. Ray restarts an actor whose process dies and retries its batch (Ray Data's actor-pool
defaults: max_restarts=-1, max_task_retries=-1; see pipeline.py). Each clip's attempt is counted durably before it starts, so a retried batch
returns the records its clips already settled, runs the rest one clip at a time when any of them
has an attempt that never finished (a crash's suspects then do not take their neighbours'
attempts with them), and gives a clip up as an error once its counter reaches
`resources.max_attempts`.

Test hook (fault injection, inert by default): `CORPUS_ANON_FAULT_CRASH_CLIPS`, a comma-separated
list of clip ids, read only in the worker process. A listed clip kills its worker process with
`os._exit(1)` right after its attempt is counted, as a decoder segfault or an OOM kill would. It
exists for tests/e2e/test_faults.py; never set it in a real run.

Benchmark hook (inert by default): `CORPUS_ANON_BENCH_STANDIN_S`, seconds. When set, the actor does
not fetch, decode, anonymize, encode or upload: each clip counts its attempt, sleeps that long (a
declared fixed-cost stand-in for the model) and writes an `ok` record without an output, so that
benchmarks/scale.py measures only the plan, the records and Ray's scheduling. Never set it in a
real run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Iterator

from corpus_anon.errors import ClipError, ClipTimeout, one_sentence
from corpus_anon.io.records import (SETTLED_STATUSES, RunLayout, bump_attempts, face_boxes_bytes, make_record,
                                    read_attempts, read_record, row_value, seed_start, write_record)
from corpus_anon.io.scratch import TEMP_PREFIX, sweep_dead_temp_dirs
from corpus_anon.io.storage import Storage, StorageSettings, TooLargeError, sha256_file

log = logging.getLogger(__name__)


@dataclass
class Deadline:
    at: float
    seconds: float

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise ClipTimeout(f"the clip ran past resources.clip_timeout_s ({self.seconds:g} s).")


@dataclass
class Prepared:
    row: dict[str, Any]
    attempt: int
    deadline: Deadline
    clip: Any = None  # video.DecodedClip
    t_fetch_s: float = 0.0
    ready_at: float = 0.0  # when fetch/decode finished; time queued after it is not the clip's
    face_boxes: bytes | None = None  # the user's own tracks (face_boxes_uri), fetched with the clip
    record: dict[str, Any] | None = None  # set when the clip already failed or was given up


FAULT_CRASH_ENV = "CORPUS_ANON_FAULT_CRASH_CLIPS"


def _fault_crash(clip_id: str) -> None:
    """The test hook (see the module docstring): kill this process for a listed clip."""
    listed = os.environ.get(FAULT_CRASH_ENV)
    if listed and clip_id in {c.strip() for c in listed.split(",")}:
        log.error("fault injection (%s): killing the worker process on clip %s", FAULT_CRASH_ENV, clip_id)
        logging.shutdown()
        os._exit(1)


def download_source(storage: Storage, uri: str, local: str, max_bytes: int | None = None) -> None:
    """Fetch a clip's source video, at most `max_bytes` (`video.max_bytes`) of it; a missing,
    forbidden or oversized object is a ClipError (the clip's row)."""
    try:
        storage.download(uri, local, max_bytes=max_bytes)
    except TooLargeError as e:
        if e.during:
            raise ClipError(f"the input object {uri} sent more than video.max_bytes ({e.limit}) bytes although "
                            f"it was listed as {e.size}; the download was cut off.") from None
        raise ClipError(f"the input object {uri} is {e.size} bytes, above video.max_bytes ({e.limit}); "
                        "it was not downloaded.") from None
    except FileNotFoundError:
        raise ClipError(f"the input object {uri} does not exist.") from None
    except PermissionError as e:
        raise ClipError(f"access to {uri} was denied ({one_sentence(e).rstrip('.')}).") from None


def read_face_boxes(storage: Storage, row: dict[str, Any]) -> bytes | None:
    """The row's own signer track (`face_boxes_uri`), or None when it has none."""
    if not row_value(row, "face_boxes_uri"):
        return None
    try:
        return face_boxes_bytes(storage, row["face_boxes_uri"])
    except FileNotFoundError:
        raise ClipError(f"face_boxes_uri {row['face_boxes_uri']} does not exist.") from None
    except ValueError as e:
        raise ClipError(str(e)) from None


class ClipProcessor:
    """Fetch → decode → anonymize → encode → publish for one clip at a time; no Ray in here."""

    def __init__(self, cfg: Any, storage: Storage, layout: RunLayout | None, device: str = "cpu",
                 analyze_faces: bool = True) -> None:
        from corpus_anon.actor.anonymize import build_anonymizer

        self.cfg = cfg
        self.storage = storage
        self.layout = layout
        self.anonymizer = build_anonymizer(cfg, device, storage)
        self.faces = None
        if analyze_faces and cfg.faces.backend != "none":
            from corpus_anon.actor.identity import FaceAnalyzer

            self.faces = FaceAnalyzer(cfg, device, storage)
        sweep_dead_temp_dirs()
        self.tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        self._sources: dict[tuple[Any, Any], str] = {}  # (clip_id, row_fp) -> its source's temp file

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- the steps ----------------------------------------------------------------------------
    def decode(self, path: str, row: dict[str, Any], check: Any) -> Any:
        from corpus_anon.io import video

        v = self.cfg.video
        return video.decode_segment(
            path, row_value(row, "start_s"), row_value(row, "end_s"),
            short_side=v.short_side, max_clip_s=v.max_clip_s, max_pixels=v.max_pixels,
            max_aspect=v.max_aspect, max_fps=v.max_fps, check=check, threads=v.threads,
        )

    def encode(self, clip: Any, frames: Any, out_path: str, check: Any) -> None:
        from corpus_anon.io import video

        v = self.cfg.video
        audio = (clip.source_path, clip.start_s, clip.end_s) if v.audio == "copy" and clip.has_audio else None
        video.encode_mp4(frames, clip.timestamps, clip.fps, clip.out_size, out_path,
                         crf=v.crf, preset=v.preset, audio_from=audio, check=check, threads=v.threads)

    def clip_metrics(self, clip: Any) -> dict[str, Any]:
        ow, oh = clip.out_size
        return {
            "n_frames": clip.n_frames,
            "fps": round(float(clip.fps), 6),
            "vfr": clip.vfr,
            "width": ow,
            "height": oh,
            "work_width": int(clip.frames.shape[2]),
            "work_height": int(clip.frames.shape[1]),
            "src_width": clip.src_width,
            "src_height": clip.src_height,
            "duration_s": round(clip.duration_s, 6),
            "anonymizer": self.anonymizer.name,
        }

    # ---- one clip in a run --------------------------------------------------------------------
    def prepare(self, row: dict[str, Any]) -> Prepared:
        """Count the attempt durably, then fetch and decode (runs on an I/O thread)."""
        assert self.layout is not None
        clip_id, row_fp = row["clip_id"], row["row_fp"]
        timeout = self.cfg.resources.clip_timeout_s
        deadline = Deadline(time.monotonic() + timeout, timeout)
        max_attempts = self.cfg.resources.max_attempts
        before = read_attempts(self.storage, self.layout, clip_id, row_fp)
        done = self.finished_record(row, before)
        rerun_of = done is not None and done.get("status") == "leak" and \
            int(row.get("seed_start") or 0) > 0 and seed_start(done) == int(row["seed_start"])
        if done is not None and done.get("status") in SETTLED_STATUSES and not rerun_of:
            # Settled by an earlier try of this batch whose actor then died (Ray retries the batch).
            return Prepared(row, before, deadline, record=done)
        if before >= max_attempts:
            # Every earlier attempt died before writing a record (a crash or a kill): give it up.
            err = (f"gave up after {before} attempts that never finished "
                   "(the worker crashed or was killed during each).")
            return Prepared(row, before, deadline, record=self._error(row, before, err))
        attempt = bump_attempts(self.storage, self.layout, clip_id, row_fp)
        _fault_crash(clip_id)
        p = Prepared(row, attempt, deadline)
        t0 = time.monotonic()
        local = self._source_path(row)
        try:
            self._check_still_wanted(row)
            download_source(self.storage, row["video_uri"], local, self.cfg.video.max_bytes)
            deadline.check()
            p.clip = self.decode(local, row, deadline.check)
            p.face_boxes = read_face_boxes(self.storage, row)
        except Exception as e:  # noqa: BLE001 - a bad clip is a row
            p.record = self._error(row, attempt, one_sentence(e))
        finally:
            if p.record is not None or self.cfg.video.audio != "copy":
                self.discard_source(row)  # only copying the audio reads the source again (publish)
        p.ready_at = time.monotonic()
        p.t_fetch_s = p.ready_at - t0
        return p

    def finished_record(self, row: dict[str, Any], attempts: int) -> dict[str, Any] | None:
        """The record of this clip's latest attempt (same inputs), or None if that attempt never
        finished or none was made."""
        assert self.layout is not None
        if attempts <= 0:
            return None
        rec = read_record(self.storage, self.layout, row["clip_id"])
        if rec is None or rec.get("row_fp") != row["row_fp"] or int(rec.get("attempts") or 0) < attempts:
            return None
        return rec

    def unfinished(self, row: dict[str, Any]) -> bool:
        """Whether this clip has a counted attempt that never wrote its record (it crashed, or
        was killed with its worker)."""
        assert self.layout is not None
        n = read_attempts(self.storage, self.layout, row["clip_id"], row["row_fp"])
        return n > 0 and self.finished_record(row, n) is None

    def assess(self, p: Prepared, ctx: dict[str, Any], result: Any) -> tuple[Any, dict[str, Any], str, dict[str, bytes]]:
        """Face analysis and the leak gate: (result, metrics, status, private artifacts); see gate.py."""
        if self.faces is None:
            return result, {}, "ok", {}
        from corpus_anon.actor.gate import assess_clip

        return assess_clip(self, p, ctx, result)

    def publish(self, p: Prepared, frames: Any, metrics: dict[str, Any], status: str = "ok",
                artifacts: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Encode, upload, verify, write the private artifacts, then the record (an I/O thread)."""
        assert self.layout is not None
        row = p.row
        t0 = time.monotonic()
        out_local = os.path.join(self.tmp, f"{row['clip_id']}-{row['row_fp']}.mp4")
        try:
            self.encode(p.clip, frames, out_local, p.deadline.check)
            digest, size = sha256_file(out_local), os.path.getsize(out_local)
            uri = self.layout.clip(row["clip_id"], row["row_fp"])
            self._check_still_wanted(row)  # a takedown may have landed while the clip ran
            self.storage.upload(out_local, uri)
            self.storage.verify(uri, size, digest)
            for kind, data in (artifacts or {}).items():
                self.storage.write_bytes(self.layout.artifact(kind, row["clip_id"]), data)
            metrics = dict(metrics, t_publish_s=round(time.monotonic() - t0, 4))
            rec = make_record(
                clip_id=row["clip_id"], status=status, row_fp=row["row_fp"], cfg_fp=self.layout.cfg_fp,
                attempts=p.attempt, output_uri=uri, sha256=digest, n_bytes=size, metrics=metrics,
            )
        except Exception as e:  # noqa: BLE001 - a bad clip is a row
            rec = self._error(row, p.attempt, one_sentence(e), metrics)
        finally:
            if os.path.exists(out_local):
                os.remove(out_local)
            self.discard_source(row)
            p.clip = None  # the batch keeps its Prepared objects until it returns: free the frames now
        write_record(self.storage, self.layout, rec)
        return rec

    def _check_still_wanted(self, row: dict[str, Any]) -> None:
        """ClipError when a takedown withdrew this clip or its signer since the run started (the
        driver put the row's non-secret tombstone keys into it)."""
        from corpus_anon.release.tombstones import WITHDRAWN_ERROR, still_wanted, tombstones_uri

        if not still_wanted(self.storage, tombstones_uri(self.cfg), row):
            raise ClipError(WITHDRAWN_ERROR)

    def _source_path(self, row: dict[str, Any]) -> str:
        """A fresh, unguessable name in the actor's temp folder for a clip's source: no file can
        name another clip's source (a concat script is refused anyway; see video.open_source)."""
        path = os.path.join(self.tmp, f"{secrets.token_hex(16)}.src")
        self._sources[(row["clip_id"], row["row_fp"])] = path
        return path

    def discard_source(self, row: dict[str, Any]) -> None:
        path = self._sources.pop((row.get("clip_id"), row.get("row_fp")), None)
        if path is not None and os.path.exists(path):
            os.remove(path)

    def _error(self, row: dict[str, Any], attempts: int, error: str,
               metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.layout is not None
        rec = make_record(
            clip_id=row["clip_id"], status="error", row_fp=row["row_fp"], cfg_fp=self.layout.cfg_fp,
            attempts=attempts, error=error, metrics=metrics,
        )
        write_record(self.storage, self.layout, rec)
        log.warning("clip %s failed: %s", row["clip_id"], error)
        return rec


class BatchGate:
    """Concurrent batches share the actor; a batch of crash suspects runs alone (it waits for the
    others to finish, and new ones wait for it)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cv:
            self._waiting_alone += 1
            self._cv.wait_for(lambda: not self._alone and self._shared == 0)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cv:
                self._alone = False
                self._cv.notify_all()


class AnonymizeWorker:
    """The Ray Data actor: `map_batches(AnonymizeWorker, batch_format="pyarrow", ...)`."""

    def __init__(self, cfg: dict[str, Any], storage: StorageSettings, layout: RunLayout,
                 use_gpu: bool = False) -> None:
        from corpus_anon.config import config_from_dict

        self.cfg = config_from_dict(cfg)
        device = "cpu"
        if self.cfg.anonymizer.kind != "pixelate":  # pixelate needs no torch at all
            device = _cuda_or_cpu(self.cfg.device if use_gpu else "cpu")
        self.proc = ClipProcessor(self.cfg, Storage(storage), layout, device)
        self.pool = ThreadPoolExecutor(self.cfg.resources.io_threads, thread_name_prefix="anon-io")
        # The model (and face analysis) serves one batch at a time; see the module docstring.
        self.model_lock = threading.Lock()
        self.gate = BatchGate()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        records = self.process(rows)
        return pa.table({
            "clip_id": [r["clip_id"] for r in records],
            "record": [json.dumps(r, sort_keys=True, default=str) for r in records],
        })

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return []
        standin = os.environ.get("CORPUS_ANON_BENCH_STANDIN_S")
        if standin:
            return [self._standin(r, float(standin)) for r in rows]
        if any(self.proc.unfinished(r) for r in rows):
            # A retried batch (its actor died) or clips left by a killed run: alone in the actor and
            # one clip at a time, so that if one of them kills the process again, only its own
            # attempt is spent (not a neighbour's, nor the other concurrent batch's).
            log.warning("batch has clips whose last attempt never finished; running it alone, one clip at a time")
            with self.gate.alone():
                return [rec for r in rows for rec in self._process([r])]
        with self.gate.shared():
            return self._process(rows)

    def _standin(self, row: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The benchmark stand-in (see the module docstring): real attempts and records, no media."""
        layout = self.proc.layout
        attempt = bump_attempts(self.proc.storage, layout, row["clip_id"], row["row_fp"])
        with self.model_lock:
            time.sleep(seconds)
        rec = make_record(clip_id=row["clip_id"], status="ok", row_fp=row["row_fp"], cfg_fp=layout.cfg_fp,
                          attempts=attempt, metrics={"t_anonymize_s": seconds, "standin": True})
        write_record(self.proc.storage, layout, rec)
        return rec

    def _process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        k = max(1, int(getattr(self.proc.anonymizer, "batch_clips", 1)))
        prepared: list[Future] = []
        published: list[tuple[Prepared | None, Future | dict]] = []
        for i in range(0, len(rows), k):
            # Fetch and decode the next group while this one is anonymized.
            while len(prepared) < min(len(rows), i + 2 * k):
                prepared.append(self.pool.submit(self.proc.prepare, rows[len(prepared)]))
            if k == 1:
                published.append(self._anonymize_one(rows[i], prepared[i]))
            else:
                published.extend(self._anonymize_group(rows[i : i + k], prepared[i : i + k]))
        out = []
        for p, fut in published:
            if isinstance(fut, dict):
                out.append(fut)
                continue
            try:
                out.append(fut.result(timeout=max(1.0, p.deadline.remaining()) if p else None))
            except FutureTimeout:
                out.append(self.proc._error(p.row, p.attempt, one_sentence(ClipTimeout(
                    f"the clip ran past resources.clip_timeout_s ({p.deadline.seconds:g} s) while publishing."))))
        return out

    def _wait_prepared(self, row: dict[str, Any], fut: Future) -> tuple[Prepared | None, dict | None]:
        """The prepared clip, or the error record that replaces it."""
        timeout = self.cfg.resources.clip_timeout_s
        try:
            p: Prepared = fut.result(timeout=timeout)
        except FutureTimeout:
            # The fetch hangs: its thread cannot be killed, but the clip becomes an error row.
            attempts = read_attempts(self.proc.storage, self.proc.layout, row["clip_id"], row["row_fp"])
            return None, self.proc._error(row, attempts, one_sentence(
                ClipTimeout(f"fetching the clip ran past resources.clip_timeout_s ({timeout:g} s).")))
        if p.record is not None:
            return p, p.record
        p.deadline.at += time.monotonic() - p.ready_at  # waiting behind other clips does not count
        return p, None

    def _anonymize_group(self, rows: list[dict[str, Any]], futs: list[Future]) -> list[tuple[Prepared | None, Future | dict]]:
        """Clips whose key frames share UNet calls (`diffusion.batch_clips`); per-clip on failure."""
        out: list[tuple[Prepared | None, Future | dict]] = []
        ready: list[Prepared] = []
        for row, fut in zip(rows, futs):
            p, rec = self._wait_prepared(row, fut)
            if rec is not None:
                out.append((p, rec))
            else:
                ready.append(p)
        by_size: dict[tuple[int, ...], list[Prepared]] = {}
        for p in ready:
            by_size.setdefault(tuple(p.clip.frames.shape[1:3]), []).append(p)
        for group in by_size.values():
            t_wait = time.monotonic()
            with self.model_lock:
                t0 = time.monotonic()
                for p in group:  # waiting for the other batch's model time does not count
                    p.deadline.at += t0 - t_wait
                try:
                    results = self.proc.anonymizer.anonymize_many(
                        [(p.clip.frames, _ctx(p.row, p.clip.fps)) for p in group],
                        lambda: [p.deadline.check() for p in group])
                except Exception as e:  # noqa: BLE001 - isolate the failing clip by running each alone
                    log.warning("a batch of %d clips failed (%s); running them one by one", len(group),
                                one_sentence(e))
                    results = None
                share = (time.monotonic() - t0) / len(group)
                if results is not None:
                    out.extend(self._assess_and_publish(p, _ctx(p.row, p.clip.fps), result, share)
                               for p, result in zip(group, results))
            if results is None:
                out.extend(self._anonymize_one(p.row, None, p) for p in group)
        order = {r["clip_id"]: i for i, r in enumerate(rows)}
        return sorted(out, key=lambda pr: order[(pr[0].row if pr[0] else pr[1])["clip_id"]])

    def _anonymize_one(self, row: dict[str, Any], fut: Future | None,
                       p: Prepared | None = None) -> tuple[Prepared | None, Future | dict]:
        if p is None:
            p, rec = self._wait_prepared(row, fut)
            if rec is not None:
                return p, rec
        ctx = _ctx(row, p.clip.fps)
        t_wait = time.monotonic()
        with self.model_lock:
            t0 = time.monotonic()
            p.deadline.at += t0 - t_wait  # waiting for the other batch's model time does not count
            try:
                result = self.proc.anonymizer.anonymize(p.clip.frames, ctx, p.deadline.check)
            except Exception as e:  # noqa: BLE001 - a bad clip is a row
                self.proc.discard_source(row)
                return p, self.proc._error(row, p.attempt, one_sentence(e), self.proc.clip_metrics(p.clip))
            return self._assess_and_publish(p, ctx, result, time.monotonic() - t0)

    def _assess_and_publish(self, p: Prepared, ctx: dict[str, Any], result: Any,
                            t_anon: float) -> tuple[Prepared, Future | dict]:
        """Face analysis and the gate (the caller holds the model lock), then publishing on an I/O
        thread; a failure is an error row."""
        try:
            result, extra, status, artifacts = self.proc.assess(p, ctx, result)
        except Exception as e:  # noqa: BLE001 - a bad clip is a row
            self.proc.discard_source(p.row)
            return p, self.proc._error(p.row, p.attempt, one_sentence(e), self.proc.clip_metrics(p.clip))
        metrics = dict(self.proc.clip_metrics(p.clip), **result.metrics, **extra,
                       t_fetch_s=round(p.t_fetch_s, 4), t_anonymize_s=round(t_anon, 4))
        return p, self.pool.submit(self.proc.publish, p, result.frames, metrics, status, artifacts)


def _ctx(row: dict[str, Any], fps: float) -> dict[str, Any]:
    """What the anonymizer is told about a clip. A `leak` clip re-run by a refresh starts at its
    next seed attempt (`seed_start`): its first pass already uses hash(row seed, seed_start)."""
    from corpus_anon.secret import reseed

    ctx = dict(row, fps=float(fps), base_seed=row.get("seed"))
    start = int(row.get("seed_start") or 0)
    if start > 0 and row.get("seed") is not None:
        ctx["seed"] = reseed(int(row["seed"]), start)
    return ctx


def _cuda_or_cpu(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("device: cuda was requested but this worker sees no CUDA device.")
    return "cpu"


def anonymize_file(cfg: Any, in_path: str, out_path: str, ctx: dict[str, Any] | None = None,
                   storage: Storage | None = None) -> dict[str, Any]:
    """One local file without Ray (the `corpus-anon anonymize` command). Raises ClipError."""
    device = _cuda_or_cpu(cfg.device) if cfg.anonymizer.kind != "pixelate" else "cpu"
    # The single-file command neither gates nor records identity: do not load the face models.
    size = os.path.getsize(in_path)
    if size > cfg.video.max_bytes:
        raise ClipError(f"{in_path} is {size} bytes, above video.max_bytes ({cfg.video.max_bytes}).")
    proc = ClipProcessor(cfg, storage or Storage(), None, device, analyze_faces=False)
    try:
        t0 = time.monotonic()
        clip = proc.decode(in_path, {}, lambda: None)
        t1 = time.monotonic()
        result = proc.anonymizer.anonymize(clip.frames, dict(ctx or {}, fps=float(clip.fps)), lambda: None)
        t2 = time.monotonic()
        proc.encode(clip, result.frames, out_path, lambda: None)
        return dict(proc.clip_metrics(clip), **result.metrics, t_fetch_s=round(t1 - t0, 4),
                    t_anonymize_s=round(t2 - t1, 4), t_publish_s=round(time.monotonic() - t2, 4))
    finally:
        proc.close()
