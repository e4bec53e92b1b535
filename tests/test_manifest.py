import pyarrow as pa
import pytest

from corpus_anon.config import config_from_dict
from corpus_anon.run.manifest import build_manifest, passthrough_columns, validate_table
from corpus_anon.io.storage import Storage, StorageSettings


def _cfg(tmp_path, **video):
    return config_from_dict({"video": video, "storage": {"allowed_prefixes": {"read": [str(tmp_path)]}}})


def _storage(cfg):
    return Storage(StorageSettings.from_config(cfg, None))


def _table(rows, extra_schema=()):
    schema = pa.schema([("clip_id", pa.string()), ("video_uri", pa.string()), ("signer_id", pa.string()),
                        ("start_s", pa.float64()), ("end_s", pa.float64()), *extra_schema])
    return pa.Table.from_pylist(rows, schema=schema)


def _row(tmp_path, cid="c1", **kw):
    return {"clip_id": cid, "video_uri": str(tmp_path / f"{cid}.mp4"), "signer_id": "s1",
            "start_s": None, "end_s": None, **kw}


def test_good_manifest_passes(tmp_path):
    cfg = _cfg(tmp_path)
    t = _table([_row(tmp_path, "a", start_s=0.0, end_s=2.0), _row(tmp_path, "b.2_x-y")],
               [("gloss", pa.string())])
    assert validate_table(t, cfg, _storage(cfg)) == []
    assert passthrough_columns(t) == ["gloss"]


@pytest.mark.parametrize("row,needle", [
    (dict(clip_id="a/b"), "unsafe"),
    (dict(clip_id="a..b"), "unsafe"),
    (dict(clip_id="_lead"), "unsafe"),
    (dict(clip_id="abc\n"), "unsafe"),  # `$` would match before the newline
    (dict(clip_id="a\x00b"), "unsafe"),
    (dict(clip_id="a" * 129), "unsafe"),
    (dict(clip_id=""), "empty"),
    (dict(start_s=2.0, end_s=2.0), "start_s >= end_s"),
    (dict(start_s=3.0, end_s=2.0), "start_s >= end_s"),
    (dict(start_s=-1.0), "negative"),
    (dict(start_s=0.0, end_s=61.0), "longer than video.max_clip_s"),
    (dict(video_uri="http://example.com/a.mp4"), "not supported"),
    (dict(video_uri="gs://bucket/a.mp4"), "not supported"),
    (dict(video_uri="/etc/passwd"), "outside storage.allowed_prefixes.read"),
    (dict(video_uri="s3://other-team/a.mp4"), "outside storage.allowed_prefixes.read"),
    (dict(signer_id=None), "signer_id is empty"),
])
def test_each_rule_reports_its_row(tmp_path, row, needle):
    cfg = _cfg(tmp_path)
    t = _table([_row(tmp_path, "ok1"), {**_row(tmp_path, "bad"), **row}])
    problems = validate_table(t, cfg, _storage(cfg))
    assert problems, row
    assert all(p.row == 1 for p in problems), problems
    assert any(needle in str(p) for p in problems), problems


def test_a_very_long_clip_id_is_shown_cut_with_its_length(tmp_path):
    cfg = _cfg(tmp_path)
    problems = validate_table(_table([_row(tmp_path, "a" * 5000)]), cfg, _storage(cfg))
    assert len(problems) == 1
    msg = str(problems[0])
    assert "(5000 characters) is unsafe" in msg and len(msg) < 250 and msg.endswith(".")


def test_duplicates_and_missing_columns(tmp_path):
    cfg = _cfg(tmp_path)
    t = _table([_row(tmp_path, "a"), _row(tmp_path, "b"), _row(tmp_path, "a")])
    problems = validate_table(t, cfg, _storage(cfg))
    assert [str(p) for p in problems] == ["row 2: clip_id 'a' duplicates row 0."]
    t1 = _table([_row(tmp_path, "a"), _row(tmp_path, "A")])
    assert [str(p) for p in validate_table(t1, cfg, _storage(cfg))] == [
        "row 1: clip_id 'A' duplicates row 0 (ids may not differ only in case)."]
    t2 = pa.table({"clip_id": ["a"], "video_uri": [str(tmp_path / "a.mp4")]})
    assert any("'signer_id' is missing" in str(p) for p in validate_table(t2, cfg, _storage(cfg)))
    t3 = pa.table({"clip_id": [1], "video_uri": ["x"], "signer_id": ["s"]})
    assert any("column 'clip_id' has type int" in str(p) for p in validate_table(t3, cfg, _storage(cfg)))


def test_max_clip_from_config(tmp_path):
    cfg = _cfg(tmp_path, max_clip_s=5)
    t = _table([_row(tmp_path, "a", start_s=0.0, end_s=6.0)])
    assert any("5.0 s" in str(p) for p in validate_table(t, cfg, _storage(cfg)))


def test_build_one_clip_per_file(tmp_path):
    for rel in ("alice/a1.mp4", "alice/a2.MOV", "bob/session 1.mp4", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    st = Storage(StorageSettings(unrestricted=True))
    t = build_manifest(str(tmp_path), st)
    rows = t.to_pylist()
    assert [r["clip_id"] for r in rows] == ["alice_a1", "alice_a2", "bob_session_1"]
    assert [r["signer_id"] for r in rows] == ["alice", "alice", "bob"]
    t2 = build_manifest(str(tmp_path), st, signer_regex=r"^(?P<signer>[a-z])")
    assert [r["signer_id"] for r in t2.to_pylist()] == ["a", "a", "b"]
    cfg = _cfg(tmp_path)
    assert validate_table(t, cfg, _storage(cfg)) == []


def test_build_from_segments_csv(tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "Cory_sc115.mp4").write_bytes(b"x")
    csv = tmp_path / "seg.csv"
    csv.write_text("file,start_s,end_s,signer_id,clip_id\n"
                   "rec/Cory_sc115.mp4,0.0,2.5,cory,\n"
                   "rec/Cory_sc115.mp4,3.0,5.5,cory,utt-22\n")
    st = Storage(StorageSettings(unrestricted=True))
    rows = build_manifest(str(tmp_path), st, segments_csv=str(csv)).to_pylist()
    assert [(r["clip_id"], r["start_s"], r["end_s"]) for r in rows] == [
        ("Cory_sc115_0000", 0.0, 2.5), ("utt-22", 3.0, 5.5)]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,start_s,end_s,signer_id\nmissing.mp4,0,1,x\n")
    with pytest.raises(ValueError, match="not a video under"):
        build_manifest(str(tmp_path), st, segments_csv=str(bad))


def test_shipped_example_manifest_is_valid():
    import os

    from corpus_anon.config import Config
    from corpus_anon.run.manifest import read_manifest

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "manifests", "example.parquet")
    st = Storage(StorageSettings(unrestricted=True))
    t = read_manifest(path, st)
    assert t.num_rows == 3 and validate_table(t, Config(), st) == []
