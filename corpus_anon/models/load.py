"""Loading a staged model folder onto a device (actor side): every diffusion component, offline,
after the folder is verified against its lock (`corpus_anon.models.registry`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corpus_anon.models.registry import staged_paths, verify_staged

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class LoadedModels:
    """Every model one actor needs, on its device, in eval mode."""

    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    hed: Any
    lcm_lora_path: Path | None
    profile: str
    tpsmm_dir: Path | None = None
    staged_dir: Path | None = None
    file_sha256: dict[str, str] = field(default_factory=dict)  # relpath -> sha256, for fingerprints


def _resolve_dtype(dtype: Any) -> "torch.dtype":
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown torch dtype {dtype!r}.")
        return resolved
    return dtype


def load_models(staged_dir: str | Path, profile: str, device: "str | torch.device" = "cpu",
                dtype: "torch.dtype | str | None" = None, use_ft_mse_vae: bool = True) -> LoadedModels:
    """Verify a staged folder against its lock and load every component from it, offline.

    `dtype` defaults to float32. The VAE comes from sd-vae-ft-mse when it is staged and
    `use_ft_mse_vae`, else from the pipeline's `vae/`.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from corpus_anon.models.hed import load_hed

    dt = _resolve_dtype(dtype)
    files = verify_staged(staged_dir, profile)
    paths = staged_paths(staged_dir, profile)
    pipe = str(paths.pipeline)

    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet", local_files_only=True, torch_dtype=dt)
    controlnet = ControlNetModel.from_pretrained(str(paths.controlnet), local_files_only=True, torch_dtype=dt)
    if use_ft_mse_vae and paths.vae is not None:
        vae = AutoencoderKL.from_pretrained(str(paths.vae), local_files_only=True, torch_dtype=dt)
    else:
        vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae", local_files_only=True, torch_dtype=dt)
    text_encoder = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder", local_files_only=True, dtype=dt)
    tokenizer = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(pipe, subfolder="scheduler", local_files_only=True)
    hed = load_hed(paths.hed, device=device, dtype=dt)
    for m in (unet, controlnet, vae, text_encoder, hed):  # already in `dt`: loaded with it
        m.to(device).eval().requires_grad_(False)
    log.info("loaded profile %s from %s on %s (%s); VAE from %s", profile, staged_dir, device, dt,
             paths.vae if (use_ft_mse_vae and paths.vae) else "the pipeline")
    return LoadedModels(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, scheduler=scheduler, hed=hed, lcm_lora_path=paths.lcm_lora,
                        profile=profile, tpsmm_dir=paths.tpsmm, staged_dir=Path(staged_dir), file_sha256={r: e["sha256"] for r, e in files.items()})
