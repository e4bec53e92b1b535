"""HED soft edges: ControlNet's Apache-2.0 annotator network (`ControlNetHED_Apache2`).

Written from the published architecture (METHOD.md §3) so that the public `ControlNetHED.pth`
(lllyasviel/Annotators) loads with `strict=True`: a learned `norm` (1,3,1,1) subtracted from RGB
in 0-255, five VGG-like blocks of 3x3 conv + ReLU (2,2,3,3,3 convs) with a 2x2 max-pool before
blocks 2-5, a 1x1 projection to one channel per block, and the edge map is the sigmoid of the mean
of the five projections resized bilinearly to the input size. Only stdlib, numpy and torch are
imported here: the GPU check imports this module on a machine that has nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corpus_anon.models.checkpoints import first_mismatch

log = logging.getLogger(__name__)

DEFAULT_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK: tuple[int, ...] = (2, 2, 3, 3, 3)
# Four 2x2 pools: a side shorter than 16 px would vanish before block 5.
MIN_SIDE = 2 ** (len(CONVS_PER_BLOCK) - 1)


class HEDBlock(nn.Module):
    """`n_convs` 3x3 conv + ReLU layers and a 1x1 projection of their output to one channel."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1)
            for i in range(n_convs)
        )
        self.projection = nn.Conv2d(out_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, one-channel projection); max-pools 2x2 first when `down_sampling`."""
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """The HED annotator network; `channels` lets tests build it small with the same keys."""

    def __init__(self, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != len(CONVS_PER_BLOCK) or any(c < 1 for c in channels):
            raise ValueError(
                f"ControlNetHED needs {len(CONVS_PER_BLOCK)} positive channel counts, got {channels}."
            )
        self.channels = channels
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        in_ch = 3
        for i, (ch, n) in enumerate(zip(channels, CONVS_PER_BLOCK)):
            self.add_module(f"block{i + 1}", HEDBlock(in_ch, ch, n))
            in_ch = ch

    def blocks(self) -> list[HEDBlock]:
        return [getattr(self, f"block{i + 1}") for i in range(len(CONVS_PER_BLOCK))]

    def projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five one-channel side outputs at their own resolutions, for RGB input in 0-255."""
        h = x - self.norm
        out = []
        for i, block in enumerate(self.blocks()):
            h, p = block(h, down_sampling=i > 0)
            out.append(p)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft edges (N,1,H,W) in [0,1] for RGB (N,3,H,W) floats in 0-255."""
        size = x.shape[-2:]
        side = [F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                for p in self.projections(x)]
        return torch.sigmoid(torch.stack(side, dim=0).mean(dim=0))


def _channels_from_state_dict(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Each block's width, read from its projection's input channels."""
    chans = []
    for i in range(len(CONVS_PER_BLOCK)):
        key = f"block{i + 1}.projection.weight"
        if key not in sd:
            raise ValueError(f"HED state dict lacks key {key!r}, so it is not a ControlNetHED checkpoint.")
        chans.append(int(sd[key].shape[1]))
    return tuple(chans)


def _first_bad_key(model: nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """A one-sentence description of the first missing, mis-shaped or unexpected key, else None."""
    return first_mismatch(model, sd, "HED state dict")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from `.pth` (weights only, no code runs) or `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a plain state dict of tensors.")
    return sd


def load_hed(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> ControlNetHED:
    """Build a ControlNetHED sized from the checkpoint and load it strictly, in eval mode."""
    sd = load_state_dict_file(path)
    model = ControlNetHED(_channels_from_state_dict(sd))
    bad = _first_bad_key(model, sd)
    if bad:
        raise ValueError(f"{path}: {bad}")
    model.load_state_dict(sd, strict=True)
    log.debug("loaded HED %s with channels %s", path, model.channels)
    return model.to(device=device, dtype=dtype).eval()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def hed_edges(model: ControlNetHED, frames: np.ndarray | torch.Tensor,
              batch_size: int = 8) -> torch.Tensor:
    """Soft edges (N,1,H,W) float32 in [0,1] of uint8 RGB frames (N,H,W,3), on the model's device.

    The network sees the frames as they are (no resize), as Rerender runs HED on the already
    resized frame; `batch_size` bounds memory at large resolutions.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"hed_edges takes a numpy array or torch tensor, got {type(frames).__name__}.")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"hed_edges takes uint8 RGB frames shaped (N,H,W,3), got {frames.dtype} {tuple(frames.shape)}."
        )
    n, h, w, _ = frames.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"HED needs frames at least {MIN_SIDE} px on each side, got {h}x{w}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    device, dtype = _model_device_dtype(model)
    out = torch.empty((n, 1, h, w), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            x = frames[s:s + batch_size].to(device).permute(0, 3, 1, 2).to(dtype)
            out[s:s + batch_size] = model(x).float()
    return out
