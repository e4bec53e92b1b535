"""TPSMM fine-tuning losses and the VGG-19 feature extractor (corpus_anon/finetune/{losses,vgg}.py).

Tiny widths and 128 px frames (the smallest the pyramid's 1/8 scale takes through VGG-19's four
pools); the keypoint detectors of the equivariance tests are built to be (or not be) equivariant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from corpus_anon.finetune.losses import (ImagePyramid, RandomTPS, bg_loss, equivariance_loss, perceptual_loss,
                                         warp_loss)
from corpus_anon.models.vgg import Vgg19Features, load_vgg19, save_vgg19
from corpus_anon.models.tpsmm import InpaintingNetwork, make_coordinate_grid

TINY = 0.125
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread is faster than two on a shared 2-core machine (and far faster under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frames(b: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vgg() -> Vgg19Features:
    torch.manual_seed(0)
    return Vgg19Features(TINY)


# ---------------------------------------------------------------------------------------------
# VGG-19
# ---------------------------------------------------------------------------------------------

def test_vgg_has_torchvision_keys_and_shapes_at_full_width():
    with torch.device("meta"):
        model = Vgg19Features(1.0)
    sd = model.state_dict()
    assert list(sd) == [f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")]
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.5.weight"].shape == (128, 64, 3, 3)
    assert sd["features.10.weight"].shape == (256, 128, 3, 3)
    assert sd["features.19.weight"].shape == (512, 256, 3, 3)
    assert sd["features.34.weight"].shape == (512, 512, 3, 3)
    assert sum(v.numel() for v in sd.values()) == 20_024_384  # torchvision vgg19().features


def test_vgg_forward_gives_five_relu_slices_of_normalised_input(vgg):
    x = _frames(2, 64, 1)
    maps = vgg(x)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 64, 64), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8),
                                              (2, 64, 4, 4)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv = vgg.features[0]
    torch.testing.assert_close(maps[0], torch.relu(conv((x - mean) / std)))
    assert all((m >= 0).all() for m in maps)
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training


def test_vgg_save_load_round_trip_is_strict(vgg, tmp_path):
    path = save_vgg19(vgg, tmp_path / "vgg.pth")
    back = load_vgg19(path)
    assert back.width_scale == TINY and not back.training
    assert not any(p.requires_grad for p in back.parameters())
    x = _frames(1, 32, 2)
    for a, b in zip(vgg(x), back(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vgg_file_with_classifier_keys_loads(vgg, tmp_path):
    sd = dict(vgg.state_dict())
    sd["classifier.0.weight"] = torch.zeros(4, 7)
    sd["classifier.6.bias"] = torch.zeros(10)
    torch.save(sd, tmp_path / "vgg19-full.pth")
    back = load_vgg19(tmp_path / "vgg19-full.pth")
    torch.testing.assert_close(back.features[34].weight, vgg.features[34].weight, rtol=0, atol=0)


@pytest.mark.parametrize("change, key", [
    (lambda sd: sd.pop("features.32.bias"), "features.32.bias"),
    (lambda sd: sd.__setitem__("features.21.weight", torch.zeros(64, 64, 1, 1)), "features.21.weight"),
    (lambda sd: sd.__setitem__("fc.weight", torch.zeros(2, 2)), "fc.weight"),
])
def test_vgg_file_with_a_bad_key_is_refused_naming_it(vgg, tmp_path, change, key):
    sd = dict(vgg.state_dict())
    change(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_vgg19(tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------
# Pyramid and perceptual loss
# ---------------------------------------------------------------------------------------------

def test_image_pyramid_scales():
    x = _frames(2, 128, 3)
    levels = ImagePyramid()(x)
    assert [tuple(t.shape[-2:]) for t in levels] == [(128, 128), (64, 64), (32, 32), (16, 16)]
    assert levels[0] is x
    assert levels[3].std() < 0.5 * x.std()  # anti-aliased (blurred) before subsampling, not just subsampled


def test_perceptual_loss_is_zero_for_identical_and_positive_for_different_frames(vgg):
    pyramid = ImagePyramid()
    weights = [10.0] * 5
    a, b = _frames(2, 128, 4), _frames(2, 128, 5)
    same = perceptual_loss(vgg, pyramid(a), pyramid(a.clone()), weights)
    assert same.ndim == 0 and same.item() == 0.0
    pred = b.clone().requires_grad_(True)
    diff = perceptual_loss(vgg, pyramid(pred), pyramid(a), weights)
    assert diff.item() > 0.0
    half = perceptual_loss(vgg, pyramid(b), pyramid(a), [5.0] * 5)
    torch.testing.assert_close(half, diff.detach() / 2)
    diff.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())


# ---------------------------------------------------------------------------------------------
# Equivariance
# ---------------------------------------------------------------------------------------------

class CentroidKP(nn.Module):
    """Equivariant by construction: keypoint c = the intensity centroid of channel c (one blob each)."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        grid = make_coordinate_grid(h, w, dtype=image.dtype)
        weights = image.clamp_min(0)
        kp = (weights[..., None] * grid).sum((2, 3)) / weights.sum((2, 3))[..., None]
        return {"fg_kp": kp}


class FixedKP(nn.Module):
    """Not equivariant: the same keypoints whatever the image."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        kp = torch.tensor([[-0.4, -0.3], [0.35, 0.1], [0.0, 0.45]], dtype=image.dtype)
        return {"fg_kp": kp.expand(image.shape[0], 3, 2)}


def _blobs(b: int, size: int, seed: int, sigma: float = 0.04) -> torch.Tensor:
    """One Gaussian blob per channel on black, centres in [-0.5, 0.5]^2."""
    centres = torch.rand(b, 3, 2, generator=torch.Generator().manual_seed(seed)) - 0.5
    grid = make_coordinate_grid(size, size)
    d2 = ((grid[None, None] - centres[:, :, None, None, :]) ** 2).sum(-1)
    return torch.exp(-0.5 * d2 / sigma ** 2)


def test_random_tps_is_not_the_identity_and_warps_frames_by_warp_coordinates():
    transform = RandomTPS(3, generator=torch.Generator().manual_seed(0))
    grid = make_coordinate_grid(9, 9).view(1, -1, 2)
    moved = transform.warp_coordinates(grid)
    assert moved.shape == (3, 81, 2)
    assert (moved - grid).abs().mean() > 0.01
    # The transformed frame at p is the original at warp_coordinates(p): check on a linear ramp image.
    size = 33
    ramp = make_coordinate_grid(size, size).permute(2, 0, 1).unsqueeze(0).expand(3, 2, size, size)
    out = transform.transform_frame(ramp.contiguous())
    inside = moved.view(3, 9, 9, 2).abs().amax(-1) < 1  # reflection padding only beyond the border
    expected = moved.view(3, 9, 9, 2).permute(0, 3, 1, 2)
    got = out[:, :, ::4, ::4]
    torch.testing.assert_close(got.permute(0, 2, 3, 1)[inside], expected.permute(0, 2, 3, 1)[inside],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivariance_loss_is_near_zero_only_for_an_equivariant_detector(seed):
    frames = _blobs(4, 128, seed)
    transform = RandomTPS(4, generator=torch.Generator().manual_seed(100 + seed))
    good = equivariance_loss(CentroidKP(), frames, transform)
    bad = equivariance_loss(FixedKP(), frames, transform)
    assert good.ndim == 0 and bad.ndim == 0
    assert good.item() < 1e-3
    assert bad.item() > 10 * good.item()
    kp = CentroidKP()(frames)["fg_kp"]
    torch.testing.assert_close(equivariance_loss(CentroidKP(), frames, transform, kp_driving=kp), good)


# ---------------------------------------------------------------------------------------------
# Warp and background losses
# ---------------------------------------------------------------------------------------------

def _identity_motion(b: int, size: int, occlusion: float = 1.0) -> dict:
    deformation = make_coordinate_grid(size // 4, size // 4).expand(b, size // 4, size // 4, 2).clone()
    occ = [torch.full((b, 1, s, s), occlusion) for s in (size // 8, size // 4, size // 2, size)]
    return {"deformation": deformation.requires_grad_(True), "occlusion_map": occ}


def test_warp_loss_vanishes_for_identity_motion_of_the_same_frame_and_trains_only_the_motion():
    torch.manual_seed(0)
    net = InpaintingNetwork(3, 8, 64, 3)
    a, b = _frames(2, 64, 6), _frames(2, 64, 7)
    motion = _identity_motion(2, 64)
    same = warp_loss(net, a, net.encode(a), motion)
    assert same.ndim == 0 and same.item() < 1e-5
    diff = warp_loss(net, b, net.encode(a), motion)
    assert diff.item() > 1e-2
    # A zero occlusion masks everything out.
    assert warp_loss(net, b, net.encode(a), _identity_motion(2, 64, occlusion=0.0)).item() == 0.0
    diff.backward()
    assert motion["deformation"].grad is not None and motion["deformation"].grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_warp_loss_refuses_mismatched_levels():
    net = InpaintingNetwork(3, 8, 64, 3)
    a = _frames(1, 64, 8)
    motion = _identity_motion(1, 64)
    motion["occlusion_map"] = motion["occlusion_map"][:3]
    with pytest.raises(ValueError, match="one occlusion map per encoder level"):
        warp_loss(net, a, net.encode(a), motion)


def test_bg_loss_is_zero_for_inverse_affines_and_positive_otherwise():
    m = torch.tensor([[1.1, 0.1, 0.05], [-0.05, 0.95, 0.02], [0.0, 0.0, 1.0]])
    src, drv = _frames(2, 64, 9), _frames(2, 64, 10)

    def inverse_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (m if a is src else torch.linalg.inv(m)).expand(a.shape[0], 3, 3)

    def same_both_ways(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return m.expand(a.shape[0], 3, 3)

    assert bg_loss(inverse_pair, src, drv).item() < 1e-6
    value = bg_loss(same_both_ways, src, drv)
    torch.testing.assert_close(value, (torch.eye(3) - m @ m).abs().mean())
    assert value.item() > 0.01
