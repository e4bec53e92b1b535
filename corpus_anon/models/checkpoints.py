"""Strict checkpoint checks shared by the project's own modules (HED, TPSMM); torch only."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def first_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> str | None:
    """One sentence on the first missing, mis-shaped or unexpected key of `sd` against `model`,
    else None. `what` names the state dict in the sentence."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in sd:
            return f"{what} lacks key {key!r}."
        got = tuple(sd[key].shape)
        if got != tuple(ref.shape):
            return f"{what} key {key!r} has shape {got}, expected {tuple(ref.shape)}."
    extra = sorted(k for k in sd if k not in expected)
    if extra:
        return f"{what} has unexpected key {extra[0]!r}."
    return None
