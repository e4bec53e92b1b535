"""Clip anonymizers: frames in, anonymized frames and per-clip diagnostics out. No Ray in here.

`pixelate` is the real, simple baseline: faces are found by the configured detector (CenterFace by
default, see `corpus_anon.models.detect`), batched over frames, linked into tracks, and every track
is pixelated over its whole span (interpolated across the frames where the detector missed it) and
`hold_s` beyond both ends; the signer's track (see `facetrack.signer_track`) is held over the whole
clip. Single-frame detections are kept. A clip where no face is found is processed as it is
(`faces_found = 0` in its metrics), not failed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from corpus_anon.models import facetrack

if TYPE_CHECKING:
    from corpus_anon.models.landmarks import ClipLandmarks, Landmarks

log = logging.getLogger(__name__)

Check = Callable[[], None]


@dataclass
class AnonResult:
    frames: np.ndarray  # (N, H, W, 3) uint8, same shape as the input
    metrics: dict[str, Any] = field(default_factory=dict)


class ClipAnonymizer(Protocol):
    """`ctx` is the manifest row (with the driver's derived `seed`/`prompt`) plus `fps`."""

    name: str

    def anonymize(self, frames: np.ndarray, ctx: dict[str, Any], check: Check) -> AnonResult: ...


def pixelate_region(frame: np.ndarray, box: tuple[int, int, int, int], blocks: int) -> None:
    """Replace a region by a mosaic of `blocks` cells across its longer side, in place."""
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    region = frame[y0:y1, x0:x1]
    h, w = region.shape[:2]
    cell = max(1, int(np.ceil(max(h, w) / blocks)))
    for ys in range(0, h, cell):
        for xs in range(0, w, cell):
            block = region[ys : ys + cell, xs : xs + cell]
            block[...] = block.reshape(-1, 3).mean(axis=0).astype(np.uint8)


def hold_while_unchanged(frames: np.ndarray, boxes: np.ndarray) -> None:
    """Extend a track's boxes (in place) before its first and after its last covered frame for as
    long as the picture at its end box stays what it was there (`facetrack.still_until`): a face the
    detector found late, or lost early, is still there while its place looks the same, and stays
    hidden. The exposure check holds a track by the same rule."""
    covered = np.flatnonzero(~np.isnan(boxes[:, 0]))
    if len(covered) == 0:
        return
    for end, step in ((int(covered[0]), -1), (int(covered[-1]), 1)):
        reach = facetrack.still_until(frames, boxes[end], end, step)
        lo, hi = sorted((end, reach))
        boxes[lo : hi + 1] = np.where(np.isnan(boxes[lo : hi + 1]), boxes[end], boxes[lo : hi + 1])


class PixelateAnonymizer:
    """Pixelate every face track the detector finds (see the module docstring)."""

    name = "pixelate"

    def __init__(self, detector: Any, blocks: int = 8, box_scale: float = 1.5, detect_every: int = 1,
                 hold_s: float = 0.5, batch_frames: int = 8) -> None:
        self.detector = detector
        self.blocks = blocks
        self.box_scale = box_scale
        self.detect_every = detect_every
        self.hold_s = hold_s
        self.batch_frames = batch_frames

    def hold_frames(self, fps: float) -> int:
        """Frames every track is held past its ends: `hold_s` at the clip's rate, and at least the
        frames between two detector runs."""
        return max(int(math.ceil(self.hold_s * fps - 1e-9)), self.detect_every - 1)

    def anonymize(self, frames: np.ndarray, ctx: dict[str, Any], check: Check) -> AnonResult:
        n, h, w = frames.shape[:3]
        run = list(range(0, n, self.detect_every))
        detections: list[np.ndarray] = [np.zeros((0, 4))] * n
        for a in range(0, len(run), self.batch_frames):
            idx = run[a : a + self.batch_frames]
            for t, faces in zip(idx, self.detector.detect_batch([frames[t] for t in idx])):
                detections[t] = np.array([f.box for f in faces], dtype=np.float64).reshape(-1, 4)
            check()
        # A track stays open across any gap: where the face comes back it is linked and the gap filled.
        tracks = facetrack.build_tracks(detections, max_gap=n)
        signer = facetrack.signer_track(tracks, w, h)
        hold = self.hold_frames(float(ctx.get("fps") or 30.0))
        out = frames.copy()
        for boxes in facetrack.cover_boxes(tracks, n, hold, whole=signer):
            hold_while_unchanged(frames, boxes)
            for t in np.flatnonzero(~np.isnan(boxes[:, 0])):
                pixelate_region(out[t], facetrack.expand_box(boxes[t], self.box_scale, w, h), self.blocks)
        check()
        signer_frames = len(tracks[signer].frames) if signer is not None else 0
        return AnonResult(
            out,
            {
                "faces_found": len(tracks),
                "signer_detected_frames": signer_frames,
                "signer_detected_frac": round(signer_frames / max(1, len(run)), 4),
                "detector": self.detector.name,
            },
        )


class DiffSLVAAnonymizer:
    """DiffSLVA: key frames through SD 1.5 + ControlNet-HED with the temporal constraints,
    propagated to every frame. Models are staged (verified against the store's lock file) and
    loaded once, in the constructor, on the actor."""

    name = "diffslva"

    def __init__(self, cfg: Any, device: str, storage: Any) -> None:
        import torch

        from corpus_anon.models import registry
        from corpus_anon.models.load import load_models
        from corpus_anon.models.diffusion import TranslatorSettings, VideoTranslator, attach_lcm_lora
        from corpus_anon.models.propagate import build_propagator, resolve_flow

        d, m = cfg.diffusion, cfg.models
        self.device = device
        self.dtype = resolve_dtype(d.dtype, device)
        staged = registry.stage(m.profile, m.store, m.cache_dir, storage)
        models = load_models(staged, m.profile, device=device, dtype=self.dtype)
        if device.startswith("cuda") and d.channels_last:
            models.unet.to(memory_format=torch.channels_last)
            models.controlnet.to(memory_format=torch.channels_last)
        self.sampler = "ddim"
        if d.mode == "fast" and attach_lcm_lora(models):
            self.sampler = "lcm"
        settings = TranslatorSettings(
            mode=d.mode, steps=d.steps, fast_steps=d.fast_steps, guidance_scale=d.guidance_scale,
            controlnet_scale=d.controlnet_scale, strength=d.strength, a_prompt=d.a_prompt,
            n_prompt=d.n_prompt, cross_frame_attention=d.cross_frame_attention,
            loose_cfattn=d.loose_cfattn, shape_fusion=d.shape_fusion, pixel_fusion=d.pixel_fusion,
            adain=d.adain, style_update_freq=d.style_update_freq,
        )
        # One flow estimator for the actor, shared by the key-frame fusions and the propagation: None is
        # DIS (the code before RAFT, unchanged); RAFT's checkpoint comes from the store, lock-checked.
        self.flow = resolve_flow(d.flow, device)
        estimator = None
        if self.flow != "dis":
            from corpus_anon.models.raft import RAFT_FILES, build_raft_flow

            path = registry.raft_checkpoint(staged, RAFT_FILES[self.flow], models.file_sha256)
            estimator = build_raft_flow(self.flow, path, device=device, iters=d.raft_iters)
        self.translator = VideoTranslator(models, settings, device, self.dtype, flow=estimator)
        if d.compile:
            models.unet.forward = torch.compile(models.unet.forward)
        self.propagator = build_propagator(d.propagator, estimator=estimator)
        self.reenactor = None
        f = cfg.faces
        self.enhance_size = f.enhance_size
        if f.enhance and f.backend != "none":
            from corpus_anon.models.reenact import Reenactor
            from corpus_anon.models.registry import tpsmm_checkpoint

            if models.staged_dir is None:
                raise ValueError("faces.enhance needs the TPSMM checkpoint in the model store; "
                                 "stage it or set faces.enhance: false.")
            self.reenactor = Reenactor.from_checkpoint(
                tpsmm_checkpoint(models.staged_dir, models.profile, f.tpsmm, models.file_sha256), device)
        self.key_rate = d.key_rate
        self.batch_clips = d.batch_clips
        self.mode = d.mode
        self.profile = m.profile

    def anonymize(self, frames: np.ndarray, ctx: dict[str, Any], check: Check) -> AnonResult:
        return self.anonymize_many([(frames, ctx)], check)[0]

    def anonymize_many(self, items: list[tuple[np.ndarray, dict[str, Any]]], check: Check) -> list[AnonResult]:
        """Several clips of one frame size: their key frames share UNet calls (the translator
        batches key n of every clip), then each clip is propagated on its own."""
        from corpus_anon.models.diffusion import TranslateJob
        from corpus_anon.models.propagate import key_indices, key_interval

        jobs, ks = [], []
        for frames, ctx in items:
            seed, prompt = ctx.get("seed"), ctx.get("prompt")
            if seed is None or not prompt:
                raise ValueError("the row carries no seed/prompt; the driver derives them before the run.")
            k = key_interval(float(ctx.get("fps") or 30.0), self.key_rate)
            ks.append(k)
            jobs.append(TranslateJob(frames, key_indices(int(frames.shape[0]), k), str(prompt), int(seed)))
        key_frames = self.translator.translate_many(jobs, check=check)
        results = []
        for job, k, keys_out, nfe in zip(jobs, ks, key_frames, self.translator.last_nfe):
            check()
            out = self.propagator.propagate(job.frames, keys_out, device=self.device)
            n = int(job.frames.shape[0])
            results.append(AnonResult(out, {
                "nfe_per_frame": round(nfe / max(1, n), 4), "diffusion_mode": self.mode,
                "models_profile": self.profile, "key_interval": k, "n_key_frames": len(job.keys),
                "sampler": self.sampler, "batched_clips": len(jobs), "flow": self.propagator.flow_name,
            }))
        return results


def enhance_expressions(anonymizer: Any, orig: np.ndarray, result: AnonResult, track: Any,
                        landmarks: Landmarks | None = None, clip_landmarks: ClipLandmarks | None = None,
                        use_kps: bool = True) -> AnonResult:
    """The facial-expression module (METHOD §6): reenact the synthesized face with the original
    signer's facial motion and paste it back, hands on top. Only for anonymizers that synthesize a
    face and hold a reenactor; `pixelate` never gets it.

    With `landmarks` (or `clip_landmarks`, the original already measured by
    `enhance.measure_original`: once per clip, however many seeds are tried) the mask follows the
    face mesh, the source is the translated key frame (from the result's `key_interval`) nearest the
    clip's median expression, and hands on top come from the hand model (`enhance.enhance_clip`);
    without, the box ellipse, the best-scoring frame and the moving-skin rule. The metrics say which
    ran. `use_kps` False keeps the track's five keypoints from the face mesh: dlib's start with one
    eye's two corners, not the two eyes the mesh's first square is levelled by."""
    reenactor = getattr(anonymizer, "reenactor", None)
    if reenactor is None:
        return result
    from corpus_anon.actor.enhance import enhance_clip

    scores = np.array([np.nan if f is None else f.score for f in track.faces], dtype=np.float64)
    kps = [None if f is None else getattr(f, "kps", None) for f in track.faces] if use_kps else None
    key_frames = None
    if result.metrics.get("key_interval"):
        from corpus_anon.models.propagate import key_indices

        key_frames = key_indices(len(orig), int(result.metrics["key_interval"]))
    frames, info = enhance_clip(orig, result.frames, track.boxes(), scores, reenactor,
                                size=anonymizer.enhance_size, landmarks=landmarks, key_frames=key_frames, kps=kps,
                                clip_landmarks=clip_landmarks)
    return AnonResult(frames, dict(result.metrics, enhanced=bool(info["enhanced"]),
                                   hand_pixels_kept=info.get("hand_pixels_kept"), enhance_mask=info["mask"],
                                   enhance_hands=info["hand_source"], enhance_source_frame=info["source_frame"],
                                   enhance_source_is_key=info["source_is_key"],
                                   enhance_source_rule=info["source_rule"]))


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_anonymizer(cfg: Any, device: str = "cpu", storage: Any = None) -> ClipAnonymizer:
    """The anonymizer a config asks for, with its models loaded (called once per actor)."""
    kind = cfg.anonymizer.kind
    if kind == "pixelate":
        from corpus_anon.models.detect import build_detector

        p = cfg.anonymizer.pixelate
        return PixelateAnonymizer(build_detector(cfg, storage, device), p.blocks, p.box_scale, p.detect_every,
                                  p.hold_s)
    if kind == "diffslva":
        return DiffSLVAAnonymizer(cfg, device, storage)
    raise ValueError(f"anonymizer.kind '{kind}' is unknown.")
