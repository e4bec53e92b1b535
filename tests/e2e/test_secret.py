"""CORPUS_ANON_SECRET stays on the driver: no Ray process has it, no output contains it."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.media import make_video

pytestmark = pytest.mark.e2e
SECRET = "e2e-secret-that-must-never-leave-the-driver-0123456789"

SCRIPT = textwrap.dedent("""
    import os, sys, json
    from corpus_anon.config import config_from_dict
    from corpus_anon.run.pipeline import run
    root, store, probe = sys.argv[1], sys.argv[2], sys.argv[3].encode()
    cfg = config_from_dict({
        "manifest": {"uri": root + "/m.parquet"}, "output": {"uri": root + "/out"},
        "anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
        "models": {"profile": "tiny", "store": store, "cache_dir": root + "/cache"},
        "video": {"short_side": 64},
        "storage": {"allowed_prefixes": {"read": [root], "write": [root + "/out"]}},
    })
    res = run(cfg)
    import ray
    leaks = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if b"ray" in cmd and int(pid) != os.getpid() and probe in env:
            leaks.append(cmd[:80].decode(errors="replace"))
    @ray.remote
    def worker_env():
        return "CORPUS_ANON_SECRET" in os.environ
    print(json.dumps({"counts": res.counts, "leaks": leaks, "task_sees_secret": ray.get(worker_env.remote()),
                      "driver_has_secret": "CORPUS_ANON_SECRET" in os.environ}), flush=True)
    ray.shutdown()
    os._exit(0)  # as the console script does: pyarrow's teardown can abort an otherwise finished process
""")


def test_secret_never_reaches_workers_or_outputs(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.models.tiny import make_tiny

    make_video(str(tmp_path / "a.mp4"), 8, 8, (64, 64))
    pq.write_table(pa.table({"clip_id": ["a"], "video_uri": [str(tmp_path / "a.mp4")], "signer_id": ["s1"]}),
                   tmp_path / "m.parquet")
    store = tmp_path / "store"
    make_tiny(store)
    env = dict(os.environ, CORPUS_ANON_SECRET=SECRET)
    env.pop("RAY_ADDRESS", None)  # the driver starts its own local Ray: workers inherit its environment
    # The probe value travels in argv, which child processes do not inherit.
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(store), SECRET], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["counts"] == {"ok": 1}
    assert result["leaks"] == [] and result["task_sees_secret"] is False and result["driver_has_secret"] is False
    for dirpath, _, files in os.walk(tmp_path / "out"):
        for f in files:
            data = open(os.path.join(dirpath, f), "rb").read()
            assert SECRET.encode() not in data, f
