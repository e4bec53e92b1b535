"""The leak gate end to end: a clip judged to leak is re-seeded, then ends as `leak`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e


def test_leaking_clip_is_reseeded_then_marked_leak(ray_cluster, tmp_path):
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.registry import make_tiny
    from corpus_anon.pipeline import run

    make_tiny(tmp_path / "store")
    make_video(str(tmp_path / "a.mp4"), 8, 8, (320, 240), frames=face_frames(8, (320, 240), 110))
    make_video(str(tmp_path / "b.mp4"), 8, 8, (320, 240), frames=face_frames(8, (320, 240), with_face=False))
    pq.write_table(pa.table({"clip_id": ["face", "noface"], "video_uri": [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")],
                             "signer_id": ["s1", "s2"], "seed": [11, 12]}), tmp_path / "m.parquet")
    cfg = config_from_dict({
        "manifest": {"uri": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path / "out")},
        "anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
        "models": {"profile": "tiny", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "faces": {"backend": "dlib", "enhance": False},
        # Every pair of faces counts as the same person: the clip with a face must leak.
        "gate": {"max_reseeds": 2, "id_threshold": 100.0},
        "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    res = run(cfg)
    assert res.counts == {"leak": 1, "ok": 1}
    rec = json.loads((tmp_path / "out" / res.layout.cfg_fp / "records" / "face.json").read_text())
    assert rec["status"] == "leak" and rec["metrics"]["seed_attempt"] == 2 and rec["metrics"]["leak"] is True
    assert rec["metrics"]["face_frac_orig"] > 0.5
    other = json.loads((tmp_path / "out" / res.layout.cfg_fp / "records" / "noface.json").read_text())
    assert other["status"] == "ok" and other["metrics"]["face_frac_orig"] == 0.0  # no face is not a leak
    assert res.summary["reid"]["n_no_face"] == 1  # counted, never tested
    assert res.summary["reseeded_clips"] == ["face"]
    # Original-face embeddings live only in the private artifact, never in the metrics table.
    assert (tmp_path / "out" / res.layout.cfg_fp / "embeddings" / "face.npz").is_file()
    assert (tmp_path / "out" / res.layout.cfg_fp / "tracks" / "face.parquet").is_file()
    metrics = pq.read_table(tmp_path / "out" / res.layout.cfg_fp / "metrics" / "metrics.parquet")
    assert not [c for c in metrics.column_names if "emb" in c]
    # A rerun skips the settled leak.
    assert run(cfg).ran == 0
