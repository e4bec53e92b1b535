"""Release pure parts: pseudonyms, exclusion rules (the unchecked rule included), columns, the card,
store separation, tombstones in the private store, and takedown pieces on local folders."""

from __future__ import annotations

import pytest

from corpus_anon.release import card as rc
from corpus_anon.release import publish as rl
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


CHECKED = {"exposure_covered": True, "frames_checked": 40}


@pytest.mark.parametrize("row,settings,expected", [
    ({"status": "ok", **CHECKED}, {}, None),
    ({"status": "error", **CHECKED}, {}, "status"),
    ({"status": "leak", **CHECKED}, {}, "status"),
    ({"status": "ok", "reidentified": True, **CHECKED}, {}, "reidentified"),
    ({"status": "ok", "reidentified": True, **CHECKED}, {"exclude_reidentified": False}, None),
    ({"status": "ok", "face_lost": True, **CHECKED}, {}, "face_lost"),
    ({"status": "ok", "face_lost": True, **CHECKED}, {"exclude_face_lost": False}, None),
    ({"status": "ok", "face_frac_orig": 0.0, **CHECKED}, {}, "no_face"),
    ({"status": "ok", "face_frac_orig": 0.0, **CHECKED}, {"exclude_unchecked": False}, None),
    ({"status": "ok", "face_frac_orig": 0.4, **CHECKED}, {}, None),
    # Nothing proved the faces hidden: no exposure check on record (older runs), or one that did not
    # cover every face track.
    ({"status": "ok", "face_frac_orig": 0.4}, {}, "unchecked"),
    ({"status": "ok", "exposure_covered": False, "frames_checked": 12}, {}, "unchecked"),
    ({"status": "ok", "exposure_covered": True}, {}, "unchecked"),
])
def test_exclusion_rules(row, settings, expected):
    cfg = config_from_dict({"release": settings})
    row = {"clip_id": "c1", **row}
    assert rl._exclusion(row, cfg, "rid", "sp", set(), None, (set(), set())) == expected


def test_a_run_without_face_analysis_or_gate_is_unchecked_unless_allowed():
    row = {"clip_id": "c1", "status": "ok", **CHECKED}
    cfg = config_from_dict({})
    assert rl.run_checked(config_from_dict({"faces": {"backend": "dlib"}}))
    for run_cfg in (config_from_dict({"faces": {"backend": "none"}}), config_from_dict({"gate": {"enabled": False}}),
                    None):
        checked = rl.run_checked(run_cfg)
        assert not checked
        assert rl._exclusion(row, cfg, "rid", "sp", set(), None, (set(), set()), checked_run=checked) == "unchecked"
        assert rl._exclusion(row, cfg, "rid", "sp", set(), None, (set(), set()), checked_run=checked,
                             allow_unchecked=True) is None
    # --allow-unchecked never releases a failed or leaking clip
    assert rl._exclusion({**row, "status": "leak"}, cfg, "rid", "sp", set(), None, (set(), set()), checked_run=False,
                         allow_unchecked=True) == "status"


def test_release_columns_may_name_manifest_passthrough_columns_only():
    metrics_cols = ["clip_id", "status", "output_uri", "n_frames", "id_orig_anon", "video_uri", "signer_id",
                    "start_s", "session", "gloss"]
    assert rl.passthrough_in(metrics_cols) == ["session", "gloss"]
    rl._check_columns(["session"], metrics_cols)
    with pytest.raises(rl.ReleaseError, match="only the manifest's passthrough columns .*not n_frames"):
        rl._check_columns(["n_frames"], metrics_cols)
    with pytest.raises(rl.ReleaseError, match="not status"):
        rl._check_columns(["status"], metrics_cols)


def test_card_says_what_was_released_unchecked_and_that_audio_is_included():
    meta = {"created_at": "2026-11-26T00:00:00+00:00", "run_cfg_fp": "abc", "anonymizer": "pixelate",
            "counts": {"source_rows": 2, "excluded": {}}, "columns": ["release_id"], "audio": "copy"}
    rows = [{"signer_pseudonym": "a", "checked": False}, {"signer_pseudonym": "b", "checked": True}]
    card = rc.render_card("v0001", rows, meta)
    assert "1 of the 2 clips in this release were never checked for identity leakage" in card
    assert "a face may be visible" in card and "Audio is included" in card and "voice" in card
    quiet = rc.render_card("v0001", [{"signer_pseudonym": "b", "checked": True}], {**meta, "audio": "drop"})
    assert "never checked" not in quiet and "source audio was dropped" in quiet


def test_release_root_never_overlaps_private_outputs_or_the_private_store():
    from corpus_anon.config import ConfigError
    from corpus_anon.release.tombstones import check_separation, private_uri

    base = {"output": {"uri": "s3://b/runs"}}
    check_separation(config_from_dict({**base, "release": {"root": "s3://pub/rel"}}))
    assert private_uri(config_from_dict(base)) == "s3://b/runs/private"
    for root in ("s3://b/runs/public", "s3://b", "s3://b/runs"):
        with pytest.raises(ConfigError, match=r"^the release root .* and output.uri s3://b/runs overlap; "):
            check_separation(config_from_dict({**base, "release": {"root": root}}))
    with pytest.raises(ConfigError, match="finetune.crops_uri s3://pub/rel/crops overlap"):
        check_separation(config_from_dict({**base, "release": {"root": "s3://pub/rel"},
                                           "finetune": {"crops_uri": "s3://pub/rel/crops"}}))
    with pytest.raises(ConfigError, match="private store s3://pub/rel/private .* overlap"):
        check_separation(config_from_dict({**base, "release": {"root": "s3://pub/rel",
                                                               "private_uri": "s3://pub/rel/private"}}))
    with pytest.raises(ConfigError, match="lies inside the private store"):
        check_separation(config_from_dict({**base, "release": {"private_uri": "s3://b"}}))
    # a release without a config: the run's own output stands in
    with pytest.raises(ConfigError, match="run output s3://x/out overlap"):
        check_separation(config_from_dict({}), "s3://x", extra=[("run output", "s3://x/out")])


def test_public_tombstones_move_to_the_private_store_and_workers_see_them(tmp_path):
    import json as _json

    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.release import tombstones as tb

    storage = Storage(StorageSettings(unrestricted=True))
    root = tmp_path / "rel"
    root.mkdir()
    maria = rl.signer_pseudonym(KEY, "Maria")
    (root / "tombstones.json").write_text(_json.dumps({"entries": [{"kind": "signer", "pseudonym": maria}],
                                                       "superseded": {"v0001": "old"}}))
    cfg = config_from_dict({"output": {"uri": str(tmp_path / "out")}, "release": {"root": str(root)}})
    # runs read the old public file too until a release or takedown moves it
    assert tb.withdrawn_sets(tb.load_tombstones(storage, cfg))[1] == {maria}
    private = tb.tombstones_uri(cfg)
    assert tb.migrate_public_tombstones(storage, str(root), private) == 1
    assert not (root / "tombstones.json").exists()
    assert tb.withdrawn_sets(tb.read_tombstones(storage, private))[1] == {maria}
    # the workers' check needs no secret: the driver put the row's pseudonyms into the row
    cory = {"tomb_release_id": rl.release_id(KEY, "c1"), "tomb_signer_pseudonym": rl.signer_pseudonym(KEY, "Cory")}
    assert tb.still_wanted(storage, private, cory, ttl_s=0)
    assert not tb.still_wanted(storage, private, {**cory, "tomb_signer_pseudonym": maria}, ttl_s=0)
    assert tb.still_wanted(storage, private, {}, ttl_s=0)  # a run without the secret has no keys
    tomb = tb.read_tombstones(storage, private)
    tb.add_tombstone(tomb, "clip", cory["tomb_release_id"])
    tb.write_tombstones(storage, private, tomb)
    assert not tb.still_wanted(storage, private, cory, ttl_s=0)
    assert tb.withdrawn_rows(storage, private, {"c1": (cory["tomb_release_id"], None), "c2": ("x", None)}) == ["c1"]


def test_exclude_approve_and_withdrawn_by_either_id():
    cfg = config_from_dict({})
    row = {"clip_id": "c1", "status": "ok", **CHECKED}
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
    card = rc.render_card("v0002", rows, meta, {"v0001": "lists withdrawn clips"})
    assert "2 clips from 2 signers" in card and "1 failed or leaking (status not ok)" in card
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
    from corpus_anon.io.storage import StorageError

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
    from corpus_anon.io.storage import Storage, StorageSettings

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
        return next(m["name"] for m in rc.models_used(cfg, storage) if m["role"] == "tpsmm")

    line = tpsmm_line("asl.pth.tar")
    assert line.startswith("tpsmm/asl.pth.tar (sha256 abababababababab)")
    assert "fine-tuned from vox.pth.tar for 7 epochs on 40 corpus chunks (3 signers) and 90 reference" in line
    assert tpsmm_line("gone.pth.tar") == "tpsmm/gone.pth.tar (not in the model store's lock now)"


def test_takedown_deletes_the_withdrawn_signers_face_crops(tmp_path):
    import io as _io

    import pyarrow.parquet as pq

    from corpus_anon.finetune.crops import CropLayout, fragment_bytes, index_table
    from corpus_anon.io.storage import Storage, StorageSettings

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

    from corpus_anon.release.takedown import scrub_crops

    def hit(clips, signers):
        return lambda cid, ids: bool(cid) and (rl.release_id(KEY, cid) in clips or
                                               any(rl.signer_pseudonym(KEY, i) in signers for i in ids if i))

    gone = scrub_crops(storage, layout.root, hit(set(), {rl.signer_pseudonym(KEY, "Maria")}))
    assert gone == ["maria_1", "maria_2", "maria_3", "maria_4"]
    assert not storage.exists(layout.chunk("maria_3", 0)) and not storage.exists(layout.chunk("maria_4", 0))
    assert not storage.exists(layout.attempts("maria_4"))
    assert not storage.exists(layout.chunk("maria_1", 0)) and not storage.exists(layout.part("maria_2"))
    assert storage.exists(layout.chunk("cory_1", 0)) and storage.exists(layout.part("cory_1"))
    assert pq.read_table(str(tmp_path / "crops" / "index.parquet")).column("clip_id").to_pylist() == ["cory_1"]
    # a clip withdrawn by its release id
    assert scrub_crops(storage, layout.root, hit({rl.release_id(KEY, "cory_1")}, set())) == ["cory_1"]
    assert scrub_crops(storage, layout.root, hit({rl.release_id(KEY, "cory_1")}, set())) == []


def test_a_takedown_before_the_first_release_deletes_crops_and_leaves_a_private_tombstone(tmp_path):
    import json as _json

    from corpus_anon.config import ConfigError
    from corpus_anon.finetune.crops import CropLayout, fragment_bytes
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.release.takedown import takedown

    storage = Storage(StorageSettings(unrestricted=True))
    layout = CropLayout(str(tmp_path / "crops"))
    row = {"clip_id": "maria_1", "identity_id": "Maria", "chunk_uri": layout.chunk_rel("maria_1", 0), "frames": 32,
           "box": [0, 0, 64, 64]}
    storage.write_bytes(layout.chunk("maria_1", 0), b"mp4")
    storage.write_bytes(layout.part("maria_1"), fragment_bytes([row], {"clip_id": "maria_1", "status": "ok"}))
    # A crashed write's hidden temporary file holding the clip (its writer is long gone).
    stale = tmp_path / "crops" / "parts" / ".maria_1.parquet.tmp-999999999-1"
    stale.write_bytes(b"partial")
    with pytest.raises(ConfigError, match="needs --config naming output.uri"):
        takedown(config_from_dict({}), storage, secret=KEY, signer="Maria")
    cfg = config_from_dict({"output": {"uri": str(tmp_path / "out")}, "finetune": {"crops_uri": layout.root},
                            "release": {"root": str(tmp_path / "rel")}})
    td = takedown(cfg, storage, secret=KEY, signer="Maria")
    assert td.latest is None and td.crop_clips_deleted == ["maria_1"] and td.temp_files_deleted >= 1  # + dead actors' folders in /tmp, if any
    assert not storage.exists(layout.chunk("maria_1", 0)) and not stale.exists()
    tomb = _json.loads((tmp_path / "out" / "private" / "tombstones.json").read_text())
    assert tomb["entries"][0]["pseudonym"] == rl.signer_pseudonym(KEY, "Maria")
    assert not (tmp_path / "rel" / "tombstones.json").exists()
    with pytest.raises(ConfigError):
        takedown(cfg, storage, secret=KEY, signer="Maria", clip="x")


def test_card_states_the_linguistic_fidelity_medians_and_the_manifest_lists_their_columns():
    meta = {"created_at": "2026-11-26T00:00:00+00:00", "run_cfg_fp": "abc", "anonymizer": "pixelate",
            "counts": {"source_rows": 3, "excluded": {}}, "columns": [*rl.BASE_COLUMNS, *rl.METRIC_COLUMNS]}
    rows = [{"signer_pseudonym": "a", "checked": True, "nmm_corr": 0.1, "hand_lm_err": 0.05, "hand_presence_agree": 1.0,
             "hand_lm_recall": 0.8},
            {"signer_pseudonym": "b", "checked": True, "nmm_corr": 0.3, "hand_lm_err": None, "hand_presence_agree": 0.5},
            {"signer_pseudonym": "b", "checked": True, "nmm_corr": None, "hand_lm_err": 0.15, "hand_presence_agree": 0.9,
             "expr_fidelity": 0.4}]
    card = rc.render_card("v0001", rows, meta)
    line = next(x for x in card.splitlines() if x.startswith("Linguistic fidelity"))
    assert "median correlation of 0.20 over 2 clips" in line and "median 0.10 hand sizes" in line
    assert "shows as many of the original's hands on a median 90 % of sampled frames" in line
    assert "shows the same hand on a median 80 % of those frames (1 clip)" in line
    assert "| `nmm_corr` | 2 |" in card and "| `hand_lm_err` | 2 |" in card
    assert card.index("| `nmm_corr`") < card.index("| `expr_fidelity`")  # the landmark columns come first
    for c in ("nmm_corr", "nmm_mae", "nmm_brow_corr", "nmm_mouth_corr", "hand_lm_err", "hand_presence_agree",
              "expr_fidelity", "hand_fidelity"):
        assert c in rl.METRIC_COLUMNS and f"`{c}`" in card
    assert "nmm_series" not in rl.METRIC_COLUMNS and "landmark_note" not in rl.METRIC_COLUMNS
    assert rc.fidelity_line([{"signer_pseudonym": "a", "nmm_corr": None}]) is None
    static = rc.fidelity_line([{"nmm_corr": None, "hand_lm_err": 0.2}])
    assert static is not None and "no clip had facial-marker movement" in static
