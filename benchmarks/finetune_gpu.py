"""GPU check for TPSMM fine-tuning: training steps/s and pairs/s per GPU at full size, on random data.

Runs on the lent GPU machine as it is (Python with torch and numpy; no Ray, pydantic or project
config): it builds the full vox-256 TPSMM (width 1.0, background predictor on) and a full VGG-19
with random weights (the compute equals the real models'), then runs the real
`TrainModel` / `train_step` (Adam, all four losses, TPS dropout, gradient clipping) on random
256x256 source/driving pairs: `--warmup` untimed steps, then `--steps` timed ones. The epoch is
the config's `bg_start_epoch`, so the background predictor and TPS dropout are both on (the
costliest step). One table comes out. Usage:

    python benchmarks/finetune_gpu.py --flops             # on the GPU machine (well under 4 minutes)
    python benchmarks/finetune_gpu.py --device cpu --width-scale 0.125 --size 128 --steps 3   # CPU smoke test

Sides must be multiples of 128 px (TPSMM's dense-motion hourglass), so 128 is the smallest size.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from corpus_anon.finetune.train import TrainModel, build_optimizer, seed_everything, train_step  # noqa: E402
from corpus_anon.models.vgg import Vgg19Features  # noqa: E402
from corpus_anon.models.tpsmm import TPSMM  # noqa: E402

# METHOD.md §8.5 / config/vox-256.yaml values (the defaults of the config's `finetune` section).
CFG = SimpleNamespace(lr=2e-4, milestones=[70, 90], weight_decay=1e-4, grad_clip=10.0, w_perceptual=[10.0] * 5,
                      w_equivariance=10.0, w_warp=10.0, w_bg=10.0, bg_start_epoch=10, dropout_start=0.1,
                      dropout_max=0.3, dropout_inc_epochs=10, dropout_epochs=35, seed=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, allocator)")
    ap.add_argument("--batch", type=int, default=8, help="source/driving pairs per step (the config's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width-scale", type=float, default=1.0, help="TPSMM and VGG-19 widths (1.0 = full size)")
    ap.add_argument("--size", type=int, default=256, help="frame side in px (a multiple of 128)")
    ap.add_argument("--flops", action="store_true", help="also count FLOPs per pair (one extra step)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--steps and --batch must be at least 1 and --warmup at least 0.")
    if args.size < 128 or args.size % 128:
        ap.error(f"--size must be a multiple of 128 px (TPSMM's dense-motion hourglass), got {args.size}.")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    seed_everything(CFG.seed)
    tpsmm = TPSMM.build(args.width_scale, bg_predictor=True)
    vgg = Vgg19Features(args.width_scale)
    model = TrainModel(tpsmm, vgg, CFG).to(device).train()
    optimizer, _ = build_optimizer(model, CFG)
    n_params = sum(p.numel() for p in tpsmm.parameters())
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    # A few distinct batches on the device, cycled, so data loading is not timed.
    batches = [(torch.rand(shape, generator=gen).to(device), torch.rand(shape, generator=gen).to(device))
               for _ in range(2)]
    epoch = CFG.bg_start_epoch

    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(model, optimizer, *batches[i % 2], epoch, CFG)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses = train_step(model, optimizer, *batches[i % 2], epoch, CFG)
    _sync(device)
    elapsed = time.perf_counter() - t0
    gflop = None
    if args.flops:  # a count that does not depend on the machine: matmul/conv FLOPs of one step
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            train_step(model, optimizer, *batches[0], epoch, CFG)
        gflop = fc.get_total_flops() / 1e9 / args.batch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f}" if device.type == "cuda" else "-"
    steps_s = args.steps / elapsed
    print(f"# {name}, torch {torch.__version__}, fp32, TPSMM width {args.width_scale:g} "
          f"({n_params / 1e6:.1f}M params, bg predictor on), VGG-19 width {args.width_scale:g}, "
          f"epoch {epoch} (TPS dropout p={model.dropout_p(epoch):.3f}), warm-up {args.warmup} steps {warm_s:.1f} s")
    print("| device | torch | size | batch/GPU | timed steps | s/step | steps/s/GPU | pairs/s/GPU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {torch.__version__} | {args.size} | {args.batch} | {args.steps} | {elapsed / args.steps:.3f} "
          f"| {steps_s:.3f} | {steps_s * args.batch:.2f} | {peak} |")
    print("# last step losses: " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    if gflop is not None:
        print(f"# {gflop:.1f} GFLOP per pair (forward + backward, conv/matmul, torch.utils.flop_counter); "
              f"achieved {gflop * steps_s * args.batch / 1e3:.2f} TFLOP/s")
    if not all(math.isfinite(v) for v in losses.values()):
        print("# FAILED: a loss is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
