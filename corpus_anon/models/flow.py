"""Optical flow, backward warping and forward-backward occlusion masks (METHOD §4.6).

OpenCV DIS stands in for GMFlow: it needs no weights and runs on CPU threads while the GPU
denoises, and the rest (warping, occlusion, blend masks, latent-resolution masks) follows
Rerender-A-Video's ``flow/flow_utils.py`` and ``rerender.py``.

Conventions: images are torch tensors (B, C, H, W) float; flows are torch (B, 2, H, W) float32 in
pixels, channel 0 = x (horizontal), channel 1 = y. A *backward flow* ``f_b`` warps a reference
frame into the current one: ``current(x) ≈ reference(x + f_b(x))``; ``f_f`` is the opposite
direction (reference → current). Masks are (B, 1, H, W) with 1 = occluded / use new content.

The flow itself comes from a *flow estimator*: DIS by default, or any object with the
``FlowEstimator`` interface, such as a loaded RAFT (``corpus_anon.models.raft.RaftFlow``), passed as
``estimator`` to ``backward_flows`` / ``flow_pair``; everything after the flow is the same for all.

Only stdlib, numpy and torch are imported at module level (the GPU check imports this module on a
machine without cv2); cv2 is imported inside ``dis_flow``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DIS_PRESETS = ("ultrafast", "fast", "medium")

# One DIS instance per (thread, preset): cv2 algorithm objects keep per-call buffers, so sharing
# one across threads is unsafe, and creating one per call wastes allocations.
_thread_state = threading.local()


@dataclass(frozen=True)
class FlowPair:
    """Flows and masks for one (current, reference) pair, all (1, C, H, W) on one device.

    ``f_b``: current → reference (warps the reference into the current frame); ``f_f``: reference
    → current; ``occ``: hard forward-backward occlusion (1 = occluded); ``mask``: soft blend mask
    from ``blend_mask(occ)`` (1 = occluded / use new content).
    """

    f_b: torch.Tensor
    f_f: torch.Tensor
    occ: torch.Tensor
    mask: torch.Tensor


class FlowEstimator(Protocol):
    """A dense flow estimator: ``pair(current, reference)`` -> (f_b, f_f), CPU (1, 2, H, W) float32 tensors
    (f_b = current → reference, f_f = reference → current) from uint8 RGB (H, W, 3) frames."""

    name: str

    def pair(self, current_rgb: np.ndarray, reference_rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Both flows of one pair, in pixels."""
        ...


def _check_rgb(name: str, img: np.ndarray) -> None:
    """Reject anything but a uint8 (H, W) or (H, W, 3) array."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 numpy array, got {type(img).__name__} "
                         f"{getattr(img, 'dtype', '')}.")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 3), got {img.shape}.")


def dis_flow(src_rgb: np.ndarray, dst_rgb: np.ndarray, preset: str = "medium") -> np.ndarray:
    """Dense flow (H, W, 2) float32 with ``src(x) ≈ dst(x + flow(x))``, from OpenCV DIS.

    Runs on grayscale uint8 frames; safe to call from several threads (cv2 releases the GIL, and
    each thread gets its own DIS instances). An instance is kept per preset AND frame size: OpenCV's
    DIS changes its own settings on a small frame and keeps them (measured: after one 32x32 call, its
    flows on 64x64 frames moved by up to 0.97 px), so one instance for every size would make a
    clip's flow depend on the clips before it.
    """
    import cv2  # lazy: this module must import without cv2 (see module docstring)

    if preset not in DIS_PRESETS:
        raise ValueError(f"DIS preset must be one of {DIS_PRESETS}, got {preset!r}.")
    _check_rgb("src_rgb", src_rgb)
    _check_rgb("dst_rgb", dst_rgb)
    if src_rgb.shape != dst_rgb.shape:
        raise ValueError(f"src_rgb {src_rgb.shape} and dst_rgb {dst_rgb.shape} differ in shape.")

    cache = getattr(_thread_state, "dis", None)
    if cache is None:
        cache = _thread_state.dis = {}
    key = (preset, src_rgb.shape[:2])
    dis = cache.get(key)
    if dis is None:
        dis = cache[key] = cv2.DISOpticalFlow_create(
            getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}"))

    def gray(img: np.ndarray) -> np.ndarray:
        img = np.ascontiguousarray(img)
        return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)

    flow = dis.calc(gray(src_rgb), gray(dst_rgb), None)
    return np.ascontiguousarray(flow, dtype=np.float32)


def flow_to_tensor(flow: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 2) numpy flow → (1, 2, H, W) float32 tensor on ``device``."""
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H, W, 2), got {flow.shape}.")
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1)[None].to(device)


def backward_flows(current_rgb: np.ndarray, reference_rgb: np.ndarray, preset: str = "medium",
                   estimator: FlowEstimator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_b, f_f) as CPU (1, 2, H, W) tensors: f_b = current → reference, f_f = reference → current.

    f_b warps the reference into the current frame; f_f is needed only for the occlusion check.
    DIS with ``preset`` unless an ``estimator`` is given (then ``preset`` is unused).
    """
    if estimator is not None:
        _check_rgb("current_rgb", current_rgb)
        _check_rgb("reference_rgb", reference_rgb)
        return estimator.pair(current_rgb, reference_rgb)
    f_b = dis_flow(current_rgb, reference_rgb, preset)
    f_f = dis_flow(reference_rgb, current_rgb, preset)
    return flow_to_tensor(f_b), flow_to_tensor(f_f)


def pixel_grid(h: int, w: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(1, 2, H, W) float32 pixel coordinates, channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack((xs, ys))[None]


def warp(img: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Backward-warp ``img`` (B, C, H, W): out(x) = img(x + flow(x)), via ``grid_sample``.

    ``align_corners=True`` so pixel centres map exactly and integer flows reproduce an integer
    translation; samples outside the frame are 0 (``padding_mode="zeros"``, as Rerender) unless
    another grid_sample padding mode is asked for. A flow with batch 1 is shared by all images.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp mode must be 'bilinear' or 'nearest', got {mode!r}.")
    if img.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp needs img (B, C, H, W) and flow (B, 2, H, W), got {tuple(img.shape)} "
                         f"and {tuple(flow.shape)}.")
    if img.shape[2:] != flow.shape[2:] or flow.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"img {tuple(img.shape)} and flow {tuple(flow.shape)} do not match.")
    if not img.is_floating_point():
        raise ValueError(f"warp needs a floating-point image, got {img.dtype}.")
    b, _, h, w = img.shape
    coords = pixel_grid(h, w, flow.device) + flow.float()
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    gx = coords[:, 0] * (2.0 / max(w - 1, 1)) - 1.0
    gy = coords[:, 1] * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1).expand(b, h, w, 2)
    out = F.grid_sample(img.float(), grid.to(img.device), mode=mode, padding_mode=padding_mode,
                        align_corners=True)
    return out.to(img.dtype)


def occlusion(f_b: torch.Tensor, f_f: torch.Tensor, alpha: float = 0.01,
              beta: float = 0.5) -> torch.Tensor:
    """Forward-backward consistency check (UnFlow): (B, 1, H, W) float, 1 = occluded in current.

    A pixel whose backward flow does not come back to itself through the forward flow was not
    visible in the reference (or left the frame), so a warp cannot supply it.
    """
    warped_ff = warp(f_f, f_b)
    diff = torch.linalg.vector_norm(f_b + warped_ff, dim=1, keepdim=True)
    # Follows Rerender-A-Video flow/flow_utils.py forward_backward_consistency_check: plain
    # (not squared) L2 norms, and the magnitude term uses the unwarped f_f and f_b at the same
    # pixel, i.e. |f_b + W(f_f)| > alpha * (|f_f| + |f_b|) + beta, rather than UnFlow's squared form.
    mag = (torch.linalg.vector_norm(f_f.float(), dim=1, keepdim=True)
           + torch.linalg.vector_norm(f_b.float(), dim=1, keepdim=True))
    return (diff > alpha * mag + beta).float()


def gaussian_kernel1d(kernel_size: int, sigma: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian taps (same construction as torchvision's GaussianBlur)."""
    if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
        raise ValueError(f"Gaussian kernel needs an odd size >= 1 and sigma > 0, got {kernel_size}, {sigma}.")
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 18.0) -> torch.Tensor:
    """Separable per-channel Gaussian blur of (B, C, H, W) with reflect padding (as torchvision)."""
    b, c, h, w = x.shape
    k = gaussian_kernel1d(kernel_size, sigma, x.device).to(x.dtype)
    pad = kernel_size // 2
    # torch's reflect padding needs pad < size; tiny inputs (latents of tiny frames) replicate.
    pad_mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=pad_mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def blend_mask(occ: torch.Tensor, kernel_size: int = 9, sigma: float = 18.0) -> torch.Tensor:
    """Soft mask ``clamp(blur(maxpool_9(occ)) + occ, 0, 1)`` (1 = occluded / use new content).

    Dilating then blurring widens the region that takes new content so warp seams at occlusion
    boundaries are feathered instead of hard.
    """
    dilated = F.max_pool2d(occ, kernel_size, stride=1, padding=kernel_size // 2)
    return torch.clamp(gaussian_blur(dilated, kernel_size, sigma) + occ, 0.0, 1.0)


def to_latent(flow: torch.Tensor, mask: torch.Tensor, factor: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent_flow, latent_keep_mask) at 1/``factor`` resolution for latent shape fusion (§4.7).

    latent_flow = bilinear resize of ``flow / factor``; keep mask = 1 − maxpool_factor(mask), so a
    latent pixel is trusted (1) only if none of its image pixels is occluded.
    """
    h, w = flow.shape[2:]
    if h % factor or w % factor or mask.shape[2:] != flow.shape[2:]:
        raise ValueError(f"to_latent needs flow and mask of the same size divisible by {factor}, "
                         f"got {tuple(flow.shape)} and {tuple(mask.shape)}.")
    latent_flow = F.interpolate(flow / factor, size=(h // factor, w // factor), mode="bilinear",
                                align_corners=False)
    keep = 1.0 - F.max_pool2d(mask, factor)
    return latent_flow, keep


def masks_from_flows(f_b: torch.Tensor, f_f: torch.Tensor, device: str | torch.device = "cpu",
                     alpha: float = 0.01, beta: float = 0.5) -> FlowPair:
    """The torch half of ``flow_pair``: move flows to ``device``, build occlusion and blend masks."""
    with torch.no_grad():
        f_b, f_f = f_b.to(device), f_f.to(device)
        occ = occlusion(f_b, f_f, alpha, beta)
        return FlowPair(f_b=f_b, f_f=f_f, occ=occ, mask=blend_mask(occ))


def flow_pair(current_rgb: np.ndarray, reference_rgb: np.ndarray, device: str | torch.device = "cpu",
              preset: str = "medium", estimator: FlowEstimator | None = None) -> FlowPair:
    """Flows and masks for one (current, reference) pair of uint8 RGB frames.

    Flows from DIS (``preset``) unless an ``estimator`` is given. Meant to run on CPU worker threads
    so flow overlaps GPU work: the cv2 part holds no shared state, and the torch part only reads its
    own tensors.
    """
    f_b, f_f = backward_flows(current_rgb, reference_rgb, preset, estimator)
    pair = masks_from_flows(f_b, f_f, device)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("flow pair %s: max |f_b| %.2f px, occluded %.3f", tuple(current_rgb.shape),
                     float(torch.linalg.vector_norm(pair.f_b, dim=1).max()), float(pair.occ.mean()))
    return pair


__all__ = [
    "DIS_PRESETS", "FlowEstimator", "FlowPair", "backward_flows", "blend_mask", "dis_flow", "flow_pair",
    "flow_to_tensor", "gaussian_blur", "gaussian_kernel1d", "masks_from_flows", "occlusion",
    "pixel_grid", "to_latent", "warp",
]
