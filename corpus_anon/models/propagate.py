"""Key frames → all frames (METHOD §5): choose key frames and propagate their stylization.

Diffusion runs only on key frames (every K-th frame plus the last); the in-between frames are
filled from the two neighbouring stylized keys, guided by flow computed on the ORIGINAL frames
(stylized frames have unreliable flow, §11.1).

Only stdlib, numpy and torch are imported at module level (see ``corpus_anon.models.flow``).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from corpus_anon.models import flow as fl

logger = logging.getLogger(__name__)


def key_interval(fps: float, key_rate: float = 6.0) -> int:
    """Key-frame interval K = max(1, round(fps / key_rate)) (6 keys/s: 30 fps → 5, 24 fps → 4).

    Halves round up (15 fps → 3), not to even as Python's ``round`` would (15 → 2 but 45 → 8).
    """
    if not (math.isfinite(fps) and fps > 0 and math.isfinite(key_rate) and key_rate > 0):
        raise ValueError(f"fps and key_rate must be positive, got fps={fps}, key_rate={key_rate}.")
    return max(1, math.floor(fps / key_rate + 0.5))


def key_indices(n_frames: int, K: int) -> list[int]:
    """Key frame indices 0, K, 2K, … plus the last frame (once): diffusion runs on these."""
    if n_frames < 1 or K < 1:
        raise ValueError(f"key_indices needs n_frames >= 1 and K >= 1, got {n_frames} and {K}.")
    keys = list(range(0, n_frames, K))
    if keys[-1] != n_frames - 1:
        keys.append(n_frames - 1)
    return keys


class Propagator(Protocol):
    """Fills every frame of a clip from its stylized key frames.

    ``frames``: original clip, uint8 (N, H, W, 3); ``keys``: frame index → stylized key frame,
    uint8 (H, W, 3). Returns uint8 (N, H, W, 3) with each key frame unchanged at its own index.
    """

    name: str

    def propagate(self, frames: np.ndarray, keys: Mapping[int, np.ndarray],
                  device: str = "cpu") -> np.ndarray:
        """Return the stylized clip, one output frame per input frame."""
        ...


def _check_inputs(frames: np.ndarray, keys: Mapping[int, np.ndarray]) -> None:
    """Reject malformed clips or key frames in one sentence, before any work."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be a uint8 array (N, H, W, 3) with N >= 1, got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}.")
    if not keys:
        raise ValueError("propagation needs at least one stylized key frame.")
    n = frames.shape[0]
    for k, img in keys.items():
        if not isinstance(k, (int, np.integer)) or not 0 <= k < n:
            raise ValueError(f"key frame index {k!r} is not a frame index in [0, {n}).")
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != frames.shape[1:]:
            raise ValueError(f"key frame {k} must be uint8 {frames.shape[1:]}, got "
                             f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}.")


def _to_tensor(img: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (1, 3, H, W) in 0..255 on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)[None].float()


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """float (1, 3, H, W) in 0..255 → uint8 (H, W, 3), rounded and clipped."""
    return img[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class FlowBlendPropagator:
    """Flow-guided blend of the two neighbouring key frames (a < j < b) into frame j.

    Each key is backward-warped into j with flow computed on the original frames (j → key): OpenCV
    DIS (``preset``) by default, or the given ``estimator`` (``corpus_anon.models.flow.FlowEstimator``, e.g.
    a loaded RAFT from ``corpus_anon.models.raft.build_raft_flow``).
    Per pixel, each side is weighted by temporal distance (w_a = (b − j)/(b − a), w_b = 1 − w_a),
    by its forward-backward occlusion (an occluded pixel gets no weight from that side) and by
    its warp error exp(−err/τ), err = smoothed Σ_c |orig_j − warp(orig_key)| / 255, so the side
    whose flow explains the original frame better dominates. Weights are normalised; where both
    sides are occluded the nearer key's warp is used. Frames before the first / after the last key
    take the single neighbouring key's warp.

    A patch-based propagator (Ebsynth-like, §5) can be added behind the same ``Propagator``
    interface and registered in ``build_propagator``. It ghosts less on hands: it rebuilds every
    pixel from one coherent patch of a key frame chosen by matching guides (original colours,
    edges, position), while this class averages two per-pixel warps, so wherever flow is wrong
    (fast, thin, self-occluding, motion-blurred fingers) the two warps disagree and the average
    shows both copies.
    """

    name = "flowblend"

    def __init__(self, preset: str = "medium", tau: float = 0.1, error_blur: int = 5,
                 error_sigma: float = 1.5, estimator: fl.FlowEstimator | None = None) -> None:
        """Store settings and the (already loaded) flow estimator; None means DIS. ``tau`` is in
        channel-summed units of 1/255."""
        if preset not in fl.DIS_PRESETS:
            raise ValueError(f"DIS preset must be one of {fl.DIS_PRESETS}, got {preset!r}.")
        if tau <= 0 or error_blur < 1 or error_blur % 2 == 0 or error_sigma <= 0:
            raise ValueError(f"flowblend needs tau > 0, an odd error_blur >= 1 and error_sigma > 0, "
                             f"got {tau}, {error_blur}, {error_sigma}.")
        self.preset = preset
        self.tau = tau
        self.error_blur = error_blur
        self.error_sigma = error_sigma
        self.estimator = estimator

    @property
    def flow_name(self) -> str:
        """The flow this propagator uses: ``dis-<preset>`` or the estimator's name (e.g. ``raft-small``)."""
        return self.estimator.name if self.estimator is not None else f"dis-{self.preset}"

    def _side(self, frames: np.ndarray, orig_j: torch.Tensor, j: int, k: int, style_k: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp key k into frame j; return (warped stylized key, confidence (1, 1, H, W) in [0, 1])."""
        if self.estimator is None:
            pair = fl.flow_pair(frames[j], frames[k], device, self.preset)
        else:
            pair = fl.flow_pair(frames[j], frames[k], device, estimator=self.estimator)
        # Border padding: a pixel whose flow leaves the frame is occluded anyway (zero confidence),
        # and repeating the edge beats black if it is still used as the nearer-key fallback.
        warped_style = fl.warp(style_k, pair.f_b, padding_mode="border")
        warped_orig = fl.warp(_to_tensor(frames[k], device), pair.f_b, padding_mode="border")
        err = (orig_j - warped_orig).abs().sum(dim=1, keepdim=True) / 255.0
        err = fl.gaussian_blur(err, self.error_blur, self.error_sigma)
        conf = (1.0 - pair.occ) * torch.exp(-err / self.tau)
        return warped_style, conf

    def _frame(self, frames: np.ndarray, j: int, a: int | None, b: int | None,
               styles: dict[int, torch.Tensor], device: torch.device) -> np.ndarray:
        """Stylized frame j from its neighbouring keys a (before) and b (after), either may be None."""
        orig_j = _to_tensor(frames[j], device)
        if a is None or b is None:
            k = b if a is None else a
            warped, _ = self._side(frames, orig_j, j, k, styles[k], device)
            return _to_uint8(warped)
        sa, ca = self._side(frames, orig_j, j, a, styles[a], device)
        sb, cb = self._side(frames, orig_j, j, b, styles[b], device)
        da = (b - j) / (b - a)
        # A tiny prior on the nearer key: it takes over smoothly where both sides have ~0 weight.
        eps = 1e-6
        near_a = 1.0 if (j - a) <= (b - j) else 0.0
        wa = da * ca + eps * near_a
        wb = (1.0 - da) * cb + eps * (1.0 - near_a)
        return _to_uint8((wa * sa + wb * sb) / (wa + wb))

    def propagate(self, frames: np.ndarray, keys: Mapping[int, np.ndarray],
                  device: str = "cpu") -> np.ndarray:
        """Stylized clip uint8 (N, H, W, 3); key frames are copied unchanged to their indices."""
        _check_inputs(frames, keys)
        dev = torch.device(device)
        order = sorted(int(k) for k in keys)
        out = np.empty_like(frames)
        styles: dict[int, torch.Tensor] = {}
        for k in order:
            out[k] = keys[k]
            styles[k] = _to_tensor(keys[k], dev)
        with torch.no_grad():
            for j in range(frames.shape[0]):
                if j in styles:
                    continue
                pos = bisect.bisect_left(order, j)
                a = order[pos - 1] if pos > 0 else None
                b = order[pos] if pos < len(order) else None
                out[j] = self._frame(frames, j, a, b, styles, dev)
        logger.debug("flowblend: %d frames from %d key frames", frames.shape[0], len(order))
        return out


_PROPAGATORS: dict[str, type] = {FlowBlendPropagator.name: FlowBlendPropagator}


FLOWS = ("auto", "dis", "raft-small", "raft-large")


def resolve_flow(flow: str, device: str) -> str:
    """The flow a run uses on `device` for the config's ``diffusion.flow``: ``auto`` is ``raft-large`` on
    cuda (where RAFT costs little beside the UNet) and ``dis`` elsewhere (RAFT takes seconds per pair
    on CPU, DIS milliseconds); any other value is kept. Returns dis, raft-small or raft-large."""
    if flow not in FLOWS:
        raise ValueError(f"diffusion.flow must be one of {', '.join(FLOWS)}, got {flow!r}.")
    if flow == "auto":
        return "raft-large" if str(device).startswith("cuda") else "dis"
    return flow


def build_propagator(name: str, **options: Any) -> Propagator:
    """The propagator registered as ``name``, built with ``options`` (its constructor keywords)."""
    cls = _PROPAGATORS.get(name)
    if cls is None:
        raise ValueError(f"Unknown propagator {name!r}; available: {', '.join(sorted(_PROPAGATORS))}.")
    return cls(**options)


__all__ = ["FLOWS", "FlowBlendPropagator", "Propagator", "build_propagator", "key_indices", "key_interval",
           "resolve_flow"]
