"""The GPU benchmark script must keep working: run it at tiny size on CPU."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_translate_runs_tiny_on_cpu():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_translate.py"), "--tiny", "--frames", "6",
         "--no-compile", "--stock-frames", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and "nfe" not in line}
    assert float(rows["stock img2img per frame (20 steps, CFG)"]) == 40.0  # the stock pipeline, by hooks
    assert float(rows["corpus-anon faithful"]) == round((40 + 80) / 6, 2)  # keys 0 and 5 of 6 frames
    assert float(rows["corpus-anon fast"]) == round(2 * 4 / 6, 2)
