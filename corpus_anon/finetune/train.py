"""A framework-agnostic TPSMM training step (METHOD.md §6.2 step 5, §8.5).

`TrainModel` runs everything a step needs inside `forward` (keypoints, background affine,
dense motion with TPS dropout, inpainting and the four weighted losses), so Ray Train can wrap
it in DistributedDataParallel (find_unused_parameters=True: the background predictor is unused
before `bg_start_epoch`). `build_optimizer` and `train_step` follow TPSMM's train.py (Adam
betas (0.5, 0.999), MultiStepLR x0.1 per epoch, inf-norm gradient clipping of the keypoint,
dense-motion and, once used, background networks); `run_local` is a plain loop for smoke checks.

`cfg` is any object with the `finetune` section's attribute names (lr, milestones,
weight_decay, grad_clip, w_perceptual, w_equivariance, w_warp, w_bg, bg_start_epoch,
dropout_start, dropout_max, dropout_inc_epochs, dropout_epochs, seed): the project config is not imported here
because the GPU check runs this module on a machine with only torch.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_

from corpus_anon.finetune.losses import (PYRAMID_SCALES, ImagePyramid, RandomTPS, bg_loss, equivariance_loss,
                                         perceptual_loss, warp_loss)
from corpus_anon.models.vgg import SLICE_ENDS, Vgg19Features
from corpus_anon.models.tpsmm import TPSMM, BGMotionPredictor

log = logging.getLogger(__name__)

LOSS_NAMES: tuple[str, ...] = ("perceptual", "equivariance", "warp", "bg")
ADAM_BETAS = (0.5, 0.999)
LR_GAMMA = 0.1


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (every device's) generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def with_bg_predictor(model: TPSMM) -> TPSMM:
    """The model with a fresh (identity-initialised) background predictor if it has none.

    For starting from a checkpoint that was saved without one; its width follows the keypoint detector's.
    """
    if model.bg_predictor is None:
        kp = model.kp_detector
        p = next(kp.parameters())
        bg = BGMotionPredictor(model.inpainting_network.num_channels, kp.fg_encoder.width)
        model.bg_predictor = bg.to(p.device, p.dtype)
    return model


def _unwrap(model: nn.Module) -> TrainModel:
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    if not isinstance(core, TrainModel):
        raise TypeError(f"expected a TrainModel (or one wrapped in DDP), got {type(core).__name__}.")
    return core


class TrainModel(nn.Module):
    """A TPSMM (with its background predictor) and the frozen VGG-19 of the perceptual loss.

    `forward(source, driving, epoch)` returns the weighted loss terms of LOSS_NAMES as scalar
    tensors; terms whose weight is 0, and `bg` before `bg_start_epoch`, are zero tensors and
    their networks are not run. The AVD network, if the model has one, is frozen (not trained here).
    """

    def __init__(self, tpsmm: TPSMM, vgg: Vgg19Features, cfg: Any) -> None:
        super().__init__()
        if tpsmm.bg_predictor is None:
            raise ValueError("TrainModel needs a TPSMM with a bg_predictor (TPSMM.build(..., bg_predictor=True), "
                             "or with_bg_predictor(model) for a checkpoint saved without one).")
        weights = tuple(float(w) for w in cfg.w_perceptual)
        if len(weights) != len(SLICE_ENDS):
            raise ValueError(f"w_perceptual needs {len(SLICE_ENDS)} weights (one per VGG-19 slice), "
                             f"got {len(weights)}.")
        if cfg.dropout_epochs > 0 and not (0 <= cfg.dropout_start < 1 and 0 <= cfg.dropout_max < 1):
            raise ValueError(f"dropout_start and dropout_max must be in [0, 1), got {cfg.dropout_start} and "
                             f"{cfg.dropout_max}.")
        self.tpsmm = tpsmm
        self.vgg = vgg.requires_grad_(False).eval()
        if tpsmm.avd_network is not None:
            tpsmm.avd_network.requires_grad_(False)
        self.pyramid = ImagePyramid(PYRAMID_SCALES, tpsmm.inpainting_network.num_channels)
        self.w_perceptual = weights
        self.w_equivariance = float(cfg.w_equivariance)
        self.w_warp = float(cfg.w_warp)
        self.w_bg = float(cfg.w_bg)
        self.bg_start_epoch = int(cfg.bg_start_epoch)
        self.dropout_start = float(cfg.dropout_start)
        self.dropout_max = float(cfg.dropout_max)
        self.dropout_inc_epochs = max(1, int(cfg.dropout_inc_epochs))
        self.dropout_epochs = int(cfg.dropout_epochs)

    def dropout_p(self, epoch: int) -> float:
        """TPS dropout probability, TPSMM's schedule: dropout_start + dropout_max per dropout_inc_epochs
        epochs, at most dropout_max; none from dropout_epochs on."""
        if epoch >= self.dropout_epochs:
            return 0.0
        return min(self.dropout_start + epoch / self.dropout_inc_epochs * self.dropout_max, self.dropout_max)

    def _check(self, source: torch.Tensor, driving: torch.Tensor) -> None:
        c = self.tpsmm.inpainting_network.num_channels
        m = self.tpsmm.size_multiple
        if source.ndim != 4 or source.shape != driving.shape or source.shape[1] != c:
            raise ValueError(f"source and driving must both be shaped (B,{c},S,S), got {tuple(source.shape)} "
                             f"and {tuple(driving.shape)}.")
        if source.shape[2] % m or source.shape[3] % m:
            raise ValueError(f"frame sides must be multiples of {m} px, got {source.shape[2]}x{source.shape[3]}.")

    def forward(self, source: torch.Tensor, driving: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Weighted loss terms for source/driving pairs (B,3,S,S) in [0,1] at `epoch` (0-based)."""
        self._check(source, driving)
        m = self.tpsmm
        zero = source.new_zeros(())
        kp_source = m.kp_detector(source)["fg_kp"]
        kp_driving = m.kp_detector(driving)["fg_kp"]
        use_bg = epoch >= self.bg_start_epoch
        bg_param = m.bg_predictor(source, driving) if use_bg else None
        p = self.dropout_p(epoch)
        motion = m.dense_motion_network(source, kp_driving, kp_source, bg_param=bg_param,
                                        dropout_flag=p > 0, dropout_p=p)
        source_maps = m.inpainting_network.encode(source)
        prediction = m.inpainting_network.decode(source, source_maps, motion)["prediction"]
        losses = dict.fromkeys(LOSS_NAMES, zero)
        if any(self.w_perceptual):
            losses["perceptual"] = perceptual_loss(self.vgg, self.pyramid(prediction), self.pyramid(driving),
                                                   self.w_perceptual)
        if self.w_equivariance:
            transform = RandomTPS(driving.shape[0], device=driving.device, dtype=driving.dtype)
            losses["equivariance"] = self.w_equivariance * equivariance_loss(m.kp_detector, driving, transform,
                                                                             kp_driving)
        if self.w_warp:
            losses["warp"] = self.w_warp * warp_loss(m.inpainting_network, driving, source_maps, motion)
        if use_bg and self.w_bg:
            losses["bg"] = self.w_bg * bg_loss(m.bg_predictor, source, driving, bg_param)
        return losses


def build_optimizer(train_model: nn.Module, cfg: Any) -> tuple[torch.optim.Optimizer,
                                                              torch.optim.lr_scheduler.MultiStepLR]:
    """Adam over the trainable TPSMM parameters (never VGG's) and MultiStepLR x0.1 at cfg.milestones.

    Step the scheduler once per epoch. Parameters without a gradient in a step (the background
    predictor before bg_start_epoch) are left alone by Adam.
    """
    core = _unwrap(train_model)
    params = [p for p in core.tpsmm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(cfg.lr), betas=ADAM_BETAS, weight_decay=float(cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[int(m) for m in cfg.milestones],
                                                     gamma=LR_GAMMA)
    return optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, source: torch.Tensor, driving: torch.Tensor,
               epoch: int, cfg: Any) -> dict[str, float]:
    """One optimisation step on a batch of pairs; returns the loss terms and their `total` as floats.

    `model` is a TrainModel or a DDP wrapping one. Gradients of the keypoint and dense-motion
    networks (and of the background predictor once it is used) are clipped to inf-norm
    cfg.grad_clip before the step, as TPSMM does.
    """
    core = _unwrap(model)
    optimizer.zero_grad(set_to_none=True)
    losses = model(source, driving, epoch)
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    clip = float(cfg.grad_clip)
    tpsmm = core.tpsmm
    clip_grad_norm_(tpsmm.kp_detector.parameters(), max_norm=clip, norm_type=math.inf)
    clip_grad_norm_(tpsmm.dense_motion_network.parameters(), max_norm=clip, norm_type=math.inf)
    if epoch >= core.bg_start_epoch:
        clip_grad_norm_(tpsmm.bg_predictor.parameters(), max_norm=clip, norm_type=math.inf)
    optimizer.step()
    values = torch.stack([*(v.detach() for v in losses.values()), total.detach()]).float().cpu().tolist()
    return dict(zip([*losses, "total"], values))


def run_local(model: TPSMM, vgg: Vgg19Features, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], cfg: Any,
              epochs: int, steps_per_epoch: int, device: str | torch.device) -> list[dict[str, float]]:
    """Train in a plain torch loop (no Ray): `steps_per_epoch` batches of (source, driving) per epoch.

    Seeds with cfg.seed; returns one dict per step with `epoch`, `step`, `lr` and the losses. The
    model is trained in place (a fresh background predictor is added if it has none).
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"run_local needs epochs and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}.")
    seed_everything(int(cfg.seed))
    train_model = TrainModel(with_bg_predictor(model), vgg, cfg).to(device).train()
    optimizer, scheduler = build_optimizer(train_model, cfg)
    batch_iter = iter(batches)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            try:
                source, driving = next(batch_iter)
            except StopIteration:
                raise ValueError(f"batches ran out after {len(history)} steps; run_local needs "
                                 f"{epochs * steps_per_epoch}.") from None
            lr = optimizer.param_groups[0]["lr"]
            losses = train_step(train_model, optimizer, source.to(device), driving.to(device), epoch, cfg)
            history.append({"epoch": float(epoch), "step": float(step), "lr": lr, **losses})
        scheduler.step()
        last = history[-1]
        log.info("epoch %d: total %.4g (perceptual %.4g, equivariance %.4g, warp %.4g, bg %.4g)", epoch,
                 last["total"], last["perceptual"], last["equivariance"], last["warp"], last["bg"])
    return history
