"""The output layout of a run, per-clip records (the done markers), fingerprints and attempts.

Everything a run writes lives under `{output}/{cfg_fp}/`:

    clips/{clip_id}-{row_fp}.mp4   the anonymized clip (key changes whenever its inputs change)
    attempts/{clip_id}.json        attempt counter, bumped *before* each attempt starts
    records/{clip_id}.json         written only after the clip is verified or given up: the done marker
    metrics/metrics.parquet        one row per manifest row
    plan.json  summary.json  config.yaml

`{output}/LATEST_RUN` names the last `cfg_fp`, so a run URI is `{output}` or `{output}/{cfg_fp}`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from corpus_anon.io.storage import Storage, join, normalize_uri

STATUSES = ("ok", "error", "leak")
SETTLED_STATUSES = ("ok", "leak")
FP_LEN = 12


def now_iso(timespec: str = "seconds") -> str:
    """UTC now in ISO 8601; records use milliseconds (benchmarks time clips from them)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def row_value(row: dict[str, Any], key: str) -> Any:
    """A manifest row's optional value: None when absent, null or NaN (Arrow nulls of float columns)."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v


MAX_FACE_BOXES_BYTES = 64 * 1024**2  # a signer track of hours of frames is a few MB


def face_boxes_bytes(storage: Any, uri: str) -> bytes:
    """A row's `face_boxes_uri` object, refused (ValueError, one sentence) when it is larger than
    MAX_FACE_BOXES_BYTES: its size is checked before it is read."""
    size = int(storage.info(uri).get("size") or 0)
    if size > MAX_FACE_BOXES_BYTES:
        raise ValueError(f"face_boxes_uri {uri} is {size:,} bytes, over the {MAX_FACE_BOXES_BYTES:,}-byte limit "
                         "for a track file.")
    return storage.read_bytes(uri)


def source_inputs(storage: Any, row: dict[str, Any]) -> tuple[str, str | None]:
    """What a row's fingerprint knows of its inputs: the source object's identity (size + ETag or
    mtime; "missing" / "unavailable:..." when it cannot be read: the worker reports the clip's own
    error) and the sha256 of its `face_boxes_uri`, if any."""
    import hashlib

    try:
        ident = storage.identity(row["video_uri"])
    except FileNotFoundError:
        ident = "missing"
    except Exception as e:  # noqa: BLE001
        ident = f"unavailable:{type(e).__name__}"
    boxes_digest = None
    if row_value(row, "face_boxes_uri"):
        try:
            boxes_digest = hashlib.sha256(face_boxes_bytes(storage, row["face_boxes_uri"])).hexdigest()
        except Exception as e:  # noqa: BLE001
            boxes_digest = f"unavailable:{type(e).__name__}"
    return ident, boxes_digest


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return round(value, 6)
    return value


def row_fingerprint(
    source_identity: str,
    start_s: float | None,
    end_s: float | None,
    prompt: str | None = None,
    seed: int | None = None,
    face_boxes_digest: str | None = None,
) -> str:
    """Hash of every per-row input that changes the output clip."""
    blob = json.dumps(
        {
            "source": source_identity,
            "start_s": _canonical(start_s),
            "end_s": _canonical(end_s),
            "prompt": prompt,
            "seed": seed,
            "face_boxes": face_boxes_digest,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:FP_LEN]


@dataclass(frozen=True)
class RunLayout:
    """Where each artifact of one run lives."""

    output: str
    cfg_fp: str

    @property
    def root(self) -> str:
        return join(normalize_uri(self.output), self.cfg_fp)

    def clip(self, clip_id: str, row_fp: str) -> str:
        return join(self.root, "clips", f"{clip_id}-{row_fp}.mp4")

    def attempts(self, clip_id: str) -> str:
        return join(self.root, "attempts", f"{clip_id}.json")

    def record(self, clip_id: str) -> str:
        return join(self.root, "records", f"{clip_id}.json")

    def artifact(self, kind: str, clip_id: str) -> str:
        """Private per-clip artifacts: `tracks/{clip_id}.parquet`, `embeddings/{clip_id}.npz`
        (original-face embeddings are biometric data: never in metrics, releases or reports)."""
        ext = {"tracks": "parquet", "embeddings": "npz"}[kind]
        return join(self.root, kind, f"{clip_id}.{ext}")

    @property
    def records_prefix(self) -> str:
        return join(self.root, "records")

    @property
    def metrics(self) -> str:
        return join(self.root, "metrics", "metrics.parquet")

    @property
    def plan(self) -> str:
        return join(self.root, "plan.json")

    @property
    def summary(self) -> str:
        return join(self.root, "summary.json")

    @property
    def config(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def latest_pointer(self) -> str:
        return join(normalize_uri(self.output), "LATEST_RUN")


def resolve_run(storage: Storage, run_uri: str) -> RunLayout:
    """A run URI is `{output}` (its LATEST_RUN) or `{output}/{cfg_fp}`."""
    norm = normalize_uri(run_uri)
    pointer = join(norm, "LATEST_RUN")
    if storage.exists(pointer):
        return RunLayout(norm, storage.read_text(pointer).strip())
    parent, _, last = norm.rpartition("/")
    if storage.exists(join(norm, "plan.json")):
        return RunLayout(parent, last)
    raise FileNotFoundError(f"{run_uri} is neither an output root with LATEST_RUN nor a run folder.")


# ---- attempts -----------------------------------------------------------------------------------
def read_attempts(storage: Storage, layout: RunLayout, clip_id: str, row_fp: str) -> int:
    """Attempts made so far at this clip with these inputs (a changed input starts from zero)."""
    uri = layout.attempts(clip_id)
    try:
        data = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return 0
    return int(data.get("attempts", 0)) if data.get("row_fp") == row_fp else 0


def bump_attempts(storage: Storage, layout: RunLayout, clip_id: str, row_fp: str) -> int:
    """Count one more attempt durably, before the attempt starts; return its number (1-based)."""
    n = read_attempts(storage, layout, clip_id, row_fp) + 1
    storage.write_text(
        layout.attempts(clip_id),
        json.dumps({"clip_id": clip_id, "row_fp": row_fp, "attempts": n, "started_at": now_iso("milliseconds")}),
    )
    return n


# ---- records ------------------------------------------------------------------------------------
def read_record(storage: Storage, layout: RunLayout, clip_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(layout.record(clip_id)))
    except FileNotFoundError:
        return None


def write_record(storage: Storage, layout: RunLayout, record: dict[str, Any]) -> None:
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
    storage.write_text(layout.record(record["clip_id"]), json.dumps(record, sort_keys=True, default=str))


def make_record(
    *,
    clip_id: str,
    status: str,
    row_fp: str,
    cfg_fp: str,
    attempts: int,
    error: str | None = None,
    output_uri: str | None = None,
    sha256: str | None = None,
    n_bytes: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "clip_id": clip_id,
        "status": status,
        "error": error,
        "row_fp": row_fp,
        "cfg_fp": cfg_fp,
        "output_uri": output_uri,
        "sha256": sha256,
        "bytes": n_bytes,
        "attempts": attempts,
        "finished_at": now_iso("milliseconds"),
        "metrics": metrics or {},
    }


def settle(record: dict[str, Any] | None, row_fp: str, max_attempts: int,
           reseed_limit: int | None = None) -> str:
    """Decide what a (re)run does with one clip: 'skip' or 'run'.

    Settled: an `ok` or `leak` record for the same inputs, or an `error` whose attempts reached
    `max_attempts`. Everything else runs (new clips, changed inputs, errors with attempts left).
    A clip whose earlier attempts all died without a record runs, and the worker gives it up
    when its durable attempt counter is already at `max_attempts`. With `reseed_limit` (a
    refresh), a `leak` clip whose last `seed_attempt` is below it runs again (see `seed_start`).
    """
    if record is not None and record.get("row_fp") == row_fp:
        if record.get("status") == "leak" and reseed_limit is not None and seed_start(record) <= reseed_limit:
            return "run"
        if record.get("status") in SETTLED_STATUSES:
            return "skip"
        if record.get("status") == "error" and int(record.get("attempts", 0)) >= max_attempts:
            return "skip"
    return "run"


def seed_start(record: dict[str, Any] | None) -> int:
    """The first seed attempt a re-run of a `leak` clip uses: one past the last one tried."""
    if not record or record.get("status") != "leak":
        return 0
    last = (record.get("metrics") or {}).get("seed_attempt")
    return int(last) + 1 if last is not None else 0
