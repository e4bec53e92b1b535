"""Release pure parts: pseudonyms, exclusion rules, version numbering, the card."""

from __future__ import annotations

import pytest

from corpus_anon import release as rl
from corpus_anon import secret as sec
from corpus_anon.config import config_from_dict

KEY = b"k" * 32


def test_pseudonyms_are_keyed_and_in_their_own_domains():
    assert rl.signer_pseudonym(KEY, "Cory") == rl.signer_pseudonym(KEY, "Cory")
    assert rl.signer_pseudonym(KEY, "Cory") != rl.signer_pseudonym(b"x" * 32, "Cory")
    assert rl.signer_pseudonym(KEY, "Cory") != rl.release_id(KEY, "Cory")
    # The seed derivation uses the same key in another domain: no pseudonym equals a seed's bits.
    assert int(rl.signer_pseudonym(KEY, "Cory"), 16) & ((1 << sec.SEED_BITS) - 1) != sec.derive_seed(KEY, "Cory")
    assert len(rl.release_id(KEY, "a")) == rl.PSEUDONYM_HEX


@pytest.mark.parametrize("row,settings,expected", [
    ({"status": "ok"}, {}, None),
    ({"status": "error"}, {}, "status"),
    ({"status": "leak"}, {}, "status"),
    ({"status": "ok", "reidentified": True}, {}, "reidentified"),
    ({"status": "ok", "reidentified": True}, {"exclude_reidentified": False}, None),
    ({"status": "ok", "face_lost": True}, {}, "face_lost"),
    ({"status": "ok", "face_lost": True}, {"exclude_face_lost": False}, None),
    ({"status": "ok", "face_frac_orig": 0.0}, {}, "unchecked"),
    ({"status": "ok", "face_frac_orig": 0.0}, {"exclude_unchecked": False}, None),
    ({"status": "ok", "face_frac_orig": None}, {}, None),  # no face analysis configured: nothing to check
    ({"status": "ok", "face_frac_orig": 0.4}, {}, None),
])
def test_exclusion_rules(row, settings, expected):
    cfg = config_from_dict({"release": settings})
    row = {"clip_id": "c1", **row}
    assert rl._exclusion(row, cfg, "rid", "sp", set(), None, (set(), set())) == expected


def test_exclude_approve_and_withdrawn_by_either_id():
    cfg = config_from_dict({})
    row = {"clip_id": "c1", "status": "ok"}
    assert rl._exclusion(row, cfg, "rid", "sp", {"c1"}, None, (set(), set())) == "excluded"
    assert rl._exclusion(row, cfg, "rid", "sp", {"rid"}, None, (set(), set())) == "excluded"
    assert rl._exclusion(row, cfg, "rid", "sp", set(), {"other"}, (set(), set())) == "not_approved"
    assert rl._exclusion(row, cfg, "rid", "sp", set(), {"rid"}, (set(), set())) is None
    unchecked = {**row, "face_frac_orig": 0.0}
    assert rl._exclusion(unchecked, cfg, "rid", "sp", set(), {"c1"}, (set(), set())) is None  # approved by a person
    assert rl._exclusion(row, cfg, "rid", "sp", set(), None, ({"rid"}, set())) == "withdrawn"
    assert rl._exclusion({**row, "status": "error"}, cfg, "rid", "sp", set(), None, (set(), {"sp"})) == "withdrawn"


def test_card_states_counts_distributions_and_superseded_versions():
    rows = [{"signer_pseudonym": "a", "id_orig_anon": 0.9, "id_score_kind": "euclidean"},
            {"signer_pseudonym": "b", "id_orig_anon": 0.7, "id_score_kind": "euclidean"}]
    meta = {"created_at": "2026-11-26T00:00:00+00:00", "run_cfg_fp": "abc", "anonymizer": "pixelate",
            "counts": {"source_rows": 3, "excluded": {"status": 1}}, "reid": {"n_tested": 2, "reid_top1": 0.5,
                                                                          "reid_top1_originals": 1.0, "reid_chance": 0.5},
            "models": [{"role": "dlib", "name": "dlib", "licence": "CC0"}], "columns": ["release_id"]}
    card = rl.render_card("v0002", rows, meta, {"v0001": "lists withdrawn clips"})
    assert "2 clips from 2 signers" in card and "1 status" in card
    assert "| `id_orig_anon` | 2 | 0.700 | 0.800 | 0.800 | 0.900 |" in card
    assert "higher means less alike" in card and "v0001: lists withdrawn clips" in card
    assert "chance: 0.5" in card and "dlib: dlib — CC0" in card


def test_read_list_file(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("a\n\n# note\nb  # why\n")
    assert rl.read_list_file(str(p)) == {"a", "b"}
    with pytest.raises(rl.ReleaseError, match="cannot read"):
        rl.read_list_file(str(tmp_path / "nope.txt"))


def test_cli_reports_a_failed_verification_in_one_line(monkeypatch, capsys):
    from corpus_anon import cli
    from corpus_anon.storage import StorageError

    def boom(*a, **k):
        raise StorageError("verification of s3://rel/clips/x.mp4 failed: 10 bytes sha256 abc, expected 11 bytes.")

    monkeypatch.setenv("CORPUS_ANON_SECRET", "k" * 32)
    monkeypatch.setattr(rl, "release", boom)
    assert cli.main(["release", "/nonexistent/run", "--out", "/tmp/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification of s3://rel/clips/x.mp4 failed" in err[0]


def test_card_names_the_reenactment_checkpoint_and_its_fine_tuning(tmp_path):
    import json

    from corpus_anon.models.registry import LOCK_NAME
    from corpus_anon.storage import Storage, StorageSettings

    store = tmp_path / "store"
    (store / "tpsmm").mkdir(parents=True)
    (store / LOCK_NAME).write_text(json.dumps({"profile": "tiny", "files": {
        "tpsmm/asl.pth.tar": {"sha256": "ab" * 32, "bytes": 10}}}))
    (store / "tpsmm" / "asl.json").write_text(json.dumps({
        "init": "vox.pth.tar", "epochs": 7, "data": {"corpus_chunks": 40, "corpus_identities": 3,
                                                     "reference_chunks": 90, "reference_ratio": 0.5}}))
    storage = Storage(StorageSettings(unrestricted=True))

    def tpsmm_line(name: str) -> str:
        cfg = config_from_dict({"anonymizer": {"kind": "diffslva"}, "faces": {"backend": "dlib", "tpsmm": name},
                                "models": {"profile": "tiny", "store": str(store)}})
        return next(m["name"] for m in rl._models_used(cfg, storage) if m["role"] == "tpsmm")

    line = tpsmm_line("asl.pth.tar")
    assert line.startswith("tpsmm/asl.pth.tar (sha256 abababababababab)")
    assert "fine-tuned from vox.pth.tar for 7 epochs on 40 corpus chunks (3 signers) and 90 reference" in line
    assert tpsmm_line("gone.pth.tar") == "tpsmm/gone.pth.tar (not in the model store's lock now)"


def test_takedown_deletes_the_withdrawn_signers_face_crops(tmp_path):
    import io as _io

    import pyarrow.parquet as pq

    from corpus_anon.extract import CropLayout, fragment_bytes, index_table
    from corpus_anon.storage import Storage, StorageSettings

    layout = CropLayout(str(tmp_path / "crops"))
    storage = Storage(StorageSettings(unrestricted=True))
    rows = []
    for cid, who in (("maria_1", "Maria"), ("maria_2", "Maria"), ("cory_1", "Cory")):
        row = {"clip_id": cid, "identity_id": who, "chunk_uri": layout.chunk_rel(cid, 0), "frames": 32,
               "box": [0, 0, 64, 64]}
        storage.write_bytes(layout.chunk(cid, 0), b"mp4")
        storage.write_bytes(layout.part(cid), fragment_bytes([row], {"clip_id": cid, "status": "ok"}))
        rows.append(row)
    buf = _io.BytesIO()
    pq.write_table(index_table(rows), buf)
    storage.write_bytes(layout.index, buf.getvalue())
    # A re-extraction that failed (an error fragment without rows, old chunks still there) and a
    # clip killed before its fragment (only its attempts file and a chunk).
    storage.write_bytes(layout.chunk("maria_3", 0), b"old mp4")
    storage.write_bytes(layout.part("maria_3"), fragment_bytes(
        [], {"clip_id": "maria_3", "identity_id": "Maria", "status": "error"}))
    storage.write_bytes(layout.chunk("maria_4", 0), b"partial mp4")
    storage.write_text(layout.attempts("maria_4"), '{"clip_id": "maria_4", "identity_id": "Maria", "attempts": 1}')

    gone = rl._scrub_crops(storage, layout.root, KEY, set(), {rl.signer_pseudonym(KEY, "Maria")})
    assert gone == ["maria_1", "maria_2", "maria_3", "maria_4"]
    assert not storage.exists(layout.chunk("maria_3", 0)) and not storage.exists(layout.chunk("maria_4", 0))
    assert not storage.exists(layout.attempts("maria_4"))
    assert not storage.exists(layout.chunk("maria_1", 0)) and not storage.exists(layout.part("maria_2"))
    assert storage.exists(layout.chunk("cory_1", 0)) and storage.exists(layout.part("cory_1"))
    assert pq.read_table(str(tmp_path / "crops" / "index.parquet")).column("clip_id").to_pylist() == ["cory_1"]
    # a clip withdrawn by its release id
    assert rl._scrub_crops(storage, layout.root, KEY, {rl.release_id(KEY, "cory_1")}, set()) == ["cory_1"]
    assert rl._scrub_crops(storage, layout.root, KEY, {rl.release_id(KEY, "cory_1")}, set()) == []


def test_a_takedown_before_the_first_release_deletes_crops_and_leaves_a_tombstone(tmp_path):
    import json as _json

    from corpus_anon.config import ConfigError
    from corpus_anon.extract import CropLayout, fragment_bytes
    from corpus_anon.storage import Storage, StorageSettings

    storage = Storage(StorageSettings(unrestricted=True))
    layout = CropLayout(str(tmp_path / "crops"))
    row = {"clip_id": "maria_1", "identity_id": "Maria", "chunk_uri": layout.chunk_rel("maria_1", 0), "frames": 32,
           "box": [0, 0, 64, 64]}
    storage.write_bytes(layout.chunk("maria_1", 0), b"mp4")
    storage.write_bytes(layout.part("maria_1"), fragment_bytes([row], {"clip_id": "maria_1", "status": "ok"}))
    root = tmp_path / "rel"
    with pytest.raises(rl.ReleaseError, match="has no release .* and no crop set was given"):
        rl.takedown(storage, str(root), secret=KEY, signer="Maria")
    td = rl.takedown(storage, str(root), secret=KEY, signer="Maria", crops_uris=[layout.root])
    assert td.version is None and td.crop_clips_deleted == ["maria_1"]
    assert not storage.exists(layout.chunk("maria_1", 0))
    tomb = _json.loads((root / "tombstones.json").read_text())
    assert tomb["entries"][0]["pseudonym"] == rl.signer_pseudonym(KEY, "Maria")
    with pytest.raises(ConfigError):
        rl.takedown(storage, str(root), secret=KEY, signer="Maria", clip="x", crops_uris=[layout.root])
