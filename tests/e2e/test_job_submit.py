"""`ray job submit` of jobs/anonymize_corpus.py to a `ray start --head` cluster, outputs on S3."""

import io
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def test_ray_job_submit(ray_cluster, s3, tmp_path):
    endpoint, fs = s3
    fs.mkdir("jobs-in")
    fs.mkdir("jobs-out")
    for i in range(2):
        path = make_video(str(tmp_path / f"v{i}.mp4"), 18, 12, (160, 120), frames=face_frames(18, (160, 120), 56))
        fs.pipe(f"jobs-in/v{i}.mp4", open(path, "rb").read())
    buf = io.BytesIO()
    pq.write_table(pa.table({"clip_id": ["v0", "v1"], "video_uri": ["s3://jobs-in/v0.mp4", "s3://jobs-in/v1.mp4"],
                             "signer_id": ["a", "b"]}), buf)
    fs.pipe("jobs-in/manifest.parquet", buf.getvalue())
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "manifest: {uri: s3://jobs-in/manifest.parquet}\noutput: {uri: s3://jobs-out/run}\n"
        f"storage: {{endpoint_url: '{endpoint}', allowed_prefixes: {{read: [s3://jobs-in], write: [s3://jobs-out]}}}}\n"
        "video: {short_side: 128}\n")
    sid = f"corpus-anon-test-{int(time.time())}"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    runtime_env = json.dumps({"excludes": [".venv", ".git", "demo-output", "tests", "benchmarks"]})
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--submission-id", sid,
         "--working-dir", REPO, "--runtime-env-json", runtime_env, "--",
         "python", "jobs/anonymize_corpus.py", str(cfg)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_cluster["dashboard"]).get_job_status(sid) == JobStatus.SUCCEEDED
    cfg_fp = fs.cat("jobs-out/run/LATEST_RUN").decode()
    metrics = pq.read_table(io.BytesIO(fs.cat(f"jobs-out/run/{cfg_fp}/metrics/metrics.parquet"))).to_pylist()
    assert [(m["clip_id"], m["status"]) for m in metrics] == [("v0", "ok"), ("v1", "ok")]
    for m in metrics:
        assert fs.info(m["output_uri"])["size"] == m["bytes"] > 0
