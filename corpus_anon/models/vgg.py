"""The frozen VGG-19 feature extractor of TPSMM's perceptual loss, with torchvision's key layout.

Written here because the project does not install torchvision: `features` is the same
nn.Sequential of 3x3 conv + ReLU and 2x2 max pools as torchvision's `vgg19().features`, so the
public ImageNet file `vgg19-dcbb9e9d.pth` loads strictly (its `classifier.*` keys are ignored).
`width_scale` scales every width for tiny models in tests. Only torch is imported: the GPU check
imports this module on a machine that has nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from corpus_anon.models.checkpoints import first_mismatch

log = logging.getLogger(__name__)

# torchvision's configuration "E" (VGG-19): conv widths, "M" = 2x2 max pool.
VGG19_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# End indices (exclusive) in `features` of TPSMM's five slices: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
SLICE_ENDS: tuple[int, ...] = (2, 7, 12, 21, 30)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Vgg19Features(nn.Module):
    """VGG-19 `features` (torchvision names), frozen and in eval mode; forward gives TPSMM's 5 relu maps.

    Input is RGB in [0,1] (B,3,H,W); ImageNet normalisation happens inside. H and W must be at
    least 16 (four 2x2 pools come before relu5_1).
    """

    def __init__(self, width_scale: float = 1.0) -> None:
        super().__init__()
        base = 64 * width_scale
        if width_scale <= 0 or abs(base - round(base)) > 1e-9:
            raise ValueError(f"width_scale must make 64 x width_scale a positive integer, got {width_scale}.")
        layers: list[nn.Module] = []
        in_ch = 3
        for v in VGG19_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_ch = int(round(int(v) * width_scale))
                layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Not persistent: the state dict holds exactly torchvision's features.* keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def width_scale(self) -> float:
        return self.features[0].out_channels / 64

    def train(self, mode: bool = True) -> Vgg19Features:
        """Stays in eval mode: the loss network is never trained."""
        return super().train(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 maps of RGB frames in [0,1]."""
        out = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        maps = []
        start = 0
        for end in SLICE_ENDS:
            for i in range(start, end):
                out = self.features[i](out)
            maps.append(out)
            start = end
        return maps


def save_vgg19(model: Vgg19Features, path: str | Path) -> Path:
    """Write the model's `features.*` state dict (torchvision's layout), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_vgg19(path: str | Path, device: str | torch.device = "cpu") -> Vgg19Features:
    """A frozen Vgg19Features sized from a torchvision-layout file and loaded strictly.

    Every `features.*` key must be there with its shape; `classifier.*` keys (torchvision's full
    ImageNet file) are ignored; any other key, or a missing or mis-shaped one, raises ValueError.
    """
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a VGG-19 state dict of tensors.")
    features: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("features."):
            features[key] = value
        elif not key.startswith("classifier."):
            raise ValueError(f"{path}: VGG-19 file has unexpected key {key!r}.")
    first = features.get("features.0.weight")
    if first is None or first.ndim != 4 or first.shape[0] < 1:
        raise ValueError(f"{path}: VGG-19 file lacks key 'features.0.weight' (a conv weight).")
    model = Vgg19Features(first.shape[0] / 64)
    bad = first_mismatch(model, features, f"{path}: VGG-19 file")
    if bad:
        raise ValueError(bad)
    model.load_state_dict(features, strict=True)
    log.info("loaded VGG-19 features %s (width scale %g)", path, model.width_scale)
    return model.to(device)
