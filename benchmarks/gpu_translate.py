"""GPU check for the diffusion translator: output frames/s at 512x512 per GPU, side by side.

Runs on the lent GPU machine as it is: Python with torch, numpy and a carried diffusers wheel
(+ transformers for the stock pipeline row), but no Ray, PyAV, OpenCV or project config. It builds
the full-size SD 1.5 UNet, ControlNet, VAE and the HED network from their configs with random
weights (the compute equals the real models'), and random text embeddings of shape 77x768.
Flows are zero (DIS optical flow needs OpenCV, which that machine lacks; it runs on CPU threads
in production and does not touch the GPU).

Rows (one clip of --frames frames at 30 fps, key interval 5):
  stock      diffusers StableDiffusionControlNetImg2ImgPipeline per frame, 20 steps, CFG, strength 1.0
  faithful   corpus-anon key frames, 20 steps x CFG + the pixel-fusion pass from step 11, + flow-blend propagation
  fast       corpus-anon key frames, 1 pass x 4 steps, no CFG, + propagation
  ..., batch_clips N   the same for N clips at once: key n of every clip shares UNet calls
  faithful+compile   the same with torch.compile on the UNet and ControlNet
All in bf16 with SDPA and channels_last. Usage:

    python benchmarks/gpu_translate.py                    # on the GPU machine (about 4 minutes)
    python benchmarks/gpu_translate.py --tiny --frames 11 # CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
)
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build(tiny: bool, device: str, dtype: torch.dtype) -> SimpleNamespace:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

    from corpus_anon.models.hed import ControlNetHED

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    hed = ControlNetHED((4, 8, 8, 16, 16) if tiny else (64, 128, 256, 512, 512))
    for m in (unet, controlnet, vae, hed):
        m.to(device=device, dtype=dtype).eval()
    if device == "cuda":
        unet.to(memory_format=torch.channels_last)
        controlnet.to(memory_format=torch.channels_last)
    dim = 32 if tiny else 768
    return SimpleNamespace(unet=unet, controlnet=controlnet, vae=vae, hed=hed,
                           scheduler=DDIMScheduler(**SCHED), text_encoder=None, tokenizer=None,
                           emb=torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype))


def zero_flows(monkeypatch_target) -> None:
    from corpus_anon.models import flow as flowlib

    def flow_pair(current, reference, device="cpu", preset="medium", estimator=None):
        h, w = current.shape[:2]
        z = torch.zeros(1, 2, h, w)
        return flowlib.FlowPair(f_b=z, f_f=z.clone(), occ=torch.zeros(1, 1, h, w), mask=torch.zeros(1, 1, h, w))

    monkeypatch_target.flow_pair = flow_pair


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(models, frames: np.ndarray, mode: str, device: str, dtype, compile_: bool) -> tuple[float, float]:
    from corpus_anon.models.diffusion import TranslatorSettings, VideoTranslator
    from corpus_anon.models.propagate import FlowBlendPropagator, key_indices

    s = TranslatorSettings(mode=mode)
    tr = VideoTranslator(models, s, device, dtype)
    tr.embed_pair = lambda prompt: models.emb
    if compile_:
        models.unet.forward = torch.compile(models.unet.forward)
        models.controlnet.forward = torch.compile(models.controlnet.forward)
    keys = key_indices(len(frames), 5)
    tr.translate(frames[:6], key_indices(6, 5), "warm-up", 0)  # warm-up (and compile)
    sync(device)
    before = tr.nfe.count
    t0 = time.perf_counter()
    out = tr.translate(frames, keys, "bench", 0)
    FlowBlendPropagator().propagate(frames, out, device=device)
    sync(device)
    dt = time.perf_counter() - t0
    nfe = (tr.nfe.count - before) / len(frames)
    tr.close()
    return len(frames) / dt, nfe


def run_batched(models, frames: np.ndarray, mode: str, device: str, dtype, clips: int) -> tuple[float, float]:
    """`clips` copies of the clip (different seeds) through `translate_many`: key n of every clip
    shares UNet calls (`diffusion.batch_clips`), then each clip is propagated. Output frames/s over
    all clips, and denoiser latents per output frame."""
    from corpus_anon.models.diffusion import TranslateJob, TranslatorSettings, VideoTranslator
    from corpus_anon.models.propagate import FlowBlendPropagator, key_indices

    tr = VideoTranslator(models, TranslatorSettings(mode=mode), device, dtype)
    tr.embed_pair = lambda prompt: models.emb
    keys = key_indices(len(frames), 5)
    tr.translate_many([TranslateJob(frames[:6], key_indices(6, 5), "warm-up", i) for i in range(clips)])
    sync(device)
    before = tr.nfe.count
    t0 = time.perf_counter()
    outs = tr.translate_many([TranslateJob(frames, keys, "bench", i) for i in range(clips)])
    for out in outs:
        FlowBlendPropagator().propagate(frames, out, device=device)
    sync(device)
    dt = time.perf_counter() - t0
    nfe = (tr.nfe.count - before) / (clips * len(frames))
    tr.close()
    return clips * len(frames) / dt, nfe


def run_stock(models, frames: np.ndarray, device: str, dtype) -> tuple[float, float] | None:
    try:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline
    except Exception as e:  # noqa: BLE001
        print(f"# stock row skipped: {e}")
        return None
    from corpus_anon.models.hed import hed_edges

    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=models.vae, text_encoder=None, tokenizer=None, unet=models.unet, controlnet=models.controlnet,
        scheduler=models.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = [0]
    h = models.unet.register_forward_pre_hook(lambda m, a, k: calls.__setitem__(0, calls[0] + (a[0] if a else k["sample"]).shape[0]), with_kwargs=True)
    neg, pos = models.emb[:1], models.emb[1:]

    def one(frame: np.ndarray) -> None:
        img = torch.from_numpy(frame).permute(2, 0, 1)[None].float().div(255).to(device, dtype)
        ctrl = hed_edges(models.hed, frame[None]).repeat(1, 3, 1, 1).to(device, dtype)
        pipe(prompt_embeds=pos, negative_prompt_embeds=neg, image=img, control_image=ctrl, strength=1.0,
             num_inference_steps=20, guidance_scale=7.5, output_type="np")

    one(frames[0])
    sync(device)
    calls[0] = 0
    t0 = time.perf_counter()
    for f in frames:
        one(f)
    sync(device)
    dt = time.perf_counter() - t0
    h.remove()
    return len(frames) / dt, calls[0] / len(frames)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    ap.add_argument("--frames", type=int, default=31)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--stock-frames", type=int, default=4, help="frames for the (slow) stock row")
    ap.add_argument("--batch-clips", default="2,4",
                    help="also run faithful/fast with this many clips sharing UNet calls (diffusion.batch_clips)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 64 if args.tiny else args.size
    from corpus_anon.models import diffusion

    zero_flows(diffusion.flowlib)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.frames, size, size, 3), dtype=np.uint8)
    models = build(args.tiny, device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {dtype}, {size}x{size}, {args.frames} frames at K=5")
    print("| variant | output frames/s | nfe_per_frame |")
    print("|---|---|---|")
    stock = run_stock(models, frames[: args.stock_frames], device, dtype)
    if stock:
        print(f"| stock img2img per frame (20 steps, CFG) | {stock[0]:.3f} | {stock[1]:.1f} |", flush=True)
    for mode in ("faithful", "fast"):
        fps, nfe = run_ours(models, frames, mode, device, dtype, False)
        print(f"| corpus-anon {mode} | {fps:.3f} | {nfe:.2f} |", flush=True)
    for n in [int(b) for b in args.batch_clips.split(",") if b]:
        for mode in ("faithful", "fast"):
            fps, nfe = run_batched(models, frames, mode, device, dtype, n)
            print(f"| corpus-anon {mode}, batch_clips {n} | {fps:.3f} | {nfe:.2f} |", flush=True)
    if not args.no_compile:
        fps, nfe = run_ours(models, frames, "faithful", device, dtype, True)
        print(f"| corpus-anon faithful + torch.compile | {fps:.3f} | {nfe:.2f} |", flush=True)


if __name__ == "__main__":
    main()
