"""`corpus-anon status` on a run folder built by hand: in progress, then finished."""

from __future__ import annotations

import json

from corpus_anon.run.status import run_status
from corpus_anon.io.storage import Storage, StorageSettings


def test_status_counts_rate_and_eta(tmp_path, capsys):
    from corpus_anon.cli import main

    root = tmp_path / "out" / "abc123"
    (root / "records").mkdir(parents=True)
    (tmp_path / "out" / "LATEST_RUN").write_text("abc123")
    (root / "plan.json").write_text(json.dumps({"planned_clips": 10, "started_at": "2026-01-01T00:00:00+00:00"}))
    recs = [("a", "ok", "00:00:10"), ("b", "ok", "00:00:20"), ("c", "error", "00:00:30"),
            ("old", "ok", "2025-12-31T23:00:00")]
    for cid, status, t in recs:
        ts = t if "T" in t else f"2026-01-01T{t}"
        (root / "records" / f"{cid}.json").write_text(json.dumps(
            {"clip_id": cid, "status": status, "finished_at": ts + "+00:00",
             "error": "the input is not a readable video." if status == "error" else None}))
    st = run_status(Storage(StorageSettings(unrestricted=True)), str(tmp_path / "out"))
    assert st.counts == {"ok": 3, "error": 1} and st.done == 4 and not st.finished
    assert abs(st.clips_per_s - 0.1) < 1e-9  # three of this run's records in 30 s; the older one is not in the rate
    assert abs(st.eta_s - 60.0) < 1e-6
    (root / "summary.json").write_text(json.dumps({"finished_at": "2026-01-01T00:01:00+00:00"}))
    assert main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "4/10 clips with a record (error 1, ok 3); finished" in out
    assert "error c: the input is not a readable video." in out
    assert main(["status", str(tmp_path / "nothing")]) == 2
