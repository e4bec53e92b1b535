"""Denoiser calls per output frame (nfe_per_frame), counted by a UNet forward hook.

One UNet forward (with its ControlNet) on one latent counts 1; the two halves of a CFG batch count
2 (`corpus_anon.models.diffusion.NFECounter`, a forward pre-hook that adds the batch size). The
count depends only on the frame count, the fps, the key rate, the steps and CFG: not on the frame
size, the weights or the machine. So this runs the tiny profile (`make_tiny`, random
weights, same diffusers classes and the same product code path) on small synthetic frames on CPU.

Rows (a 301-frame, 30 fps clip unless --frames/--fps say otherwise):
  stock      diffusers StableDiffusionControlNetImg2ImgPipeline per frame, 20 steps, strength 1.0,
             CFG 7.5: hook count over --stock-frames frames, divided by them
  faithful   DiffSLVAAnonymizer.anonymize (key frames, propagation) at the default key_rate, and at
             key_rate = fps/5 and fps/10 (K = max(1, round(fps / key_rate)), propagate.key_interval)
  fast       the same in `fast` mode at the default key_rate

Each row also prints the closed form the code implies (`closed_form`) and the goal from issues 6 and 15.

    .venv/bin/python benchmarks/nfe.py                  # about 2-3 minutes on one CPU thread
    .venv/bin/python benchmarks/nfe.py --frames 31      # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Goals from issue 6 (P1): nfe_per_frame at 30 fps.
# issue 6's goals, tightened by issue 15 (pass 2 resumes where the pixel-aware fusion starts)
GOALS = {("faithful", 5): 12.0, ("faithful", 10): 6.0, ("fast", None): 1.0}


@dataclass
class NFERow:
    variant: str
    mode: str
    key_rate: float | None
    K: int | None
    n_keys: int | None
    n_frames: int
    hook_count: int  # latents through the UNet, by the forward hook
    closed_form: int  # what the code's schedule implies
    product_metric: float | None = None  # the anonymizer's own nfe_per_frame metric
    seconds: float = 0.0

    @property
    def per_frame(self) -> float:
        return self.hook_count / self.n_frames

    @property
    def closed_form_per_frame(self) -> float:
        return self.closed_form / self.n_frames


def synthetic_frames(n: int, size: int = 64) -> np.ndarray:
    """A moving bar over a gradient (tests/media.gradient_frame's pattern), uint8 (N,H,W,3)."""
    img = np.zeros((n, size, size, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, None, :]
    img[..., 1] = np.linspace(0, 255, size, dtype=np.uint8)[None, :, None]
    for i in range(n):
        img[i, ..., 2] = (i * 7) % 256
        x = (i * 3) % max(1, size - 8)
        img[i, :, x : x + 8] = 255
    return img


def make_store(root: str | Path) -> dict[str, str]:
    """The tiny profile's store (random weights) and a cache dir under `root`."""
    from corpus_anon.models.tiny import make_tiny

    root = Path(root)
    make_tiny(root / "tiny", faces=False)
    return {"store": str(root / "tiny"), "cache": str(root / "cache")}


def _storage():
    from corpus_anon.io.storage import Storage, StorageSettings

    return Storage(StorageSettings(unrestricted=True))


def closed_form(mode: str, n_keys: int, steps: int, fast_steps: int, guidance_scale: float) -> int:
    """The schedule VideoTranslator.translate_many runs (diffusion.py), written out:
    every sampling pass is n_steps UNet calls on 2 latents with CFG (faithful, guidance > 1) or 1;
    faithful: the anchor key is one pass, every later key a direct pass plus the pixel-fusion pass
    from the first step the fusion changes: the fusion period (0.5, 0.8) of 20 steps acts from step
    11 (after int(0.5 x 20) = 10), so that pass runs steps 11..19, 9 steps (fusion on, strength 1);
    fast: one pass per key, fast_steps steps, no CFG. Cross-frame attention reads cached hidden
    states of the anchor/previous key: it adds no latents."""
    cfg = mode == "faithful" and guidance_scale > 1.0
    mult = 2 if cfg else 1
    if n_keys <= 0:
        return 0
    if mode == "fast":
        return n_keys * fast_steps * mult
    second = steps - (int(0.5 * steps) + 1)
    return steps * mult + (n_keys - 1) * (steps + second) * mult


def count_mode(store: dict[str, str], frames: np.ndarray, fps: float, mode: str,
               key_rate: float | None = None, variant: str | None = None) -> NFERow:
    """Run one clip through DiffSLVAAnonymizer (config defaults except mode/key_rate) and count the
    latents its UNet sees with a separate NFECounter hook."""
    from corpus_anon.actor.anonymize import DiffSLVAAnonymizer
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.diffusion import NFECounter
    from corpus_anon.models.propagate import key_indices, key_interval

    diffusion: dict = {"mode": mode}
    if key_rate is not None:
        diffusion["key_rate"] = key_rate
    cfg = config_from_dict({"anonymizer": {"kind": "diffslva"}, "diffusion": diffusion,
                            "faces": {"enhance": False},
                            "models": {"profile": "tiny", "store": store["store"], "cache_dir": store["cache"]}})
    d = cfg.diffusion
    anon = DiffSLVAAnonymizer(cfg, "cpu", _storage())
    counter = NFECounter(anon.translator.m.unet)
    t0 = time.perf_counter()
    try:
        res = anon.anonymize(frames, {"fps": fps, "seed": 11, "prompt": "a person is making gestures"},
                             lambda: None)
    finally:
        counter.remove()
        anon.translator.close()
    n = int(frames.shape[0])
    K = key_interval(fps, d.key_rate)
    n_keys = len(key_indices(n, K))
    assert res.metrics["key_interval"] == K and res.metrics["n_key_frames"] == n_keys
    return NFERow(variant or f"{mode}, key_rate {d.key_rate:g}", mode, d.key_rate, K, n_keys, n, counter.count,
                  closed_form(mode, n_keys, d.steps, d.fast_steps, d.guidance_scale),
                  float(res.metrics["nfe_per_frame"]), time.perf_counter() - t0)


def count_stock(store: dict[str, str], frames: np.ndarray, steps: int = 20, guidance_scale: float = 7.5,
                strength: float = 1.0) -> NFERow:
    """The stock per-frame diffusers ControlNet img2img pipeline on the same (freshly loaded) tiny
    models, one call per frame, counted by the same hook."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from corpus_anon.models import registry
    from corpus_anon.models.load import load_models
    from corpus_anon.models.diffusion import NFECounter
    from corpus_anon.models.hed import hed_edges

    staged = registry.stage("tiny", store["store"], store["cache"], _storage())
    m = load_models(staged, "tiny")
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, controlnet=m.controlnet,
        scheduler=m.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    counter = NFECounter(m.unet)
    t0 = time.perf_counter()
    try:
        for f in frames:
            img = torch.from_numpy(f).permute(2, 0, 1)[None].float().div(255)
            ctrl = hed_edges(m.hed, f[None]).repeat(1, 3, 1, 1).float()
            pipe(prompt="a person is making gestures", negative_prompt="lowres", image=img, control_image=ctrl,
                 strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        counter.remove()
    n = int(frames.shape[0])
    # diffusers img2img runs int(steps * strength) of the steps; CFG doubles the batch when guidance > 1.
    per_frame = min(steps, int(steps * strength)) * (2 if guidance_scale > 1.0 else 1)
    return NFERow(f"stock diffusers ControlNet img2img per frame ({steps} steps, strength {strength:g}, CFG)",
                  "stock", None, 1, n, n, counter.count, per_frame * n, None, time.perf_counter() - t0)


def run_all(store: dict[str, str], n_frames: int = 301, fps: float = 30.0, size: int = 64,
            stock_frames: int = 3, intervals: tuple[int, ...] = (5, 10)) -> list[NFERow]:
    frames = synthetic_frames(n_frames, size)
    rows = [count_stock(store, frames[:stock_frames])]
    rows.append(count_mode(store, frames, fps, "faithful", None, "faithful, default key_rate"))
    for k in intervals:
        rows.append(count_mode(store, frames, fps, "faithful", fps / k, f"faithful, K={k}"))
    rows.append(count_mode(store, frames, fps, "fast", None, "fast, default key_rate"))
    return rows


def goal_for(row: NFERow, n_frames: int, fps: float) -> float | None:
    """The issue's goals are for a 301-frame clip at 30 fps; other clips get none."""
    if (n_frames, fps) != (301, 30.0):
        return None
    if row.mode == "fast":
        return GOALS[("fast", None)]
    return GOALS.get((row.mode, row.K))


def print_table(rows: list[NFERow], n_frames: int, fps: float, size: int) -> None:
    print(f"# {n_frames} frames at {fps:g} fps, {size}x{size}, tiny profile on CPU, torch {torch.__version__}")
    print("| variant | key_rate | K | key frames | UNet latents (hook) | nfe_per_frame (hook) | closed form | "
          "anonymizer metric | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        goal = goal_for(r, n_frames, fps)
        met = "" if goal is None else ("yes" if r.per_frame <= goal else "NO")
        print(f"| {r.variant} | {'' if r.key_rate is None else f'{r.key_rate:g}'} | {r.K or ''} | "
              f"{r.n_keys if r.mode != 'stock' else f'{r.n_frames} (all, measured)'} | {r.hook_count} | "
              f"{r.per_frame:.4f} | {r.closed_form_per_frame:.4f} | "
              f"{'' if r.product_metric is None else f'{r.product_metric:.4f}'} | "
              f"{'' if goal is None else f'<= {goal:g}'} | {met} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=301)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=64, help="frame side (the count does not depend on it)")
    ap.add_argument("--stock-frames", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="nfe-") as tmp:
        rows = run_all(make_store(tmp), args.frames, args.fps, args.size, args.stock_frames)
    print_table(rows, args.frames, args.fps, args.size)
    bad = [r.variant for r in rows if r.hook_count != r.closed_form]
    if bad:
        print(f"# hook count differs from the closed form: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
