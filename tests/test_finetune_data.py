"""Training pairs for TPSMM fine-tuning (corpus_anon/finetune/data.py): the balanced draw over the
two crop sets, and frames of real H.264 chunks made here with the project's encoder."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from corpus_anon.finetune.data import (BalancedPairSampler, ChunkError, FrameSource, PairSpec, check_size,
                                       decode_chunk, fit_indices, pair_batch)
from corpus_anon.io.storage import PolicyError, Storage, StorageSettings

N = 20_000


def _index(chunks: dict[str, list[int]], prefix: str) -> pa.Table:
    """An index table: identity -> frame counts of its chunks."""
    rows = [(ident, f"s3://bucket/{prefix}/{ident}/{k}.mp4", n) for ident, ns in chunks.items()
            for k, n in enumerate(ns)]
    return pa.table({"clip_id": [r[1] for r in rows], "identity_id": [r[0] for r in rows],
                     "chunk_uri": [r[1] for r in rows], "frames": pa.array([r[2] for r in rows], pa.int64())})


# One corpus signer with 10 chunks, three with one; a reference identity with 5 chunks, one with 1.
CORPUS = {"many": [30] * 10, "one_a": [40], "one_b": [20], "one_c": [2]}
REFERENCE = {"vox_many": [50] * 5, "vox_one": [60]}


def _draws(sampler: BalancedPairSampler, seed: int = 0, n: int = N) -> list[PairSpec]:
    return sampler.draw_many(np.random.default_rng(seed), n)


def _within(count: int, total: int, p: float, k: float = 4.0) -> bool:
    """`count` of `total` Bernoulli(p) draws lies within k standard errors of p."""
    se = np.sqrt(p * (1 - p) / total)
    return abs(count / total - p) <= k * se


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_reference_share_follows_the_ratio(ratio):
    sampler = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), ratio)
    draws = _draws(sampler, seed=int(ratio * 10))
    ref = sum(d.set_name == "reference" for d in draws)
    assert _within(ref, N, ratio), ref / N
    assert {d.set_name for d in draws} == {"corpus", "reference"}
    assert all(d.chunk_uri.startswith("s3://bucket/r/") == (d.set_name == "reference") for d in draws)


def test_identities_are_uniform_within_each_set_whatever_their_chunk_counts():
    sampler = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), 0.5)
    draws = _draws(sampler, seed=1)
    for name, chunks in (("corpus", CORPUS), ("reference", REFERENCE)):
        mine = [d for d in draws if d.set_name == name]
        counts = Counter(d.identity_id for d in mine)
        assert set(counts) == set(chunks)
        for ident in chunks:
            # "many" holds 10 of 13 corpus chunks, yet is drawn like every other signer.
            assert _within(counts[ident], len(mine), 1 / len(chunks)), (name, ident, counts[ident] / len(mine))


def test_chunks_are_uniform_within_an_identity():
    sampler = BalancedPairSampler(_index(CORPUS, "c"), None, 0.0)
    draws = [d for d in _draws(sampler, seed=2) if d.identity_id == "many"]
    counts = Counter(d.chunk_uri for d in draws)
    assert len(counts) == 10
    for c in counts.values():
        assert _within(c, len(draws), 0.1), c / len(draws)


def test_frames_are_two_distinct_frames_of_the_chunk_drawn_uniformly():
    sampler = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), 0.5)
    draws = _draws(sampler, seed=3)
    frames = {u: n for chunks, p in ((CORPUS, "c"), (REFERENCE, "r")) for ident, ns in chunks.items()
              for u, n in zip([f"s3://bucket/{p}/{ident}/{k}.mp4" for k in range(len(ns))], ns)}
    for d in draws:
        assert d.src_frame != d.drv_frame
        assert 0 <= d.src_frame < frames[d.chunk_uri] and 0 <= d.drv_frame < frames[d.chunk_uri]
        assert sampler.chunk_frames(d.chunk_uri) == frames[d.chunk_uri]
    two = [(d.src_frame, d.drv_frame) for d in draws if d.identity_id == "one_c"]  # a 2-frame chunk
    assert set(two) == {(0, 1), (1, 0)}
    one_a = [d for d in draws if d.identity_id == "one_a"]  # 40 frames: every frame is a source about equally
    src = np.bincount([d.src_frame for d in one_a], minlength=40)
    drv = np.bincount([d.drv_frame for d in one_a], minlength=40)
    assert src.min() > 0 and drv.min() > 0
    expected = len(one_a) / 40
    assert np.abs(src - expected).max() < 5 * np.sqrt(expected)


def test_draws_repeat_with_the_same_generator():
    sampler = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), 0.3)
    assert _draws(sampler, 7, 500) == _draws(sampler, 7, 500)
    assert _draws(sampler, 7, 500) != _draws(sampler, 8, 500)


def test_summary_counts_chunks_and_identities():
    sampler = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), 0.5)
    assert sampler.summary() == {"corpus_chunks": 13, "corpus_identities": 4, "reference_chunks": 6,
                                 "reference_identities": 2, "reference_ratio": 0.5}


def test_without_a_reference_set_every_pair_is_from_the_corpus(caplog):
    with caplog.at_level("INFO", logger="corpus_anon.finetune.data"):
        sampler = BalancedPairSampler(_index(CORPUS, "c"), None, 0.5)
    assert "every training pair comes from the corpus" in caplog.text
    assert {d.set_name for d in _draws(sampler, n=2000)} == {"corpus"}
    assert sampler.summary()["reference_ratio"] == 0.0 and sampler.summary()["reference_chunks"] == 0
    # A ratio of 0 leaves a reference set unused, and the summary says so.
    unused = BalancedPairSampler(_index(CORPUS, "c"), _index(REFERENCE, "r"), 0.0)
    assert {d.set_name for d in _draws(unused, n=2000)} == {"corpus"}
    assert unused.summary()["reference_identities"] == 0


def test_one_frame_chunks_are_left_out():
    sampler = BalancedPairSampler(_index({"a": [1, 1, 5], "b": [1]}, "c"), None, 0.0)
    assert sampler.summary()["corpus_chunks"] == 1 and sampler.summary()["corpus_identities"] == 1
    assert {d.chunk_uri for d in _draws(sampler, n=200)} == {"s3://bucket/c/a/2.mp4"}


def test_sampler_refuses_what_it_cannot_draw_from():
    corpus, ref = _index(CORPUS, "c"), _index(REFERENCE, "r")
    with pytest.raises(ValueError, match="reference_ratio is 1 .* no reference set"):
        BalancedPairSampler(corpus, None, 1.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        BalancedPairSampler(corpus, ref, 1.5)
    with pytest.raises(ValueError, match="corpus crop set has no chunk"):
        BalancedPairSampler(corpus.slice(0, 0), ref, 0.5)
    with pytest.raises(ValueError, match="corpus crop set has no chunk"):
        BalancedPairSampler(_index({"a": [1]}, "c"), ref, 0.5)
    with pytest.raises(ValueError, match="reference crop set has no chunk"):
        BalancedPairSampler(corpus, ref.slice(0, 0), 0.5)
    with pytest.raises(ValueError, match="no 'frames' column"):
        BalancedPairSampler(corpus.drop_columns(["frames"]), None, 0.0)
    # Every pair from the reference set: fine when there is one.
    only_ref = BalancedPairSampler(corpus, ref, 1.0)
    assert {d.set_name for d in _draws(only_ref, n=500)} == {"reference"}


# ---- frames ---------------------------------------------------------------------------------------
LEVELS = [16 + 18 * i for i in range(12)]  # frame i is a flat grey of LEVELS[i] with a white square


def _chunk_frames(n: int = 12, side: int = 128) -> np.ndarray:
    frames = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        frames[i] = LEVELS[i]
        x = 8 + 6 * i
        frames[i, 40:72, x:x + 32] = 250
    return frames


def _write_chunk(path, n: int = 12, side: int = 128) -> str:
    from corpus_anon.io.video import encode_mp4

    encode_mp4(_chunk_frames(n, side), np.arange(n) / 25.0, Fraction(25), (side, side), str(path), crf=10,
               threads=1)
    return str(path)


def _level(frame: np.ndarray) -> float:
    return float(np.median(frame[100:, :, 0]))


@pytest.fixture
def chunks(tmp_path):
    root = tmp_path / "crops"
    root.mkdir()
    a = _write_chunk(root / "a.mp4")
    b = _write_chunk(root / "b.mp4", n=6)
    big = _write_chunk(root / "big.mp4", n=4, side=256)
    storage = Storage(StorageSettings(allowed_read=(str(root),)))
    return {"root": root, "a": "file://" + a, "b": "file://" + b, "big": "file://" + big, "storage": storage}


def test_decode_chunk_gives_every_frame_or_the_asked_ones_in_order(chunks):
    path = chunks["a"].removeprefix("file://")
    frames = decode_chunk(path)
    assert frames.shape == (12, 128, 128, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - _chunk_frames().astype(int)).mean() < 3
    some = decode_chunk(path, [7, 2, 7])
    assert np.array_equal(some, frames[[7, 2, 7]])
    with pytest.raises(ChunkError, match="has 12 frames; frame 12 was asked for"):
        decode_chunk(path, [3, 12])
    bad = chunks["root"] / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ChunkError, match="not a readable video"):
        decode_chunk(str(bad))


def test_frame_source_downloads_and_decodes_a_chunk_once(chunks, tmp_path):
    src = FrameSource(chunks["storage"], str(tmp_path / "cache"))
    first = src.chunk(chunks["a"])
    again = src.chunk(chunks["a"])
    assert again is first and src.stats == {"downloads": 1, "decodes": 1, "partial_decodes": 0, "hits": 1}
    assert [round(_level(f)) for f in first] == pytest.approx(LEVELS, abs=3)
    got = src.frames(chunks["a"], [5, 1], n_frames=12)
    assert [_level(f) for f in got] == pytest.approx([LEVELS[5], LEVELS[1]], abs=3)
    assert src.stats["decodes"] == 1 and len(list((tmp_path / "cache").glob("*.mp4"))) == 1


def test_frame_source_lru_is_bounded_by_bytes(chunks, tmp_path):
    one = 12 * 128 * 128 * 3
    src = FrameSource(chunks["storage"], str(tmp_path / "cache"), max_bytes=one + 1)
    src.chunk(chunks["a"])
    assert src.cached_bytes == one
    src.chunk(chunks["b"])  # 6 frames: a must go to make room
    assert src.cached_bytes == 6 * 128 * 128 * 3
    src.chunk(chunks["a"])
    assert src.stats["decodes"] == 3 and src.cached_bytes == one
    # A chunk larger than a quarter of the budget is decoded only up to the frames asked for.
    got = src.frames(chunks["b"], [4, 0], n_frames=6)
    assert src.stats["partial_decodes"] == 1
    assert [_level(f) for f in got] == pytest.approx([LEVELS[4], LEVELS[0]], abs=3)


def test_frame_source_refuses_missing_chunks_and_bad_frames(chunks, tmp_path):
    src = FrameSource(chunks["storage"], str(tmp_path / "cache"))
    with pytest.raises(ChunkError, match="does not exist"):
        src.chunk("file://" + str(chunks["root"] / "gone.mp4"))
    with pytest.raises(ChunkError, match="has 6 frames; frame 6"):
        src.frames(chunks["b"], [0, 6])
    with pytest.raises(PolicyError, match="outside storage.allowed_prefixes.read"):
        src.chunk("file://" + str(tmp_path / "elsewhere.mp4"))


def test_an_index_that_overstates_a_chunk_is_scaled_onto_its_frames(chunks, tmp_path):
    assert fit_indices([3, 1], 6, 8, "u") == [3, 1]  # they fit: unchanged
    assert fit_indices([7, 6], 6, 8, "u") == [5, 4]
    assert fit_indices([1, 0], 1, 8, "u") == [0, 0]  # one frame left: nothing to keep apart
    assert fit_indices([7, 7], 6, 8, "u") == [5, 5]
    moved = fit_indices([7, 6, 5], 2, 8, "u")
    assert len(set(moved[:2])) == 2 and all(0 <= j < 2 for j in moved)
    with pytest.raises(ChunkError, match="has 6 frames; frame 8"):
        fit_indices([8, 0], 6, None, "u")
    # A 6-frame chunk whose index says 8: the cached path and the decode-only-what-is-asked path agree.
    for budget in (1 << 30, 1):
        src = FrameSource(chunks["storage"], str(tmp_path / f"cache{budget}"), max_bytes=budget)
        got = src.frames(chunks["b"], [7, 6], n_frames=8)
        assert [_level(f) for f in got] == pytest.approx([LEVELS[5], LEVELS[4]], abs=3)
        assert src.stats["partial_decodes"] == (budget == 1)


def test_pair_batch_gives_float_pairs_and_resizes(chunks, tmp_path):
    import torch

    src = FrameSource(chunks["storage"], str(tmp_path / "cache"))
    specs = [PairSpec("corpus", "a", chunks["a"], 3, 9), PairSpec("reference", "v", chunks["big"], 1, 0)]
    source, driving = pair_batch(specs, src, 128)
    assert source.shape == driving.shape == (2, 3, 128, 128) and source.dtype == torch.float32
    assert 0.0 <= float(source.min()) and float(source.max()) <= 1.0
    assert float(source[0, 0, 110].median()) * 255 == pytest.approx(LEVELS[3], abs=3)
    assert float(driving[0, 0, 110].median()) * 255 == pytest.approx(LEVELS[9], abs=3)
    assert float(source[1, 0, 110].median()) * 255 == pytest.approx(LEVELS[1], abs=3)  # the 256 px chunk, shrunk
    up, _ = pair_batch(specs[:1], src, 256)  # the 128 px chunk enlarged
    assert up.shape == (1, 3, 256, 256)
    with pytest.raises(ValueError, match="multiple of 128"):
        pair_batch(specs, src, 200)
    with pytest.raises(ValueError, match="multiple of 128"):
        check_size(64)
