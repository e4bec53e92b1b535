"""Training pairs for TPSMM fine-tuning: a balanced draw over two face-crop sets, and their frames.

`BalancedPairSampler` follows METHOD.md §6.2 step 5 and TPSMM's `id_sampling`: each pair comes
from the reference (talking-head) set with probability `reference_ratio`, else from the corpus's
own crops; within the chosen set an identity is picked uniformly (so a signer with many chunks
weighs no more than one with few), then one of that identity's chunks uniformly, then two
distinct frames of the chunk (source and driving). Draws depend only on the generator passed
in, so a worker that seeds it by (seed, rank, epoch) draws the same pairs when a run resumes.

`FrameSource` fetches crop chunks (short square H.264 MP4s, see `corpus_anon.finetune.extract`) into a
per-worker cache folder, decodes them with PyAV and keeps recently used decoded chunks in a
small LRU bounded by bytes; `pair_batch` turns pairs into (source, driving) float tensors.

numpy and pyarrow only at import: PyAV, cv2 and torch are imported where frames are decoded,
resized or batched (on the training workers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from corpus_anon.errors import ClipError
from corpus_anon.io.storage import Storage, StorageSettings
from corpus_anon.io.video import open_source

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

log = logging.getLogger(__name__)

SET_NAMES: tuple[str, ...] = ("corpus", "reference")
# TPSMM's frame sides must be multiples of this (vox-256's hourglass and inpainting skips).
SIZE_MULTIPLE = 128
DEFAULT_CACHE_BYTES = 512 << 20  # decoded frames kept per worker
DEFAULT_DISK_BYTES = 4 << 30  # downloaded chunk files kept per worker


class ChunkError(RuntimeError):
    """A crop chunk that cannot be fetched or decoded as its index says (one sentence)."""


class ShortChunkError(ChunkError):
    """A chunk that decodes to fewer frames than were asked for; `frames` is how many it has."""

    def __init__(self, message: str, frames: int) -> None:
        super().__init__(message)
        self.frames = frames


@dataclass(frozen=True)
class PairSpec:
    """One training pair: two distinct frames of one chunk of one identity of one set."""

    set_name: str
    identity_id: str
    chunk_uri: str
    src_frame: int
    drv_frame: int


@dataclass(frozen=True)
class _CropSet:
    """One set's chunks grouped by identity: chunk URIs and frame counts per identity."""

    identities: tuple[str, ...]
    chunks: tuple[tuple[str, ...], ...]  # per identity, its chunk URIs
    frames: tuple[np.ndarray, ...]  # per identity, its chunks' frame counts (int64)
    dropped: int  # chunks of fewer than 2 frames

    @property
    def n_chunks(self) -> int:
        return sum(len(c) for c in self.chunks)


def _group(table: Any, name: str) -> _CropSet:
    for col in ("identity_id", "chunk_uri", "frames"):
        if col not in table.column_names:
            raise ValueError(f"the {name} crop set's index has no '{col}' column.")
    ids = table.column("identity_id").to_pylist()
    uris = table.column("chunk_uri").to_pylist()
    frames = table.column("frames").to_pylist()
    by_id: dict[str, list[tuple[str, int]]] = {}
    dropped = 0
    for ident, uri, n in zip(ids, uris, frames):
        if ident is None or uri is None or n is None:
            raise ValueError(f"the {name} crop set's index has empty identity_id, chunk_uri or frames values.")
        if int(n) < 2:  # a pair needs two distinct frames
            dropped += 1
            continue
        by_id.setdefault(str(ident), []).append((str(uri), int(n)))
    order = sorted(by_id)
    return _CropSet(
        identities=tuple(order),
        chunks=tuple(tuple(u for u, _ in by_id[i]) for i in order),
        frames=tuple(np.array([n for _, n in by_id[i]], dtype=np.int64) for i in order),
        dropped=dropped,
    )


class BalancedPairSampler:
    """Draws `PairSpec`s: the set by `reference_ratio`, then an identity uniformly within the set,
    a chunk uniformly within the identity, and two distinct frames uniformly within the chunk.

    `corpus` and `reference` are crop-set indexes as `corpus_anon.finetune.crops.read_index` returns them
    (identity_id, chunk_uri, frames; other columns are ignored). Chunks of fewer than 2 frames are
    left out. Without a reference set every pair comes from the corpus (a ratio of 1 is refused);
    with a ratio of 0 a reference set is not used. Raises ValueError in one sentence.
    """

    def __init__(self, corpus: "pa.Table", reference: "pa.Table | None", reference_ratio: float) -> None:
        ratio = float(reference_ratio)
        if not 0.0 <= ratio <= 1.0 or ratio != ratio:
            raise ValueError(f"reference_ratio must lie in [0, 1], got {reference_ratio}.")
        self.configured_ratio = ratio
        self.corpus = _group(corpus, "corpus")
        if not self.corpus.identities:
            raise ValueError("the corpus crop set has no chunk of at least 2 frames to draw pairs from.")
        self.reference = _group(reference, "reference") if reference is not None else None
        if self.reference is None:
            if ratio >= 1.0:
                raise ValueError("reference_ratio is 1 (every pair from the reference set) but no reference set "
                                 "was given.")
            if ratio > 0:
                log.info("no reference crop set: every training pair comes from the corpus (reference_ratio %g "
                         "is not used)", ratio)
            ratio = 0.0
        elif not self.reference.identities:
            if ratio > 0:
                raise ValueError(f"reference_ratio is {ratio:g} but the reference crop set has no chunk of at least "
                                 "2 frames.")
        elif ratio == 0:
            log.info("reference_ratio is 0: the reference crop set is not used")
        self.reference_ratio = ratio
        self._frames = {u: int(n) for st in (self.corpus, self.reference) if st is not None
                        for us, ns in zip(st.chunks, st.frames) for u, n in zip(us, ns)}
        for name, s in (("corpus", self.corpus), ("reference", self.reference)):
            if s is not None and s.dropped:
                log.info("%d %s chunk(s) of fewer than 2 frames are left out", s.dropped, name)

    def _set(self, name: str) -> _CropSet:
        s = self.corpus if name == "corpus" else self.reference
        assert s is not None
        return s

    def draw(self, rng: np.random.Generator) -> PairSpec:
        """One pair. Uses a fixed number of draws from `rng` per call whatever the set sizes."""
        name = "reference" if rng.random() < self.reference_ratio else "corpus"
        s = self._set(name)
        i = int(rng.integers(len(s.identities)))
        j = int(rng.integers(len(s.chunks[i])))
        n = int(s.frames[i][j])
        a = int(rng.integers(n))
        b = int(rng.integers(n - 1))
        if b >= a:
            b += 1
        return PairSpec(name, s.identities[i], s.chunks[i][j], a, b)

    def draw_many(self, rng: np.random.Generator, n: int) -> list[PairSpec]:
        return [self.draw(rng) for _ in range(n)]

    def chunk_frames(self, chunk_uri: str) -> int | None:
        """The frame count the index gives for a chunk (None for a chunk it does not hold)."""
        return self._frames.get(chunk_uri)

    def chunk_uris(self, set_name: str) -> list[str]:
        """Every chunk a set's pairs can come from."""
        s = self.corpus if set_name == "corpus" else self.reference
        return [] if s is None else [u for us in s.chunks for u in us]

    def summary(self) -> dict[str, Any]:
        """Chunk and identity counts per set and the share of pairs from the reference set (the
        `data` entry of the fine-tune's JSON, which the release card quotes)."""
        ref = self.reference if self.reference_ratio > 0 else None
        return {
            "corpus_chunks": self.corpus.n_chunks,
            "corpus_identities": len(self.corpus.identities),
            "reference_chunks": ref.n_chunks if ref is not None else 0,
            "reference_identities": len(ref.identities) if ref is not None else 0,
            "reference_ratio": self.reference_ratio,
        }


# ---- frames -----------------------------------------------------------------------------------------
def decode_chunk(path: str, indices: Sequence[int] | None = None) -> np.ndarray:
    """RGB uint8 frames of a local video file: all of them (T, H, W, 3), or only `indices` in the
    given order (decoding stops after the last one needed). Raises ChunkError."""
    import av

    want = None if indices is None else sorted(set(int(i) for i in indices))
    if want is not None and (not want or want[0] < 0):
        raise ChunkError(f"frame indices {list(indices or [])} are not valid for {path}.")
    got: dict[int, np.ndarray] = {}
    frames: list[np.ndarray] = []
    n = 0
    try:
        with open_source(path) as c:  # the allow-list: reference sets come from elsewhere
            if not c.streams.video:
                raise ChunkError(f"{path} has no video stream.")
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            for frame in c.decode(vs):
                if want is None:
                    frames.append(frame.to_ndarray(format="rgb24"))
                elif n in want:
                    got[n] = frame.to_ndarray(format="rgb24")
                    if len(got) == len(want):
                        break
                n += 1
    except av.FFmpegError as e:
        raise ChunkError(f"{path} is not a readable video ({str(e).splitlines()[0].rstrip('.')}).") from None
    except ClipError as e:
        raise ChunkError(f"{path}: {e}") from None
    if want is None:
        if not frames:
            raise ChunkError(f"{path} holds no frames.")
        return np.stack(frames)
    if len(got) < len(want):
        raise ShortChunkError(f"{path} has {n} frames; frame {want[-1]} was asked for.", n)
    return np.stack([got[int(i)] for i in indices])  # type: ignore[union-attr]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Frames (N, H, W, 3) resized to (N, size, size, 3): area averaging when shrinking, bilinear
    when enlarging; returned as they are when already that size."""
    if frames.shape[1:3] == (size, size):
        return frames
    import cv2

    shrink = frames.shape[1] > size or frames.shape[2] > size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


class FrameSource:
    """Frames of crop chunks for one training worker.

    A chunk is downloaded once into `cache_dir` (kept while the files there stay under
    `max_disk_bytes`, least recently used first out) and decoded with PyAV. Whole decoded chunks
    are kept in an LRU of at most `max_bytes`; a chunk larger than a quarter of that is not kept,
    and for it only the asked frames are decoded. Safe to call from several threads.
    """

    def __init__(self, storage: Storage | StorageSettings, cache_dir: str, max_bytes: int = DEFAULT_CACHE_BYTES,
                 max_disk_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)
        self.cache_dir = cache_dir
        self.max_bytes = int(max_bytes)
        self.max_disk_bytes = int(max_disk_bytes)
        os.makedirs(cache_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._decoded: OrderedDict[str, np.ndarray] = OrderedDict()
        self._decoded_bytes = 0
        self._files: OrderedDict[str, int] = OrderedDict()  # local path -> bytes
        self._file_bytes = 0
        self._sides: dict[str, int] = {}
        self.stats = {"downloads": 0, "decodes": 0, "partial_decodes": 0, "hits": 0}

    @property
    def cached_bytes(self) -> int:
        return self._decoded_bytes

    def local_path(self, uri: str) -> str:
        """The chunk's file in the cache folder, downloaded first if it is not there."""
        name = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24] + ".mp4"
        path = os.path.join(self.cache_dir, name)
        with self._lock:
            if path in self._files and os.path.isfile(path):
                self._files.move_to_end(path)
                return path
        tmp = f"{path}.part-{uuid.uuid4().hex[:8]}"
        try:
            self.storage.download(uri, tmp)
            os.replace(tmp, path)
        except FileNotFoundError:
            raise ChunkError(f"crop chunk {uri} does not exist.") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        size = os.path.getsize(path)
        with self._lock:
            self.stats["downloads"] += 1
            if path not in self._files:
                self._file_bytes += size
            self._files[path] = size
            self._files.move_to_end(path)
            while self._file_bytes > self.max_disk_bytes and len(self._files) > 1:
                old, n = self._files.popitem(last=False)
                self._file_bytes -= n
                try:
                    os.remove(old)
                except OSError:
                    pass
        return path

    def chunk(self, uri: str) -> np.ndarray:
        """Every frame of a chunk, (T, H, W, 3) RGB uint8, decoded once while it stays cached."""
        with self._lock:
            hit = self._decoded.get(uri)
            if hit is not None:
                self._decoded.move_to_end(uri)
                self.stats["hits"] += 1
                return hit
        frames = decode_chunk(self.local_path(uri))
        frames.setflags(write=False)
        with self._lock:
            self.stats["decodes"] += 1
            if frames.nbytes <= self.max_bytes and uri not in self._decoded:
                self._decoded[uri] = frames
                self._decoded_bytes += frames.nbytes
                while self._decoded_bytes > self.max_bytes:
                    _, old = self._decoded.popitem(last=False)
                    self._decoded_bytes -= old.nbytes
        return frames

    def frames(self, uri: str, indices: Sequence[int], n_frames: int | None = None) -> np.ndarray:
        """Frames `indices` of a chunk, (len(indices), H, W, 3).

        `n_frames` is the index's frame count: it tells whether the whole decoded chunk is small
        enough to cache (without it the chunk is cached), and when the video decodes to fewer
        frames than that (an index made from container headers), indices are scaled onto the
        frames it has, distinct ones kept distinct. Without it, an index past the end is a ChunkError."""
        with self._lock:
            hit = self._decoded.get(uri)
        if hit is None and n_frames is not None:
            path = self.local_path(uri)
            side = self._frame_side(path)
            if n_frames * side * side * 3 > self.max_bytes // 4:
                with self._lock:
                    self.stats["partial_decodes"] += 1
                try:
                    return decode_chunk(path, indices)
                except ShortChunkError as e:
                    return decode_chunk(path, fit_indices(indices, e.frames, n_frames, uri))
        frames = self.chunk(uri)
        return frames[fit_indices(indices, len(frames), n_frames, uri)]

    def _frame_side(self, path: str) -> int:
        side = self._sides.get(path)
        if side is None:
            import av

            try:
                with open_source(path) as c:
                    vs = c.streams.video[0]
                    side = max(int(vs.codec_context.width), int(vs.codec_context.height), 1)
            except (av.FFmpegError, ClipError, IndexError):
                raise ChunkError(f"{path} is not a readable video.") from None
            self._sides[path] = side
        return side


def fit_indices(indices: Sequence[int], have: int, declared: int | None, uri: str) -> list[int]:
    """`indices` of a chunk said to have `declared` frames, on the `have` frames it decodes to: as
    they are when they fit, else scaled onto [0, have) with distinct indices kept distinct (when
    `have` allows). Raises ChunkError when they do not fit and no count was declared."""
    idx = [int(i) for i in indices]
    if idx and min(idx) >= 0 and max(idx) < have:
        return idx
    if not idx or min(idx) < 0 or not declared or declared <= have or have < 1:
        raise ChunkError(f"crop chunk {uri} has {have} frames; frame {max(idx, default=-1)} was asked for.")
    log.debug("crop chunk %s decodes to %d frames, not the %d its index says", uri, have, declared)
    assigned: dict[int, int] = {}
    for i in idx:
        if i not in assigned:
            j = min(i * have // declared, have - 1)
            used = set(assigned.values())
            free = [c for c in range(have) if c not in used]
            if j in used and free:
                j = min(free, key=lambda c: (abs(c - j), c))
            assigned[i] = j
    return [assigned[i] for i in idx]


def check_size(size: int) -> int:
    """`size` if TPSMM can train at it (a positive multiple of 128), else ValueError."""
    if int(size) != size or size <= 0 or size % SIZE_MULTIPLE:
        raise ValueError(f"training frames must be square with a side that is a multiple of {SIZE_MULTIPLE} px "
                         f"(TPSMM's layout), got {size}.")
    return int(size)


def load_pair(spec: PairSpec, source: FrameSource, size: int, n_frames: int | None = None) -> np.ndarray:
    """(2, size, size, 3) uint8: the pair's source and driving frames, resized to `size`."""
    frames = source.frames(spec.chunk_uri, [spec.src_frame, spec.drv_frame], n_frames)
    return resize_frames(np.ascontiguousarray(frames), size)


def to_tensors(pairs: np.ndarray, device: "str | torch.device" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Pairs (B, 2, S, S, 3) uint8 to (source, driving), each (B, 3, S, S) float in [0, 1] on `device`."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(pairs)).to(device)
    t = t.permute(1, 0, 4, 2, 3).float().div_(255.0)
    return t[0].contiguous(), t[1].contiguous()


def pair_batch(specs: Sequence[PairSpec], source: FrameSource, size: int,
               device: "str | torch.device" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(source, driving) tensors (B, 3, size, size) in [0, 1] for a batch of pairs; frames of
    chunks at another side are resized to `size`, which must be a multiple of 128."""
    check_size(size)
    if not specs:
        raise ValueError("pair_batch needs at least one pair.")
    return to_tensors(np.stack([load_pair(s, source, size) for s in specs]), device)
