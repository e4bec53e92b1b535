"""TPSMM reenactment: checkpoint compatibility with the public vox-256 format (keys, shapes, dtypes,
element counts), strict checkpoint I/O, the TPS and relative-motion maths, and the Reenactor contract.

The full-size model (~85M parameters) is built once and never run forward; forwards use the same
classes at width_scale 0.125 with the same key names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus_anon.models.reenact import Reenactor, adapt_movement_scale, convex_hull_area, relative_kp
from corpus_anon.models.tpsmm import (AntiAliasInterpolation2d, BGMotionPredictor, TPSMM, kp2gaussian, load_tpsmm,
                                      make_coordinate_grid, save_checkpoint, tps_fit, tps_grids, tps_warp)

TSV = (Path(__file__).resolve().parents[2] / "shared" / "design" / "checkpoints"
       / "tpsmm_vox256_state_dict.tsv")
needs_tsv = pytest.mark.skipif(not TSV.is_file(), reason=f"checkpoint key table {TSV} is not present")
TINY = 0.125
ENTRIES = ("kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor", "avd_network")


def _tsv_rows() -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    rows: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    for line in TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("module\t"):
            continue
        module, key, shape, dtype = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        rows.setdefault(module, []).append((key, dims, dtype))
    return rows


def _tsv_counts() -> dict[str, int]:
    header = " ".join(line.lstrip("# ") for line in TSV.read_text().splitlines() if line.startswith("#"))
    text = header.split("Parameter counts:")[1].split(".")[0]
    return {name: int(n.replace(",", "")) for name, n in re.findall(r"(\w+) ([\d,]+)", text)}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move norm affines and BatchNorm statistics off their constant init (zero-mean noise), so a
    round trip cannot pass by re-initialising; conv and linear weights are random already."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1:
                noise = (torch.rand(t.shape, generator=g) - 0.5) * 0.1
                t.mul_(1 + noise) if name.endswith("running_var") else t.add_(noise)


@pytest.fixture(scope="module")
def full_model() -> TPSMM:
    torch.manual_seed(0)
    return TPSMM.build(1.0, bg_predictor=True, avd_network=True)


@pytest.fixture(scope="module")
def tiny_model() -> TPSMM:
    torch.manual_seed(0)
    model = TPSMM.build(TINY, bg_predictor=True, avd_network=True)
    _perturb(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_forward(tiny_model: TPSMM) -> dict:
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(2, 3, 256, 256, generator=g)
    with torch.inference_mode():
        kp = tiny_model.kp_detector(frames)["fg_kp"]
        motion = tiny_model.dense_motion_network(frames, kp.flip(0), kp)
        out = tiny_model.inpainting_network(frames, motion)
    return {"kp": kp, "motion": motion, "out": out, "dense": tiny_model.dense_motion_network}


def _frames(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- checkpoint format (full size)

@needs_tsv
def test_full_size_entries_have_exactly_the_public_keys_shapes_and_dtypes(full_model):
    want = _tsv_rows()
    assert set(want) == set(ENTRIES)
    assert set(full_model.entries()) == set(ENTRIES)
    for name, module in full_model.entries().items():
        got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
               for k, v in module.state_dict().items()]
        assert got == want[name], name  # same keys in the checkpoint's order, shapes and dtypes


@needs_tsv
def test_full_size_element_counts_match_the_table_header(full_model):
    counts = _tsv_counts()
    assert set(counts) == set(ENTRIES)
    for name, module in full_model.entries().items():
        # the header counts every state-dict element (BatchNorm running stats and down.weight included)
        assert sum(v.numel() for v in module.state_dict().values()) == counts[name], name
    assert full_model.dense_motion_network.hourglass.out_channels == [1024, 2048, 1024, 512, 256, 148]
    assert full_model.width_scale == 1.0 and full_model.size_multiple == 128


def test_full_size_checkpoint_round_trips_exactly(full_model, tmp_path):
    path = save_checkpoint(full_model, tmp_path / "vox.pth.tar", epoch=99)
    back = load_tpsmm(path)
    assert set(back.entries()) == set(ENTRIES)
    assert not back.training and back.width_scale == 1.0
    for name, module in full_model.entries().items():
        ref, got = module.state_dict(), back.entries()[name].state_dict()
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref), name


# ---------------------------------------------------------------- strict loading (tiny)

def _tiny_ckpt(model: TPSMM) -> dict:
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in model.entries().items()}


def test_checkpoint_without_inpainting_network_is_refused(tiny_model, tmp_path):
    ckpt = _tiny_ckpt(tiny_model)
    del ckpt["inpainting_network"]
    torch.save(ckpt, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="lacks the 'inpainting_network' entry"):
        load_tpsmm(tmp_path / "c.pth")


@pytest.mark.parametrize("damage, message", [
    ("misshape", r"'dense_motion_network' key 'occlusion\.2\.weight' has shape \(1, 3, 7, 7\)"),
    ("drop", r"'inpainting_network' lacks key 'resblock\.3\.norm2\.bias'"),
    ("extra", r"'kp_detector' has unexpected key 'fg_encoder\.extra'"),
])
def test_checkpoint_with_a_bad_key_is_refused_naming_it(tiny_model, tmp_path, damage, message):
    ckpt = _tiny_ckpt(tiny_model)
    if damage == "misshape":
        ckpt["dense_motion_network"]["occlusion.2.weight"] = torch.zeros(1, 3, 7, 7)
    elif damage == "drop":
        del ckpt["inpainting_network"]["resblock.3.norm2.bias"]
    else:
        ckpt["kp_detector"]["fg_encoder.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=message):
        load_tpsmm(tmp_path / "c.pth")


def test_load_infers_widths_and_num_tps_and_ignores_optimizer_state(tmp_path):
    torch.manual_seed(3)
    model = TPSMM.build(0.0625, num_tps=6)
    ckpt = _tiny_ckpt(model)
    ckpt.update(optimizer={"state": {}, "param_groups": [{"lr": 2e-4}]},
                optimizer_bg_predictor={"state": {}}, epoch=7)
    torch.save(ckpt, tmp_path / "c.pth")
    back = load_tpsmm(tmp_path / "c.pth")
    assert back.width_scale == 0.0625
    assert back.kp_detector.num_tps == back.dense_motion_network.num_tps == 6
    assert back.inpainting_network.block_expansion == 4 and back.dense_motion_network.max_features == 64
    assert back.bg_predictor is None and back.avd_network is None
    sd = back.dense_motion_network.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt["dense_motion_network"].items())


def test_width_scale_must_give_whole_channels():
    with pytest.raises(ValueError, match="width_scale"):
        TPSMM.build(0.1)


# ---------------------------------------------------------------- tiny forward and round trip

def test_tiny_forward_shapes_and_ranges(tiny_forward):
    kp, motion, out = tiny_forward["kp"], tiny_forward["motion"], tiny_forward["out"]
    assert kp.shape == (2, 50, 2) and kp.abs().max() <= 1
    assert kp.std() > 0.05  # spread out, not saturated at the corners
    assert motion["deformation"].shape == (2, 64, 64, 2)
    assert motion["contribution_maps"].shape == (2, 11, 64, 64)
    torch.testing.assert_close(motion["contribution_maps"].sum(1), torch.ones(2, 64, 64))
    assert motion["deformed_source"].shape == (2, 11, 3, 64, 64)
    # the deformation is the contribution-weighted mix of the identity and the 10 TPS warps
    kp_d = kp.flip(0)
    transformations = tiny_forward["dense"].transformations(kp_d, kp, (64, 64))
    mix = (transformations * motion["contribution_maps"].unsqueeze(-1)).sum(1)
    torch.testing.assert_close(motion["deformation"], mix, rtol=0, atol=1e-6)
    assert (transformations[:, 1:] - transformations[:, :1]).abs().max() > 0.05  # warps differ
    assert [tuple(o.shape) for o in motion["occlusion_map"]] == [(2, 1, s, s) for s in (32, 64, 128, 256)]
    assert all(((o >= 0) & (o <= 1)).all() for o in motion["occlusion_map"])
    pred = out["prediction"]
    assert pred.shape == (2, 3, 256, 256) and pred.min() >= 0 and pred.max() <= 1
    assert pred.std() > 0.01  # not a constant image


def test_tiny_checkpoint_round_trips_with_identical_state_and_output(tiny_model, tmp_path):
    back = load_tpsmm(save_checkpoint(tiny_model, tmp_path / "tiny.pth.tar"))
    assert back.width_scale == TINY
    for name, module in tiny_model.entries().items():
        ref, got = module.state_dict(), back.entries()[name].state_dict()
        assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref), name
    frame = _frames(1, 128, seed=3)
    with torch.inference_mode():
        kp, kp_back = tiny_model.kp_detector(frame)["fg_kp"], back.kp_detector(frame)["fg_kp"]
        assert torch.equal(kp, kp_back)
        drive = kp.flip(1)
        pred, pred_back = tiny_model(frame, kp, drive)["prediction"], back(frame, kp, drive)["prediction"]
    assert torch.equal(pred, pred_back)


def test_dense_motion_is_the_identity_when_every_warp_is():
    # With an unregularised TPS and equal keypoints every transformation is the identity grid, so
    # any convex mix of them (the softmax contribution maps) is the identity too, whatever the weights.
    torch.manual_seed(5)
    model = TPSMM.build(0.0625)
    model.dense_motion_network.tps_regularization = 0.0
    source = _frames(1, 128, 24)
    with torch.inference_mode():
        kp = model.kp_detector(source)["fg_kp"]
        motion = model.dense_motion_network(source, kp, kp)
    torch.testing.assert_close(motion["deformation"], make_coordinate_grid(32, 32)[None], rtol=0, atol=1e-4)
    small = model.dense_motion_network.down(source)
    torch.testing.assert_close(motion["deformed_source"], small[:, None].expand(1, 11, 3, 32, 32),
                               rtol=0, atol=1e-4)


def _inpaint(model: TPSMM, source: torch.Tensor, deformation: torch.Tensor,
             occlusion: tuple[float, float, float, float]) -> dict:
    """Inpainting driven by a hand-made motion: constant occlusion per level (16..128 px at 128 px)."""
    motion = {"deformation": deformation,
              "occlusion_map": [torch.full((1, 1, s, s), v) for s, v in zip((16, 32, 64, 128), occlusion)]}
    with torch.inference_mode():
        return model.inpainting_network(source, motion)


def test_inpainting_blends_warps_and_skips_as_tpsmm_does(tiny_model):
    src_a, src_b = _frames(1, 128, 25), _frames(1, 128, 26)
    ident = make_coordinate_grid(32, 32)[None]
    mirror = ident * torch.tensor([-1.0, 1.0])  # read the source at -x: a horizontal flip
    # nothing occluded: the prediction is the warped source
    out = _inpaint(tiny_model, src_a, ident, (1, 1, 1, 1))
    torch.testing.assert_close(out["prediction"], src_a, rtol=0, atol=1e-4)
    torch.testing.assert_close(_inpaint(tiny_model, src_a, mirror, (1, 1, 1, 1))["prediction"],
                               src_a.flip(-1), rtol=0, atol=1e-4)
    # everything occluded: the decoder sees no source feature, so the output cannot depend on the source
    assert torch.equal(_inpaint(tiny_model, src_a, ident, (0, 0, 0, 0))["prediction"],
                       _inpaint(tiny_model, src_b, ident, (0, 0, 0, 0))["prediction"])
    # one encoder level visible at a time (the last at 0.5, so the decoder output still counts):
    # each level carries source features, warped by the deformation, into the decoded part
    for level in range(4):
        occ = tuple(0.5 if i == level == 3 else float(i == level) for i in range(4))

        def decoded(src: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
            o = _inpaint(tiny_model, src, deformation, occ)
            return o["prediction"] - occ[3] * o["deformed"]

        base = decoded(src_a, ident)
        assert (base - decoded(src_a, mirror)).abs().max() > 1e-3, f"level {level} is not warped"
        assert (base - decoded(src_b, ident)).abs().max() > 1e-3, f"level {level} carries no source"


def test_bg_predictor_starts_as_the_identity_affine():
    torch.manual_seed(4)
    bg = BGMotionPredictor(width=4).eval()
    with torch.inference_mode():
        out = bg(_frames(2, 64, 5), _frames(2, 64, 6))
    assert torch.equal(out, torch.eye(3).expand(2, 3, 3))


# ---------------------------------------------------------------- geometry

def test_coordinate_grid_and_gaussian_heatmap():
    grid = make_coordinate_grid(5, 9)
    assert grid.shape == (5, 9, 2)
    assert torch.equal(grid[0, 0], torch.tensor([-1.0, -1.0])) and torch.equal(grid[-1, -1], torch.tensor([1.0, 1.0]))
    assert torch.equal(grid[2, 4], torch.tensor([0.0, 0.0]))  # (x, y) order
    kp = torch.tensor([[[0.5, -0.5]]])  # x = 0.5 -> column 6 of 9, y = -0.5 -> row 1 of 5
    heat = kp2gaussian(kp, (5, 9), kp_variance=0.01)
    assert heat.shape == (1, 1, 5, 9)
    assert heat[0, 0, 1, 6] == 1.0 and heat.argmax() == 1 * 9 + 6
    torch.testing.assert_close(heat[0, 0, 1, 7], torch.tensor(np.exp(-0.5 * 0.25 ** 2 / 0.01), dtype=torch.float32))


def test_antialias_downsampling_kernel_and_output():
    down = AntiAliasInterpolation2d(3, 0.25)
    assert down.weight.shape == (3, 1, 13, 13)
    torch.testing.assert_close(down.weight.sum(dim=(1, 2, 3)), torch.ones(3))
    assert torch.equal(down.weight[0, 0], down.weight[0, 0].T) and down.weight[0, 0].argmax() == 6 * 13 + 6
    out = down(torch.full((1, 3, 256, 256), 0.7))
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], torch.full((1, 3, 60, 60), 0.7))  # zero padding at borders


def _random_kp(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.rand(b, n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


def test_tps_with_equal_points_is_the_identity_warp():
    kp = _random_kp(2, 50, 7).float()
    grids = tps_grids(kp, kp, (64, 64), regularization=0.0)
    assert grids.shape == (2, 10, 64, 64, 2)
    identity = make_coordinate_grid(64, 64).expand(2, 10, 64, 64, 2)
    torch.testing.assert_close(grids, identity, rtol=0, atol=1e-4)


def test_tps_reproduces_an_affine_map_everywhere():
    kp_from = _random_kp(1, 5, 8)
    a = torch.tensor([[1.1, -0.2], [0.15, 0.9]], dtype=torch.float64)
    t = torch.tensor([0.05, -0.1], dtype=torch.float64)
    kp_to = kp_from @ a.T + t
    affine, weights = tps_fit(kp_from, kp_to, regularization=0.0)
    torch.testing.assert_close(affine[0], torch.cat([a, t[:, None]], dim=1), rtol=0, atol=1e-8)
    assert weights.abs().max() < 1e-8
    pts = make_coordinate_grid(17, 17, dtype=torch.float64).view(-1, 2)
    torch.testing.assert_close(tps_warp(pts, kp_from, affine, weights)[0], pts @ a.T + t, rtol=0, atol=1e-8)


def test_tps_interpolates_control_points_and_solves_tpsmm_regularised_system():
    kp_from, kp_to = _random_kp(1, 5, 9), _random_kp(1, 5, 10)
    affine, weights = tps_fit(kp_from, kp_to, regularization=0.0)
    torch.testing.assert_close(tps_warp(kp_from[0], kp_from, affine, weights), kp_to, rtol=0, atol=1e-8)
    # default (TPSMM) solve: L + 0.01 I with L built here independently from the formula
    affine, weights = tps_fit(kp_from, kp_to)
    p = kp_from[0].numpy()
    r2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    q = np.hstack([p, np.ones((5, 1))])
    big = np.block([[r2 * np.log(r2 + 1e-9), q], [q.T, np.zeros((3, 3))]]) + 0.01 * np.eye(8)
    params = np.vstack([weights[0].numpy(), affine[0].numpy().T])
    np.testing.assert_allclose(big @ params, np.vstack([kp_to[0].numpy(), np.zeros((3, 2))]), atol=1e-10)
    assert not np.allclose(tps_warp(kp_from[0], kp_from, affine, weights)[0].numpy(), kp_to[0].numpy(), atol=1e-4)


def test_background_affine_moves_the_identity_transformation(tiny_model):
    dm = tiny_model.dense_motion_network
    kp = _random_kp(1, 50, 11).float()
    plain = dm.transformations(kp, kp, (8, 8))
    assert torch.equal(dm.transformations(kp, kp, (8, 8), torch.eye(3)[None]), plain)
    shift = torch.tensor([[[1.0, 0, 0.25], [0, 1.0, -0.5], [0, 0, 1.0]]])
    moved = dm.transformations(kp, kp, (8, 8), shift)
    torch.testing.assert_close(moved[:, 0], plain[:, 0] + torch.tensor([0.25, -0.5]))
    assert torch.equal(moved[:, 1:], plain[:, 1:])


# ---------------------------------------------------------------- relative motion

def test_convex_hull_area():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [0.2, 0.7]])
    assert convex_hull_area(square) == pytest.approx(1.0)
    assert convex_hull_area(np.array([[0, 0], [2, 0], [0, 1]])) == pytest.approx(1.0)
    assert convex_hull_area(torch.tensor([[0.0, 0], [1, 1], [2, 2]])) == 0.0  # collinear
    hexagon = np.array([[np.cos(a), np.sin(a)] for a in np.arange(6) * np.pi / 3])
    assert convex_hull_area(np.vstack([hexagon, hexagon * 0.3])) == pytest.approx(1.5 * np.sqrt(3))


def test_relative_kp_is_the_source_when_driving_is_the_initial_frame():
    kp_s, kp_d = _random_kp(1, 50, 12).float(), _random_kp(1, 50, 13).float()
    assert torch.equal(relative_kp(kp_s, kp_d, kp_d), kp_s)


def test_relative_kp_scales_a_driving_translation_by_the_hull_size_ratio():
    unit = torch.tensor([[[0.0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]]])
    initial = unit * 2 - 0.5  # a 2x square: area 4 vs 1 -> scale sqrt(1)/sqrt(4) = 0.5
    assert adapt_movement_scale(unit, initial) == pytest.approx(0.5)
    d = torch.tensor([0.2, -0.1])
    driving = torch.cat([initial + d, initial - 2 * d])  # two frames
    out = relative_kp(unit, driving, initial)
    torch.testing.assert_close(out, torch.cat([unit + 0.5 * d, unit - d]))
    with pytest.raises(ValueError, match="collinear"):
        relative_kp(unit, driving, torch.zeros(1, 5, 2))


# ---------------------------------------------------------------- Reenactor

@pytest.fixture(scope="module")
def reenactor(tiny_model: TPSMM) -> Reenactor:
    return Reenactor(tiny_model)


def test_animate_shape_range_determinism_and_batching(reenactor):
    # 128 px is the smallest side the architecture takes (size_multiple); it keeps the test quick.
    source, driving = _frames(1, 128, 20), _frames(3, 128, 21)
    a = reenactor.animate(source, driving, driving_initial_index=1, batch_size=2)
    assert a.shape == (3, 3, 128, 128) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    b = reenactor.animate(source, driving, driving_initial_index=1, batch_size=2)
    assert torch.equal(a, b)
    c = reenactor.animate(source, driving, driving_initial_index=1, batch_size=3)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-4)  # float32 summation order differs by batch
    assert (a[0] - a[2]).abs().max() > 0.01  # different driving frames give different output
    # the initial frame is driven by the source's own keypoints (kp_norm == kp_source)
    model = reenactor.model
    with torch.inference_mode():
        kp_s = model.kp_detector(source)["fg_kp"]
        direct = model(source, kp_s, kp_s)["prediction"]
    torch.testing.assert_close(a[1:2], direct, rtol=0, atol=1e-4)
    d = reenactor.animate(source, driving, driving_initial_index=0, batch_size=3)
    assert (d[1] - a[1]).abs().max() > 0.01  # the anchor frame matters


@pytest.mark.parametrize("mode", ["standard", "avd"])
def test_animate_standard_and_avd_modes_drive_with_their_keypoints(reenactor, mode):
    source, driving = _frames(1, 128, 22), _frames(1, 128, 23)
    out = reenactor.animate(source, driving, mode=mode)
    model = reenactor.model
    with torch.inference_mode():
        kp_s = model.kp_detector(source)["fg_kp"]
        kp_d = model.kp_detector(driving)["fg_kp"]
        kp_norm = kp_d if mode == "standard" else model.avd_network(kp_s, kp_d)
        direct = model(source, kp_s, kp_norm)["prediction"]
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-4)


def test_avd_mode_needs_an_avd_network():
    model = TPSMM.build(0.0625)
    with pytest.raises(ValueError, match="avd_network"):
        Reenactor(model).animate(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), mode="avd")


@pytest.mark.parametrize("kwargs, message", [
    ({"source": torch.rand(2, 3, 128, 128)}, "source must be a float tensor shaped"),
    ({"driving": torch.rand(2, 3, 96, 96)}, "multiples of 128"),
    ({"driving": torch.rand(2, 3, 256, 256)}, "differ in size"),
    ({"driving": torch.rand(2, 3, 128, 128) * 2}, r"values in \[0,1\]"),
    ({"driving_initial_index": 2}, r"driving_initial_index must be in \[0, 2\)"),
    ({"batch_size": 0}, "batch_size"),
    ({"mode": "magic"}, "mode must be one of"),
])
def test_animate_rejects_bad_input_in_one_sentence(reenactor, kwargs, message):
    args = {"source": torch.rand(1, 3, 128, 128), "driving": torch.rand(2, 3, 128, 128), **kwargs}
    with pytest.raises(ValueError, match=message):
        reenactor.animate(**args)


def test_module_imports_no_heavy_or_driver_libraries():
    code = ("import sys, corpus_anon.models.reenact, corpus_anon.models.tpsmm; "
            "print(','.join(m for m in ('scipy', 'cv2', 'torchvision', 'pydantic', 'corpus_anon.config') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
