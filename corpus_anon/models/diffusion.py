"""DiffSLVA key-frame translation on diffusers components (METHOD §4): SD 1.5 + ControlNet-HED,
an own DDIM loop, cross-frame attention, shape-aware and pixel-aware fusion, optional AdaIN.

Module-level imports are stdlib, numpy, torch and `corpus_anon.models.flow` only: the GPU check imports
this module on a machine that has torch but no project config, Ray, PyAV or OpenCV.

Order of work for one clip (faithful mode):
    anchor (key 0):     sample once, STORE the decoder self-attention inputs and x̂0 per step
    every later key c:  flows c→prev key and c→anchor on the ORIGINAL frames (CPU threads)
                        pass 1: LOAD cross-frame attention, x̂0 shape fusion, AdaIN → decode
                        pixel-aware fusion target from the warped previous/anchor outputs
                        pass 2: same seed, LOAD (+UPDATE previous), latent blend → decode = key c
Pass 2 is pass 1 exactly up to the first step the pixel-aware fusion changes (step 11 of 20), so it
resumes from pass 1's latent there instead of repeating those steps, and pass 1 already writes the
"previous" attention reference for them; without pixel-aware fusion (or without a fusion step in the
schedule) pass 2 would reproduce pass 1 and is not run. Outputs are bit-identical to running both
passes whole (`VideoTranslator.resume_pass2 = False`, kept for the test that says so).
`fast` mode runs one pass per key frame with few steps and no CFG (LCM-LoRA when staged).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from corpus_anon.models import flow as flowlib

log = logging.getLogger(__name__)

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
            "cropped, worst quality, low quality")


@dataclass
class TranslatorSettings:
    """Every knob of the key-frame translator; defaults follow METHOD §7 (Rerender-A-Video)."""

    mode: str = "faithful"  # faithful | fast
    steps: int = 20
    fast_steps: int = 4
    guidance_scale: float = 7.5
    controlnet_scale: float = 1.0
    strength: float = 1.0  # >= 1.0: start from pure noise, no source latent at all
    a_prompt: str = A_PROMPT
    n_prompt: str = N_PROMPT
    cross_frame_attention: bool = True
    loose_cfattn: bool = True  # skip the widest decoder block (1280 channels in SD 1.5)
    shape_fusion: bool = True
    warp_period: tuple[float, float] = (0.0, 0.1)
    pixel_fusion: bool = True
    mask_period: tuple[float, float] = (0.5, 0.8)
    adain: bool = True
    ada_period: tuple[float, float] = (0.8, 1.0)
    mask_strength: float = 0.5
    inner_strength: float = 0.9
    smooth_boundary: bool = True
    style_update_freq: int = 1  # update the "previous" attention reference every N key frames
    fidelity_threshold: float = 0.25

    @property
    def use_cfg(self) -> bool:
        return self.mode == "faithful" and self.guidance_scale > 1.0

    @property
    def n_steps(self) -> int:
        return self.steps if self.mode == "faithful" else self.fast_steps


def inclusive_steps(period: tuple[float, float], n: int) -> set[int]:
    """DDIM indices i with int(a·n) <= i <= int(b·n), within range (warp and AdaIN periods)."""
    a, b = int(period[0] * n), int(period[1] * n)
    return {i for i in range(n) if a <= i <= b}


def exclusive_steps(period: tuple[float, float], n: int) -> set[int]:
    """DDIM indices j with int(a·n) < j < int(b·n) (the pixel-aware fusion period)."""
    a, b = int(period[0] * n), int(period[1] * n)
    return {j for j in range(n) if a < j < b}


# ---- cross-frame attention ----------------------------------------------------------------------
@dataclass
class CrossFrameState:
    """Shared by every processor: what the current UNet call should do with its cache."""

    mode: str = "off"  # off | store | load
    update_prev: bool = False
    update_steps: set[int] | None = None  # with update_prev: only at these steps (None = every step)
    step: int = 0
    first: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    prev: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    reads: list[tuple[int, str]] = field(default_factory=list)  # (step, layer) read, for tests

    def select(self, positions: list[int], n_before: int, cfg: bool) -> None:
        """Keep only the cache rows of the clips still running (batch order [uncond…, cond…])."""
        idx = positions + [n_before + p for p in positions] if cfg else positions
        for cache in (self.first, self.prev):
            for k, v in cache.items():
                cache[k] = v[idx]

    def clear(self) -> None:
        self.first.clear()
        self.prev.clear()
        self.reads.clear()
        self.mode, self.update_prev, self.step = "off", False, 0
        self.update_steps = None

    def updating(self) -> bool:
        """Whether this UNet call writes the "previous" reference (after reading it)."""
        return self.update_prev and (self.update_steps is None or self.step in self.update_steps)


class CrossFrameAttnProcessor:
    """Self-attention whose keys/values come from the anchor's and the previous key frame's
    hidden states at the same step and layer (the current frame's own tokens are not in K/V)."""

    def __init__(self, name: str, state: CrossFrameState) -> None:
        self.name = name
        self.state = state

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        st = self.state
        if encoder_hidden_states is not None:
            raise RuntimeError(f"{self.name}: cross-frame attention is only for self-attention layers")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        key_id = (st.step, self.name)
        context = hidden_states
        if st.mode == "store":
            st.first[key_id] = hidden_states.detach()
            st.prev[key_id] = hidden_states.detach()
        elif st.mode == "load":
            first, prev = st.first.get(key_id), st.prev.get(key_id)
            if first is None or prev is None or first.shape != hidden_states.shape:
                raise RuntimeError(f"cross-frame cache has no entry for step {st.step} at {self.name}")
            context = torch.cat([first, prev], dim=1)
            st.reads.append(key_id)
            if st.updating():
                st.prev[key_id] = hidden_states.detach()
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_frame_layers(unet: Any, loose: bool) -> list[str]:
    """Processor names of the decoder self-attention layers that get cross-frame attention."""
    names = [n for n in unet.attn_processors if n.startswith("up_blocks") and n.endswith("attn1.processor")]
    if loose and names:
        widths = {}
        for n in names:
            block = int(n.split(".")[1])
            widths[block] = unet.config.block_out_channels[::-1][block]
        widest = max(widths.values())
        if len(set(widths.values())) > 1:
            names = [n for n in names if widths[int(n.split(".")[1])] < widest]
    return names


def install_cross_frame(unet: Any, state: CrossFrameState, loose: bool) -> list[str]:
    """Install the processor on the chosen layers (SDPA everywhere else); return their names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    chosen = set(cross_frame_layers(unet, loose))
    procs = {n: (CrossFrameAttnProcessor(n, state) if n in chosen else AttnProcessor2_0())
             for n in unet.attn_processors}
    unet.set_attn_processor(procs)
    return sorted(chosen)


# ---- helpers ------------------------------------------------------------------------------------
def adain(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True) + eps
    return (x - mu) / sd * std + mean


def find_flat_region(mask: torch.Tensor) -> torch.Tensor:
    """1 where the 3x3 Prewitt gradient of a (B,1,h,w) mask is zero."""
    kx = torch.tensor([[-1.0, 0.0, 1.0]] * 3, device=mask.device, dtype=mask.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    padded = F.pad(mask, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, ky)
    return ((gx.abs() + gy.abs()) == 0).to(mask.dtype)


class NFECounter:
    """Counts latents that go through the UNet (a CFG pair counts two)."""

    def __init__(self, unet: Any) -> None:
        self.count = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.count += int(sample.shape[0])

    def remove(self) -> None:
        self._handle.remove()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] → (B,H,W,3) uint8."""
    x = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(frames: np.ndarray, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """(B,H,W,3) uint8 → (B,3,H,W) in [-1,1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    return (t / 127.5 - 1).to(dtype)


@dataclass
class TranslateJob:
    """One clip for the translator: frames (N,H,W,3) uint8, key indices, prompt, seed."""

    frames: np.ndarray
    keys: list[int]
    prompt: str
    seed: int


def control_uint8(edges: torch.Tensor) -> torch.Tensor:
    """Soft edges in [0, 1] as the reference HED annotator's uint8 map: ``(edge * 255)`` clipped and
    truncated (numpy's ``astype(uint8)``), not rounded."""
    return (edges.float() * 255.0).clamp(0, 255).to(torch.uint8)


# ---- the translator -----------------------------------------------------------------------------
class VideoTranslator:
    """Key frames of one clip through SD 1.5 + ControlNet with the DiffSLVA/Rerender constraints.

    `models` has `unet, controlnet, vae, text_encoder, tokenizer, scheduler, hed` (diffusers and
    transformers objects, and the HED module), already on `device` in `dtype`.
    """

    def __init__(self, models: Any, settings: TranslatorSettings, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, flow: flowlib.FlowEstimator | None = None) -> None:
        """`flow` is the estimator of the key-frame fusions' flows (a loaded RAFT); None is DIS."""
        self.m = models
        self.flow = flow
        self.s = settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.state = CrossFrameState()
        self.cf_layers: list[str] = []
        if settings.cross_frame_attention:
            self.cf_layers = install_cross_frame(models.unet, self.state, settings.loose_cfattn)
        self.nfe = NFECounter(models.unet)
        self.vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        self.scaling = float(getattr(models.vae.config, "scaling_factor", 0.18215))
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.scheduler = self._make_scheduler()
        self._flow_pool = ThreadPoolExecutor(2, thread_name_prefix="flow")
        self.last_nfe: list[int] = []
        self.last_cache_written: set[tuple[int, str]] = set()
        self.last_cache_reads: list[tuple[int, str]] = []
        # Pass 2 resumes from pass 1's latent (False: both passes run whole, as the reference loop did).
        self.resume_pass2 = True

    def pass2_start(self) -> int | None:
        """The first step at which pass 2 differs from pass 1 (where the pixel-aware fusion first
        acts: a fusion step after the loop's first), or None when pass 2 would reproduce pass 1."""
        return pass2_start(self.s)

    def _make_scheduler(self) -> Any:
        sched = self.m.scheduler
        if self.s.mode == "fast" and getattr(self.m, "lcm_lora_loaded", False):
            from diffusers import LCMScheduler

            return LCMScheduler.from_config(sched.config)
        return sched

    # ---- text, control, VAE -------------------------------------------------------------------
    @torch.inference_mode()
    def embed_pair(self, prompt: str) -> torch.Tensor:
        """(2,77,D): [negative prompt, prompt + quality suffix], cached per prompt."""
        if prompt not in self._prompt_cache:
            tok = self.m.tokenizer
            texts = [self.s.n_prompt, f"{prompt}, {self.s.a_prompt}" if self.s.a_prompt else prompt]
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            self._prompt_cache[prompt] = self.m.text_encoder(ids)[0].to(self.dtype)
        return self._prompt_cache[prompt]

    @torch.inference_mode()
    def control(self, frames: np.ndarray) -> torch.Tensor:
        """HED soft edges of uint8 frames as the (N,3,H,W) control in [0,1], quantized to k/255 as the
        reference annotator writes its edge map (``(edge * 255).clip(0, 255).astype(uint8)``: truncated)
        and ControlNet's pipelines read it back (``/ 255``)."""
        from corpus_anon.models.hed import hed_edges

        edges = control_uint8(hed_edges(self.m.hed, frames))
        return (edges.to(self.device).float() / 255.0).repeat(1, 3, 1, 1).to(self.dtype)

    @torch.inference_mode()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        return self.m.vae.encode(img.to(self.dtype)).latent_dist.mean * self.scaling

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.m.vae.decode((z / self.scaling).to(self.dtype)).sample.float()

    # ---- one sampling call ----------------------------------------------------------------------
    @torch.inference_mode()
    def sample(
        self,
        control: torch.Tensor,
        emb: torch.Tensor,
        seeds: list[int],
        *,
        source: torch.Tensor | None = None,
        x0_store: dict[int, torch.Tensor] | None = None,
        x0_ref: dict[int, torch.Tensor] | None = None,
        shape_flow: torch.Tensor | None = None,
        shape_keep: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        target_keep: torch.Tensor | None = None,
        check: Callable[[], None] | None = None,
        keep_at: int | None = None,
        kept: dict[str, Any] | None = None,
        resume: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Run the DDIM loop for one key frame of each of B clips (batched); returns (B,4,h,w).

        Each clip has its own generator, re-seeded on every call and drawn in a fixed order, so a
        clip's key frames all start from the same noise and its result does not depend on which
        other clips share the batch.

        ``keep_at`` = i puts the loop's state as step i begins (``step``, ``latents``, ``prev_dir``)
        into ``kept``; ``resume`` = such a state starts the loop there instead of at the beginning
        (the generators still make their initial draws, so later draws are the same)."""
        s = self.s
        n = s.n_steps
        sched = self.scheduler
        sched.set_timesteps(n, device=self.device)
        timesteps = sched.timesteps
        gens = [torch.Generator(device="cpu").manual_seed(int(sd) % (2**63)) for sd in seeds]
        h, w = control.shape[-2] // self.vae_factor, control.shape[-1] // self.vae_factor
        shape = (1, self.m.unet.config.in_channels, h, w)

        def draw() -> torch.Tensor:
            return torch.cat([torch.randn(shape, generator=g) for g in gens]).to(self.device, self.dtype)

        noise = draw()
        start = 0
        latents = noise * float(getattr(sched, "init_noise_sigma", 1.0))
        if s.strength < 1.0 and source is not None:
            # SDEdit (METHOD §4.3): begin at index int(n·(1−s)) from the noised source latent;
            # the steps before it would be discarded anyway, so they are not run.
            start = min(n - 1, int(n * (1.0 - s.strength)))
            latents = sched.add_noise(source, draw(), timesteps[start : start + 1])
        cfg = s.use_cfg
        ctrl = torch.cat([control] * 2) if cfg else control
        warp_steps = inclusive_steps(s.warp_period, n) if (s.shape_fusion and shape_flow is not None) else set()
        ada_steps = inclusive_steps(s.ada_period, n) if (s.adain and x0_ref is not None) else set()
        mask_steps = exclusive_steps(s.mask_period, n) if target is not None else set()
        alphas = sched.alphas_cumprod.to(self.device)
        final_alpha = sched.final_alpha_cumprod.to(self.device) if hasattr(sched, "final_alpha_cumprod") else alphas[0]
        prev_dir: torch.Tensor | None = None
        lcm = type(sched).__name__ == "LCMScheduler"
        if resume is not None:
            if lcm or not start <= resume["step"] < n:
                raise ValueError(f"cannot resume a {'LCM' if lcm else 'DDIM'} loop of {n} steps at step {resume['step']}.")
            start, latents, prev_dir = resume["step"], resume["latents"], resume["prev_dir"]
        for i in range(start, n):
            t = timesteps[i]
            self.state.step = i
            if i == keep_at and kept is not None:
                kept.update(step=i, latents=latents, prev_dir=prev_dir)
            if i in mask_steps and prev_dir is not None:
                latents = self._pixel_fusion(latents, prev_dir, target, target_keep, t, draw())
            inp = torch.cat([latents] * 2) if cfg else latents
            down, mid = self.m.controlnet(inp, t, encoder_hidden_states=emb, controlnet_cond=ctrl,
                                          conditioning_scale=s.controlnet_scale, return_dict=False)
            eps = self.m.unet(inp, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0]
            if cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + s.guidance_scale * (e_c - e_u)
            if lcm:
                latents = sched.step(eps, t, latents, generator=gens, return_dict=False)[0]
                continue
            a_t = alphas[t]
            t_prev = t - sched.config.num_train_timesteps // n
            a_prev = alphas[t_prev] if t_prev >= 0 else final_alpha
            x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            if x0_store is not None:
                x0_store[i] = x0.detach()
            if i in warp_steps and x0_ref is not None and i in x0_ref:
                warped = flowlib.warp(x0_ref[i].float(), shape_flow, mode="nearest").to(x0.dtype)
                x0 = warped * shape_keep + (1 - shape_keep) * x0
            if i in ada_steps and i in x0_ref:
                ref = x0_ref[i].float()
                x0 = adain(x0.float(), ref.mean(dim=(2, 3), keepdim=True),
                           ref.std(dim=(2, 3), keepdim=True)).to(x0.dtype)
            prev_dir = (1 - a_prev).sqrt() * eps
            latents = a_prev.sqrt() * x0 + prev_dir
            if check is not None:
                check()
        return latents

    def _pixel_fusion(self, latents: torch.Tensor, prev_dir: torch.Tensor, target: torch.Tensor,
                      keep: torch.Tensor, t: torch.Tensor, q_noise: torch.Tensor) -> torch.Tensor:
        """x_j ← q(x_trg, t_j)·w + (1−w)·(x_j − dir) + r·dir  (METHOD §4.7 step 4)."""
        s = self.s
        w = keep * s.mask_strength
        r = torch.maximum(1 - w, torch.sqrt((1 - w * w).clamp(min=0)) * s.inner_strength)
        if s.smooth_boundary:
            flat = find_flat_region(keep)
            r = (1 - w) * (1 - flat) + r * flat
        noised = self.scheduler.add_noise(target, q_noise, t.reshape(1))
        return noised * w + (1 - w) * (latents - prev_dir) + r * prev_dir

    # ---- pixel-aware fusion target --------------------------------------------------------------
    @torch.inference_mode()
    def fusion_target(self, direct: torch.Tensor, warped_prev: torch.Tensor, warped_first: torch.Tensor,
                      occ_prev: torch.Tensor, occ_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_trg, W): the latent the second pass is pulled towards, and where it is trusted."""
        f = self.vae_factor
        m_prev, m_first = flowlib.blend_mask(occ_prev), flowlib.blend_mask(occ_first)
        blend = (1 - m_prev) * warped_prev + m_prev * direct
        blend = (1 - m_first) * warped_first + m_first * blend
        occ = 1 - torch.clamp((1 - occ_prev) + (1 - occ_first), 0, 1)
        m = 1 - flowlib.blend_mask(occ)
        keep = 1 - F.max_pool2d(1 - m, kernel_size=f, stride=f)
        z = self.encode(blend).float()
        z_rec = self.encode(self.decode(z)).float()
        z_comp = z + (z - z_rec)
        err = (self.decode(z_comp) - blend).abs().mean(dim=1, keepdim=True)
        err_lat = F.interpolate(err, size=z.shape[-2:], mode="bilinear", align_corners=False)
        mask_x = F.max_pool2d((err_lat > self.s.fidelity_threshold).float(), 3, stride=1, padding=1)
        target = (z + (1 - mask_x) * (z - z_rec)) * keep
        return target.to(self.dtype), keep.to(self.dtype)

    # ---- clips ----------------------------------------------------------------------------------
    def translate(self, frames: np.ndarray, keys: list[int], prompt: str, seed: int,
                  check: Callable[[], None] | None = None) -> dict[int, np.ndarray]:
        """Translate one clip's key frames (indices into uint8 (N,H,W,3) `frames`); the first key is
        the anchor. Returns {index: uint8 (H,W,3)}."""
        return self.translate_many([TranslateJob(frames, keys, prompt, seed)], check)[0]

    def translate_many(self, jobs: list["TranslateJob"],
                       check: Callable[[], None] | None = None) -> list[dict[int, np.ndarray]]:
        """Translate several clips of one frame size together: the key frames of one clip form a
        chain, but key n of every clip is independent of the others, so they share UNet calls.
        `self.last_nfe` holds each clip's denoiser latents afterwards."""
        s = self.s
        if not jobs:
            return []
        sizes = {j.frames.shape[1:3] for j in jobs}
        if len(sizes) != 1:
            raise ValueError(f"clips batched together must share a frame size, got {sorted(sizes)}")
        dev, cfg = self.device, s.use_cfg
        keys = [sorted(j.keys) for j in jobs]
        if any(not k for k in keys):
            raise ValueError("every clip needs at least one key frame")
        self.state.clear()
        embs = [self.embed_pair(j.prompt) for j in jobs]
        controls = [self.control(j.frames[k]) for j, k in zip(jobs, keys)]
        # Flows for every later key against the previous key and the anchor, on the ORIGINAL frames,
        # computed on CPU threads while the GPU samples.
        futures: list[dict[int, tuple]] = []
        for j, k in zip(jobs, keys):
            futures.append({n: (self._flow_pool.submit(flowlib.flow_pair, j.frames[k[n]], j.frames[k[n - 1]], "cpu",
                                                       estimator=self.flow),
                                self._flow_pool.submit(flowlib.flow_pair, j.frames[k[n]], j.frames[k[0]], "cpu",
                                                       estimator=self.flow))
                            for n in range(1, len(k))} if s.mode == "faithful" else {})
        sources = None
        if s.strength < 1.0:
            sources = [self.encode(from_uint8(j.frames[k], dev, self.dtype)) for j, k in zip(jobs, keys)]

        def batch(active: list[int], n: int) -> tuple:
            e_neg = [embs[j][0:1] for j in active]
            e_pos = [embs[j][1:2] for j in active]
            emb = torch.cat(e_neg + e_pos) if cfg else torch.cat(e_pos)
            ctrl = torch.cat([controls[j][n : n + 1] for j in active])
            src = None if sources is None else torch.cat([sources[j][n : n + 1] for j in active])
            return emb, ctrl, src, [jobs[j].seed for j in active]

        per_pass = (s.n_steps - first_step(s)) * (2 if cfg else 1)
        nfe = [0] * len(jobs)
        outs: list[dict[int, np.ndarray]] = [{} for _ in jobs]
        active = list(range(len(jobs)))
        self.state.mode = "store" if self.cf_layers else "off"
        x0_first: dict[int, torch.Tensor] = {}
        emb, ctrl, src, seeds = batch(active, 0)
        first_img = self.decode(self.sample(ctrl, emb, seeds, source=src, x0_store=x0_first, check=check))
        prev_img = first_img
        for i, j in enumerate(active):
            outs[j][keys[j][0]] = to_uint8(first_img[i : i + 1])[0]
            nfe[j] += per_pass
        for n in range(1, max(len(k) for k in keys)):
            still = [j for j in active if len(keys[j]) > n]
            if still != active:  # some clips finished their chain: drop their rows everywhere
                pos = [active.index(j) for j in still]
                self.state.select(pos, len(active), cfg)
                x0_first = {i: v[pos] for i, v in x0_first.items()}
                first_img, prev_img, active = first_img[pos], prev_img[pos], still
            emb, ctrl, src, seeds = batch(active, n)
            load = "load" if self.cf_layers else "off"
            if s.mode == "fast":
                self.state.mode, self.state.update_prev = load, bool(self.cf_layers)
                img = self.decode(self.sample(ctrl, emb, seeds, source=src, check=check))
            else:
                pairs = [tuple(f.result() for f in futures[j].pop(n)) for j in active]
                fb_prev = torch.cat([p.f_b for p, _ in pairs]).to(dev)
                fb_first = torch.cat([q.f_b for _, q in pairs]).to(dev)
                occ_prev = torch.cat([p.occ for p, _ in pairs]).to(dev).float()
                occ_first = torch.cat([q.occ for _, q in pairs]).to(dev).float()
                lat_flow, lat_keep = flowlib.to_latent(fb_first, flowlib.blend_mask(occ_first), self.vae_factor)
                lat_flow, lat_keep = lat_flow.float(), lat_keep.to(self.dtype)
                update = bool(self.cf_layers) and (n % max(1, s.style_update_freq) == 0)
                fuse_at = self.pass2_start() if self.resume_pass2 else None
                # Pass 1 writes the "previous" reference at the steps pass 2 will not run again
                # (the reference loop: pass 1 never writes, pass 2 writes at every step).
                self.state.mode, self.state.update_prev = load, update and self.resume_pass2
                self.state.update_steps = None if fuse_at is None else set(range(fuse_at))
                kept: dict[str, Any] = {}
                z1 = self.sample(ctrl, emb, seeds, source=src, x0_ref=x0_first, shape_flow=lat_flow,
                                 shape_keep=lat_keep, check=check, keep_at=fuse_at, kept=kept)
                direct = self.decode(z1)
                self.state.update_steps = None
                n_lat = per_pass
                if self.resume_pass2 and fuse_at is None:  # pass 2 would reproduce pass 1
                    img = direct
                else:
                    target = keep = None
                    if s.pixel_fusion:
                        target, keep = self.fusion_target(direct, flowlib.warp(prev_img, fb_prev),
                                                          flowlib.warp(first_img, fb_first), occ_prev, occ_first)
                    self.state.mode, self.state.update_prev = load, update
                    img = self.decode(self.sample(ctrl, emb, seeds, source=src, x0_ref=x0_first, shape_flow=lat_flow,
                                                  shape_keep=lat_keep, target=target, target_keep=keep, check=check,
                                                  resume=kept or None))
                    n_lat += (s.n_steps - kept["step"]) * (2 if cfg else 1) if kept else per_pass
            for i, j in enumerate(active):
                outs[j][keys[j][n]] = to_uint8(img[i : i + 1])[0]
                nfe[j] += per_pass if s.mode == "fast" else n_lat
            prev_img = img
        # What the cache held and what was read from it, kept for diagnostics and tests.
        self.last_cache_written = set(self.state.first)
        self.last_cache_reads = list(self.state.reads)
        self.last_nfe = nfe
        self.state.clear()
        return outs

    def close(self) -> None:
        self._flow_pool.shutdown(wait=False, cancel_futures=True)
        self.nfe.remove()


def attach_lcm_lora(models: Any) -> bool:
    """Fuse the staged LCM-LoRA into the UNet (for `fast` mode); False when none is staged."""
    path = getattr(models, "lcm_lora_path", None)
    if path is None:
        return False
    if getattr(models, "lcm_lora_loaded", False):
        return True
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    models.unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="lcm")
    models.unet.fuse_lora(lora_scale=1.0)
    models.lcm_lora_loaded = True
    log.info("fused the LCM-LoRA %s into the UNet", path)
    return True


def first_step(settings: TranslatorSettings) -> int:
    """The first DDIM index the loop runs (later than 0 for SDEdit, strength < 1)."""
    n = settings.n_steps
    return min(n - 1, int(n * (1.0 - settings.strength))) if settings.strength < 1.0 else 0


def pass2_start(settings: TranslatorSettings) -> int | None:
    """The step at which a faithful key frame's pass 2 first differs from its pass 1: the first
    pixel-aware fusion step after the loop's first step (the fusion needs the previous step's
    direction). None when pass 2 would reproduce pass 1: fusion off, or no fusion step in the schedule."""
    if settings.mode != "faithful" or not settings.pixel_fusion:
        return None
    start = first_step(settings)
    steps = sorted(j for j in exclusive_steps(settings.mask_period, settings.n_steps) if j > start)
    return steps[0] if steps else None


def expected_nfe(n_keys: int, settings: TranslatorSettings, resume_pass2: bool = True) -> int:
    """UNet latents the key-frame schedule implies (what the NFE hook must count): the anchor's one
    pass, then for every later key pass 1 and the part of pass 2 that differs from it (faithful), or
    one pass (fast). ``resume_pass2`` False counts both passes whole (the reference loop)."""
    if n_keys <= 0:
        return 0
    mult = 2 if settings.use_cfg else 1
    per = (settings.n_steps - first_step(settings)) * mult
    if settings.mode == "fast":
        return n_keys * per
    if not resume_pass2:
        return per + (n_keys - 1) * 2 * per
    at = pass2_start(settings)
    second = 0 if at is None else (settings.n_steps - at) * mult
    return per + (n_keys - 1) * (per + second)
