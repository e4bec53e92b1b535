"""corpus_anon.models.flow: DIS flow, backward warping, occlusion and blend masks on tiny synthetic frames."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corpus_anon.models import flow as fl


def texture(h: int, w: int, seed: int, scale: int = 4) -> np.ndarray:
    """Smooth random colour texture, uint8 (H, W, 3): blobs of about ``scale`` px, good for flow."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // scale + 3, w // scale + 3, generator=g)
    t = F.interpolate(base, scale_factor=scale, mode="bicubic", align_corners=False)[0, :, :h, :w]
    return (t * 255).clamp(0, 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def const_flow(dx: float, dy: float, h: int, w: int) -> torch.Tensor:
    """(1, 2, H, W) flow that is (dx, dy) everywhere."""
    f = torch.zeros(1, 2, h, w)
    f[:, 0], f[:, 1] = dx, dy
    return f


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_reproduces_integer_translation(mode: str) -> None:
    h, w = 64, 80
    ref = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    out = fl.warp(ref, const_flow(3, -2, h, w), mode=mode)  # out(x, y) = ref(x + 3, y - 2)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out[:, :, 2:, : w - 3], ref[:, :, : h - 2, 3:], atol=1e-5, rtol=0)
    # Zeros padding: samples from outside the frame are 0.
    assert out[:, :, :, w - 2 :].abs().max() == 0
    assert out[:, :, :1, :].abs().max() == 0


def test_warp_half_pixel_is_bilinear_average() -> None:
    ref = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = fl.warp(ref, const_flow(0.5, 0, 16, 16))
    torch.testing.assert_close(out[..., :-1], 0.5 * (ref[..., :-1] + ref[..., 1:]), atol=1e-5, rtol=0)


def test_warp_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        fl.warp(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError):
        fl.warp(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 2, 8, 8))


def test_dis_flow_recovers_translation() -> None:
    big = texture(96, 96, seed=0)
    src = big[10:74, 10:74]
    dst = big[12:76, 7:71]  # src(x, y) = dst(x + 3, y - 2)
    f = fl.dis_flow(src, dst)
    assert f.shape == (64, 64, 2) and f.dtype == np.float32
    interior = f[8:-8, 8:-8].reshape(-1, 2)
    np.testing.assert_allclose(np.median(interior, axis=0), [3.0, -2.0], atol=0.25)
    assert np.mean(np.abs(interior - [3.0, -2.0]).max(axis=1) < 0.5) > 0.95


def test_backward_flows_directions_and_warp_alignment() -> None:
    big = texture(96, 96, seed=5)
    cur, ref = big[10:74, 10:74], big[12:76, 7:71]  # cur(x) = ref(x + (3, -2))
    f_b, f_f = fl.backward_flows(cur, ref)
    assert f_b.shape == f_f.shape == (1, 2, 64, 64) and f_b.dtype == torch.float32
    assert torch.allclose(f_b[0, :, 8:-8, 8:-8].median(dim=-1).values.median(dim=-1).values,
                          torch.tensor([3.0, -2.0]), atol=0.25)
    assert torch.allclose(f_f[0, :, 8:-8, 8:-8].median(dim=-1).values.median(dim=-1).values,
                          torch.tensor([-3.0, 2.0]), atol=0.25)
    ref_t = torch.from_numpy(ref).permute(2, 0, 1)[None].float()
    cur_t = torch.from_numpy(cur).permute(2, 0, 1)[None].float()
    err_warped = (fl.warp(ref_t, f_b) - cur_t)[..., 8:-8, 8:-8].abs().mean()
    err_plain = (ref_t - cur_t)[..., 8:-8, 8:-8].abs().mean()
    assert err_warped < 3.0 and err_warped < 0.1 * err_plain


def test_dis_flow_rejects_bad_input() -> None:
    img = texture(32, 32, seed=1)
    with pytest.raises(ValueError):
        fl.dis_flow(img.astype(np.float32), img)
    with pytest.raises(ValueError):
        fl.dis_flow(img, img[:16])
    with pytest.raises(ValueError):
        fl.dis_flow(img, img, preset="slow")


def test_occlusion_analytic_moving_square() -> None:
    # A 20 px square moves +6 px in x; the background is static.
    h, w, x0, d = 48, 64, 20, 6
    f_b = torch.zeros(1, 2, h, w)
    f_f = torch.zeros(1, 2, h, w)
    f_b[:, 0, 14:34, x0 + d : x0 + d + 20] = -d  # current square → where it was
    f_f[:, 0, 14:34, x0 : x0 + 20] = d  # reference square → where it goes
    occ = fl.occlusion(f_b, f_f)
    assert occ.shape == (1, 1, h, w)
    expected = torch.zeros(h, w)
    expected[14:34, x0 : x0 + d] = 1  # background uncovered in the current frame
    assert torch.equal(occ[0, 0], expected)


def test_occlusion_marks_disoccluded_strip_with_dis() -> None:
    bg = texture(96, 96, seed=1)
    sq = 255 - texture(32, 32, seed=101)
    ref, cur = bg.copy(), bg.copy()
    ref[36:68, 20:52] = sq
    cur[36:68, 26:58] = sq  # square moved +6 px: cur columns 20..25 show background hidden in ref
    occ = fl.flow_pair(cur, ref).occ[0, 0].numpy()
    assert occ[38:66, 21:25].mean() > 0.5
    far = np.ones_like(occ, dtype=bool)
    far[30:74, 14:64] = False
    assert occ[far].mean() < 0.01


def test_identical_frames_have_no_occlusion() -> None:
    img = texture(64, 64, seed=3)
    pair = fl.flow_pair(img, img)
    assert pair.f_b.abs().max() < 0.05 and pair.f_f.abs().max() < 0.05
    assert pair.occ.sum() == 0 and pair.mask.sum() == 0


def test_blend_mask_range_spread_and_reference() -> None:
    occ = torch.zeros(1, 1, 64, 64)
    occ[0, 0, 28:34, 30:36] = 1
    m = fl.blend_mask(occ)
    assert m.shape == occ.shape
    assert m.min() >= 0 and m.max() <= 1
    assert torch.all(m >= occ)
    assert m[0, 0, 28:34, 30:36].eq(1).all()
    assert (m[occ == 0] > 0).sum() > 0  # spreads beyond occ ...
    assert m[0, 0, :20].abs().max() == 0 and m[0, 0, :, 44:].abs().max() == 0  # ... by at most 8 px
    # Same formula with OpenCV: 9x9 dilation, Gaussian k=9 sigma=18 with reflect-101 borders.
    o = occ[0, 0].numpy()
    ref = cv2.GaussianBlur(cv2.dilate(o, np.ones((9, 9), np.uint8)), (9, 9), 18,
                           borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(m[0, 0].numpy(), np.clip(ref + o, 0, 1), atol=1e-5)


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    x = torch.full((1, 2, 20, 24), 0.7)
    torch.testing.assert_close(fl.gaussian_blur(x, 9, 18.0), x)
    k = fl.gaussian_kernel1d(9, 18.0)
    assert k.shape == (9,) and abs(float(k.sum()) - 1) < 1e-6 and k[4] == k.max()


def test_to_latent_shapes_and_scaling() -> None:
    flow = const_flow(8, -16, 64, 96)
    mask = torch.zeros(1, 1, 64, 96)
    mask[0, 0, 10, 20] = 0.3
    lf, keep = fl.to_latent(flow, mask)
    assert lf.shape == (1, 2, 8, 12) and keep.shape == (1, 1, 8, 12)
    torch.testing.assert_close(lf, const_flow(1, -2, 8, 12))
    expected = torch.ones(1, 1, 8, 12)
    expected[0, 0, 1, 2] = 0.7
    torch.testing.assert_close(keep, expected)
    with pytest.raises(ValueError):
        fl.to_latent(const_flow(0, 0, 60, 64), torch.zeros(1, 1, 60, 64))


def test_flow_pair_is_thread_safe() -> None:
    big = texture(96, 96, seed=4)
    pairs = [(big[s : s + 64, 8:72], big[8:72, s : s + 64]) for s in (4, 6, 8, 10)]
    serial = [fl.flow_pair(c, r) for c, r in pairs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda cr: fl.flow_pair(*cr), pairs))
    for a, b in zip(serial, threaded):
        torch.testing.assert_close(a.f_b, b.f_b, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.occ, b.occ)
        torch.testing.assert_close(a.mask, b.mask, atol=1e-5, rtol=0)


def test_dis_flow_does_not_depend_on_the_frames_before() -> None:
    """OpenCV's DIS keeps settings it changed on a small frame: a flow must not depend on what the
    thread computed before (a 32x32 pair first moved later 64x64 flows by up to 0.97 px)."""
    big = texture(96, 96, seed=4)
    pairs = [(big[s : s + 64, 8:72], big[8:72, s : s + 64]) for s in (4, 6, 8, 10)]

    def in_a_new_thread(first: np.ndarray | None) -> list[np.ndarray]:
        def run() -> list[np.ndarray]:
            if first is not None:
                fl.dis_flow(first, first)
            return [fl.dis_flow(c, r) for c, r in pairs]

        with ThreadPoolExecutor(max_workers=1) as pool:  # a fresh thread: no DIS instance yet
            return pool.submit(run).result()

    fresh = in_a_new_thread(None)
    after_small = in_a_new_thread(texture(32, 32, seed=14))
    for a, b in zip(fresh, after_small):
        np.testing.assert_array_equal(a, b)
    # the history mattered before the fix: an instance used on the small pair first gives other flows
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    small = cv2.cvtColor(texture(32, 32, seed=14), cv2.COLOR_RGB2GRAY)
    dis.calc(small, small, None)
    gray = [(cv2.cvtColor(np.ascontiguousarray(c), cv2.COLOR_RGB2GRAY),
             cv2.cvtColor(np.ascontiguousarray(r), cv2.COLOR_RGB2GRAY)) for c, r in pairs]
    assert max(float(np.abs(dis.calc(c, r, None) - f).max()) for (c, r), f in zip(gray, fresh)) > 0.1


def test_module_imports_only_stdlib_numpy_torch() -> None:
    code = (
        "import sys\n"
        "for m in ('cv2', 'pydantic', 'corpus_anon.config'): sys.modules[m] = None\n"
        "import corpus_anon.models.flow\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
