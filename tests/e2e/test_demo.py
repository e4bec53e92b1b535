"""The demo on embedded defaults, then a rerun of its pass that skips every clip."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.media import read_frames

pytestmark = pytest.mark.e2e


def test_demo_then_rerun_skips_everything(ray_cluster, tmp_path):
    from corpus_anon.demo import run_demo

    out = tmp_path / "demo"
    results = run_demo(str(out))
    res = results["pixelate"]
    assert res.counts == {"ok": 6} and res.ran == 6
    run_dir = out / "pixelate" / res.layout.cfg_fp
    assert (out / "pixelate" / "LATEST_RUN").read_text() == res.layout.cfg_fp
    for name in ("plan.json", "summary.json", "config.yaml"):
        assert (run_dir / name).is_file()
    assert json.loads((run_dir / "plan.json").read_text())["planned_clips"] == 6
    metrics = pq.read_table(run_dir / "metrics" / "metrics.parquet").to_pylist()
    assert len(metrics) == 6 and {m["status"] for m in metrics} == {"ok"}
    for m in metrics:
        assert m["gloss"]  # passthrough column
        frames, ts, fps = read_frames(m["output_uri"].removeprefix("file://"))
        assert len(frames) == m["n_frames"] == 72
        assert frames.shape[1:3] == (m["height"], m["width"]) == (240, 320)
        assert float(fps) == m["fps"] == 24
        assert m["faces_found"] >= 1
    # Segments of one long recording start at their own offsets.
    assert {m["clip_id"]: m["start_s"] for m in metrics}["signer1_utt02"] == 4.0

    cfg = out / "pixelate" / "config.yaml"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "corpus-anon"), "run", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(0 processed, 6 skipped earlier)" in proc.stdout
    assert len(pq.read_table(run_dir / "metrics" / "metrics.parquet")) == 6
