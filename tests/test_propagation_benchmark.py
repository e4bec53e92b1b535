"""benchmarks/propagation.py: its known-motion ground truth is right, and its CPU smoke run works on a real clip."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(REPO, "benchmarks", "propagation.py")
    spec = importlib.util.spec_from_file_location("bench_propagation", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_propagation"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("scene_name", ["global", "nonrigid"])
def test_the_known_field_maps_each_frame_onto_the_other(bench, scene_name: str) -> None:
    import cv2

    w, h = 96, 72
    margin = int(math.ceil(0.3 * w))
    (base, patch), _ = bench.part1_images(w, h, margin)
    scene = next(s for s in bench.scenes(w, h) if s.name == scene_name)
    xs, ys = scene.grid()
    px, py = scene.psi_inv(7.0, xs, ys)
    qx, qy = scene.psi(7.0, px, py)
    assert np.abs(qx - xs).max() < 1e-3 and np.abs(qy - ys).max() < 1e-3  # psi_inv inverts psi
    j, k = 3, 8
    fj, fk = scene.render(j, base, patch, margin), scene.render(k, base, patch, margin)
    flow, valid = scene.true_flow(j, k)
    assert 0.5 < valid.mean() < 1.0  # some pixels are occluded or leave the frame, most are not
    assert np.hypot(flow[..., 0], flow[..., 1])[valid].max() > 5  # it does move
    mx, my = (xs + flow[..., 0]).astype(np.float32), (ys + flow[..., 1]).astype(np.float32)
    warped = cv2.remap(fk, mx, my, cv2.INTER_LINEAR)
    err = np.abs(warped.astype(float) - fj.astype(float)).mean(axis=2)
    inner = valid.copy()
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    # Frame k sampled at x + flow(x) is frame j, up to bilinear resampling of each render.
    assert np.median(err[inner]) < 6.0
    zero = np.abs(fk.astype(float) - fj.astype(float)).mean(axis=2)
    assert np.median(err[inner]) < 0.5 * np.median(zero[inner])


def test_quick_run_on_a_real_clip(bench) -> None:
    res = bench.main(["--quick"])
    part1, part2 = res["part1"], res["part2"]
    assert {r[2] for r in part1} == {"dis-medium", "raft-small"} == {r[2] for r in part2}
    for scene, _k, _cand, p, s, _pm, _sm, frac, epe in part1:
        assert scene == "global" and p > 22 and s > 0.85 and frac > 0 and epe < 1.5
    for video, _k, _cand, p, s, _pm, _sm, frac, _epe in part2:
        assert p > 25 and s > 0.9 and frac > 0  # the quick clip has motion between its keys
        megamind = os.path.isfile(os.path.join(bench.OPENCV_DATA, "Megamind.avi"))
        assert video.startswith("Megamind.avi" if megamind else "demo signer")
    for _scene, _cand, background_epe, patch_epe in res["spans"]:
        assert 0 < background_epe < 2 and patch_epe >= 0
    assert all(n > 0 for _s, n in res["timing"].values())


def test_part2_without_the_opencv_videos_says_how_to_install_them(bench) -> None:
    cands = bench.build_candidates(("dis",), "cpu")
    lines: list[str] = []
    rows = bench.run_part2(cands, 96, 3, (2,), "cpu", bench.OPENCV_VIDEOS, with_demo=True, log=lines.append,
                           data_dir="/nonexistent/opencv-doc")
    assert any("apt-get install opencv-doc" in m and "skipping Megamind.avi, tree.avi, vtest.avi" in m for m in lines)
    assert [r[0].split(" (")[0] for r in rows] == ["demo signer"]
    assert rows[0][3] > 25  # the demo signer's in-between frame is reconstructed
