"""A face-crop set as it lies in a store (driver side, no torch or cv2): its layout (chunks, per-clip
fragments, attempts, the index), the fragment and index formats, reading and validating an index,
indexing a folder of videos someone else cut, and deleting a clip's crops (takedowns). The
extraction that writes one is `corpus_anon.finetune.extract`; fine-tuning reads one through
`corpus_anon.finetune.data`."""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from corpus_anon.errors import one_sentence
from corpus_anon.io.storage import Storage, join, normalize_uri

log = logging.getLogger(__name__)


INDEX_COLUMNS = ("clip_id", "identity_id", "chunk_uri", "frames", "box")


INDEX_NAME = "index.parquet"


SUMMARY_NAME = "extract.json"


_FRAGMENT_META = b"corpus_anon.extract"  # the key crop-set fragments were first written with; kept so they read


# ---- the index ------------------------------------------------------------------------------------
def index_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("clip_id", pa.string()), ("identity_id", pa.string()), ("chunk_uri", pa.string()),
        ("frames", pa.int64()), ("box", pa.list_(pa.int32())),
        ("chunk", pa.int32()), ("start_frame", pa.int64()), ("start_s", pa.float64()), ("fps", pa.float64()),
        ("crop_size", pa.int32()), ("src_width", pa.int32()), ("src_height", pa.int32()),
        ("sha256", pa.string()), ("bytes", pa.int64()), ("row_fp", pa.string()),
    ])


def index_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=index_schema())


def validate_index(table: Any, source: str = "index") -> Any:
    """The index with its required columns in their canonical types (`frames` int64, `box`
    list<int32> of [x0, y0, x1, y1]); extra columns kept. Raises ValueError naming every problem."""
    import pyarrow as pa

    problems = []
    for c in INDEX_COLUMNS:
        if c not in table.column_names:
            problems.append(f"required column '{c}' is missing")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    want = {"clip_id": pa.string(), "identity_id": pa.string(), "chunk_uri": pa.string(),
            "frames": pa.int64(), "box": pa.list_(pa.int32())}
    kinds = {"clip_id": pa.types.is_string, "identity_id": pa.types.is_string, "chunk_uri": pa.types.is_string,
             "frames": pa.types.is_integer}
    for c, typ in want.items():
        t = table.schema.field(c).type
        if pa.types.is_large_string(t):
            t = pa.string()
        if c == "box":
            ok = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                and pa.types.is_integer(t.value_type)
        else:
            ok = kinds[c](t)
        if not ok:
            problems.append(f"column '{c}' has type {table.schema.field(c).type}; expected {typ}")
            continue
        if table.schema.field(c).type != typ:
            table = table.set_column(table.column_names.index(c), c, table.column(c).cast(typ))
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    for c in INDEX_COLUMNS:
        if table.column(c).null_count:
            problems.append(f"column '{c}' has {table.column(c).null_count} empty value(s)")
    for i, (n, box) in enumerate(zip(table.column("frames").to_pylist(), table.column("box").to_pylist())):
        if n is not None and n <= 0:
            problems.append(f"row {i}: frames is {n}")
        if box is not None and (len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]):
            problems.append(f"row {i}: box {box} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        if len(problems) >= 5:
            break
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + ".")
    return table


def _is_absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith("/")


def resolve_chunk_uri(base: str, chunk_uri: str) -> str:
    """A chunk's URI: absolute ones (s3://, file://, /path) as they are, relative ones under the
    folder that holds the index."""
    if _is_absolute(chunk_uri):
        return normalize_uri(chunk_uri)
    return normalize_uri(join(normalize_uri(base), chunk_uri))


def index_location(uri: str) -> tuple[str, str]:
    """(index file, the folder chunk URIs are relative to) for a crop set folder or its index file."""
    norm = normalize_uri(uri)
    if norm.endswith(".parquet"):
        return norm, norm.rsplit("/", 1)[0]
    return join(norm, INDEX_NAME), norm


def read_index(uri: str, storage: Storage) -> Any:
    """A crop set's index (a folder holding index.parquet, or the index file itself) as a pyarrow
    Table with `INDEX_COLUMNS` checked and every `chunk_uri` resolved to an absolute URI. Reference
    sets made elsewhere (VoxCeleb crops) work when they have these columns. Raises
    FileNotFoundError or ValueError in one sentence."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, base = index_location(uri)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; run `corpus-anon faces extract` first.") from None
    try:
        table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e}).") from None
    table = validate_index(table, path)
    resolved = [resolve_chunk_uri(base, u) for u in table.column("chunk_uri").to_pylist()]
    return table.set_column(table.column_names.index("chunk_uri"), "chunk_uri", pa.array(resolved, pa.string()))


def _probe_chunk(storage: Storage, uri: str) -> tuple[int, int, int, float | None]:
    """(frames, width, height, fps) of a crop MP4 from its header, counting frames by demuxing
    when the header has no count. Raises ValueError in one sentence."""
    from corpus_anon.io.video import open_source

    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f, open_source(f, uri) as c:
            if not c.streams.video:
                got = None
            else:
                vs = c.streams.video[0]
                n = int(vs.frames or 0)
                if n <= 0:
                    n = sum(1 for pkt in c.demux(vs) if pkt.size)
                rate = vs.average_rate or vs.guessed_rate
                got = (n, vs.codec_context.width, vs.codec_context.height, float(rate) if rate else None)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one sentence (PyAV's errors are ValueErrors too)
        raise ValueError(f"{uri} is not a readable video ({one_sentence(e).rstrip('.')}).") from None
    if got is None:
        raise ValueError(f"{uri} has no video stream.")
    return got


def build_crop_index(prefix: str, storage: Storage, identity_from: str | None = None,
                     out: str | None = None, threads: int = 16) -> tuple[str, Any]:
    """Index a folder of face-crop MP4s made elsewhere (e.g. VoxCeleb crops from its official
    lists) in the crop-set format, so `faces finetune` can use it as `finetune.reference_uri`.

    One row per video: `clip_id` = its path without extension, `identity_id` = `identity_from`'s
    match on the relative path (the group named `identity`, else the first group, else the whole
    match) or the parent folder, `chunk_uri` = the relative path, `frames` from the header, `box` =
    the whole frame. Writes `out` (default PREFIX/index.parquet); returns (index URI, table)."""
    import re

    import pyarrow.parquet as pq

    from corpus_anon.run.manifest import VIDEO_SUFFIXES, safe_clip_id

    base = normalize_uri(prefix)
    files = [u for u in storage.list(base, VIDEO_SUFFIXES)]
    if not files:
        raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {prefix}.")
    try:
        rx = re.compile(identity_from) if identity_from else None
    except re.error as e:
        raise ValueError(f"--identity-from {identity_from!r} is not a valid regular expression ({e}).") from None

    def identity(rel: str) -> str:
        if rx is None:
            parent = os.path.dirname(rel)
            return parent.replace("/", "_") if parent else "unknown"
        m = rx.search(rel)
        if not m:
            raise ValueError(f"--identity-from {identity_from!r} does not match {rel!r}.")
        return m.group("identity") if "identity" in rx.groupindex else m.group(1 if rx.groups else 0)

    rels = [u[len(base):].lstrip("/") for u in files]
    ids = [identity(r) for r in rels]  # every pattern problem before any probing
    def probe(uri: str) -> tuple[int, int, int, float | None] | str:
        try:
            return _probe_chunk(storage, uri)
        except ValueError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        probes = list(pool.map(probe, files))
    bad = [p for p in probes if isinstance(p, str)]
    if len(bad) == len(probes):
        raise ValueError(f"none of the {len(bad)} videos under {prefix} is readable; the first: {bad[0].rstrip('.')}.")
    for reason in bad[:5]:
        log.warning("left out of the index: %s", reason)
    if bad:
        log.warning("%d of %d videos are unreadable and left out of the index", len(bad), len(probes))
    rows = []
    for rel, who, got in zip(rels, ids, probes):
        if isinstance(got, str):
            continue
        n, w, h, fps = got
        if w != h:
            log.warning("%s is %dx%d, not square: training resizes it to a square", rel, w, h)
        rows.append({"clip_id": safe_clip_id(os.path.splitext(rel)[0]), "identity_id": who, "chunk_uri": rel,
                     "frames": n, "box": [0, 0, w, h], "chunk": 0, "start_frame": 0, "start_s": 0.0,
                     "fps": fps, "crop_size": w if w == h else None, "src_width": w, "src_height": h})
    table = index_table(rows)
    dest = normalize_uri(out) if out else join(base, INDEX_NAME)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(dest, buf.getvalue())
    return dest, table


# ---- the output layout and per-clip fragments -----------------------------------------------------
def clip_key(clip_id: str) -> str:
    """The name of a clip's outputs: its id, as in the run's outputs (ids are file-name safe)."""
    return clip_id


@dataclass(frozen=True)
class CropLayout:
    """Where each artifact of one crop set lives."""

    root: str

    def chunk_rel(self, clip_id: str, k: int) -> str:
        return f"chunks/{clip_key(clip_id)}/{k}.mp4"

    def chunk(self, clip_id: str, k: int) -> str:
        return join(self.root, self.chunk_rel(clip_id, k))

    def chunks_prefix(self, clip_id: str) -> str:
        return join(self.root, "chunks", clip_key(clip_id))

    def part(self, clip_id: str) -> str:
        return join(self.root, "parts", f"{clip_key(clip_id)}.parquet")

    def attempts(self, clip_id: str) -> str:
        return join(self.root, "attempts", f"{clip_key(clip_id)}.json")

    @property
    def index(self) -> str:
        return join(self.root, INDEX_NAME)

    @property
    def summary(self) -> str:
        return join(self.root, SUMMARY_NAME)


def fragment_bytes(rows: list[dict[str, Any]], meta: dict[str, Any]) -> bytes:
    """A clip's index rows as Parquet, with `meta` (fingerprints, status, error) in its metadata."""
    import pyarrow.parquet as pq

    table = index_table(rows)
    table = table.replace_schema_metadata({_FRAGMENT_META: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_fragment(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a fragment; ValueError when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"not a readable Parquet file ({e}).") from None
    raw = (table.schema.metadata or {}).get(_FRAGMENT_META)
    if raw is None:
        raise ValueError("not a corpus-anon crop fragment (no metadata).")
    return json.loads(raw), table.to_pylist()


def purge_clips(storage: Storage, layout: CropLayout, clip_ids: list[str]) -> int:
    """Delete every crop-set object of these clips (chunks, fragment, attempts): consent withdrawn
    by a takedown. Returns the number of objects deleted."""
    def one(cid: str) -> int:
        uris = storage.list(layout.chunks_prefix(cid)) + [u for u in (layout.part(cid), layout.attempts(cid))
                                                           if storage.exists(u)]
        for uri in uris:
            storage.delete(uri)
        return len(uris)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, clip_ids))
