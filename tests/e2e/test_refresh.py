"""Scheduled refresh end to end: only new and changed clips run, removed clips leave the next
release, nothing changed means no new version, and `leak` clips resume their seed attempts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e

SECRET = "refresh-test-secret-0123456789abcdef0123"
ROOT = Path(__file__).resolve().parents[2]


def _manifest(tmp: Path, ids: list[str]) -> None:
    uris = []
    for i, cid in enumerate(ids):
        path = tmp / "videos" / f"{cid}.mp4"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            make_video(str(path), 8, 8, (160, 120), frames=face_frames(8, (160, 120), 56 + 4 * i))
        uris.append(str(path))
    pq.write_table(pa.table({"clip_id": ids, "video_uri": uris, "signer_id": [c[0] for c in ids]}),
                   tmp / "manifest.parquet")


def _cfg_dict(tmp: Path) -> dict:
    return {
        "manifest": {"uri": str(tmp / "manifest.parquet")}, "output": {"uri": str(tmp / "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "none"}, "video": {"short_side": 128},
        "storage": {"allowed_prefixes": {"read": [str(tmp)], "write": [str(tmp / "out"), str(tmp / "rel")]}},
        "resources": {"actors": 1, "batch_size": 4},
        "release": {"root": str(tmp / "rel")},
    }


def test_refresh_runs_only_what_changed_and_releases_only_when_something_did(ray_cluster, tmp_path, monkeypatch):
    import yaml

    from corpus_anon.config import config_from_dict
    from corpus_anon.release.refresh import refresh

    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    _manifest(tmp_path, ["a1", "a2", "b1"])
    cfg = config_from_dict(_cfg_dict(tmp_path))
    # faces.backend: none checks nothing: the refresh releases nothing unless told to.
    r0 = refresh(cfg)
    assert r0.run.ran == 3 and r0.release.version is None and r0.release.excluded["unchecked"] == 3
    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    r1 = refresh(cfg, allow_unchecked=True)
    assert r1.run.ran == 0 and r1.release.version == "v0001" and r1.release.released == 3

    # The corpus grows by one clip, one recording is re-cut, one clip is removed.
    make_video(str(tmp_path / "videos" / "a2.mp4"), 6, 8, (160, 120), frames=face_frames(6, (160, 120), 70))
    _manifest(tmp_path, ["a1", "a2", "c1"])
    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    r2 = refresh(cfg, allow_unchecked=True)
    assert r2.run.ran == 2 and r2.run.skipped == 1  # a2 changed, c1 new; a1 carried forward
    assert r2.release.version == "v0002" and r2.release.released == 3
    rows = pq.read_table(tmp_path / "rel" / "releases" / "v0002" / "manifest.parquet").to_pylist()
    v1 = pq.read_table(tmp_path / "rel" / "releases" / "v0001" / "manifest.parquet").to_pylist()
    assert len({r["release_id"] for r in rows} & {r["release_id"] for r in v1}) == 2  # b1 left, c1 came
    a2_old = next(r for r in v1 if r["n_frames"] == 8 and r["clip_uri"] not in {x["clip_uri"] for x in rows})
    assert Path(a2_old["clip_uri"].removeprefix("file://")).exists()  # v0001 still points at its bytes

    # The scheduled job with nothing new: no clip runs, no version is written.
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(tmp_path)))
    env = {**os.environ, "CORPUS_ANON_SECRET": SECRET}
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "refresh.py"), str(cfg_path), "--allow-unchecked"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(0 processed, 3 carried forward)" in p.stdout and "nothing changed: v0002 stays the latest" in p.stdout
    assert (tmp_path / "rel" / "releases" / "LATEST").read_text() == "v0002"
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "refresh.py"), str(cfg_path)],
                       env={k: v for k, v in env.items() if k != "CORPUS_ANON_SECRET"},
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert p.returncode == 2 and "needs the secret in CORPUS_ANON_SECRET" in p.stderr
    # A release root inside the run output is refused before any work.
    bad = {**_cfg_dict(tmp_path), "release": {"root": str(tmp_path / "out" / "public")}}
    cfg_path.write_text(yaml.safe_dump(bad))
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "refresh.py"), str(cfg_path)], env=env,
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert p.returncode == 2 and "overlap" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_refresh_resumes_a_leaking_clip_from_its_last_seed_attempt(ray_cluster, tmp_path, monkeypatch):
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.tiny import make_tiny
    from corpus_anon.release.refresh import refresh

    make_tiny(tmp_path / "store")
    make_video(str(tmp_path / "a.mp4"), 8, 8, (320, 240), frames=face_frames(8, (320, 240), 110))
    pq.write_table(pa.table({"clip_id": ["face"], "video_uri": [str(tmp_path / "a.mp4")], "signer_id": ["s1"],
                             "seed": [11]}), tmp_path / "m.parquet")
    cfg = config_from_dict({
        "manifest": {"uri": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path / "out")},
        "anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
        "models": {"profile": "tiny", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "faces": {"backend": "dlib", "enhance": False},
        "gate": {"max_reseeds": 1, "id_threshold": 100.0},  # every face pair is "the same person": always leaks
        "refresh": {"max_reseeds": 2},
        "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out"), str(tmp_path / "rel")]}},
        "release": {"root": str(tmp_path / "rel")},
    })
    rec_path = None
    attempts_seen = []
    for _ in range(3):
        monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
        res = refresh(cfg)
        rec_path = tmp_path / "out" / res.run.layout.cfg_fp / "records" / "face.json"
        rec = json.loads(rec_path.read_text())
        attempts_seen.append((res.run.ran, rec["status"], rec["metrics"]["seed_attempt"]))
        assert res.release.released == 0 and res.release.excluded["status"] == 1
    # Run 1: seeds 0 and 1 (gate.max_reseeds 1); run 2 resumes at 2 (refresh.max_reseeds 2 in all);
    # run 3 has nothing left to try.
    assert attempts_seen == [(1, "leak", 1), (1, "leak", 2), (0, "leak", 2)]
