"""The tiny profile (tests, the demo, CI): the real diffusers/transformers classes and the project's
own networks at tiny size with seeded random weights, written in the real checkpoints' formats and
staged through the same lock as real weights; the real face, landmark and flow files beside them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from corpus_anon.models.add import copy_centerface_file, copy_dlib_files, copy_mediapipe_files, copy_raft_files
from corpus_anon.models.registry import MEDIAPIPE_DIR, RAFT_DIR, VGG19_FILE, write_local_lock

log = logging.getLogger(__name__)


TINY_HED_CHANNELS: tuple[int, ...] = (4, 8, 8, 16, 16)


def _tiny_tokenizer() -> Any:
    """A byte-level CLIP BPE tokenizer with a small in-memory vocabulary: any text encodes."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "n</w>"),
              ("e", "r"), ("p", "e"), ("pe", "r"), ("s", "o"), ("so", "n</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _write_tiny_lora(unet: Any, out_dir: Path, seed: int) -> None:
    """A seeded random LoRA on the UNet's attention projections, saved the way LCM-LoRA ships."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    lora_unet = copy.deepcopy(unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with torch.no_grad():
            for name, param in lora_unet.named_parameters():
                if "lora_B" in name:  # peft starts B at zero, which would make the LoRA a no-op
                    param.normal_(0.0, 0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_unet))
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers,
                                              weight_name="pytorch_lora_weights.safetensors",
                                              safe_serialization=True)


def make_tiny(dir: str | Path, seed: int = 0, lcm_lora: bool = True, faces: bool = True,
              landmarks: bool = True, raft: bool = True) -> Path:
    """Write the tiny profile's store into `dir`: the real diffusers/transformers classes at tiny
    size with seeded random weights, the HED module, a LoRA in the LCM-LoRA file format (so `fast`
    mode's LoRA path runs too), a reduced-width TPSMM and VGG-19 (fine-tuning's perceptual loss),
    the real face files (`faces`: dlib's and CenterFace's), the mediapipe landmark models (`landmarks`,
    on by default as the landmarks section is), RAFT's flow checkpoints (`raft`: real weights, for
    diffusion.flow: raft-small / raft-large) and the lock. Same seed, same bytes."""
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from corpus_anon.models.hed import ControlNetHED

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=32,
        )
        controlnet = ControlNetModel.from_unet(unet)
        # A trained ControlNet's zero convolutions are not zero: give them small weights so the
        # control image changes the UNet's output in tests.
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, 0.05)
                conv.bias.normal_(0.0, 0.05)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=64,
        )
        tokenizer = _tiny_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        # SD 1.5's scheduler settings (ldm "linear" betas = diffusers "scaled_linear").
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        )
        hed = ControlNetHED(TINY_HED_CHANNELS)
        with torch.no_grad():
            hed.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(root), safe_serialization=True)
    (root / "hed").mkdir(exist_ok=True)
    torch.save(hed.state_dict(), str(root / "hed" / "ControlNetHED.pth"))
    if lcm_lora:
        _write_tiny_lora(unet, root / "lcm_lora", seed)
    from corpus_anon.models.tpsmm import TPSMM, save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        tpsmm = TPSMM.build(0.125)  # reduced width, the vox-256 key names
    (root / "tpsmm").mkdir(exist_ok=True)
    save_checkpoint(tpsmm, root / "tpsmm" / "vox.pth.tar")
    from corpus_anon.models.vgg import Vgg19Features, save_vgg19

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        vgg = Vgg19Features(0.125)  # torchvision's key names, an eighth of the widths
    (root / "vgg19").mkdir(exist_ok=True)
    save_vgg19(vgg, root / "vgg19" / VGG19_FILE)
    if faces:
        copy_dlib_files(root / "dlib")
        copy_centerface_file(root / "centerface")
    if landmarks:
        copy_mediapipe_files(root / MEDIAPIPE_DIR)
    if raft:
        copy_raft_files(root / RAFT_DIR)
    write_local_lock(root, "tiny")
    log.info("wrote the tiny model store (seed %d) to %s", seed, root)
    return root
