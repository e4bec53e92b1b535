"""Faults survived (issue 5 §4, §5): local Ray (`ray start --head`), the local S3 server, and the
fault-injecting proxy of tests/faultproxy.py in front of it.

    a  an anonymize actor's process is SIGKILLed mid-run   -> restarted, every clip ok
    b  the driver is SIGKILLed mid-run, then the job reruns -> finished clips skipped, no duplicate
                                                               rows, no partial or stray objects
    c  ~20 % of S3 requests answered 503 SlowDown or dropped -> retried, the same clips as a clean
                                                               run (see _assert_same_clip)
    d  one input object's GET hangs                          -> clip_timeout_s error row, others ok
    e  a clip that kills its worker process every time       -> error row after max_attempts
    +  access denied on the input prefix -> error rows; on the output -> refused before any work

Every run is `anonymizer.kind: pixelate` with `faces.backend: none` on tiny clips.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_anon.config import config_from_dict
from tests.faultproxy import FaultProxy, Rule
from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN, OUT = "corpus-in", "corpus-out"


# ---- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Eight tiny, distinct source clips (160x120, 12-19 frames at 12 fps), as bytes."""
    d = tmp_path_factory.mktemp("fault-videos")
    out = {}
    for i in range(8):
        n = 12 + i
        frames = face_frames(n, (160, 120), 56) if i % 2 == 0 else None
        out[f"c{i}"] = open(make_video(str(d / f"c{i}.mp4"), n, 12, (160, 120), frames=frames), "rb").read()
    return out


@pytest.fixture
def proxy(s3):
    endpoint, _ = s3
    with FaultProxy(endpoint, seed=5) as px:
        yield px


def _corpus(fs, videos, ids, folder="v"):
    fs.mkdir(IN)
    fs.mkdir(OUT)
    uris = []
    for cid in ids:
        key = f"{IN}/{folder(cid) if callable(folder) else folder}/{cid}.mp4"
        fs.pipe(key, videos[cid])
        uris.append(f"s3://{key}")
    buf = io.BytesIO()
    pq.write_table(pa.table({"clip_id": list(ids), "video_uri": uris, "signer_id": ["s"] * len(ids)}), buf)
    fs.pipe(f"{IN}/manifest.parquet", buf.getvalue())


def _cfg_dict(endpoint, out="runs", **resources):
    return {
        "manifest": {"uri": f"s3://{IN}/manifest.parquet"},
        "output": {"uri": f"s3://{OUT}/{out}"},
        "anonymizer": {"kind": "pixelate"},
        "faces": {"backend": "none"},
        "storage": {"endpoint_url": endpoint, "retries": 5,
                    "allowed_prefixes": {"read": [f"s3://{IN}"], "write": [f"s3://{OUT}"]}},
        "video": {"short_side": 128},
        "resources": {"actors": 1, "batch_size": 4, "max_attempts": 3, "clip_timeout_s": 60, **resources},
    }


def _cfg(endpoint, out="runs", **resources):
    return config_from_dict(_cfg_dict(endpoint, out, **resources))


def _metrics(fs, result):
    fs.invalidate_cache()
    uri = result.metrics_uri.removeprefix("s3://")
    return pq.read_table(io.BytesIO(fs.cat(uri))).to_pylist()


def _check_published(fs, result, ids):
    """One metrics row per manifest row, every ok clip's object matches its sha256, and the clips
    prefix holds exactly the objects the metrics point at (nothing partial or stray)."""
    rows = _metrics(fs, result)
    assert sorted(r["clip_id"] for r in rows) == sorted(ids)
    uris = set()
    for r in rows:
        if r["status"] == "ok":
            data = fs.cat(r["output_uri"].removeprefix("s3://"))
            assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"], r["clip_id"]
            uris.add(r["output_uri"])
    clips = f"{OUT}/{result.layout.root.split(f'{OUT}/', 1)[1]}/clips"
    fs.invalidate_cache()
    assert {f"s3://{k}" for k in fs.find(clips)} == uris
    uploads = fs.call_s3("list_multipart_uploads", Bucket=OUT).get("Uploads", [])
    assert uploads == [], "no multipart upload may be left open"
    return {r["clip_id"]: r for r in rows}


def _records(fs, result):
    fs.invalidate_cache()
    prefix = f"{OUT}/{result.layout.root.split(f'{OUT}/', 1)[1]}/records" if hasattr(result, "layout") else result
    return {k.rsplit("/", 1)[1][:-5]: json.loads(fs.cat(k)) for k in fs.find(prefix)}


def _anonymize_actors(job=None):
    """The live anonymize actors (of one Ray job, when given)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if "AnonymizeWorker" in (a.repr_name or "") and job in (None, a.job_id)]


def _wait(cond, timeout, what, every=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- (a) an actor's process killed mid-run ------------------------------------------------------------
def test_actor_killed_mid_run_is_restarted_and_no_clip_is_lost(ray_cluster, s3, proxy, videos):
    from corpus_anon.run.pipeline import ensure_ray, run

    _, fs = s3
    ids = ["c0", "c1", "c2", "c3", "c4", "c5"]
    _corpus(fs, videos, ids)
    # c1's fetch is held for 3 s: the kill lands while c1's attempt is counted and unfinished.
    proxy.set_rules([Rule("delay", bucket=IN, prefix="v/c1.mp4", methods=("GET",), delay_s=3.0, limit=1)])
    cfg = _cfg(proxy.url, batch_size=3)
    job = ensure_ray().get_runtime_context().get_job_id()
    killed = {}

    def killer():
        try:
            att = f"{OUT}/runs"

            def c1_started():
                fs.invalidate_cache()
                return [k for k in fs.find(att) if k.endswith("/attempts/c1.json")]

            _wait(c1_started, 120, "c1's attempt")
            (actor,) = _wait(lambda: _anonymize_actors(job), 30, "the anonymize actor")
            os.kill(actor.pid, signal.SIGKILL)
            killed.update(pid=actor.pid, actor_id=actor.actor_id)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            killed["error"] = repr(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = run(cfg)
    t.join(10)
    assert "error" not in killed and killed.get("pid"), killed
    from ray.util.state import get_actor

    assert get_actor(killed["actor_id"]).num_restarts >= 1  # Ray restarted it in a new process
    assert r.counts == {"ok": len(ids)}
    m = _check_published(fs, r, ids)
    assert m["c1"]["attempts"] == 2  # its first attempt died with the process
    assert all(m[c]["attempts"] in (1, 2) for c in ids)


# ---- (b) the driver killed mid-run, then the job rerun ------------------------------------------------
def test_driver_killed_mid_run_then_rerun_skips_finished_clips(ray_cluster, s3, proxy, videos, tmp_path):
    """The job runs as its own process (`python jobs/anonymize_corpus.py CONFIG`, joining the
    cluster through RAY_ADDRESS, as under `ray job submit`) and is SIGKILLed while clip c3's upload
    is in flight: the proxy holds that PUT for a few seconds, then lets it through, so an object
    without a record appears after the kill, as a PUT already sent by a dying process can."""
    import yaml

    from corpus_anon.run.pipeline import run

    _, fs = s3
    ids = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]
    _corpus(fs, videos, ids)
    proxy.set_rules([Rule("delay", bucket=OUT, contains="/clips/c3-", methods=("PUT",), delay_s=6.0, limit=1)])
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(proxy.url, batch_size=2)))
    before = {a.actor_id for a in _anonymize_actors()}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "anonymize_corpus.py"), str(cfg_path)],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        def mid_run():
            fs.invalidate_cache()
            done = [k for k in fs.find(OUT) if "/records/" in k]
            return len(done) >= 2 and proxy.counts["delay"] == 1

        _wait(mid_run, 150, "two finished clips and c3's upload in flight")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        log.close()
    # Ray ends a dead driver's actors; wait for that, and for the held PUT to land.
    _wait(lambda: not [a for a in _anonymize_actors() if a.actor_id not in before], 60, "the old job's actors to end")
    cfg_fp = fs.cat(f"{OUT}/runs/LATEST_RUN").decode()
    root = f"{OUT}/runs/{cfg_fp}"

    def orphan():
        fs.invalidate_cache()
        return [k for k in fs.find(f"{root}/clips") if "/c3-" in k]

    _wait(orphan, 30, "c3's held upload")
    old = _records(fs, f"{root}/records")
    settled = {c for c, rec in old.items() if rec["status"] == "ok"}
    # Two batches run in the actor at once, so which two clips finished first varies.
    assert len(settled) >= 2 and "c3" not in settled and len(settled) < len(ids), \
        (sorted(settled), (tmp_path / "driver.log").read_text()[-3000:])
    assert json.loads(fs.cat(f"{root}/attempts/c3.json"))["attempts"] == 1  # c3: uploaded, never recorded
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/summary.json")  # the first run really did not finish

    proxy.set_rules([])
    r = run(config_from_dict(_cfg_dict(proxy.url, batch_size=2)))
    assert r.layout.cfg_fp == cfg_fp
    assert r.skipped == len(settled) and r.ran == len(ids) - len(settled)
    assert r.counts == {"ok": len(ids)}
    summary = json.loads(fs.cat(f"{root}/summary.json"))
    assert summary["skipped"] == len(settled) and summary["processed"] == len(ids) - len(settled)
    m = _check_published(fs, r, ids)  # c3's object is the one its new record describes
    assert m["c3"]["attempts"] == 2
    new = _records(fs, r)
    for c in settled:  # skipped: neither re-run nor rewritten
        assert new[c] == old[c] and m[c]["finished_at"] == old[c]["finished_at"] and m[c]["attempts"] == 1
    # Nothing but the run's own files under the run (no temporary or partial objects anywhere).
    fs.invalidate_cache()
    kinds = {k[len(root) + 1:].split("/", 1)[0] for k in fs.find(root)}
    assert kinds <= {"clips", "attempts", "records", "metrics", "plan.json", "summary.json", "config.yaml",
                     "report.html"}, kinds
    assert not [k for k in fs.find(OUT) if "probe" in k or ".tmp" in k]


def _frames(data):
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _assert_same_clip(fs, a, b):
    """The same clip from two runs of one config. Byte equality (sha256) is what should hold, but
    the encoder is not bit-reproducible yet: libx264's AVX-512 code, called from a thread other
    than the main one (the actor publishes on its I/O threads), gives a slightly different stream
    run to run for the same frames (measured here: 3-12 distinct sha256 in 15 encodes of one clip).
    A fixed x264 thread count (`video.threads: 1`) did not make these runs byte-equal, so both clips
    must agree in every stream property and decode to the same frames within encoder noise."""
    for k in ("n_frames", "fps", "width", "height", "duration_s", "vfr", "faces_found"):
        assert a[k] == b[k], (a["clip_id"], k, a[k], b[k])
    if a["sha256"] == b["sha256"]:
        return
    fa = _frames(fs.cat(a["output_uri"].removeprefix("s3://"))).astype(int)
    fb = _frames(fs.cat(b["output_uri"].removeprefix("s3://"))).astype(int)
    assert fa.shape == fb.shape, (a["clip_id"], fa.shape, fb.shape)
    diff = abs(fa - fb)
    assert diff.mean() < 0.5 and diff.max() <= 24, (a["clip_id"], float(diff.mean()), int(diff.max()))


# ---- (c) transient S3 faults ---------------------------------------------------------------------------
def test_transient_s3_faults_are_retried_to_the_same_outputs(ray_cluster, s3, proxy, videos):
    from corpus_anon.run.pipeline import run

    endpoint, fs = s3
    ids = ["c0", "c1", "c2", "c3"]
    _corpus(fs, videos, ids)
    clean = run(_cfg(endpoint, out="clean"))
    want = _check_published(fs, clean, ids)

    proxy.set_rules([
        # Sure hits on the paths that matter: source downloads cut mid-body (the client resumes
        # with a range request), a clip upload that took effect but lost its answer, records throttled.
        Rule("drop_mid_body", bucket=IN, prefix="v/", methods=("GET",), limit=2),
        Rule("drop_after", bucket=OUT, contains="/clips/", methods=("PUT",), limit=1),
        Rule("slowdown", bucket=OUT, contains="/records/", methods=("PUT",), limit=2),
        # And about a fifth of every request at random.
        Rule("slowdown", rate=0.10),
        Rule("drop", rate=0.04),
        Rule("drop_after", rate=0.03, methods=("PUT",)),
        Rule("drop_mid_body", rate=0.05, methods=("GET",)),
    ])
    faulty = run(_cfg(proxy.url, out="faulty"))
    assert faulty.counts == {"ok": len(ids)}
    got = _check_published(fs, faulty, ids)  # every object matches the sha256 its record holds
    for c in ids:
        _assert_same_clip(fs, want[c], got[c])
    counts = dict(proxy.counts)
    logging.getLogger(__name__).warning("faults injected: %s of %d requests", counts, proxy.requests)
    assert counts.get("slowdown", 0) > 2 and counts.get("drop", 0) > 0 and counts.get("drop_mid_body", 0) >= 2, counts
    assert counts.get("drop_after", 0) >= 1, counts
    assert proxy.injected >= 0.1 * proxy.requests, (counts, proxy.requests)


# ---- (d) a clip whose fetch hangs ------------------------------------------------------------------------
def test_hanging_clip_becomes_a_timeout_error_row(ray_cluster, s3, proxy, videos):
    from corpus_anon.run.pipeline import run

    _, fs = s3
    ids = ["c0", "c1", "c2"]
    _corpus(fs, videos, ids)
    # A real hang at the I/O layer: the object's GETs get no answer for far longer than the timeout.
    proxy.set_rules([Rule("delay", bucket=IN, prefix="v/c1.mp4", methods=("GET",), delay_s=600.0)])
    t0 = time.time()
    r = run(_cfg(proxy.url, clip_timeout_s=4))
    assert time.time() - t0 < 120
    assert proxy.counts["delay"] >= 1
    m = _check_published(fs, r, ids)
    assert {c: m[c]["status"] for c in ids} == {"c0": "ok", "c1": "error", "c2": "ok"}
    err = m["c1"]["error"]
    assert "clip_timeout_s (4 s)" in err and "\n" not in err and err.count(". ") == 0 and err.endswith("."), err


# ---- (e) a poison clip that kills its worker process every time -------------------------------------------
def test_poison_clip_is_given_up_after_max_attempts(ray_cluster, s3, videos):
    """The crash hook's environment variable must reach the actor's process only for this run: it
    goes in this driver's job-level runtime_env (the shared cluster's raylet and the other tests'
    jobs never see it), and the driver disconnects afterwards so later runs start a clean job."""
    import ray

    from corpus_anon.run.pipeline import run
    from corpus_anon.actor.worker import FAULT_CRASH_ENV

    endpoint, fs = s3
    ids = ["c0", "poison", "c2", "c3"]
    _corpus(fs, {**videos, "poison": videos["c1"]}, ids)
    ray.shutdown()
    ray.init(address=ray_cluster["address"], runtime_env={"env_vars": {FAULT_CRASH_ENV: "poison"}},
             logging_level=logging.WARNING)
    try:
        r = run(_cfg(endpoint, max_attempts=2, batch_size=4))
    finally:
        ray.shutdown()
    assert r.counts == {"ok": 3, "error": 1}
    m = _check_published(fs, r, ids)
    err = m["poison"]["error"]
    assert err.startswith("gave up after 2 attempts") and "\n" not in err, err
    assert m["poison"]["attempts"] == 2
    attempts = json.loads(fs.cat(f"{OUT}/runs/{r.layout.cfg_fp}/attempts/poison.json"))
    assert attempts["attempts"] == 2  # giving up is not another attempt
    for c in ("c0", "c2", "c3"):  # its neighbours in the batch lose at most the one crashed attempt
        assert m[c]["status"] == "ok" and m[c]["attempts"] <= 2, (c, m[c]["attempts"])


# ---- access denied ----------------------------------------------------------------------------------------
def test_access_denied_on_input_becomes_error_rows(ray_cluster, s3, proxy, videos):
    from corpus_anon.run.pipeline import run

    _, fs = s3
    ids = ["c0", "c1", "c2"]
    _corpus(fs, videos, ids, folder=lambda c: "denied" if c != "c0" else "v")
    proxy.set_rules([Rule("deny", bucket=IN, prefix="denied/")])
    r = run(_cfg(proxy.url))
    assert proxy.counts["deny"] >= 2
    m = _check_published(fs, r, ids)
    assert m["c0"]["status"] == "ok"
    for c in ("c1", "c2"):
        err = m[c]["error"]
        assert m[c]["status"] == "error" and err.startswith(f"access to s3://{IN}/denied/{c}.mp4 was denied"), err
        assert "\n" not in err and err.endswith(".")


def test_access_denied_on_output_is_refused_before_any_work(s3, proxy, videos, capsys, tmp_path):
    import yaml

    from corpus_anon.cli import main
    from corpus_anon.run.pipeline import RunError, run

    _, fs = s3
    _corpus(fs, videos, ["c0", "c1"])
    proxy.set_rules([Rule("deny", bucket=OUT)])
    with pytest.raises(RunError) as ei:
        run(_cfg(proxy.url))
    msg = str(ei.value)
    # The private store (tombstones) lies under the output by default: its read is the first refusal.
    assert msg == (f"reading the tombstones in s3://{OUT}/runs/private was denied "
                   "(PermissionError: Forbidden)."), msg
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(proxy.url)))
    assert main(["run", str(cfg_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"corpus-anon: {msg}", err
    fs.invalidate_cache()
    assert fs.find(OUT) == []  # nothing was written
    # refused at the first request to the output bucket: the private store's tombstones (a HEAD)
    assert {e[1] for e in proxy.events} == {"HEAD"}


def test_ray_data_restarts_actors_and_retries_batches_by_default():
    """The pipeline relies on Ray Data's actor-pool defaults (not passed: passing them is
    deprecated in Ray 2.60): restart a dead actor and retry its batches, without limit."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    args = ActorPoolMapOperator._apply_default_remote_args({"num_cpus": 0.5}, DataContext.get_current())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1
