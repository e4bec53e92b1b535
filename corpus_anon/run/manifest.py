"""The manifest: one Parquet row per utterance clip. Schema, validation with row numbers, building.

Required columns: `clip_id` (string, unique, safe as a file name), `video_uri` (s3://, file:// or a
plain path), `signer_id` (string). Optional: `start_s`, `end_s` (seconds, null = whole file),
`prompt`, `seed`, `face_boxes_uri`. Every other column passes through to the metrics table.
Row numbers in messages count from 0, as Parquet and pandas do.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from corpus_anon.io.storage import PolicyError, Storage, normalize_uri

REQUIRED = ("clip_id", "video_uri", "signer_id")
OPTIONAL = ("start_s", "end_s", "prompt", "seed", "face_boxes_uri")
# \A...\Z, not ^...$: `$` also matches before a trailing newline, which would let "abc\n" through.
CLIP_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts")


class ManifestError(ValueError):
    """A manifest that cannot be run; the message lists every problem, one per line."""

    def __init__(self, problems: list["Problem"], source: str = "manifest") -> None:
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s):"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Problem:
    row: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.row is None else f"row {self.row}: {self.message}"


def _kind(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    return str(t)


_EXPECTED = {
    "clip_id": {"string"},
    "video_uri": {"string"},
    "signer_id": {"string"},
    "start_s": {"int", "float", "null"},
    "end_s": {"int", "float", "null"},
    "prompt": {"string", "null"},
    "seed": {"int", "null"},
    "face_boxes_uri": {"string", "null"},
}


def read_manifest(uri: str, storage: Storage) -> Any:
    """Read a manifest Parquet file into a pyarrow Table (one clear error if it is not one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError([Problem(None, f"{uri} does not exist.")], uri) from None
    try:
        # Single-threaded: manifests are small, and pyarrow's reader threads can abort the
        # interpreter at exit ("terminate called without an active exception") when a short
        # command such as `validate` finishes right after the read.
        table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError([Problem(None, f"not a readable Parquet file ({e}).")], uri) from None
    return table


def _shown(text: str, limit: int = 40) -> str:
    """A value for a message: its repr, cut (with its length) when it is long."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit - 8]!r}... ({len(text)} characters)"


def _nullish(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def validate_table(table: Any, cfg: Any, storage: Storage) -> list[Problem]:
    """Every problem of a manifest table, with row numbers; an empty list means it can run."""
    problems: list[Problem] = []
    cols = set(table.column_names)
    for c in REQUIRED:
        if c not in cols:
            problems.append(Problem(None, f"required column '{c}' is missing."))
    for c, kinds in _EXPECTED.items():
        if c in cols:
            k = _kind(table.schema.field(c).type)
            if k not in kinds:
                problems.append(Problem(None, f"column '{c}' has type {k}; expected {' or '.join(sorted(kinds))}."))
    if table.num_rows == 0:
        problems.append(Problem(None, "the manifest has no rows."))
    if problems:
        return problems

    max_clip = cfg.video.max_clip_s
    seen: dict[str, int] = {}
    data = {c: table.column(c).to_pylist() for c in (*REQUIRED, *OPTIONAL) if c in cols}
    for i in range(table.num_rows):
        cid = data["clip_id"][i]
        if _nullish(cid) or cid == "":
            problems.append(Problem(i, "clip_id is empty."))
        elif ".." in cid or not CLIP_ID_RE.match(cid):
            problems.append(Problem(
                i, f"clip_id {_shown(cid)} is unsafe; use 1-128 of A-Z a-z 0-9 _ . - , starting with a letter "
                   "or digit, without '..'."))
        elif cid.lower() in seen:
            # Case-insensitive: output keys contain the clip id, and macOS and Windows disks (and
            # tools that copy a run there) do not tell `A` from `a`.
            problems.append(Problem(i, f"clip_id {cid!r} duplicates row {seen[cid.lower()]}"
                                       f"{' (ids may not differ only in case)' if cid not in data['clip_id'][:i] else ''}."))
        else:
            seen[cid.lower()] = i
        if _nullish(data["signer_id"][i]) or str(data["signer_id"][i]).strip() == "":
            problems.append(Problem(i, "signer_id is empty."))
        for col in ("video_uri", "face_boxes_uri"):
            if col not in data:
                continue
            uri = data[col][i]
            if _nullish(uri) or uri == "":
                if col == "video_uri":
                    problems.append(Problem(i, "video_uri is empty."))
                continue
            try:
                normalize_uri(uri)
                storage.check_read(uri)
            except PolicyError as e:
                problems.append(Problem(i, f"{col}: {e}"))
        start = data.get("start_s", [None] * table.num_rows)[i]
        end = data.get("end_s", [None] * table.num_rows)[i]
        start = None if _nullish(start) else float(start)
        end = None if _nullish(end) else float(end)
        if start is not None and start < 0:
            problems.append(Problem(i, f"start_s {start} is negative."))
        if end is not None and end < 0:
            problems.append(Problem(i, f"end_s {end} is negative."))
        if end is not None and end <= (start or 0.0):
            problems.append(Problem(i, f"segment [{start or 0.0}, {end}) is empty (start_s >= end_s)."))
        elif end is not None and end - (start or 0.0) > max_clip + 1e-9:
            problems.append(Problem(
                i, f"segment of {end - (start or 0.0):.2f} s is longer than video.max_clip_s ({max_clip} s)."))
        if "seed" in data and not _nullish(data["seed"][i]) and int(data["seed"][i]) < 0:
            problems.append(Problem(i, "seed is negative."))
    return problems


def passthrough_columns(table: Any) -> list[str]:
    return [c for c in table.column_names if c not in REQUIRED + OPTIONAL]


# ---- building a manifest from a listing ---------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_clip_id(text: str) -> str:
    cid = _UNSAFE.sub("_", text).strip("._-")
    cid = re.sub(r"\.{2,}", ".", cid)
    if not cid or not cid[0].isalnum():
        cid = "c" + cid
    return cid[:128]


def _relative(uri: str, prefix: str) -> str:
    return normalize_uri(uri)[len(normalize_uri(prefix)) :].lstrip("/")


def _signer_from(rel: str, signer_regex: str | None) -> str:
    if signer_regex:
        m = re.search(signer_regex, rel)
        if not m:
            raise ValueError(f"--signer-from {signer_regex!r} does not match {rel!r}.")
        return m.group("signer") if "signer" in m.re.groupindex else m.group(1 if m.re.groups else 0)
    parent = os.path.dirname(rel)
    return parent.replace("/", "_") if parent else "unknown"


def build_manifest(
    prefix: str,
    storage: Storage,
    segments_csv: str | None = None,
    signer_regex: str | None = None,
) -> Any:
    """A manifest table for the videos under `prefix`: one clip per file, or one per CSV row.

    Segments CSV columns: `file,start_s,end_s,signer_id[,clip_id]`; `file` is relative to the
    prefix (or a full URI). Without `--signer-from`, the signer is the file's folder under the prefix.
    """
    import pyarrow as pa

    files = storage.list(prefix, VIDEO_SUFFIXES)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()

    def unique(cid: str) -> str:
        base, n = cid, 1
        while cid in used:
            n += 1
            cid = f"{base[:120]}_{n}"
        used.add(cid)
        return cid

    if segments_csv is None:
        if not files:
            raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {prefix}.")
        for uri in files:
            rel = _relative(uri, prefix)
            rows.append({
                "clip_id": unique(safe_clip_id(os.path.splitext(rel)[0])),
                "video_uri": uri, "signer_id": _signer_from(rel, signer_regex),
                "start_s": None, "end_s": None,
            })
    else:
        by_rel = {_relative(u, prefix): u for u in files}
        with open(segments_csv, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "start_s", "end_s", "signer_id"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{segments_csv} lacks column(s) {', '.join(sorted(missing))}.")
            for n, rec in enumerate(reader):
                name = rec["file"].strip()
                uri = by_rel.get(name.lstrip("/")) or (name if "://" in name else None)
                if uri is None:
                    raise ValueError(f"{segments_csv} line {n + 2}: {name!r} is not a video under {prefix}.")
                stem = os.path.splitext(os.path.basename(name))[0]
                cid = rec.get("clip_id") or f"{stem}_{n:04d}"
                rows.append({
                    "clip_id": unique(safe_clip_id(cid)), "video_uri": uri,
                    "signer_id": rec["signer_id"].strip(),
                    "start_s": float(rec["start_s"]) if rec["start_s"].strip() else None,
                    "end_s": float(rec["end_s"]) if rec["end_s"].strip() else None,
                })
    schema = pa.schema([("clip_id", pa.string()), ("video_uri", pa.string()), ("signer_id", pa.string()),
                        ("start_s", pa.float64()), ("end_s", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def write_manifest(table: Any, uri: str, storage: Storage) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())
