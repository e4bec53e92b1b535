import pytest

from corpus_anon.io.records import (
    RunLayout, bump_attempts, make_record, read_attempts, read_record, resolve_run, row_fingerprint, settle,
    write_record,
)
from corpus_anon.io.storage import Storage, StorageSettings


def _rec(status, row_fp="fp1", attempts=1):
    return make_record(clip_id="c1", status=status, row_fp=row_fp, cfg_fp="cfg", attempts=attempts)


@pytest.mark.parametrize("record,row_fp,expected", [
    (None, "fp1", "run"),
    (_rec("ok"), "fp1", "skip"),
    (_rec("leak"), "fp1", "skip"),
    (_rec("ok"), "fp2", "run"),  # the input changed
    (_rec("error", attempts=1), "fp1", "run"),
    (_rec("error", attempts=2), "fp1", "run"),
    (_rec("error", attempts=3), "fp1", "skip"),
    (_rec("error", attempts=3), "fp2", "run"),  # a changed input gets fresh attempts
])
def test_settle_rules(record, row_fp, expected):
    assert settle(record, row_fp, max_attempts=3) == expected


def test_row_fingerprint_covers_every_input():
    base = dict(source_identity="etag:1", start_s=0.0, end_s=2.0, prompt=None, seed=None, face_boxes_digest=None)
    fp = row_fingerprint(**base)
    assert row_fingerprint(**base) == fp
    for k, v in [("source_identity", "etag:2"), ("start_s", 0.5), ("end_s", 2.5), ("prompt", "a person"),
                 ("seed", 7), ("face_boxes_digest", "abc")]:
        assert row_fingerprint(**{**base, k: v}) != fp, k
    assert row_fingerprint(**{**base, "end_s": float("nan")}) == row_fingerprint(**{**base, "end_s": None})


def test_layout_and_attempts(tmp_path):
    st = Storage(StorageSettings(allowed_write=(str(tmp_path),)))
    lay = RunLayout(str(tmp_path), "abc123")
    assert lay.clip("c1", "fp1") == f"file://{tmp_path}/abc123/clips/c1-fp1.mp4"
    assert read_attempts(st, lay, "c1", "fp1") == 0
    assert bump_attempts(st, lay, "c1", "fp1") == 1
    assert bump_attempts(st, lay, "c1", "fp1") == 2
    assert read_attempts(st, lay, "c1", "fp1") == 2
    assert read_attempts(st, lay, "c1", "fp2") == 0  # changed input starts over
    assert read_record(st, lay, "c1") is None
    write_record(st, lay, _rec("ok"))
    assert read_record(st, lay, "c1")["status"] == "ok"
    with pytest.raises(ValueError):
        write_record(st, lay, {**_rec("ok"), "status": "done"})


def test_resolve_run(tmp_path):
    st = Storage(StorageSettings(allowed_write=(str(tmp_path),)))
    lay = RunLayout(str(tmp_path), "abc123")
    st.write_text(lay.plan, "{}")
    st.write_text(lay.latest_pointer, "abc123")
    assert resolve_run(st, str(tmp_path)) == RunLayout(f"file://{tmp_path}", "abc123")
    assert resolve_run(st, str(tmp_path / "abc123")) == RunLayout(f"file://{tmp_path}", "abc123")
    with pytest.raises(FileNotFoundError):
        resolve_run(st, str(tmp_path / "nothing"))


def test_refresh_reruns_leaks_until_the_reseed_limit():
    from corpus_anon.io.records import seed_start

    leak = {"status": "leak", "row_fp": "fp", "attempts": 1, "metrics": {"seed_attempt": 2}}
    assert settle(leak, "fp", max_attempts=3) == "skip"  # a plain rerun never touches a leak
    assert seed_start(leak) == 3
    assert settle(leak, "fp", max_attempts=3, reseed_limit=4) == "run"
    assert settle(leak, "fp", max_attempts=3, reseed_limit=3) == "run"
    assert settle(leak, "fp", max_attempts=3, reseed_limit=2) == "skip"
    ok = {"status": "ok", "row_fp": "fp", "attempts": 1, "metrics": {"seed_attempt": 0}}
    assert settle(ok, "fp", max_attempts=3, reseed_limit=4) == "skip" and seed_start(ok) == 0
    assert seed_start({"status": "leak", "metrics": {}}) == 0
