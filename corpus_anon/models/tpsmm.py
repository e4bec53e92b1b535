"""The Thin-Plate Spline Motion Model (TPSMM; Zhao & Zhang, CVPR 2022): its networks and its checkpoints.

Written from the published architecture (METHOD.md §8) so that the public vox-256 checkpoint
`vox.pth.tar` (and fine-tunes of it) load with `strict=True`: a ResNet-18 keypoint detector
(10 TPS transformations x 5 keypoints), a dense motion network that mixes the TPS warps and
predicts multi-resolution occlusion masks at a quarter of the input size, and an inpainting
network that warps the source's encoder features and decodes the driven frame. Reenactment with
it (relative motion, batched animation) is `corpus_anon.models.reenact`.

`TPSMM.build(width_scale)` builds the same modules with every width scaled, so the tiny profile
and tests share the real classes and key names. Only stdlib, numpy and torch are imported here:
the GPU check imports this module on a machine that has nothing else.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from corpus_anon.models.checkpoints import first_mismatch

log = logging.getLogger(__name__)

NUM_TPS = 10
POINTS_PER_TPS = 5
KP_VARIANCE = 0.01
TPS_REGULARIZATION = 0.01
# Keeps r^2 log r^2 finite at r = 0 (the value TPSMM uses).
TPS_LOG_EPS = 1e-9
REQUIRED_ENTRIES: tuple[str, ...] = ("kp_detector", "dense_motion_network", "inpainting_network")
OPTIONAL_ENTRIES: tuple[str, ...] = ("bg_predictor", "avd_network")
# vox-256 widths at width_scale 1.0.
VOX_BLOCK_EXPANSION = 64
VOX_GENERATOR_MAX_FEATURES = 512
VOX_DENSE_MAX_FEATURES = 1024
VOX_DENSE_NUM_BLOCKS = 5
VOX_SCALE_FACTOR = 0.25
VOX_AVD_HIDDEN: tuple[int, int, int] = (256, 512, 1024)
VOX_AVD_BOTTLE = 128


# --------------------------------------------------------------------------------------------
# Building blocks (TPSMM modules/util.py parameter names)
# --------------------------------------------------------------------------------------------

class SameBlock2d(nn.Module):
    """Conv + InstanceNorm(affine) + ReLU at the same resolution."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """Conv + InstanceNorm(affine) + ReLU, then a 2x2 average pool (halves the resolution)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class UpBlock2d(nn.Module):
    """Nearest 2x upsampling, then conv + InstanceNorm(affine) + ReLU."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.InstanceNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2))))


class ResBlock2d(nn.Module):
    """Pre-activation residual block: norm1 -> ReLU -> conv1 -> norm2 -> ReLU -> conv2, plus the input."""

    def __init__(self, features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(features, features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.InstanceNorm2d(features, affine=True)
        self.norm2 = nn.InstanceNorm2d(features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1)/2) then nearest resampling by `scale`.

    The depthwise kernel is a registered buffer `weight` (C,1,k,k) because the checkpoint stores it.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        sigma = (1.0 / scale - 1.0) / 2.0
        size = 2 * round(sigma * 4) + 1
        self.ka = size // 2
        self.kb = self.ka - 1 if size % 2 == 0 else self.ka
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-coords ** 2 / (2 * sigma ** 2)) if sigma > 0 else (coords == 0).float()
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.channels = channels
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight.to(out.dtype), groups=self.channels)
        return F.interpolate(out, scale_factor=(self.scale, self.scale))


class HourglassEncoder(nn.Module):
    """`num_blocks` DownBlock2d; returns the input and every block's output, fine to coarse."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock2d(in_features if i == 0 else min(max_features, block_expansion * 2 ** i),
                        min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    """`num_blocks` UpBlock2d, each followed by concatenation with the encoder map of equal size.

    `out_channels` lists each up block's input width and, last, the width of the final output.
    """

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        blocks = []
        self.out_channels: list[int] = []
        for i in reversed(range(num_blocks)):
            width = min(max_features, block_expansion * 2 ** (i + 1))
            in_filters = width if i == num_blocks - 1 else 2 * width
            self.out_channels.append(in_filters)
            blocks.append(UpBlock2d(in_filters, min(max_features, block_expansion * 2 ** i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_channels.append(block_expansion + in_features)

    def forward(self, encoded: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder output (after the skip concatenation), coarse to fine."""
        out = encoded[-1]
        outs = []
        for i, block in enumerate(self.up_blocks):
            out = torch.cat([block(out), encoded[-(i + 2)]], dim=1)
            outs.append(out)
        return outs


class Hourglass(nn.Module):
    """U-Net style encoder/decoder; forward returns all decoder outputs, coarse to fine."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3,
                 max_features: int = 256) -> None:
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_channels = self.decoder.out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x))


# --------------------------------------------------------------------------------------------
# ResNet-18 with torchvision's parameter names (the checkpoint's fg_encoder / bg_encoder)
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BatchNorm, identity or 1x1-projected shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (names included) with configurable input channels, width and outputs.

    Written here because the project does not install torchvision; `width` 64 is the standard net.
    """

    def __init__(self, in_channels: int = 3, num_outputs: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(in_planes, p, stride), BasicBlock(p, p)))
            in_planes = p
        self.fc = nn.Linear(in_planes, num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------
# Geometry: coordinate grids, Gaussian heatmaps, thin-plate splines
# --------------------------------------------------------------------------------------------

def make_coordinate_grid(height: int, width: int, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H,W,2) grid of (x, y) in [-1,1], corners on pixel centres (grid_sample align_corners=True)."""
    x = 2 * (torch.arange(width, device=device, dtype=dtype) / max(width - 1, 1)) - 1
    y = 2 * (torch.arange(height, device=device, dtype=dtype) / max(height - 1, 1)) - 1
    return torch.stack([x.view(1, -1).expand(height, width), y.view(-1, 1).expand(height, width)], dim=-1)


def kp2gaussian(kp: torch.Tensor, spatial_size: tuple[int, int], kp_variance: float = KP_VARIANCE) -> torch.Tensor:
    """Gaussian heatmaps exp(-0.5 |grid - kp|^2 / var), (..., N, H, W) for keypoints (..., N, 2)."""
    grid = make_coordinate_grid(*spatial_size, device=kp.device, dtype=kp.dtype)
    diff = grid - kp[..., None, None, :]
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / kp_variance)


def _tps_kernel(d2: torch.Tensor) -> torch.Tensor:
    """Thin-plate radial basis r^2 log r^2 evaluated from squared distances."""
    return d2 * torch.log(d2 + TPS_LOG_EPS)


def tps_fit(kp_from: torch.Tensor, kp_to: torch.Tensor,
            regularization: float = TPS_REGULARIZATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin-plate spline mapping control points `kp_from` (..., n, 2) onto `kp_to` (..., n, 2).

    Solves L P = Y with L = [[K, Q], [Q^T, 0]] + regularization * I, K_ij = U(|p_i - p_j|),
    Q = [p, 1], Y = [kp_to; 0]. Returns (affine (..., 2, 3), radial weights (..., n, 2)).
    TPSMM uses regularization 0.01, so equal point sets give a near-identity rather than the identity.
    """
    if kp_from.shape != kp_to.shape or kp_from.shape[-1] != 2:
        raise ValueError(f"tps_fit needs two (..., n, 2) point sets of equal shape, got "
                         f"{tuple(kp_from.shape)} and {tuple(kp_to.shape)}.")
    out_dtype = kp_from.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    p, y = kp_from.to(work), kp_to.to(work)
    n = p.shape[-2]
    lead = p.shape[:-2]
    k = _tps_kernel(((p[..., :, None, :] - p[..., None, :, :]) ** 2).sum(-1))
    q = torch.cat([p, torch.ones(*lead, n, 1, dtype=work, device=p.device)], dim=-1)
    top = torch.cat([k, q], dim=-1)
    bottom = torch.cat([q.transpose(-1, -2), torch.zeros(*lead, 3, 3, dtype=work, device=p.device)], dim=-1)
    system = torch.cat([top, bottom], dim=-2)
    system = system + regularization * torch.eye(n + 3, dtype=work, device=p.device)
    rhs = torch.cat([y, torch.zeros(*lead, 3, 2, dtype=work, device=p.device)], dim=-2)
    params = torch.linalg.solve(system, rhs)
    affine = params[..., n:, :].transpose(-1, -2)
    return affine.to(out_dtype), params[..., :n, :].to(out_dtype)


def tps_warp(points: torch.Tensor, control_points: torch.Tensor, affine: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """Apply fitted splines to shared points (M, 2): returns (..., M, 2) for control points (..., n, 2)."""
    linear = points @ affine[..., :2].transpose(-1, -2) + affine[..., None, :, 2]
    d2 = ((points[:, None, :] - control_points[..., None, :, :]) ** 2).sum(-1)
    return linear + _tps_kernel(d2) @ weights


def tps_grids(kp_driving: torch.Tensor, kp_source: torch.Tensor, spatial_size: tuple[int, int],
              points_per_tps: int = POINTS_PER_TPS,
              regularization: float = TPS_REGULARIZATION) -> torch.Tensor:
    """Driving-to-source sampling grids (B, G, H, W, 2), one TPS per group of `points_per_tps` keypoints.

    Each spline maps a driving-frame coordinate to where grid_sample should read the source.
    """
    b, n, _ = kp_driving.shape
    if n % points_per_tps:
        raise ValueError(f"{n} keypoints do not split into groups of {points_per_tps}.")
    kp_d = kp_driving.view(b, n // points_per_tps, points_per_tps, 2)
    kp_s = kp_source.view(b, n // points_per_tps, points_per_tps, 2)
    affine, weights = tps_fit(kp_d, kp_s, regularization)
    h, w = spatial_size
    grid = make_coordinate_grid(h, w, device=kp_driving.device, dtype=kp_driving.dtype).view(-1, 2)
    return tps_warp(grid, kp_d, affine, weights).view(b, n // points_per_tps, h, w, 2)


# --------------------------------------------------------------------------------------------
# The TPSMM networks
# --------------------------------------------------------------------------------------------

class KPDetector(nn.Module):
    """ResNet-18 regressing `num_tps` x 5 keypoints in [-1,1] (x, y) from RGB in [0,1] (no ImageNet norm)."""

    def __init__(self, num_tps: int = NUM_TPS, num_channels: int = 3, width: int = VOX_BLOCK_EXPANSION) -> None:
        super().__init__()
        self.num_tps = num_tps
        self.fg_encoder = ResNet18(num_channels, num_tps * POINTS_PER_TPS * 2, width)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.sigmoid(self.fg_encoder(image)) * 2 - 1
        return {"fg_kp": out.view(image.shape[0], self.num_tps * POINTS_PER_TPS, 2)}


class DenseMotionNetwork(nn.Module):
    """Optical flow and multi-resolution occlusion masks from `num_tps` TPS warps and the identity.

    Works at `scale_factor` of the input: an hourglass over heatmap differences and the warped
    sources predicts softmax contribution maps that mix the warps into one deformation
    (B, h, w, 2), and occlusion maps at 1/8, 1/4, 1/2 and 1x of the input (vox-256: 32..256 px).
    """

    occlusion_num = 4

    def __init__(self, block_expansion: int = VOX_BLOCK_EXPANSION, num_blocks: int = VOX_DENSE_NUM_BLOCKS,
                 max_features: int = VOX_DENSE_MAX_FEATURES, num_tps: int = NUM_TPS, num_channels: int = 3,
                 scale_factor: float = VOX_SCALE_FACTOR, kp_variance: float = KP_VARIANCE,
                 tps_regularization: float = TPS_REGULARIZATION) -> None:
        super().__init__()
        up_nums = round(math.log2(1 / scale_factor)) if scale_factor > 0 else -1
        if not 0 <= up_nums <= self.occlusion_num or 0.5 ** up_nums != scale_factor:
            raise ValueError(f"DenseMotionNetwork needs scale_factor 1/2**k with k in 0..4, got {scale_factor}.")
        if num_blocks < self.occlusion_num - up_nums:
            raise ValueError(f"DenseMotionNetwork needs at least {self.occlusion_num - up_nums} hourglass "
                             f"blocks at scale_factor {scale_factor}, got {num_blocks}.")
        self.block_expansion = block_expansion
        self.num_blocks = num_blocks
        self.max_features = max_features
        self.num_tps = num_tps
        self.num_channels = num_channels
        self.scale_factor = scale_factor
        self.kp_variance = kp_variance
        self.tps_regularization = tps_regularization
        self.up_nums = up_nums
        self.down = AntiAliasInterpolation2d(num_channels, scale_factor) if scale_factor != 1 else None
        in_features = num_channels * (num_tps + 1) + num_tps * POINTS_PER_TPS + 1
        self.hourglass = Hourglass(block_expansion, in_features, num_blocks, max_features)
        widths = self.hourglass.out_channels
        self.maps = nn.Conv2d(widths[-1], num_tps + 1, kernel_size=7, padding=3)
        self.up = nn.ModuleList(UpBlock2d(widths[-1] // 2 ** i, widths[-1] // 2 ** (i + 1)) for i in range(up_nums))
        occ_in = [widths[-(k + 1)] for k in reversed(range(self.occlusion_num - up_nums))]
        occ_in += [widths[-1] // 2 ** (i + 1) for i in range(up_nums)]
        self.occlusion = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=7, padding=3) for c in occ_in)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this for the hourglass skips to line up."""
        return 2 ** (self.up_nums + self.num_blocks)

    def transformations(self, kp_driving: torch.Tensor, kp_source: torch.Tensor, spatial_size: tuple[int, int],
                        bg_param: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_tps+1, h, w, 2): the identity (or background affine) grid, then the TPS grids."""
        b = kp_driving.shape[0]
        h, w = spatial_size
        identity = make_coordinate_grid(h, w, device=kp_driving.device, dtype=kp_driving.dtype)
        identity = identity.view(1, 1, h, w, 2).expand(b, 1, h, w, 2)
        if bg_param is not None:
            homo = torch.cat([identity, torch.ones_like(identity[..., :1])], dim=-1)
            moved = (bg_param.to(identity.dtype).view(b, 1, 1, 1, 3, 3) @ homo.unsqueeze(-1)).squeeze(-1)
            identity = moved[..., :2] / moved[..., 2:3]
        tps = tps_grids(kp_driving, kp_source, spatial_size, regularization=self.tps_regularization)
        return torch.cat([identity, tps], dim=1)

    @staticmethod
    def dropout_softmax(logits: torch.Tensor, p: float) -> torch.Tensor:
        """TPSMM's training-time dropout of whole TPS transformations (paper Eq. 7-8).

        Each TPS channel of each batch item is dropped with probability `p` (the identity /
        background channel 0 never is); the softmax is taken over the kept channels only, with
        TPSMM's 1e-6 in the denominator.
        """
        b, k = logits.shape[:2]
        keep = (torch.rand(b, k, device=logits.device) >= p).to(logits.dtype)
        keep[:, 0] = 1
        shifted = logits - logits.amax(dim=1, keepdim=True)
        weights = shifted.exp() * keep.view(b, k, 1, 1)
        return weights / (weights.sum(dim=1, keepdim=True) + 1e-6)

    def forward(self, source_image: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor,
                bg_param: torch.Tensor | None = None, dropout_flag: bool = False,
                dropout_p: float = 0.0) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Deformation, contribution maps, deformed sources and occlusion maps for keypoints (B, N, 2).

        `dropout_flag` (training only) drops TPS transformations with probability `dropout_p`
        before mixing them (see `dropout_softmax`); off, the contribution maps are a plain softmax.
        """
        if dropout_flag and not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}.")
        source = self.down(source_image) if self.down is not None else source_image
        b, c, h, w = source.shape
        k = self.num_tps + 1
        heatmap = (kp2gaussian(kp_driving, (h, w), self.kp_variance)
                   - kp2gaussian(kp_source, (h, w), self.kp_variance))
        heatmap = torch.cat([torch.zeros_like(heatmap[:, :1]), heatmap], dim=1)
        transformations = self.transformations(kp_driving, kp_source, (h, w), bg_param)
        repeated = source.unsqueeze(1).expand(b, k, c, h, w).reshape(b * k, c, h, w)
        deformed = F.grid_sample(repeated, transformations.reshape(b * k, h, w, 2), align_corners=True)
        deformed = deformed.view(b, k, c, h, w)
        features = self.hourglass(torch.cat([heatmap, deformed.view(b, k * c, h, w)], dim=1))
        logits = self.maps(features[-1])
        if dropout_flag and dropout_p > 0.0:
            contribution = self.dropout_softmax(logits, dropout_p)
        else:
            contribution = F.softmax(logits, dim=1)
        deformation = (transformations * contribution.unsqueeze(-1)).sum(dim=1)
        n_direct = self.occlusion_num - self.up_nums
        occlusion = [torch.sigmoid(self.occlusion[i](features[i - n_direct])) for i in range(n_direct)]
        out = features[-1]
        for i, up in enumerate(self.up):
            out = up(out)
            occlusion.append(torch.sigmoid(self.occlusion[n_direct + i](out)))
        return {"deformation": deformation, "contribution_maps": contribution,
                "deformed_source": deformed, "occlusion_map": occlusion}


class InpaintingNetwork(nn.Module):
    """Encodes the source, warps and occludes its features by the dense motion, decodes the frame.

    The prediction keeps warped source pixels where the last occlusion map is 1 and the decoded
    (inpainted) pixels where it is 0; values are in [0,1].
    """

    def __init__(self, num_channels: int = 3, block_expansion: int = VOX_BLOCK_EXPANSION,
                 max_features: int = VOX_GENERATOR_MAX_FEATURES, num_down_blocks: int = 3) -> None:
        super().__init__()
        if num_down_blocks != 3 or max_features != 8 * block_expansion:
            raise ValueError(f"InpaintingNetwork needs 3 down blocks and max_features = 8 x block_expansion, got "
                             f"{num_down_blocks} and {max_features} vs {block_expansion}.")
        self.num_channels = num_channels
        self.block_expansion = block_expansion
        self.max_features = max_features
        self.num_down_blocks = num_down_blocks
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=7, padding=3)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(min(max_features, block_expansion * 2 ** i), min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_down_blocks)
        )
        up_in = [max_features, max_features, max_features // 2]
        up_out = [max_features // 2, max_features // 4, max_features // 8]
        self.up_blocks = nn.ModuleList(UpBlock2d(i, o) for i, o in zip(up_in, up_out))
        self.resblock = nn.ModuleList(ResBlock2d(up_in[i // 2]) for i in range(2 * num_down_blocks))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=7, padding=3)

    @staticmethod
    def deform_input(x: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
        """grid_sample `x` by `deformation` (B, h, w, 2), resized bilinearly to x's size when they differ."""
        h, w = x.shape[-2:]
        if deformation.shape[1:3] != (h, w):
            deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                        align_corners=True).permute(0, 2, 3, 1)
        if x.shape[0] != deformation.shape[0]:
            x = x.expand(deformation.shape[0], *x.shape[1:])
        return F.grid_sample(x, deformation, align_corners=True)

    def encode(self, source_image: torch.Tensor) -> list[torch.Tensor]:
        """Source encoder maps, fine to coarse; computed once per source when animating many frames."""
        out = self.first(source_image)
        maps = [out]
        for block in self.down_blocks:
            out = block(out)
            maps.append(out)
        return maps

    def decode(self, source_image: torch.Tensor, encoder_maps: Sequence[torch.Tensor],
               dense_motion: Mapping[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The driven frame from the source, its encoder maps and the dense motion; a batch-1 source
        and its maps broadcast over the motion's batch."""
        deformation = dense_motion["deformation"]
        occlusion = dense_motion["occlusion_map"]
        out = self.deform_input(encoder_maps[-1], deformation) * occlusion[0]
        skip = out
        for i in range(self.num_down_blocks):
            out = self.resblock[2 * i + 1](self.resblock[2 * i](out))
            out = self.up_blocks[i](out)
            skip = self.deform_input(encoder_maps[-(i + 2)], deformation) * occlusion[i + 1]
            if i < self.num_down_blocks - 1:
                out = torch.cat([out, skip], dim=1)
        last = occlusion[-1]
        out = out * (1 - last) + skip
        out = torch.sigmoid(self.final(out))
        deformed = self.deform_input(source_image, deformation)
        return {"prediction": out * (1 - last) + deformed * last, "deformed": deformed}

    def forward(self, source_image: torch.Tensor,
                dense_motion: Mapping[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.decode(source_image, self.encode(source_image), dense_motion)


class AVDNetwork(nn.Module):
    """Animation-via-disentanglement: rebuilds keypoints from the source's identity and the driver's pose."""

    def __init__(self, num_tps: int = NUM_TPS, id_bottle_size: int = VOX_AVD_BOTTLE,
                 pose_bottle_size: int = VOX_AVD_BOTTLE, hidden: Sequence[int] = VOX_AVD_HIDDEN) -> None:
        super().__init__()
        self.num_tps = num_tps
        size = num_tps * POINTS_PER_TPS * 2
        h1, h2, h3 = (int(v) for v in hidden)

        def mlp(widths: Sequence[int], inplace: bool) -> nn.Sequential:
            layers: list[nn.Module] = []
            for a, b in zip(widths[:-2], widths[1:-1]):
                layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=inplace)]
            return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))

        self.id_encoder = mlp([size, h1, h2, h3, id_bottle_size], True)
        self.pose_encoder = mlp([size, h1, h2, h3, pose_bottle_size], True)
        self.decoder = mlp([pose_bottle_size + id_bottle_size, h3, h2, h1, size], False)

    def forward(self, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> torch.Tensor:
        """Keypoints (B, N, 2) with the source's identity and the driver's pose."""
        b = kp_driving.shape[0]
        pose = self.pose_encoder(kp_driving.reshape(b, -1))
        ident = self.id_encoder(kp_source.expand(b, *kp_source.shape[1:]).reshape(b, -1))
        return self.decoder(torch.cat([pose, ident], dim=1)).view(b, -1, 2)


class BGMotionPredictor(nn.Module):
    """Background affine motion (B, 3, 3) from a source/driving pair; a training-time module."""

    def __init__(self, num_channels: int = 3, width: int = VOX_BLOCK_EXPANSION) -> None:
        super().__init__()
        self.bg_encoder = ResNet18(2 * num_channels, 6, width)
        with torch.no_grad():
            self.bg_encoder.fc.weight.zero_()
            self.bg_encoder.fc.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    def forward(self, source_image: torch.Tensor, driving_image: torch.Tensor) -> torch.Tensor:
        b = source_image.shape[0]
        out = torch.eye(3, dtype=source_image.dtype, device=source_image.device).repeat(b, 1, 1)
        out[:, :2, :] = self.bg_encoder(torch.cat([source_image, driving_image], dim=1)).view(b, 2, 3)
        return out


class TPSMM(nn.Module):
    """The checkpoint's networks under their checkpoint entry names; bg_predictor / avd_network optional."""

    def __init__(self, kp_detector: KPDetector, dense_motion_network: DenseMotionNetwork,
                 inpainting_network: InpaintingNetwork, bg_predictor: BGMotionPredictor | None = None,
                 avd_network: AVDNetwork | None = None) -> None:
        super().__init__()
        if kp_detector.num_tps != dense_motion_network.num_tps:
            raise ValueError(f"kp_detector predicts {kp_detector.num_tps} TPS groups but dense_motion_network "
                             f"expects {dense_motion_network.num_tps}.")
        if dense_motion_network.num_channels != inpainting_network.num_channels:
            raise ValueError(f"dense_motion_network takes {dense_motion_network.num_channels} channels but "
                             f"inpainting_network takes {inpainting_network.num_channels}.")
        if avd_network is not None and avd_network.num_tps != kp_detector.num_tps:
            raise ValueError(f"avd_network expects {avd_network.num_tps} TPS groups but kp_detector "
                             f"predicts {kp_detector.num_tps}.")
        self.kp_detector = kp_detector
        self.dense_motion_network = dense_motion_network
        self.inpainting_network = inpainting_network
        self.register_module("bg_predictor", bg_predictor)
        self.register_module("avd_network", avd_network)

    @classmethod
    def build(cls, width_scale: float = 1.0, *, num_tps: int = NUM_TPS, num_channels: int = 3,
              bg_predictor: bool = False, avd_network: bool = False) -> TPSMM:
        """Random vox-256 TPSMM (width_scale 1.0) or the same layout with every width scaled.

        64 x width_scale must be a positive integer (0.125 gives the tiny profile's 8-wide model).
        """
        be = VOX_BLOCK_EXPANSION * width_scale
        if width_scale <= 0 or abs(be - round(be)) > 1e-9:
            raise ValueError(f"width_scale must make 64 x width_scale a positive integer, got {width_scale}.")
        be = int(round(be))
        kp = KPDetector(num_tps, num_channels, be)
        dense = DenseMotionNetwork(be, VOX_DENSE_NUM_BLOCKS, 16 * be, num_tps, num_channels, VOX_SCALE_FACTOR)
        inpaint = InpaintingNetwork(num_channels, be, 8 * be, 3)
        bg = BGMotionPredictor(num_channels, be) if bg_predictor else None
        hidden = tuple(max(1, round(h * width_scale)) for h in VOX_AVD_HIDDEN)
        bottle = max(1, round(VOX_AVD_BOTTLE * width_scale))
        avd = AVDNetwork(num_tps, bottle, bottle, hidden) if avd_network else None
        return cls(kp, dense, inpaint, bg, avd)

    @property
    def width_scale(self) -> float:
        return self.inpainting_network.block_expansion / VOX_BLOCK_EXPANSION

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this (128 for vox-256; frames are 256x256 in practice)."""
        a = self.dense_motion_network.size_multiple
        b = 2 ** self.inpainting_network.num_down_blocks
        return a * b // math.gcd(a, b)

    def entries(self) -> dict[str, nn.Module]:
        """The checkpoint entries this model has, by their top-level checkpoint name."""
        names = REQUIRED_ENTRIES + OPTIONAL_ENTRIES
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def forward(self, source_image: torch.Tensor, kp_source: torch.Tensor,
                kp_driving: torch.Tensor) -> dict[str, torch.Tensor]:
        """One driven frame per driving keypoint set (B, N, 2); a batch-1 source broadcasts."""
        b = kp_driving.shape[0]
        source = source_image.expand(b, *source_image.shape[1:])
        motion = self.dense_motion_network(source, kp_driving, kp_source.expand(b, *kp_source.shape[1:]))
        out = self.inpainting_network.decode(source_image, self.inpainting_network.encode(source_image), motion)
        return {**out, "deformation": motion["deformation"], "occlusion_map": motion["occlusion_map"]}


# --------------------------------------------------------------------------------------------
# Checkpoint I/O (vox.pth.tar format)
# --------------------------------------------------------------------------------------------

def _shape(sd: Mapping[str, torch.Tensor], entry: str, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"TPSMM checkpoint entry '{entry}' lacks key '{key}'.")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> int:
    n = 0
    while f"{prefix}{n}{suffix}" in sd:
        n += 1
    return n


def _kp_detector_from(sd: Mapping[str, torch.Tensor]) -> KPDetector:
    width, channels = _shape(sd, "kp_detector", "fg_encoder.conv1.weight")[:2]
    outputs = _shape(sd, "kp_detector", "fg_encoder.fc.weight")[0]
    if outputs % (POINTS_PER_TPS * 2):
        raise ValueError(f"TPSMM checkpoint entry 'kp_detector' regresses {outputs} values, "
                         f"not a multiple of {POINTS_PER_TPS * 2}.")
    return KPDetector(outputs // (POINTS_PER_TPS * 2), channels, width)


def _dense_motion_from(sd: Mapping[str, torch.Tensor]) -> DenseMotionNetwork:
    entry = "dense_motion_network"
    num_blocks = _count(sd, "hourglass.encoder.down_blocks.", ".conv.weight")
    first = _shape(sd, entry, "hourglass.encoder.down_blocks.0.conv.weight")
    widths = [_shape(sd, entry, f"hourglass.encoder.down_blocks.{i}.conv.weight")[0] for i in range(num_blocks)]
    be = _shape(sd, entry, f"hourglass.decoder.up_blocks.{num_blocks - 1}.conv.weight")[0]
    num_tps = _shape(sd, entry, "maps.weight")[0] - 1
    rest = first[1] - num_tps * POINTS_PER_TPS - 1
    if num_tps < 1 or rest <= 0 or rest % (num_tps + 1):
        raise ValueError(f"TPSMM checkpoint entry '{entry}' has {first[1]} hourglass input channels, which do not "
                         f"fit {num_tps} TPS groups.")
    up_nums = _count(sd, "up.", ".conv.weight")
    return DenseMotionNetwork(be, num_blocks, max(widths), num_tps, rest // (num_tps + 1), 0.5 ** up_nums)


def _inpainting_from(sd: Mapping[str, torch.Tensor]) -> InpaintingNetwork:
    entry = "inpainting_network"
    be, channels = _shape(sd, entry, "first.conv.weight")[:2]
    n = _count(sd, "down_blocks.", ".conv.weight")
    max_features = _shape(sd, entry, f"down_blocks.{max(n - 1, 0)}.conv.weight")[0]
    try:
        return InpaintingNetwork(channels, be, max_features, n)
    except ValueError as exc:
        raise ValueError(f"TPSMM checkpoint entry '{entry}' does not have the TPSMM layout: {exc}") from None


def _bg_predictor_from(sd: Mapping[str, torch.Tensor]) -> BGMotionPredictor:
    width, channels = _shape(sd, "bg_predictor", "bg_encoder.conv1.weight")[:2]
    return BGMotionPredictor(channels // 2, width)


def _avd_from(sd: Mapping[str, torch.Tensor]) -> AVDNetwork:
    e = "avd_network"
    h1, size = _shape(sd, e, "id_encoder.0.weight")
    hidden = (h1, _shape(sd, e, "id_encoder.3.weight")[0], _shape(sd, e, "id_encoder.6.weight")[0])
    return AVDNetwork(size // (POINTS_PER_TPS * 2), _shape(sd, e, "id_encoder.9.weight")[0],
                      _shape(sd, e, "pose_encoder.9.weight")[0], hidden)


_BUILDERS = {
    "kp_detector": _kp_detector_from,
    "dense_motion_network": _dense_motion_from,
    "inpainting_network": _inpainting_from,
    "bg_predictor": _bg_predictor_from,
    "avd_network": _avd_from,
}


def _first_bad_key(entry: str, model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    """One sentence on the first missing, mis-shaped or unexpected key of an entry, else None."""
    return first_mismatch(model, sd, f"TPSMM checkpoint entry '{entry}'")


def save_checkpoint(model: TPSMM, path: str | Path, epoch: int | None = None) -> Path:
    """Write the model in vox.pth.tar's layout: one state dict per entry (+ `epoch`), atomically."""
    path = Path(path)
    ckpt: dict[str, object] = {name: module.state_dict() for name, module in model.entries().items()}
    if epoch is not None:
        ckpt["epoch"] = int(epoch)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("saved TPSMM checkpoint %s (entries %s)", path, sorted(model.entries()))
    return path


def load_tpsmm(path: str | Path, device: str | torch.device = "cpu") -> TPSMM:
    """Build a TPSMM sized from a vox.pth.tar-style checkpoint and load every entry strictly, in eval mode.

    Optimizer state and `epoch` are ignored; a missing required entry or a key/shape mismatch
    raises ValueError naming it.
    """
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} does not hold a TPSMM checkpoint dict.")
    for name in REQUIRED_ENTRIES:
        if name not in ckpt:
            raise ValueError(f"{path}: TPSMM checkpoint lacks the '{name}' entry.")
    modules: dict[str, nn.Module] = {}
    for name in REQUIRED_ENTRIES + OPTIONAL_ENTRIES:
        if name not in ckpt:
            continue
        sd = ckpt[name]
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: TPSMM checkpoint entry '{name}' is not a state dict of tensors.")
        try:
            module = _BUILDERS[name](sd)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        bad = _first_bad_key(name, module, sd)
        if bad:
            raise ValueError(f"{path}: {bad}")
        module.load_state_dict(sd, strict=True)
        modules[name] = module
    ignored = sorted(k for k in ckpt if k not in modules and k != "epoch" and not str(k).startswith("optimizer"))
    if ignored:
        log.warning("TPSMM checkpoint %s: ignoring unknown entries %s", path, ignored)
    try:
        model = TPSMM(**modules)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    log.info("loaded TPSMM %s (width scale %g, entries %s)", path, model.width_scale, sorted(modules))
    return model.to(device).eval()


