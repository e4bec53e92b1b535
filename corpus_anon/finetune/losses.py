"""TPSMM's training losses (METHOD.md §8.5), each returning a scalar tensor.

- perceptual: L1 between VGG-19 relu maps of the prediction and the driving frame, per slice
  weight, summed over an image pyramid (scales 1, 1/2, 1/4, 1/8);
- equivariance: keypoints of the driving frame against those of a randomly TPS-warped copy,
  mapped back through the warp;
- warp: the driving frame's inpainting-encoder maps against the source's maps warped by the
  predicted motion, both times the occlusion masks (only the motion gets gradients);
- bg: the background affine of (source, driving) times that of (driving, source) against I.

Only torch and the project's TPSMM module are imported: the GPU check runs this module on a
machine that has nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from corpus_anon.models.tpsmm import AntiAliasInterpolation2d, InpaintingNetwork, make_coordinate_grid

PYRAMID_SCALES: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
SIGMA_AFFINE = 0.05
SIGMA_TPS = 0.005
POINTS_TPS = 5
# Keeps r^2 log r^2 finite at r = 0 (TPSMM's value).
_LOG_EPS = 1e-9


class ImagePyramid(nn.Module):
    """Anti-aliased downscaled copies of a frame, one per scale (scale 1 is the frame itself)."""

    def __init__(self, scales: Sequence[float] = PYRAMID_SCALES, num_channels: int = 3) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"pyramid scales must be in (0, 1], got {list(scales)}.")
        self.downs = nn.ModuleList(AntiAliasInterpolation2d(num_channels, s) for s in self.scales)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [down(image) for down in self.downs]


def perceptual_loss(vgg: Callable[[torch.Tensor], Sequence[torch.Tensor]], pred_pyramid: Sequence[torch.Tensor],
                    real_pyramid: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sum over scales and relu slices of weight_i x mean |vgg(pred)_i - vgg(real)_i| (real side detached)."""
    if len(pred_pyramid) != len(real_pyramid) or not pred_pyramid:
        raise ValueError(f"perceptual_loss needs two pyramids of equal, non-zero length, got "
                         f"{len(pred_pyramid)} and {len(real_pyramid)}.")
    total = pred_pyramid[0].new_zeros(())
    for pred, real in zip(pred_pyramid, real_pyramid):
        pred_maps = vgg(pred)
        with torch.no_grad():
            real_maps = vgg(real)
        if len(pred_maps) != len(weights):
            raise ValueError(f"perceptual_loss has {len(weights)} weights for {len(pred_maps)} VGG slices.")
        for w, a, b in zip(weights, pred_maps, real_maps):
            if w:
                total = total + float(w) * (a - b).abs().mean()
    return total


class RandomTPS:
    """A random affine + thin-plate-spline warp per batch item (TPSMM's equivariance transform).

    `warp_coordinates` maps (x, y) in [-1,1] of the *transformed* frame to the original frame's,
    so `transform_frame(img)` at p is img at `warp_coordinates(p)` (grid_sample, reflection
    padding). The spline uses a points_tps x points_tps grid of control points with scalar
    weights added to both coordinates, as TPSMM does. Parameters are drawn on the CPU (from
    `generator` when given, else torch's global generator) so runs repeat across devices.
    """

    def __init__(self, batch_size: int, sigma_affine: float = SIGMA_AFFINE, sigma_tps: float = SIGMA_TPS,
                 points_tps: int = POINTS_TPS, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> None:
        if batch_size < 1 or points_tps < 1:
            raise ValueError(f"RandomTPS needs batch_size and points_tps >= 1, got {batch_size} and {points_tps}.")
        self.batch_size = batch_size
        noise = torch.randn(batch_size, 2, 3, generator=generator) * sigma_affine
        self.theta = (torch.eye(2, 3).unsqueeze(0) + noise).to(device, dtype)
        self.control_points = make_coordinate_grid(points_tps, points_tps).view(-1, 2).to(device, dtype)
        params = torch.randn(batch_size, points_tps ** 2, generator=generator) * sigma_tps
        self.control_params = params.to(device, dtype)

    def warp_coordinates(self, coordinates: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) (or (1, N, 2), broadcast) transformed-frame coordinates -> original-frame coordinates."""
        if coordinates.ndim != 3 or coordinates.shape[-1] != 2 or coordinates.shape[0] not in (1, self.batch_size):
            raise ValueError(f"warp_coordinates takes coordinates shaped ({self.batch_size}, N, 2), "
                             f"got {tuple(coordinates.shape)}.")
        theta = self.theta.to(coordinates.device, coordinates.dtype)
        points = self.control_points.to(coordinates.device, coordinates.dtype)
        params = self.control_params.to(coordinates.device, coordinates.dtype)
        affine = coordinates @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
        d2 = ((coordinates[:, :, None, :] - points[None, None]) ** 2).sum(-1)
        radial = (d2 * torch.log(d2 + _LOG_EPS) * params[:, None, :]).sum(-1, keepdim=True)
        return affine + radial

    def transform_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """The frames (B, C, H, W) seen through the warp."""
        b, _, h, w = frame.shape
        if b != self.batch_size:
            raise ValueError(f"transform_frame got {b} frames for a transform of batch {self.batch_size}.")
        grid = make_coordinate_grid(h, w, device=frame.device, dtype=frame.dtype).view(1, h * w, 2)
        grid = self.warp_coordinates(grid).view(b, h, w, 2)
        return F.grid_sample(frame, grid, padding_mode="reflection", align_corners=True)


def equivariance_loss(kp_detector: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], driving: torch.Tensor,
                      transform: RandomTPS, kp_driving: torch.Tensor | None = None) -> torch.Tensor:
    """mean |kp(driving) - warp_coordinates(kp(transform(driving)))| over keypoints (B, N, 2).

    `kp_driving` reuses already-computed keypoints of `driving` instead of detecting them again.
    """
    if kp_driving is None:
        kp_driving = kp_detector(driving)["fg_kp"]
    transformed_kp = kp_detector(transform.transform_frame(driving))["fg_kp"]
    return (kp_driving - transform.warp_coordinates(transformed_kp)).abs().mean()


def warp_loss(inpainting_network: InpaintingNetwork, driving: torch.Tensor, source_maps: Sequence[torch.Tensor],
              dense_motion: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor:
    """Sum over encoder levels of mean |enc(driving)_l x occ_l - warp(enc(source)_l) x occ_l|.

    `source_maps` are the inpainting encoder's maps of the source, fine to coarse (`encode`);
    the occlusion maps (coarse to fine) pair with them by size. The encoder maps and occlusion
    maps are detached, as in TPSMM: only the deformation (keypoints, dense motion) learns from it.
    """
    occlusion = list(dense_motion["occlusion_map"])
    deformation = dense_motion["deformation"]
    with torch.no_grad():
        driving_maps = inpainting_network.encode(driving)
    if not len(driving_maps) == len(source_maps) == len(occlusion):
        raise ValueError(f"warp_loss needs one occlusion map per encoder level, got {len(occlusion)} for "
                         f"{len(source_maps)} source and {len(driving_maps)} driving maps.")
    total = driving.new_zeros(())
    for i, (drv, src) in enumerate(zip(driving_maps, source_maps)):
        occ = occlusion[-(i + 1)].detach()
        if occ.shape[-2:] != drv.shape[-2:] or src.shape[-2:] != drv.shape[-2:]:
            raise ValueError(f"warp_loss level {i}: occlusion {tuple(occ.shape[-2:])}, source "
                             f"{tuple(src.shape[-2:])} and driving {tuple(drv.shape[-2:])} maps differ in size.")
        warped = inpainting_network.deform_input(src.detach(), deformation) * occ
        total = total + (drv * occ - warped).abs().mean()
    return total


def bg_loss(bg_predictor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], source: torch.Tensor,
            driving: torch.Tensor, bg_param: torch.Tensor | None = None) -> torch.Tensor:
    """mean |I - A(source, driving) . A(driving, source)| over the batch's 3x3 background affines.

    `bg_param` reuses an already-predicted A(source, driving).
    """
    if bg_param is None:
        bg_param = bg_predictor(source, driving)
    reverse = bg_predictor(driving, source)
    eye = torch.eye(3, dtype=bg_param.dtype, device=bg_param.device)
    return (eye - bg_param @ reverse).abs().mean()
