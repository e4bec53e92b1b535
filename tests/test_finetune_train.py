"""TPSMM fine-tuning step (corpus_anon/finetune/train.py) on a tiny real TPSMM at 128 px.

The config is the project's real `finetune` section (so attribute names are checked), with
bg_start_epoch 1 and a milestone at epoch 1 so that two epochs exercise both phases.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corpus_anon.config import FinetuneSection
from corpus_anon.finetune.train import (LOSS_NAMES, TrainModel, build_optimizer, run_local, seed_everything,
                                        train_step, with_bg_predictor)
from corpus_anon.models.vgg import Vgg19Features
from corpus_anon.models.tpsmm import TPSMM, DenseMotionNetwork, load_tpsmm, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = 0.125
SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread is faster than two on a shared 2-core machine (and far faster under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**over) -> FinetuneSection:
    base = dict(milestones=[1], bg_start_epoch=1, dropout_epochs=2, batch_size=2, seed=0)
    return FinetuneSection(**{**base, **over})


def _pairs(n: int, b: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 3, SIZE, SIZE, generator=g), torch.rand(b, 3, SIZE, SIZE, generator=g)) for _ in range(n)]


def _tiny(seed: int = 0) -> tuple[TPSMM, Vgg19Features]:
    torch.manual_seed(seed)
    return TPSMM.build(TINY, bg_predictor=True), Vgg19Features(TINY)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.fixture(scope="module")
def trained():
    """Two epochs x two steps of run_local; the states before and the loss history."""
    model, vgg = _tiny()
    before = {name: _state(m) for name, m in model.entries().items()}
    vgg_before = _state(vgg)
    history = run_local(model, vgg, _pairs(4), _cfg(), epochs=2, steps_per_epoch=2, device="cpu")
    return model, vgg, before, vgg_before, history


def test_losses_are_finite_and_bg_starts_at_bg_start_epoch(trained):
    _, _, _, _, history = trained
    assert len(history) == 4
    for row in history:
        assert set(LOSS_NAMES) | {"total", "epoch", "step", "lr"} == set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert row["total"] == pytest.approx(sum(row[k] for k in LOSS_NAMES), rel=1e-5)
        assert row["perceptual"] > 0 and row["equivariance"] > 0 and row["warp"] > 0
    assert [r["bg"] for r in history[:2]] == [0.0, 0.0]
    # The predictor starts at the identity (A . A_rev = I, loss 0); one step on moves it.
    assert history[3]["bg"] > 0


def test_training_moves_every_tpsmm_network_but_not_vgg(trained):
    model, vgg, before, vgg_before, _ = trained
    for name in ("kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor"):
        module = getattr(model, name)
        params = {k for k, _ in module.named_parameters()}
        moved = _changed(before[name], module) & params
        assert len(moved) > len(params) // 2, f"{name}: only {len(moved)} of {len(params)} parameters changed"
    assert not _changed(vgg_before, vgg)
    assert not any(p.requires_grad for p in vgg.parameters())


def test_lr_drops_tenfold_after_the_milestone(trained):
    _, _, _, _, history = trained
    assert [r["lr"] for r in history] == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5])


def test_trained_model_saves_and_loads_strictly(trained, tmp_path):
    model, _, _, _, _ = trained
    path = save_checkpoint(model, tmp_path / "finetuned.pth.tar", epoch=1)
    back = load_tpsmm(path)
    assert set(back.entries()) == {"kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor"}
    for name, module in model.entries().items():
        got = back.entries()[name].state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(got[k], v), f"{name}.{k}"


def test_bg_predictor_is_not_used_before_bg_start_epoch():
    model, vgg = _tiny(1)
    tm = TrainModel(model, vgg, _cfg(bg_start_epoch=3)).train()
    bg_before = _state(model.bg_predictor)  # includes BatchNorm running statistics
    source, driving = _pairs(1, b=1)[0]
    losses = tm(source, driving, epoch=2)
    assert losses["bg"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.bg_predictor.parameters())
    assert not _changed(bg_before, model.bg_predictor)
    assert model.kp_detector.fg_encoder.fc.weight.grad is not None
    losses = tm(source, driving, epoch=3)
    sum(losses.values()).backward()
    assert model.bg_predictor.bg_encoder.fc.weight.grad.abs().sum() > 0


def test_grad_clip_bounds_the_inf_norm_of_keypoint_and_dense_motion_grads():
    model, vgg = _tiny(2)
    cfg = _cfg(grad_clip=1e-4)
    tm = TrainModel(model, vgg, cfg).train()
    optimizer, _ = build_optimizer(tm, cfg)
    nets = {"kp": model.kp_detector, "dense": model.dense_motion_network}
    raw: dict[str, dict[torch.Tensor, float]] = {n: {} for n in nets}
    for name, net in nets.items():
        for p in net.parameters():
            # Fires after each accumulation; the last value is the full (pre-clip) gradient.
            p.register_post_accumulate_grad_hook(lambda t, n=name: raw[n].__setitem__(t, float(t.grad.abs().max())))
    at_step: dict[str, float] = {}

    def record(opt, args, kwargs):
        for name, net in nets.items():
            at_step[name] = max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)

    optimizer.register_step_pre_hook(record)
    source, driving = _pairs(1)[0]
    train_step(tm, optimizer, source, driving, epoch=0, cfg=cfg)
    for name in nets:
        assert max(raw[name].values()) > 10 * cfg.grad_clip, f"{name}: the clip never bound"
        assert at_step[name] <= cfg.grad_clip * (1 + 1e-5)
    # The inpainting network is not clipped (TPSMM clips only keypoints and dense motion).
    assert max(float(p.grad.abs().max()) for p in model.inpainting_network.parameters()) > cfg.grad_clip


def test_dropout_schedule_and_the_dropped_softmax():
    model, vgg = _tiny(3)
    tm = TrainModel(model, vgg, _cfg(dropout_start=0.1, dropout_max=0.3, dropout_inc_epochs=3, dropout_epochs=5))
    assert [tm.dropout_p(e) for e in range(7)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.0, 0.0])
    torch.manual_seed(0)
    logits = torch.randn(64, 11, 4, 4)
    maps = DenseMotionNetwork.dropout_softmax(logits, 0.5)
    kept = maps.amax(dim=(2, 3)) > 0
    assert kept[:, 0].all()  # the identity / background transformation is never dropped
    frac = kept[:, 1:].float().mean().item()
    assert 0.35 < frac < 0.65
    # TPSMM adds 1e-6 to the denominator, which shows where the kept channels' sum is small.
    torch.testing.assert_close(maps.sum(1), torch.ones(64, 4, 4), atol=1e-4, rtol=0)
    masked = torch.where(kept[:, :, None, None], logits, torch.tensor(-torch.inf))
    torch.testing.assert_close(maps, torch.softmax(masked, 1), atol=1e-4, rtol=0)


def test_dense_motion_without_dropout_is_unchanged():
    model, _ = _tiny(4)
    dense = model.dense_motion_network
    source = _pairs(1)[0][0]
    kp_s, kp_d = torch.rand(2, 50, 2) * 2 - 1, torch.rand(2, 50, 2) * 2 - 1
    plain = dense(source, kp_d, kp_s)
    off = dense(source, kp_d, kp_s, dropout_flag=True, dropout_p=0.0)
    torch.testing.assert_close(plain["deformation"], off["deformation"], rtol=0, atol=0)
    on = dense(source, kp_d, kp_s, dropout_flag=True, dropout_p=0.9)
    assert not torch.equal(plain["contribution_maps"], on["contribution_maps"])
    with pytest.raises(ValueError, match="dropout_p"):
        dense(source, kp_d, kp_s, dropout_flag=True, dropout_p=1.0)


def test_train_model_refuses_bad_inputs():
    model, vgg = _tiny(5)
    with pytest.raises(ValueError, match="bg_predictor"):
        TrainModel(TPSMM.build(TINY), vgg, _cfg())
    with pytest.raises(ValueError, match="w_perceptual"):
        TrainModel(model, vgg, _cfg(w_perceptual=[1.0, 2.0]))
    tm = TrainModel(model, vgg, _cfg())
    with pytest.raises(ValueError, match="multiples of 128"):
        tm(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), 0)
    with pytest.raises(ValueError, match="run_local needs 4"):
        run_local(model, vgg, _pairs(1, b=1), _cfg(), epochs=2, steps_per_epoch=2, device="cpu")
    bare = TPSMM.build(TINY)
    assert with_bg_predictor(bare).bg_predictor.bg_encoder.width == bare.kp_detector.fg_encoder.width


def test_train_step_under_ddp_across_the_bg_start(tmp_path):
    """Ray Train wraps TrainModel in DDP(find_unused_parameters=True); the bg predictor is unused, then used."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, vgg = _tiny(6)
    cfg = _cfg()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(TrainModel(model, vgg, cfg).train(), find_unused_parameters=True)
        optimizer, scheduler = build_optimizer(ddp, cfg)
        bg_before = _state(model.bg_predictor)
        for epoch, (source, driving) in zip((0, 1, 1), _pairs(3, b=1)):
            losses = train_step(ddp, optimizer, source, driving, epoch, cfg)
            assert all(math.isfinite(v) for v in losses.values())
            if epoch == 0:
                assert not _changed(bg_before, model.bg_predictor)
        assert _changed(bg_before, model.bg_predictor)
    finally:
        dist.destroy_process_group()


def test_gpu_benchmark_runs_tiny_without_config_pydantic_or_ray():
    """The GPU machine has only torch: the benchmark (and the finetune modules) must not need more."""
    code = ("import runpy, sys\n"
            "for m in ('pydantic', 'ray', 'corpus_anon.config'): sys.modules[m] = None\n"
            f"sys.argv = ['finetune_gpu.py', '--device', 'cpu', '--width-scale', '{TINY}', '--size', '{SIZE}',"
            " '--batch', '1', '--steps', '1', '--warmup', '0', '--flops']\n"
            f"runpy.run_path({str(REPO / 'benchmarks' / 'finetune_gpu.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| cpu")]
    assert len(rows) == 1 and "| 128 | 1 | 1 |" in rows[0]
    assert "pairs/s/GPU" in out.stdout
    gflop = float(out.stdout.split(" GFLOP per pair")[0].rsplit("# ", 1)[1])
    assert 0 < gflop < 1098  # an eighth of the widths: far below the full model's 1,097.6 GFLOP per pair


def test_seed_everything_repeats_a_step():
    def one() -> dict[str, float]:
        seed_everything(7)
        model, vgg = _tiny(7)
        tm = TrainModel(model, vgg, _cfg()).train()
        optimizer, _ = build_optimizer(tm, _cfg())
        source, driving = _pairs(1, b=1)[0]
        return train_step(tm, optimizer, source, driving, 0, _cfg())

    assert one() == one()
