"""corpus_anon.models.propagate: key-frame choice and flow-blend propagation on tiny synthetic clips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus_anon.models import flow as fl
from corpus_anon.models import propagate as pr


def texture(h: int, w: int, seed: int, scale: int = 4) -> np.ndarray:
    """Smooth random colour texture, uint8 (H, W, 3): blobs of about ``scale`` px, good for flow."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // scale + 3, w // scale + 3, generator=g)
    t = F.interpolate(base, scale_factor=scale, mode="bicubic", align_corners=False)[0, :, :h, :w]
    return (t * 255).clamp(0, 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def panning_clip(n: int, h: int = 64, w: int = 64, seed: int = 3) -> np.ndarray:
    """A textured scene panning 1 px/frame: frame t at x equals frame 0 at x + t."""
    big = texture(h + 8, w + n + 8, seed)
    return np.stack([big[4 : 4 + h, 4 + t : 4 + t + w] for t in range(n)])


def mae(a: np.ndarray, b: np.ndarray, margin: int = 0) -> float:
    """Mean absolute difference, optionally ignoring a border of ``margin`` px."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if margin:
        d = d[margin:-margin, margin:-margin]
    return float(d.mean())


@pytest.mark.parametrize(("fps", "k"), [(30, 5), (24, 4), (29.97, 5), (60, 10), (15, 3), (1, 1)])
def test_key_interval(fps: float, k: int) -> None:
    assert pr.key_interval(fps) == k


def test_key_interval_rate_and_errors() -> None:
    assert pr.key_interval(30, key_rate=3) == 10
    with pytest.raises(ValueError):
        pr.key_interval(0)
    with pytest.raises(ValueError):
        pr.key_interval(30, key_rate=-1)


def test_key_indices() -> None:
    keys = pr.key_indices(301, 5)
    assert len(keys) == 61 and keys[0] == 0 and keys[-1] == 300 and keys[1] == 5
    assert pr.key_indices(12, 5) == [0, 5, 10, 11]
    assert pr.key_indices(11, 5) == [0, 5, 10]
    assert pr.key_indices(7, 1) == list(range(7))
    assert pr.key_indices(1, 5) == [0]
    assert pr.key_indices(3, 10) == [0, 2]
    with pytest.raises(ValueError):
        pr.key_indices(0, 5)
    with pytest.raises(ValueError):
        pr.key_indices(10, 0)


def test_build_propagator() -> None:
    p = pr.build_propagator("flowblend")
    assert isinstance(p, pr.FlowBlendPropagator) and p.name == "flowblend"
    assert pr.build_propagator("flowblend", tau=0.3).tau == 0.3
    with pytest.raises(ValueError, match="Unknown propagator"):
        pr.build_propagator("ebsynth")


def test_auto_flow_is_raft_large_on_cuda_and_dis_elsewhere() -> None:
    assert pr.resolve_flow("auto", "cuda") == pr.resolve_flow("auto", "cuda:1") == "raft-large"
    assert pr.resolve_flow("auto", "cpu") == "dis"
    for flow in ("dis", "raft-small", "raft-large"):
        assert pr.resolve_flow(flow, "cpu") == pr.resolve_flow(flow, "cuda") == flow
    with pytest.raises(ValueError, match="diffusion.flow must be one of auto, dis, raft-small, raft-large"):
        pr.resolve_flow("farneback", "cpu")
    from typing import get_args

    from corpus_anon.config import DiffusionSection

    assert get_args(DiffusionSection.model_fields["flow"].annotation) == pr.FLOWS
    assert pr.FlowBlendPropagator().flow_name == "dis-medium"
    assert pr.FlowBlendPropagator(preset="fast").flow_name == "dis-fast"


def test_inverted_style_follows_panning_motion() -> None:
    n = 11
    frames = panning_clip(n)
    styl = 255 - frames  # the "stylization" is a known function of the original
    keys = {k: styl[k] for k in pr.key_indices(n, 5)}
    out = pr.build_propagator("flowblend").propagate(frames, keys)
    assert out.shape == frames.shape and out.dtype == np.uint8
    for j in range(n):
        if j in keys:
            continue
        a = (j // 5) * 5
        b = a + 5
        wa = (b - j) / (b - a)
        crossfade = wa * styl[a].astype(np.float64) + (1 - wa) * styl[b]
        err = mae(out[j], styl[j], margin=6)
        assert err < 2.0, (j, err)
        assert err < 0.1 * mae(crossfade, styl[j], margin=6), j
        # Columns entering from the right edge since key a exist only in key b: occlusion
        # weighting must take them from b (a border-clamped warp of a would be wrong there).
        strip = slice(64 - (j - a), 64)
        assert mae(out[j][8:-8, strip], styl[j][8:-8, strip]) < 6.0, j


def test_colour_shift_style_follows_motion() -> None:
    n = 7
    frames = panning_clip(n, h=64, w=96, seed=7)
    styl = np.clip(frames.astype(np.int16) + np.array([40, -30, 10]), 0, 255).astype(np.uint8)
    out = pr.FlowBlendPropagator().propagate(frames, {0: styl[0], 3: styl[3], 6: styl[6]})
    for j in (1, 2, 4, 5):
        assert mae(out[j], styl[j], margin=6) < 2.0, j


def test_key_frames_come_back_unchanged() -> None:
    frames = panning_clip(6, seed=8)
    # Keys that are not a function of their originals must still come back bit-exact.
    keys = {0: texture(64, 64, seed=20), 2: texture(64, 64, seed=21), 5: texture(64, 64, seed=22)}
    out = pr.FlowBlendPropagator().propagate(frames, keys)
    assert out.shape == frames.shape and out.dtype == np.uint8
    for k, img in keys.items():
        assert np.array_equal(out[k], img)
    assert not np.array_equal(out[1], keys[0]) and not np.array_equal(out[1], keys[2])


def test_frames_outside_the_keys_use_the_single_neighbour() -> None:
    frames = np.repeat(texture(64, 64, seed=11)[None], 5, axis=0)  # static clip
    key = texture(64, 64, seed=12)
    out = pr.FlowBlendPropagator().propagate(frames, {2: key})
    assert out.shape == (5, 64, 64, 3)
    for j in range(5):
        assert np.abs(out[j].astype(int) - key).max() <= 1


def test_both_sides_occluded_falls_back_to_nearer_key(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.repeat(texture(32, 32, seed=13)[None], 6, axis=0)
    ka, kb = np.full((32, 32, 3), 50, np.uint8), np.full((32, 32, 3), 200, np.uint8)

    def all_occluded(cur: np.ndarray, ref: np.ndarray, device: str = "cpu",
                     preset: str = "medium") -> fl.FlowPair:
        z = torch.zeros(1, 2, 32, 32)
        occ = torch.ones(1, 1, 32, 32)
        return fl.FlowPair(f_b=z, f_f=z, occ=occ, mask=occ)

    monkeypatch.setattr(fl, "flow_pair", all_occluded)
    out = pr.FlowBlendPropagator().propagate(frames, {0: ka, 5: kb})
    assert (out[1] == 50).all() and (out[2] == 50).all()
    assert (out[3] == 200).all() and (out[4] == 200).all()


def test_occluded_side_gets_no_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.repeat(texture(32, 32, seed=14)[None], 5, axis=0)
    ka, kb = np.full((32, 32, 3), 50, np.uint8), np.full((32, 32, 3), 200, np.uint8)
    real = fl.flow_pair

    def occlude_right_half_of_a(cur: np.ndarray, ref: np.ndarray, device: str = "cpu",
                                preset: str = "medium") -> fl.FlowPair:
        pair = real(cur, ref, device, preset)
        if not np.shares_memory(ref, frames[0]):
            return pair
        occ = pair.occ.clone()
        occ[..., 16:] = 1
        return fl.FlowPair(pair.f_b, pair.f_f, occ, fl.blend_mask(occ))

    monkeypatch.setattr(fl, "flow_pair", occlude_right_half_of_a)
    out = pr.FlowBlendPropagator().propagate(frames, {0: ka, 4: kb})
    # Frame 1: distance weights 3/4 (a) and 1/4 (b) on the left; only b where a is occluded.
    assert np.abs(out[1][:, :16].astype(int) - round(0.75 * 50 + 0.25 * 200)).max() <= 1
    assert (out[1][:, 16:] == 200).all()


def test_warp_error_prefers_the_side_that_explains_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    # Frames 0-1 show one scene, 2-4 another (a cut); flows say "static, nothing occluded", so
    # only the warp error |orig_j - warp(orig_key)| can tell which key belongs to frame j.
    t1 = texture(32, 32, seed=15)
    t2 = t1 + np.uint8(128)  # wraps: every channel differs from t1 by exactly 128
    frames = np.stack([t1, t1, t2, t2, t2])
    ka, kb = np.full((32, 32, 3), 50, np.uint8), np.full((32, 32, 3), 200, np.uint8)

    def static(cur: np.ndarray, ref: np.ndarray, device: str = "cpu", preset: str = "medium") -> fl.FlowPair:
        z = torch.zeros(1, 2, 32, 32)
        occ = torch.zeros(1, 1, 32, 32)
        return fl.FlowPair(f_b=z, f_f=z, occ=occ, mask=occ)

    monkeypatch.setattr(fl, "flow_pair", static)
    out = pr.FlowBlendPropagator().propagate(frames, {0: ka, 4: kb})
    assert np.abs(out[1].astype(int) - 50).max() <= 2  # a plain distance blend would give 88
    assert np.abs(out[2].astype(int) - 200).max() <= 2
    assert np.abs(out[3].astype(int) - 200).max() <= 2


def test_rejects_bad_inputs() -> None:
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    p = pr.FlowBlendPropagator()
    with pytest.raises(ValueError):
        p.propagate(frames, {})
    with pytest.raises(ValueError):
        p.propagate(frames, {4: frames[0]})
    with pytest.raises(ValueError):
        p.propagate(frames, {0: np.zeros((16, 16, 3), np.float32)})
    with pytest.raises(ValueError):
        p.propagate(frames.astype(np.float32), {0: frames[0]})


def test_module_imports_only_stdlib_numpy_torch() -> None:
    code = (
        "import sys\n"
        "for m in ('cv2', 'pydantic', 'corpus_anon.config'): sys.modules[m] = None\n"
        "import corpus_anon.models.propagate\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
