"""Opt-in GPU checks (`pytest -m gpu tests/gpu`): the benchmark scripts at full model size on a
real CUDA device. Skipped without one; never part of the default run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.gpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")


@needs_cuda
def test_tpsmm_finetuning_runs_at_full_size_on_the_gpu():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "finetune_gpu.py"), "--steps", "10"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    row = lines[lines.index(next(x for x in lines if x.startswith("|---"))) + 1]
    steps_s = float(row.split("|")[7])
    assert steps_s > 0
    losses = re.search(r"last step losses: (.*)", out.stdout).group(1)
    assert "nan" not in losses and "inf" not in losses
