"""The fine-tuning driver's pieces that need no Ray (corpus_anon/finetune/job.py); the Ray Train run
itself is tests/e2e/test_finetune.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corpus_anon.config import ConfigError, FinetuneSection
from corpus_anon.finetune.job import _first_line, check_resumable, epoch_seed, steps_per_epoch

HEAVY = ("torch", "cv2", "av", "ray", "ray.train", "diffusers", "transformers")


def test_driver_side_modules_import_nothing_heavy():
    code = ("import sys\n"
            "import corpus_anon.finetune.job, corpus_anon.finetune.data\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_steps_per_epoch_cover_the_pairs_over_all_workers():
    assert steps_per_epoch(2000, 4, 8) == 63  # 63 x 4 x 8 = 2016 >= 2000
    assert steps_per_epoch(4, 2, 1) == 2
    assert steps_per_epoch(1, 8, 8) == 1


def test_epoch_seeds_differ_by_rank_and_epoch():
    seeds = {tuple(epoch_seed(s, r, e)) for s in (0, -1) for r in range(3) for e in range(4)}
    assert len(seeds) == 24 and all(0 <= x < 2 ** 32 for s in seeds for x in s)


def _info(**over) -> dict:
    return {"config": FinetuneSection(crops_uri="/data/crops", init="vox.pth.tar", **over).model_dump(mode="json")}


def test_a_checkpoint_continues_only_with_the_same_training_settings():
    mine = FinetuneSection(crops_uri="file:///data/crops", init="vox.pth.tar", epochs=200, workers=4, batch_size=4,
                           pairs_per_epoch=500, checkpoint_every=5)
    check_resumable(_info(), mine, "ckpt")  # epochs, workers, batch size, pairs, checkpoint cadence may change
    with pytest.raises(ConfigError, match="lr is 0.001 there and 0.0002 here"):
        check_resumable(_info(lr=1e-3), mine, "ckpt")
    with pytest.raises(ConfigError, match="reference_uri is 's3://b/vox' there and None here"):
        check_resumable(_info(reference_uri="s3://b/vox"), mine, "ckpt")
    with pytest.raises(ConfigError, match="milestones is \\[10\\] there"):
        check_resumable(_info(milestones=[10]), mine, "ckpt")


def test_a_worker_failure_becomes_the_workers_own_error():
    from ray.train import WorkerGroupError

    e = WorkerGroupError("Training failed due to worker errors:\n...", {1: KeyError("x"), 0: RuntimeError("boom.")})
    assert _first_line(e) == "RuntimeError: boom"
    assert _first_line(ValueError("line one\nlast line.")) == "ValueError: last line"
