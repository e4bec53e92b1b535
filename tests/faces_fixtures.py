"""Tiny ONNX models with buffalo_l's exact layouts, exported from torch for the face tests.

They load through insightface's own model zoo (routing by output count and input shape), so its
SCRFD decoder, NMS, `norm_crop` and `get_feat` run for real in the tests:

- `TinySCRFD` has det_10g's interface: input `input.1` (1, 3, ?, ?) normalised as
  (v - 127.5) / 128 in RGB, nine rank-2 outputs in insightface's order — scores (N, 1) for strides
  8/16/32, then box distances (N, 4), then keypoint offsets (N, 10), with N = (H/s)(W/s) x 2
  anchors and predictions in units of the stride. It "sees" bright pixels (channel mean above 0.5,
  i.e. roughly above 191 in 0-255): an anchor on a bright pixel scores 0.55-0.99 (more the more
  central it sits in its bright run) and regresses the edges of that run (row/column counts), so
  one bright square decodes to one box equal to the square after NMS, with five keypoints placed
  where the ArcFace template puts them in a square crop. Two squares must not share rows or
  columns.
- `TinyArcFace` has w600k_r50's interface: (B, 3, 112, 112) in, (B, 512) out. It is a fixed,
  seeded random projection of the 4x4-average-pooled, mean-centred crop, so identical crops give
  cosine 1 and unrelated textures cosine near 0. `arcface_reference` computes it in numpy.
- `TinyLandmark106` has 2d106det's interface: (1, 3, 192, 192) in, (1, 212) out: a fixed ring of
  106 points of radius 0.5 in crop units, so landmarks land on a ring about the box centre.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STRIDES = (8, 16, 32)
ANCHORS = 2
# insightface's ArcFace template (face_align.arcface_dst) in a 112x112 crop, as box fractions.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
KPS_FRACTIONS = ARCFACE_DST / 112.0
EMBED_DIM = 512
POOL = 4
RING_RADIUS = 0.5


class TinySCRFD(nn.Module):
    """Bright-square detector with SCRFD det_10g's input/output layout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fx", torch.from_numpy(KPS_FRACTIONS[:, 0].copy()).view(1, 5, 1, 1))
        self.register_buffer("fy", torch.from_numpy(KPS_FRACTIONS[:, 1].copy()).view(1, 5, 1, 1))

    @staticmethod
    def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
        """(1, C, h, w) -> (h * w * ANCHORS, C): insightface's location-major, anchor-minor order."""
        t = torch.cat([t] * ANCHORS, dim=1)
        return t.permute(0, 2, 3, 1).reshape(-1, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = (x.mean(dim=1, keepdim=True) > 0.5).float()
        cx, cy = torch.cumsum(m, dim=3), torch.cumsum(m, dim=2)
        left, top = cx - m, cy - m  # bright pixels strictly before this one in its row / column
        right, bottom = cx[..., -1:] - left, cy[..., -1:, :] - top
        scores, boxes, kps = [], [], []
        for s in STRIDES:
            ms, ls, ts, rs, bs = (t[..., ::s, ::s] for t in (m, left, top, right, bottom))
            # FCOS-style centre-ness: the anchor at the square's centre wins NMS, whose row and
            # column counts are not blurred by the resized square's edges.
            cx_ratio = torch.minimum(ls, rs) / torch.maximum(ls, rs).clamp(min=1.0)
            cy_ratio = torch.minimum(ts, bs) / torch.maximum(ts, bs).clamp(min=1.0)
            centre = torch.sqrt(cx_ratio * cy_ratio)
            scores.append(self._flat(ms * (0.55 + 0.44 * centre), 1))
            boxes.append(self._flat(torch.cat([ls, ts, rs, bs], dim=1) / s, 4))
            dx = (self.fx * (ls + rs) - ls) / s
            dy = (self.fy * (ts + bs) - ts) / s
            kps.append(self._flat(torch.stack([dx, dy], dim=2).flatten(1, 2), 10))
        return (*scores, *boxes, *kps)


def projection_matrix(seed: int = 0) -> np.ndarray:
    """The recognizer's fixed (3 * 28 * 28, 512) projection."""
    n_in = 3 * (112 // POOL) ** 2
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_in, EMBED_DIM)) / np.sqrt(n_in)).astype(np.float32)


class TinyArcFace(nn.Module):
    """Seeded random projection of the pooled, mean-centred aligned crop."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("proj", torch.from_numpy(projection_matrix(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = nn.functional.avg_pool2d(x, POOL).flatten(1)
        v = v - v.mean(dim=1, keepdim=True)
        return v @ self.proj


def arcface_reference(crop_rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    """What TinyArcFace returns (L2-normalised) for one 112x112 RGB uint8 crop, in numpy."""
    x = (crop_rgb.astype(np.float32) - 127.5) / 127.5
    x = x.transpose(2, 0, 1).reshape(3, 112 // POOL, POOL, 112 // POOL, POOL).mean(axis=(2, 4))
    v = x.reshape(-1)
    v = v - v.mean()
    e = v @ projection_matrix(seed)
    return e / np.linalg.norm(e)


def ring_points(n: int = 106) -> np.ndarray:
    """(n, 2) points on a circle of radius RING_RADIUS in [-1, 1] crop units."""
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return (RING_RADIUS * np.stack([np.cos(a), np.sin(a)], axis=1)).astype(np.float32)


class TinyLandmark106(nn.Module):
    """A constant ring of 106 points (the input only sets the batch size)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ring", torch.from_numpy(ring_points().reshape(1, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ring + 0.0 * x.mean(dim=(1, 2, 3)).unsqueeze(1)


def _export(module: nn.Module, shape: tuple[int, ...], path: Path, **kwargs: Any) -> Path:
    """TorchScript-based export (dynamo=False), without its deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.zeros(*shape),), str(path), dynamo=False, opset_version=17,
                          **kwargs)
    return path


def export_detector(path: Path) -> Path:
    """det_10g-layout ONNX at `path` (dynamic height and width, nine outputs)."""
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    axes: dict[str, dict[int, str]] = {"input.1": {2: "?", 3: "?"}}
    axes.update({n: {0: f"n{n}"} for n in names})
    return _export(TinySCRFD(), (1, 3, 64, 64), path, input_names=["input.1"], output_names=names,
                   dynamic_axes=axes)


def export_recognizer(path: Path, seed: int = 0) -> Path:
    """w600k_r50-layout ONNX at `path` (batch dynamic, 512 outputs)."""
    return _export(TinyArcFace(seed), (1, 3, 112, 112), path, input_names=["input.1"],
                   output_names=["embedding"], dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}})


def export_landmark(path: Path) -> Path:
    """2d106det-layout ONNX at `path`."""
    return _export(TinyLandmark106(), (1, 3, 192, 192), path, input_names=["data"], output_names=["fc1"])


def stage_buffalo(root: Path, landmark: bool = False) -> Path:
    """Write `<root>/models/buffalo_l/{det_10g,w600k_r50}.onnx` (+ 2d106det.onnx); returns root."""
    d = root / "models" / "buffalo_l"
    d.mkdir(parents=True, exist_ok=True)
    export_detector(d / "det_10g.onnx")
    export_recognizer(d / "w600k_r50.onnx")
    if landmark:
        export_landmark(d / "2d106det.onnx")
    return root


def square_image(
    squares: list[tuple[int, int, int]], size: tuple[int, int] = (640, 640), seed: int = 0
) -> np.ndarray:
    """Black RGB image with bright textured squares (x0, y0, side); texture 200-255 per channel."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size[0], size[1], 3), dtype=np.uint8)
    for x0, y0, side in squares:
        img[y0 : y0 + side, x0 : x0 + side] = rng.integers(200, 256, (side, side, 3), dtype=np.uint8)
    return img
