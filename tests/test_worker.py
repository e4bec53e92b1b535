"""The actor's logic in-process (no Ray): records, attempts, timeouts, give-up, overlap."""

import hashlib
import json
import os
import time

import pytest

from corpus_anon.config import config_from_dict
from corpus_anon.io.records import RunLayout, bump_attempts, read_attempts, read_record
from corpus_anon.io.storage import Storage, StorageSettings
from corpus_anon.actor.worker import AnonymizeWorker, anonymize_file
from tests.media import face_frames, make_video, read_frames


def _worker(tmp_path, **resources):
    cfg = config_from_dict({
        "video": {"short_side": 128},
        "resources": {"io_threads": 2, **resources},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    settings = StorageSettings.from_config(cfg, None)
    layout = RunLayout(str(tmp_path / "out"), "fp0")
    return AnonymizeWorker(cfg.model_dump(mode="json"), settings, layout), Storage(settings), layout


def _row(tmp_path, cid, name=None, **kw):
    return {"clip_id": cid, "video_uri": str(tmp_path / (name or f"{cid}.mp4")), "signer_id": "s",
            "start_s": None, "end_s": None, "row_fp": "r" + cid, **kw}


def test_ok_and_error_rows_with_records(tmp_path):
    make_video(str(tmp_path / "a.mp4"), 20, 10, (160, 120), frames=face_frames(20, (160, 120), 60))
    make_video(str(tmp_path / "b.mp4"), 20, 10)
    (tmp_path / "text.mp4").write_text("not a video")
    w, st, lay = _worker(tmp_path)
    rows = [_row(tmp_path, "a"), _row(tmp_path, "missing"), _row(tmp_path, "text"),
            _row(tmp_path, "b", start_s=0.5, end_s=1.5), _row(tmp_path, "late", "b.mp4", start_s=9.0, end_s=10.0)]
    recs = {r["clip_id"]: r for r in w.process(rows)}
    assert [r["status"] for r in recs.values()] == ["ok", "error", "error", "ok", "error"]
    assert "does not exist" in recs["missing"]["error"]
    assert "not a readable video" in recs["text"]["error"]
    assert "past the end" in recs["late"]["error"]
    for cid, rec in recs.items():
        assert read_record(st, lay, cid) == rec  # the record is the done marker
        assert rec["attempts"] == 1 and read_attempts(st, lay, cid, "r" + cid) == 1
    ok = recs["b"]
    path = ok["output_uri"].removeprefix("file://")
    assert ok["output_uri"] == lay.clip("b", "rb")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == ok["sha256"]
    assert os.path.getsize(path) == ok["bytes"]
    frames, ts, _ = read_frames(path)
    assert len(frames) == ok["metrics"]["n_frames"] == 10
    assert ok["metrics"]["t_fetch_s"] >= 0 and ok["metrics"]["t_publish_s"] >= 0
    assert os.listdir(w.proc.tmp) == []  # nothing left behind


def test_poison_clip_is_given_up_after_max_attempts(tmp_path):
    make_video(str(tmp_path / "p.mp4"), 10, 10)
    w, st, lay = _worker(tmp_path, max_attempts=2)
    # Two earlier attempts started and died without a record (a crash kills the process).
    bump_attempts(st, lay, "p", "rp")
    bump_attempts(st, lay, "p", "rp")
    (rec,) = w.process([_row(tmp_path, "p")])
    assert rec["status"] == "error" and "gave up after 2 attempts" in rec["error"]
    assert read_attempts(st, lay, "p", "rp") == 2  # giving up is not another attempt


def test_clip_timeout_becomes_an_error_row(tmp_path):
    make_video(str(tmp_path / "slow.mp4"), 30, 10)
    make_video(str(tmp_path / "fast.mp4"), 10, 10)
    w, st, lay = _worker(tmp_path, clip_timeout_s=1.0)
    real = w.proc.anonymizer.anonymize

    def slow(frames, row, check):
        if row["clip_id"] == "slow":
            for _ in range(100):
                time.sleep(0.05)
                check()
        return real(frames, row, check)

    w.proc.anonymizer.anonymize = slow
    recs = {r["clip_id"]: r for r in w.process([_row(tmp_path, "slow"), _row(tmp_path, "fast")])}
    assert recs["slow"]["status"] == "error" and "clip_timeout_s" in recs["slow"]["error"]
    assert recs["fast"]["status"] == "ok"


def test_single_file_without_ray(tmp_path):
    src = make_video(str(tmp_path / "in.mp4"), 12, 12, (320, 240), frames=face_frames(12), audio=True)
    out = str(tmp_path / "out.mp4")
    cfg = config_from_dict({"video": {"audio": "copy", "short_side": 256}})
    m = anonymize_file(cfg, src, out)
    frames, _, fps = read_frames(out)
    assert frames.shape == (12, 240, 320, 3) and fps == 12
    assert m["faces_found"] >= 1
    import av

    with av.open(out) as c:
        assert c.streams.audio, "audio: copy keeps the (cut) audio"


def test_diffslva_clips_share_unet_calls_in_the_actor(tmp_path):
    from corpus_anon.models.tiny import make_tiny

    make_tiny(tmp_path / "store")
    make_video(str(tmp_path / "a.mp4"), 12, 12, (64, 64))
    make_video(str(tmp_path / "b.mp4"), 8, 12, (64, 64))
    make_video(str(tmp_path / "wide.mp4"), 8, 12, (128, 64))
    cfg = config_from_dict({
        "anonymizer": {"kind": "diffslva"},
        "diffusion": {"steps": 2, "batch_clips": 4},
        "models": {"profile": "tiny", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "video": {"short_side": 64},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    settings = StorageSettings.from_config(cfg, None)
    w = AnonymizeWorker(cfg.model_dump(mode="json"), settings, RunLayout(str(tmp_path / "out"), "fp0"))
    rows = [_row(tmp_path, c, seed=i + 1, prompt="a person") for i, c in enumerate(["a", "missing", "wide", "b"])]
    recs = {r["clip_id"]: r for r in w.process(rows)}
    assert [r["clip_id"] for r in w.process(rows[:0])] == []
    assert {c: r["status"] for c, r in recs.items()} == {"a": "ok", "missing": "error", "wide": "ok", "b": "ok"}
    assert recs["a"]["metrics"]["batched_clips"] == recs["b"]["metrics"]["batched_clips"] == 2
    assert recs["wide"]["metrics"]["batched_clips"] == 1
    # 12 fps at 6 key frames/s: K=2; clip a (12 frames) keys 0,2,..,10,11 -> 7 keys, one 2-step CFG pass
    # each (a 2-step schedule has no pixel-aware fusion step, so no second pass): (4 + 6 * 4) / 12
    assert recs["a"]["metrics"]["nfe_per_frame"] == round((4 + 6 * 4) / 12, 4)
    frames, _, _ = read_frames(recs["wide"]["output_uri"].removeprefix("file://"))
    assert frames.shape == (8, 64, 128, 3)


def test_expression_enhancement_runs_for_diffslva_and_is_refused_without_tpsmm(tmp_path):
    import json as _json

    from corpus_anon.config import ConfigError
    from corpus_anon.models.registry import LOCK_NAME
    from corpus_anon.models.tiny import make_tiny
    from corpus_anon.run.pipeline import model_lock_digest

    make_tiny(tmp_path / "store")
    make_video(str(tmp_path / "f.mp4"), 6, 6, (320, 240), frames=face_frames(6, (320, 240), 110))
    base = {
        "anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
        "models": {"profile": "tiny", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "faces": {"backend": "dlib", "enhance": True, "enhance_size": 128},
        "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    }
    cfg = config_from_dict(base)
    w = AnonymizeWorker(cfg.model_dump(mode="json"), StorageSettings.from_config(cfg, None),
                        RunLayout(str(tmp_path / "out"), "fp0"))
    (rec,) = w.process([_row(tmp_path, "f", seed=3, prompt="a person")])
    assert rec["status"] in ("ok", "leak") and rec["metrics"]["face_frac_orig"] > 0.5
    assert rec["metrics"]["enhanced"] is True
    # The driver refuses enhancement when the store's lock has no TPSMM checkpoint.
    lock = tmp_path / "store" / LOCK_NAME
    data = _json.loads(lock.read_text())
    data["files"] = {k: v for k, v in data["files"].items() if not k.endswith("vox.pth.tar")}
    lock.write_text(_json.dumps(data))
    st = Storage(StorageSettings.from_config(cfg, None))
    with pytest.raises(ConfigError, match="TPSMM"):
        model_lock_digest(cfg, st)
    model_lock_digest(config_from_dict({**base, "faces": {"enhance": False}}), st)


def test_detections_export_and_bring_your_own_boxes(tmp_path):
    """The tracks a run writes (source pixels) read back as `face_boxes_uri`, and drive the checks."""
    import pyarrow.parquet as pq

    from corpus_anon.actor.identity import boxes_to_parquet

    make_video(str(tmp_path / "f.mp4"), 8, 8, (320, 240), frames=face_frames(8, (320, 240), 110))
    cfg = config_from_dict({
        "faces": {"backend": "dlib"}, "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    lay = RunLayout(str(tmp_path / "out"), "fp0")
    w = AnonymizeWorker(cfg.model_dump(mode="json"), StorageSettings.from_config(cfg, None), lay)
    (rec,) = w.process([_row(tmp_path, "f")])
    assert rec["metrics"]["face_boxes"] == "detected" and rec["metrics"]["face_frac_orig"] == 1.0
    tracks_path = lay.artifact("tracks", "f").removeprefix("file://")
    tracks = pq.read_table(tracks_path).to_pylist()
    assert len(tracks) == 8
    cx = (tracks[0]["x0"] + tracks[0]["x1"]) / 2
    assert 140 < cx < 180  # source pixels (the face is centred in a 320-wide source), not work pixels
    # Bring the same boxes back for half of the frames: they, not a detector, define the signer.
    half = tmp_path / "half.parquet"
    half.write_bytes(boxes_to_parquet([r for r in tracks if r["frame"] % 2 == 0]))
    (given,) = w.process([_row(tmp_path, "g", "f.mp4", face_boxes_uri=str(half))])
    assert given["status"] == "ok" and given["metrics"]["face_boxes"] == "given"
    assert given["metrics"]["face_frac_orig"] == 0.5
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    (err,) = w.process([_row(tmp_path, "h", "f.mp4", face_boxes_uri=str(bad))])
    assert err["status"] == "error" and "face_boxes_uri is not a readable Parquet file" in err["error"]
    (missing,) = w.process([_row(tmp_path, "i", "f.mp4", face_boxes_uri=str(tmp_path / "nope.parquet"))])
    assert missing["status"] == "error" and "does not exist" in missing["error"]


def test_retried_batch_returns_settled_records_and_runs_unfinished_clips_alone(tmp_path):
    """After an actor dies, Ray retries its whole batch on the restarted actor: clips settled by the
    earlier try come back unchanged (no new attempt), and since some clip's attempt never finished,
    the batch runs one clip at a time so a crash again costs only the crashing clip an attempt."""
    for c in ("a", "b", "c"):
        make_video(str(tmp_path / f"{c}.mp4"), 10, 10)
    w, st, lay = _worker(tmp_path, max_attempts=3)
    (done,) = w.process([_row(tmp_path, "a")])
    bump_attempts(st, lay, "b", "rb")  # b's attempt started and its process died
    calls = []
    real = w._process
    w._process = lambda rows: calls.append([r["clip_id"] for r in rows]) or real(rows)
    recs = {r["clip_id"]: r for r in w.process([_row(tmp_path, c) for c in ("a", "b", "c")])}
    assert calls == [["a"], ["b"], ["c"]]
    assert recs["a"] == done and read_attempts(st, lay, "a", "ra") == 1
    assert recs["b"]["status"] == "ok" and recs["b"]["attempts"] == 2
    assert recs["c"]["status"] == "ok" and recs["c"]["attempts"] == 1
    calls.clear()
    w.process([_row(tmp_path, "d", "c.mp4"), _row(tmp_path, "e", "c.mp4")])  # nothing unfinished: together
    assert calls == [["d", "e"]]


def test_crash_hook_is_inert_by_default_and_counts_the_attempt_first(tmp_path, monkeypatch):
    from corpus_anon.actor.worker import FAULT_CRASH_ENV

    make_video(str(tmp_path / "p.mp4"), 10, 10)
    w, st, lay = _worker(tmp_path)

    class Exited(BaseException):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.delenv(FAULT_CRASH_ENV, raising=False)
    assert w.proc.prepare(_row(tmp_path, "p")).record is None  # not set: nothing happens
    monkeypatch.setenv(FAULT_CRASH_ENV, "other, p")
    with pytest.raises(Exited):
        w.proc.prepare(_row(tmp_path, "p"))
    assert read_attempts(st, lay, "p", "rp") == 2  # counted before the process died


def test_benchmark_standin_counts_attempts_and_writes_records_without_media(tmp_path, monkeypatch):
    w, st, lay = _worker(tmp_path)
    monkeypatch.setenv("CORPUS_ANON_BENCH_STANDIN_S", "0.05")
    t0 = time.monotonic()
    recs = w.process([_row(tmp_path, "x"), _row(tmp_path, "y")])  # the videos do not even exist
    assert time.monotonic() - t0 >= 0.1
    assert [r["status"] for r in recs] == ["ok", "ok"] and all(r["output_uri"] is None for r in recs)
    assert read_record(st, lay, "x")["metrics"]["standin"] is True and read_attempts(st, lay, "y", "ry") == 1


def test_two_batches_in_one_actor_share_the_model_one_at_a_time_and_overlap_their_io(tmp_path):
    """resources.concurrent_batches: Ray Data calls the actor from two threads at once. The model
    (anonymize + face analysis) must serve one batch at a time, while the other batch's fetch and
    decode run during it."""
    import threading

    for c in "ab":
        make_video(str(tmp_path / f"{c}.mp4"), 20, 20, (160, 120))
    w, st, lay = _worker(tmp_path)
    events: list[tuple[str, str, float]] = []
    busy = [0]
    lock = threading.Lock()
    model = w.proc.anonymizer.anonymize
    prepare = w.proc.prepare

    def slow_model(frames, ctx, check):
        with lock:
            busy[0] += 1
            assert busy[0] == 1, "two batches were on the model at once"
        events.append(("model_start", ctx["clip_id"], time.monotonic()))
        time.sleep(0.6)
        events.append(("model_end", ctx["clip_id"], time.monotonic()))
        with lock:
            busy[0] -= 1
        return model(frames, ctx, check)

    def traced_prepare(row):
        events.append(("fetch_start", row["clip_id"], time.monotonic()))
        return prepare(row)

    w.proc.anonymizer.anonymize = slow_model
    w.proc.prepare = traced_prepare
    out: dict[str, list] = {}
    threads = [threading.Thread(target=lambda c=c: out.setdefault(c, w.process([_row(tmp_path, c)])))
               for c in "ab"]
    threads[0].start()
    time.sleep(0.2)  # batch a is on the model when batch b arrives
    threads[1].start()
    for t in threads:
        t.join(30)
    assert [r["status"] for c in "ab" for r in out[c]] == ["ok", "ok"]
    at = {(kind, cid): t for kind, cid, t in events}
    first, second = sorted("ab", key=lambda c: at[("model_start", c)])
    # the second batch fetched and decoded while the first was on the model
    assert at[("fetch_start", second)] < at[("model_end", first)]
    assert at[("model_start", second)] >= at[("model_end", first)]


def test_a_batch_of_crash_suspects_runs_alone_in_the_actor(tmp_path):
    """With two batches per actor, a retried batch whose clip may crash the process again must not
    run beside another batch: it waits for the running batch, and a new batch waits for it."""
    import threading

    for c in "abcd":
        make_video(str(tmp_path / f"{c}.mp4"), 10, 10)
    w, st, lay = _worker(tmp_path)
    bump_attempts(st, lay, "s", "rs")  # clip s's attempt started and its process died
    spans: dict[str, list[float]] = {}
    model = w.proc.anonymizer.anonymize

    def timed(frames, ctx, check):
        spans.setdefault(ctx["clip_id"], []).append(time.monotonic())
        time.sleep(0.4)
        out = model(frames, ctx, check)
        spans[ctx["clip_id"]].append(time.monotonic())
        return out

    w.proc.anonymizer.anonymize = timed
    first = threading.Thread(target=w.process, args=([_row(tmp_path, "a"), _row(tmp_path, "b")],))
    suspect = threading.Thread(target=w.process, args=([_row(tmp_path, "s", "c.mp4")],))
    later = threading.Thread(target=w.process, args=([_row(tmp_path, "d")],))
    first.start()
    time.sleep(0.2)
    suspect.start()
    time.sleep(0.2)
    later.start()
    for t in (first, suspect, later):
        t.join(60)
    assert read_record(st, lay, "s")["attempts"] == 2 and read_record(st, lay, "d")["status"] == "ok"
    # s started only after every clip of the running batch was done, and d only after s
    assert spans["s"][0] >= max(spans["a"][1], spans["b"][1])
    assert spans["d"][0] >= spans["s"][1]


def test_hostile_sources_are_error_rows_and_the_other_clips_finish(tmp_path):
    """A concat script naming another clip's temp source, an object over video.max_bytes, a very wide
    stream and a header lying about its frame rate: one error row each, one sentence; the good clip
    next to them is processed."""
    from tests.media import make_container_video

    make_video(str(tmp_path / "good.mp4"), 20, 10, (160, 120), frames=face_frames(20, (160, 120), 60))
    # Before the fix a clip's temp source was "<clip_id>.src" beside the others in the actor's folder.
    (tmp_path / "concat.mp4").write_text("ffconcat version 1.0\nfile good.src\n")
    make_video(str(tmp_path / "big.mp4"), 60, 10, (320, 240))
    make_video(str(tmp_path / "wide.mp4"), 4, 10, (320, 16))
    make_container_video(str(tmp_path / "dense.mkv"), "matroska", 150, (64, 48), declared_fps=10000,
                         interval_s=0.01)
    assert os.path.getsize(tmp_path / "big.mp4") > 60_000 > os.path.getsize(tmp_path / "good.mp4")
    cfg = config_from_dict({
        "video": {"short_side": 128, "max_bytes": 60_000, "max_clip_s": 5, "max_fps": 24},
        "resources": {"io_threads": 2},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    w = AnonymizeWorker(cfg.model_dump(mode="json"), StorageSettings.from_config(cfg, None),
                        RunLayout(str(tmp_path / "out"), "fp0"))
    rows = [_row(tmp_path, "concat"), _row(tmp_path, "good"), _row(tmp_path, "big"), _row(tmp_path, "wide"),
            _row(tmp_path, "dense", "dense.mkv")]
    recs = {r["clip_id"]: r for r in w.process(rows)}
    assert recs["good"]["status"] == "ok" and recs["good"]["metrics"]["n_frames"] == 20
    errors = {cid: r["error"] for cid, r in recs.items() if cid != "good"}
    assert all(r["status"] == "error" and r["output_uri"] is None for cid, r in recs.items() if cid != "good")
    assert errors["concat"].startswith("the input is an FFmpeg concat script, not an allowed video container")
    big = os.path.getsize(tmp_path / "big.mp4")
    assert errors["big"] == (f"the input object {tmp_path}/big.mp4 is {big} bytes, above video.max_bytes "
                             "(60000); it was not downloaded.")
    assert errors["wide"] == ("frames of 320x16 have an aspect ratio of 20.0, above video.max_aspect (4); "
                              "refused before decoding.")
    assert errors["dense"] == ("the clip has more than 120 frames, the most video.max_clip_s (5 s) x "
                               "video.max_fps (24) allow, whatever its header's rate (10000 fps) says.")
    assert os.listdir(w.proc.tmp) == []  # nothing left behind


def test_temp_source_names_are_random_and_never_the_clip_id(tmp_path):
    w, _, _ = _worker(tmp_path)
    row = _row(tmp_path, "victim")
    a, b = w.proc._source_path(row), w.proc._source_path(dict(row, clip_id="other", row_fp="x"))
    assert os.path.dirname(a) == w.proc.tmp and a != b
    assert "victim" not in os.path.basename(a) and len(os.path.basename(a)) >= 32
    open(a, "wb").close()
    w.proc.discard_source(row)
    assert not os.path.exists(a)


def test_single_file_over_max_bytes_is_refused_before_decoding(tmp_path):
    from corpus_anon.errors import ClipError

    src = make_video(str(tmp_path / "in.mp4"), 12, 12)
    size = os.path.getsize(src)
    cfg = config_from_dict({"video": {"max_bytes": size - 1}})
    with pytest.raises(ClipError, match=rf"in.mp4 is {size} bytes, above video.max_bytes \({size - 1}\)\.$"):
        anonymize_file(cfg, src, str(tmp_path / "out.mp4"))
    assert not (tmp_path / "out.mp4").exists()


def test_temp_folders_of_dead_workers_are_swept(tmp_path):
    """A killed actor leaves its downloaded sources behind: the next actor (or a takedown) on the
    machine removes the folders of processes that are gone, and only those."""
    from corpus_anon.io.scratch import TEMP_PREFIX, sweep_dead_temp_dirs

    dead = tmp_path / f"{TEMP_PREFIX}999999999-abc"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{TEMP_PREFIX}notapid"
    fresh = tmp_path / f"{TEMP_PREFIX}999999998-ghi"  # pid gone, but touched a moment ago
    for d in (dead, live, other, fresh):
        d.mkdir()
        (d / "0123.src").write_bytes(b"source")
    old = time.time() - 2 * 3600
    for d in (dead, live, other):
        os.utime(d, (old, old))
    assert sweep_dead_temp_dirs(str(tmp_path)) == 1
    assert not dead.exists() and live.exists() and other.exists() and fresh.exists()


def test_an_oversized_face_boxes_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from corpus_anon.io import records
    from corpus_anon.errors import ClipError
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.actor.worker import read_face_boxes

    p = tmp_path / "boxes.parquet"
    p.write_bytes(b"x" * 2048)
    monkeypatch.setattr(records, "MAX_FACE_BOXES_BYTES", 1024)
    with pytest.raises(ClipError, match="over the 1,024-byte limit"):
        read_face_boxes(Storage(StorageSettings(unrestricted=True)), {"face_boxes_uri": str(p)})
    monkeypatch.setattr(records, "MAX_FACE_BOXES_BYTES", 4096)
    assert read_face_boxes(Storage(StorageSettings(unrestricted=True)), {"face_boxes_uri": str(p)}) == b"x" * 2048
