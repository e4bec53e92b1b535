"""Bad manifests and configs are rejected before any work starts (no Ray, nothing written)."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e
CLI = os.path.join(os.path.dirname(sys.executable), "corpus-anon")


def _cfg(tmp_path, extra=""):
    p = tmp_path / "c.yaml"
    p.write_text(
        f"manifest: {{uri: {tmp_path}/m.parquet}}\noutput: {{uri: {tmp_path}/out}}\n"
        f"storage: {{allowed_prefixes: {{read: ['{tmp_path}'], write: ['{tmp_path}/out']}}}}\n"
        "video: {max_clip_s: 10}\n" + extra)
    return str(p)


def _run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("rows,needle", [
    ([dict(clip_id="a", start_s=1.0, end_s=1.0)], "row 0: segment [1.0, 1.0) is empty"),
    ([dict(clip_id="a", start_s=0.0, end_s=11.0)], "longer than video.max_clip_s"),
    ([dict(clip_id="a"), dict(clip_id="a")], "row 1: clip_id 'a' duplicates row 0"),
    ([dict(clip_id="../escape")], "unsafe"),
    ([dict(clip_id="a/b")], "unsafe"),
    ([dict(clip_id="a", video_uri="http://host/a.mp4")], "not supported"),
    ([dict(clip_id="a", video_uri="/etc/hosts")], "outside storage.allowed_prefixes.read"),
])
def test_bad_manifest_rejected_before_work(tmp_path, rows, needle):
    full = [{"video_uri": str(tmp_path / "v.mp4"), "signer_id": "s", "start_s": None, "end_s": None, **r}
            for r in rows]
    schema = pa.schema([("clip_id", pa.string()), ("video_uri", pa.string()), ("signer_id", pa.string()),
                        ("start_s", pa.float64()), ("end_s", pa.float64())])
    pq.write_table(pa.Table.from_pylist(full, schema=schema), tmp_path / "m.parquet")
    proc = _run("run", _cfg(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before validation passes"
    v = _run("validate", str(tmp_path / "m.parquet"), "--config", _cfg(tmp_path))
    assert v.returncode == 2 and needle in v.stderr


def test_missing_column_and_unknown_config_key(tmp_path):
    pq.write_table(pa.table({"clip_id": ["a"], "video_uri": [str(tmp_path / "v.mp4")]}), tmp_path / "m.parquet")
    proc = _run("run", _cfg(tmp_path))
    assert proc.returncode == 2 and "required column 'signer_id' is missing" in proc.stderr
    proc = _run("run", _cfg(tmp_path, "resources: {gpus: 1}\n"))
    assert proc.returncode == 2 and "unknown key 'resources.gpus'" in proc.stderr
    assert not (tmp_path / "out").exists()
