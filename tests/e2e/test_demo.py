"""The demo on embedded defaults, then a rerun of its pass that skips every clip."""

import json
import os
import statistics
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.media import read_frames

pytestmark = pytest.mark.e2e


def test_demo_then_rerun_skips_everything(ray_cluster, tmp_path):
    from corpus_anon.demo import DEMO_SECRET, run_demo

    out = tmp_path / "demo"
    os.environ.pop("CORPUS_ANON_SECRET", None)
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
    # summary.json's fidelity block is the median of each landmark column over the run's clips
    from corpus_anon.run.summaries import FIDELITY_SUMMARY_COLUMNS

    fid = json.loads((run_dir / "summary.json").read_text())["fidelity"]
    assert fid["n_clips"] == 6 and fid["n_no_landmarks"] == 0 and fid["n_nmm_corr"] >= 1
    for c in FIDELITY_SUMMARY_COLUMNS:
        vals = [m[c] for m in metrics if m.get(c) is not None]
        assert fid[f"n_{c}"] == len(vals), c
        assert fid[c] == (pytest.approx(statistics.median(vals), abs=1e-4) if vals else None), c
    # Identity with real face photos and the real dlib models: the embedder recognizes the
    # demo's signers from their other clips (leave-one-out), far above chance; pixelation hides them.
    reid = res.summary["reid"]
    assert reid["id_score_kind"] == "euclidean" and reid["n_tested"] == 6
    assert reid["reid_top1_originals"] >= 0.8 > reid["reid_chance"] == pytest.approx(1 / 3)
    assert set(reid["per_signer"]) == {"signer1", "signer2", "signer3"}
    for row in reid["per_signer"].values():
        assert row["id_orig_orig_xclip"] < 0.6 < row["id_orig_anon"]  # same person vs not (distances)
    assert not any(m["reidentified"] for m in metrics) and all(m["face_frac_orig"] > 0.5 for m in metrics)
    # The demo releases the pixelate pass: pseudonyms only, a card with the corpus re-id figures.
    rel = out / "release" / "releases"
    assert (rel / "LATEST").read_text() == "v0001"
    released = pq.read_table(rel / "v0001" / "manifest.parquet").to_pylist()
    assert len(released) == 6 and "clip_id" not in released[0] and "signer_id" not in released[0]
    card = (rel / "v0001" / "README.md").read_text()
    assert "6 clips from 3 signers" in card and f"the same test on the original clips: {reid['reid_top1_originals']}" in card
    assert "signer1" not in card and "dlib" in card
    # Segments of one long recording start at their own offsets.
    assert {m["clip_id"]: m["start_s"] for m in metrics}["signer1_utt02"] == 4.0

    # The diffslva pass (tiny profile): playable clips, same frame count/size/fps, the new columns.
    dres = results["diffslva"]
    assert dres.counts == {"ok": 6}
    dmetrics = pq.read_table(out / "diffslva" / dres.layout.cfg_fp / "metrics" / "metrics.parquet").to_pylist()
    for m in dmetrics:
        frames, _, fps = read_frames(m["output_uri"].removeprefix("file://"))
        assert frames.shape == (72, 240, 320, 3) and float(fps) == 24
        assert m["diffusion_mode"] == "faithful" and m["models_profile"] == "tiny"
        # 24 fps at 6 key frames/s: K=4, keys 0,4,...,68 and 71 -> 19; 40 + 18 * (40 + 18) latents / 72
        # frames (every later key: pass 1, then pass 2 from step 11 of 20).
        assert m["n_key_frames"] == 19 and m["nfe_per_frame"] == round((40 + 18 * 58) / 72, 4)
        assert m["seed"] is not None and m["prompt"]
    by_signer = {}
    for m in dmetrics:
        by_signer.setdefault(m["signer_id"], set()).add(m["seed"])
    assert all(len(v) == 1 for v in by_signer.values()) and len({next(iter(v)) for v in by_signer.values()}) == 3

    cli = os.path.join(os.path.dirname(sys.executable), "corpus-anon")
    env = dict(os.environ, CORPUS_ANON_SECRET=DEMO_SECRET)
    for name in ("pixelate", "diffslva"):
        proc = subprocess.run([cli, "run", str(out / name / "config.yaml")], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "(0 processed, 6 skipped earlier)" in proc.stdout, name
    assert len(pq.read_table(run_dir / "metrics" / "metrics.parquet")) == 6
    # Without the secret the diffslva pass refuses to start (it cannot derive the identities).
    env.pop("CORPUS_ANON_SECRET")
    proc = subprocess.run([cli, "run", str(out / "diffslva" / "config.yaml")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and "CORPUS_ANON_SECRET" in proc.stderr
