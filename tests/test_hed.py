"""The HED annotator network: checkpoint compatibility (keys and shapes of the public
ControlNetHED.pth), strict loading, and the edge function's contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus_anon.models.hed import (DEFAULT_CHANNELS, ControlNetHED, hed_edges, load_hed,
                                    load_state_dict_file)

TSV = (Path(__file__).resolve().parents[2] / "shared" / "design" / "checkpoints"
       / "controlnet_hed_state_dict.tsv")
TINY = (4, 8, 8, 16, 16)


def _tsv_shapes() -> dict[str, tuple[int, ...]]:
    rows: dict[str, tuple[int, ...]] = {}
    for line in TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape = line.split("\t")
        rows[key] = tuple(int(d) for d in shape.split("x"))
    return rows


def _tiny(seed: int = 0) -> ControlNetHED:
    torch.manual_seed(seed)
    m = ControlNetHED(TINY)
    with torch.no_grad():
        m.norm.copy_(torch.tensor([120.0, 115.0, 100.0]).view(1, 3, 1, 1))
    return m.eval()


def _frames(n: int = 3, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.skipif(not TSV.is_file(), reason=f"checkpoint key table {TSV} is not present")
def test_default_state_dict_matches_public_checkpoint_keys_and_shapes():
    want = _tsv_shapes()
    sd = ControlNetHED().state_dict()
    assert list(sd) == list(want)  # same keys, same order as the checkpoint
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_checkpoint_with_public_shapes_loads_and_infers_default_channels(tmp_path):
    if not TSV.is_file():
        pytest.skip(f"checkpoint key table {TSV} is not present")
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in _tsv_shapes().items()}
    torch.save(sd, tmp_path / "ControlNetHED.pth")
    m = load_hed(tmp_path / "ControlNetHED.pth")
    assert m.channels == DEFAULT_CHANNELS
    assert torch.equal(m.block4.convs[2].weight, sd["block4.convs.2.weight"])
    assert not m.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_state_dict_loads_back_strictly_with_identical_output(tmp_path, suffix):
    m = _tiny()
    path = tmp_path / f"hed{suffix}"
    if suffix == ".pth":
        torch.save(m.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(m.state_dict(), str(path))
    back = load_hed(path)
    assert back.channels == TINY
    frames = _frames()
    assert torch.equal(hed_edges(m, frames), hed_edges(back, frames))


def test_missing_key_is_refused_naming_it(tmp_path):
    sd = _tiny().state_dict()
    del sd["block3.convs.2.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"lacks key 'block3\.convs\.2\.bias'"):
        load_hed(tmp_path / "bad.pth")


def test_misshaped_key_is_refused_naming_it_and_its_shapes(tmp_path):
    sd = _tiny().state_dict()
    sd["block2.convs.1.weight"] = torch.zeros(8, 8, 5, 5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"'block2\.convs\.1\.weight' has shape \(8, 8, 5, 5\), "
                                         r"expected \(8, 8, 3, 3\)"):
        load_hed(tmp_path / "bad.pth")


def test_unexpected_key_and_non_hed_file_are_refused(tmp_path):
    sd = _tiny().state_dict()
    sd["block6.projection.weight"] = torch.zeros(1, 16, 1, 1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected key 'block6\.projection\.weight'"):
        load_hed(tmp_path / "extra.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a ControlNetHED checkpoint"):
        load_hed(tmp_path / "other.pth")


def test_projections_follow_the_pooling_pyramid():
    m = _tiny()
    with torch.no_grad():
        ps = m.projections(torch.rand(2, 3, 32, 48) * 255)
    assert [tuple(p.shape) for p in ps] == [(2, 1, 32, 48), (2, 1, 16, 24), (2, 1, 8, 12),
                                            (2, 1, 4, 6), (2, 1, 2, 3)]


def test_forward_is_sigmoid_of_mean_of_resized_projections():
    m = _tiny()
    x = torch.rand(1, 3, 32, 40) * 255
    with torch.no_grad():
        ps = m.projections(x)
        want = torch.sigmoid(sum(F.interpolate(p, size=(32, 40), mode="bilinear", align_corners=False)
                                 for p in ps) / 5)
        got = m(x)
    torch.testing.assert_close(got, want)


def test_input_is_centred_by_the_learned_norm():
    """Shifting the input and `norm` by the same amount leaves the edges unchanged (h = x - norm)."""
    m = _tiny()
    x = torch.rand(1, 3, 32, 32) * 200
    with torch.no_grad():
        a = m(x)
        m.norm.add_(25.0)
        b = m(x + 25.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_hed_edges_shape_range_determinism_and_input_dependence():
    m = _tiny()
    frames = _frames(n=3)
    e1 = hed_edges(m, frames)
    assert e1.shape == (3, 1, 32, 48) and e1.dtype == torch.float32
    assert e1.device == next(m.parameters()).device
    assert float(e1.min()) >= 0.0 and float(e1.max()) <= 1.0
    assert float(e1.std()) > 0  # not a constant map
    assert torch.equal(e1, hed_edges(m, frames))
    assert torch.equal(e1, hed_edges(m, torch.from_numpy(frames)))  # numpy and torch alike
    other = frames.copy()
    other[1, 8:24, 10:30] = 255 - other[1, 8:24, 10:30]
    e2 = hed_edges(m, other)
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[2], e2[2])  # frames are independent
    assert not torch.equal(e1[1], e2[1])


def test_hed_edges_batches_give_the_same_result_as_one_pass():
    m = _tiny()
    frames = _frames(n=5)
    torch.testing.assert_close(hed_edges(m, frames, batch_size=2), hed_edges(m, frames, batch_size=8))


def test_hed_edges_runs_without_autograd():
    m = _tiny()
    assert not hed_edges(m, _frames(n=1)).requires_grad


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 32, 32, 3), np.float32), "uint8 RGB"),
    (np.zeros((32, 32, 3), np.uint8), "uint8 RGB"),
    (np.zeros((1, 32, 32, 4), np.uint8), "uint8 RGB"),
    (np.zeros((1, 8, 32, 3), np.uint8), "at least 16 px"),
])
def test_hed_edges_refuses_bad_frames(bad, match):
    with pytest.raises(ValueError, match=match):
        hed_edges(_tiny(), bad)


def test_full_size_network_runs_on_a_small_frame():
    torch.manual_seed(0)
    e = hed_edges(ControlNetHED().eval(), _frames(n=1, h=16, w=24))
    assert e.shape == (1, 1, 16, 24) and 0 <= float(e.min()) <= float(e.max()) <= 1


def test_load_state_dict_file_refuses_non_tensor_content(tmp_path):
    torch.save({"a": [1, 2]}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="plain state dict"):
        load_state_dict_file(tmp_path / "x.pth")


def test_module_imports_only_stdlib_numpy_and_torch():
    code = ("import sys, corpus_anon.models.hed; "
            "bad = [m for m in ('cv2', 'pydantic', 'corpus_anon.config', 'diffusers', 'transformers', "
            "'safetensors') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
