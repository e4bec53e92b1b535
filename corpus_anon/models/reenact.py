"""Face reenactment with TPSMM (`corpus_anon.models.tpsmm`): TPSMM's relative motion (the driving
keypoints' displacements, scaled by the ratio of keypoint hull areas, applied to the source's
keypoints), which keeps the source face's shape and transfers only the motion, and `Reenactor`,
which animates one source frame with a clip's frames in batches. Only stdlib, numpy and torch are
imported here."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from corpus_anon.models.tpsmm import TPSMM, load_tpsmm

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("relative", "standard", "avd")


def convex_hull_area(points: np.ndarray | torch.Tensor) -> float:
    """Area of the 2-D convex hull of points (N, 2) (monotone chain + shoelace); 0 when degenerate."""
    if isinstance(points, torch.Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"convex_hull_area takes points shaped (N, 2), got {pts.shape}.")
    pts = np.unique(pts, axis=0)  # sorted by x, then y
    if len(pts) < 3:
        return 0.0

    def half(seq: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in seq:
            while len(chain) >= 2:
                o, a = chain[-2], chain[-1]
                if (a[0] - o[0]) * (p[1] - o[1]) - (a[1] - o[1]) * (p[0] - o[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1])
    if len(hull) < 3:
        return 0.0
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def adapt_movement_scale(kp_source: torch.Tensor, kp_driving_initial: torch.Tensor) -> float:
    """sqrt(hull area of the source keypoints) / sqrt(hull area of the initial driving keypoints)."""
    source_area = convex_hull_area(kp_source[0])
    driving_area = convex_hull_area(kp_driving_initial[0])
    if driving_area <= 0.0:
        raise ValueError("The initial driving keypoints are collinear, so their hull has no area to scale by.")
    return math.sqrt(source_area) / math.sqrt(driving_area)


def relative_kp(kp_source: torch.Tensor, kp_driving: torch.Tensor, kp_driving_initial: torch.Tensor) -> torch.Tensor:
    """TPSMM relative motion: kp_source + (kp_driving - kp_driving_initial) x hull-size ratio.

    Keypoints are (B, N, 2); the hull areas are those of batch item 0 of the source and of the
    initial driving keypoints, as in TPSMM's demo.
    """
    scale = adapt_movement_scale(kp_source, kp_driving_initial)
    return kp_source + (kp_driving - kp_driving_initial) * scale


class Reenactor:
    """Animates one (anonymized) source face with the motion of a driving face video."""

    def __init__(self, model: TPSMM) -> None:
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Reenactor:
        return cls(load_tpsmm(path, device=device))

    def _check_frames(self, name: str, x: torch.Tensor, single: bool) -> None:
        c = self.model.inpainting_network.num_channels
        m = self.model.size_multiple
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c or (single and x.shape[0] != 1) \
                or x.shape[0] < 1 or not x.is_floating_point():
            want = f"(1,{c},H,W)" if single else f"(T,{c},H,W)"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor shaped {want}, got {got}.")
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"{name} sides must be multiples of {m} px, got {x.shape[2]}x{x.shape[3]}.")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} must hold RGB values in [0,1], got values in [{lo:.3g}, {hi:.3g}].")

    def keypoints(self, frames: torch.Tensor) -> torch.Tensor:
        """Keypoints (B, N, 2) in [-1,1] of frames (B, C, H, W) in [0,1]."""
        with torch.inference_mode():
            return self.model.kp_detector(frames.to(self.device, self.dtype))["fg_kp"]

    def animate(self, source: torch.Tensor, driving: torch.Tensor, driving_initial_index: int = 0,
                batch_size: int = 8, mode: str = "relative") -> torch.Tensor:
        """Frames (T, C, H, W) in [0,1]: `source` (1, C, H, W) moved like `driving` (T, C, H, W).

        `relative` (default) moves the source keypoints by the driving keypoints' displacement from
        frame `driving_initial_index`, scaled by the hull-size ratio, so the source face keeps its
        shape; `standard` uses the driving keypoints as they are; `avd` needs the avd_network.
        The source's keypoints and encoder maps are computed once; driving frames go through in
        batches of `batch_size`. The result lives on `driving`'s device, as float32.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode == "avd" and self.model.avd_network is None:
            raise ValueError("mode 'avd' needs a checkpoint with an avd_network entry.")
        self._check_frames("source", source, single=True)
        self._check_frames("driving", driving, single=False)
        if source.shape[2:] != driving.shape[2:]:
            raise ValueError(f"source and driving frames differ in size: {tuple(source.shape[2:])} vs "
                             f"{tuple(driving.shape[2:])}.")
        t = driving.shape[0]
        if not 0 <= driving_initial_index < t:
            raise ValueError(f"driving_initial_index must be in [0, {t}), got {driving_initial_index}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        model = self.model
        out = torch.empty(driving.shape, dtype=torch.float32, device=driving.device)
        with torch.inference_mode():
            src = source.to(self.device, self.dtype)
            kp_s = model.kp_detector(src)["fg_kp"]
            encoded = model.inpainting_network.encode(src)
            kp_d0 = scale = None
            if mode == "relative":
                idx = driving_initial_index
                kp_d0 = model.kp_detector(driving[idx:idx + 1].to(self.device, self.dtype))["fg_kp"]
                scale = adapt_movement_scale(kp_s, kp_d0)
            for start in range(0, t, batch_size):
                drv = driving[start:start + batch_size].to(self.device, self.dtype)
                b = drv.shape[0]
                kp_d = model.kp_detector(drv)["fg_kp"]
                if mode == "relative":
                    kp_norm = kp_s + (kp_d - kp_d0) * scale
                elif mode == "avd":
                    kp_norm = model.avd_network(kp_s, kp_d)
                else:
                    kp_norm = kp_d
                src_b = src.expand(b, *src.shape[1:])
                motion = model.dense_motion_network(src_b, kp_norm, kp_s.expand(b, *kp_s.shape[1:]))
                pred = model.inpainting_network.decode(src, encoded, motion)["prediction"]
                out[start:start + b] = pred.to(out.device, torch.float32)
        log.debug("animated %d frames (mode %s, initial %d, batch %d)", t, mode, driving_initial_index, batch_size)
        return out
