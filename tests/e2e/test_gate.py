"""The leak gate end to end: a clip judged to leak is re-seeded, then ends as `leak`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e


def test_leaking_clip_is_reseeded_then_marked_leak(ray_cluster, tmp_path):
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.tiny import make_tiny
    from corpus_anon.run.pipeline import run

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


def test_signer_forced_unpixelated_on_three_frames_is_leak(ray_cluster, tmp_path):
    """pixelate hides the face; the test hook (`CORPUS_ANON_FAULT_EXPOSE`, set only in this driver's
    job-level runtime_env) gives one clip its original pixels back on frames 4-6. The exposure check
    counts them and the clip is `leak` (pixelate cannot be re-seeded); its twin stays `ok`."""
    import logging

    import ray

    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.gate import FAULT_EXPOSE_ENV
    from corpus_anon.run.pipeline import run

    make_video(str(tmp_path / "a.mp4"), 16, 8, (320, 240), frames=face_frames(16, (320, 240), 110))
    pq.write_table(pa.table({"clip_id": ["forced", "clean"], "video_uri": [str(tmp_path / "a.mp4")] * 2,
                             "signer_id": ["s1", "s1"]}), tmp_path / "m.parquet")
    cfg = config_from_dict({
        "manifest": {"uri": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path / "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "dlib"},
        "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)],
                                         "write": [str(tmp_path / "out"), str(tmp_path / "rel")]}},
    })
    ray.shutdown()
    ray.init(address=ray_cluster["address"], runtime_env={"env_vars": {FAULT_EXPOSE_ENV: "forced:4,5,6"}},
             logging_level=logging.WARNING)
    try:
        res = run(cfg)
    finally:
        ray.shutdown()
    assert res.counts == {"leak": 1, "ok": 1}
    recs = {c: json.loads((tmp_path / "out" / res.layout.cfg_fp / "records" / f"{c}.json").read_text())
            for c in ("forced", "clean")}
    forced, clean = recs["forced"]["metrics"], recs["clean"]["metrics"]
    assert recs["forced"]["status"] == "leak" and forced["leak"] is True
    assert forced["exposed_frames"] >= 3 and forced["max_exposed_run"] >= 3
    assert forced["faces_tracked"] >= 1 and forced["exposure_covered"] is True
    assert recs["clean"]["status"] == "ok" and clean["exposed_frames"] == 0
    assert clean["frames_checked"] >= 16 // 5 and clean["exposure_covered"] is True
    metrics = pq.read_table(tmp_path / "out" / res.layout.cfg_fp / "metrics" / "metrics.parquet").to_pylist()
    by_id = {r["clip_id"]: r for r in metrics}
    assert by_id["forced"]["exposed_frames"] >= 3 and by_id["clean"]["exposed_frames"] == 0
    # Not released: the leaking clip is left out, its clean twin goes in.
    from corpus_anon.release.publish import release, release_id
    from corpus_anon.io.storage import Storage, StorageSettings

    secret = b"e2e-gate-secret-0123456789abcdef-0123456789"
    rel = release(cfg, Storage(StorageSettings.from_config(cfg, None)), str(tmp_path / "out"),
                  str(tmp_path / "rel"), secret=secret)
    assert rel.released == 1 and rel.excluded.get("status") == 1, (rel.released, rel.excluded)
    ids = pq.read_table(rel.manifest_uri.removeprefix("file://")).column("release_id").to_pylist()
    assert ids == [release_id(secret, "clean")]
