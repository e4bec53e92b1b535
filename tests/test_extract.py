"""Face-crop extraction: segments, chunks, the square tube box, the index and its fragments."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_anon.config import ConfigError, config_from_dict
from corpus_anon.finetune.extract import (ExtractSettleStage, _extract_gpus, check_extract_config,
                                          extract_settings, plan_chunks, settings_fingerprint, settled,
                                          split_chunks, square_box, track_segments)
from corpus_anon.finetune.crops import (INDEX_COLUMNS, CropLayout, fragment_bytes, index_table, read_fragment,
                                        read_index, resolve_chunk_uri, validate_index)
from corpus_anon.run.pipeline import RunError
from corpus_anon.io.storage import Storage, StorageSettings


def _track(n, present, box_at):
    b = np.full((n, 4), np.nan)
    for t in present:
        b[t] = box_at(t)
    return b


# ---- segments and chunks --------------------------------------------------------------------------
def test_short_gaps_are_bridged_and_long_gaps_split():
    present = [*range(0, 10), *range(15, 30), *range(36, 50)]  # gaps of 5 and 6 frames
    b = _track(55, present, lambda t: [100, 50, 160, 120])
    assert track_segments(b) == [(0, 30), (36, 50)]
    assert track_segments(b, max_gap=6) == [(0, 50)]
    assert track_segments(b, max_gap=0) == [(0, 10), (15, 30), (36, 50)]
    assert track_segments(np.full((10, 4), np.nan)) == [] and track_segments(np.zeros((0, 4))) == []


def test_a_large_head_move_starts_a_new_segment():
    # The face slides right 4 px a frame: its box overlaps the segment's first one by < 0.25 after a while.
    b = _track(60, range(60), lambda t: [100 + 4 * t, 50, 160 + 4 * t, 110])
    segs = track_segments(b)
    assert len(segs) > 1 and segs[0][0] == 0 and segs[-1][1] == 60
    assert all(a2 == z1 for (_, z1), (a2, _) in zip(segs, segs[1:]))  # contiguous, nothing lost
    from corpus_anon.models.facetrack import iou

    for a, z in segs:
        assert all(iou(b[a], b[t]) >= 0.25 for t in range(a, z))
    assert track_segments(b, min_iou=0) == [(0, 60)]


@pytest.mark.parametrize("start,end,lo,hi,expected", [
    (0, 30, 8, 16, [(0, 15), (15, 30)]),           # balanced, not 16 + 14
    (5, 38, 8, 16, [(5, 16), (16, 27), (27, 38)]),
    (0, 16, 8, 16, [(0, 16)]),
    (0, 7, 8, 16, []),                             # shorter than min_chunk_frames: dropped
    (0, 17, 10, 16, []),                           # 8 + 9, both below the minimum
    (0, 2000, 32, 1024, [(0, 1000), (1000, 2000)]),
])
def test_split_chunks(start, end, lo, hi, expected):
    assert split_chunks(start, end, lo, hi) == expected


# ---- the square tube box --------------------------------------------------------------------------
def _contains(outer, inner, tol=0.0):
    return (outer[0] <= inner[0] + tol and outer[1] <= inner[1] + tol and outer[2] >= inner[2] - tol
            and outer[3] >= inner[3] - tol)


def test_square_box_is_the_enlarged_square_union():
    boxes = np.array([[100, 60, 150, 130], [110, 70, 170, 120], [np.nan] * 4])
    x0, y0, x1, y1 = square_box(boxes, 0.1, 640, 480)
    side = x1 - x0
    assert side == y1 - y0
    # union 100..170 x 60..130 (70 x 70): side 1.2 * 70 = 84, centred on (135, 95)
    assert side == 84 and (x0 + x1) / 2 == 135 and (y0 + y1) / 2 == 95
    assert _contains((x0, y0, x1, y1), (100, 60, 170, 130))
    # A tall union becomes a square on its longer side, centred.
    assert square_box(np.array([[200, 100, 240, 200.]]), 0.0, 640, 480) == (170, 100, 270, 200)
    # Fractional boxes are covered by whole pixels.
    x0, y0, x1, y1 = square_box(np.array([[10.4, 20.6, 60.2, 70.9]]), 0.0, 640, 480)
    assert x1 - x0 == y1 - y0 and _contains((x0, y0, x1, y1), (10.4, 20.6, 60.2, 70.9))


@pytest.mark.parametrize("box", [[0, 0, 50, 60], [600, 420, 640, 480], [300, 0, 380, 40], [5, 200, 45, 260]])
def test_square_box_at_the_frame_edge_shifts_to_stay_square_and_inside(box):
    x0, y0, x1, y1 = square_box(np.array([box], float), 0.2, 640, 480)
    assert x1 - x0 == y1 - y0 == int(np.ceil(1.4 * max(box[2] - box[0], box[3] - box[1])))
    assert 0 <= x0 and 0 <= y0 and x1 <= 640 and y1 <= 480
    assert _contains((x0, y0, x1, y1), box)


def test_square_box_larger_than_the_frame_is_cut_to_its_short_side():
    x0, y0, x1, y1 = square_box(np.array([[100, 10, 300, 230.]]), 0.1, 320, 240)
    assert (x1 - x0, y1 - y0) == (240, 240) and (y0, y1) == (0, 240) and 0 <= x0 and x1 <= 320
    assert square_box(np.full((3, 4), np.nan), 0.1, 320, 240) is None
    assert square_box(np.array([[400, 10, 500, 80.]]), 0.1, 320, 240) is None  # wholly outside


def test_plan_chunks_fixed_boxes_hold_every_face_of_their_frames():
    rng = np.random.default_rng(0)
    n = 200
    present = [t for t in range(n) if not (40 <= t < 44 or 120 <= t < 140) and rng.random() > 0.05]
    centre = lambda t: (320 + 30 * np.sin(t / 15), 200 + 10 * np.cos(t / 9))  # noqa: E731
    b = _track(n, present, lambda t: [centre(t)[0] - 40, centre(t)[1] - 50, centre(t)[0] + 40, centre(t)[1] + 50])
    plans = plan_chunks(b, 640, 480, 0.1, 16, 48)
    assert plans and all(16 <= p.frames <= 48 for p in plans)
    assert all(p1.end <= p2.start for p1, p2 in zip(plans, plans[1:]))
    assert not any(p.start < 140 and p.end > 120 for p in plans)  # the 20-frame gap is never bridged
    assert any(a < 40 and z > 44 for a, z in track_segments(b))  # the 4-frame gap is
    covered = 0
    for p in plans:
        x0, y0, x1, y1 = p.box
        assert x1 - x0 == y1 - y0 and 0 <= x0 and x1 <= 640 and 0 <= y0 and y1 <= 480
        for t in range(p.start, p.end):
            if np.isfinite(b[t, 0]):
                assert _contains(p.box, b[t])
                covered += 1
        assert np.isfinite(b[p.start, 0]) and np.isfinite(b[p.end - 1, 0])  # chunks start and end on a face
    assert covered > 0.8 * len(present)


# ---- config and settings --------------------------------------------------------------------------
def test_config_problems_are_refused_in_one_sentence_each():
    with pytest.raises(ConfigError) as e:
        check_extract_config(config_from_dict({"faces": {"backend": "none"},
                                               "finetune": {"min_chunk_frames": 64, "max_chunk_frames": 32}}))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "faces.backend" in lines[0] and "min_chunk_frames (64)" in lines[1]
    with pytest.raises(ConfigError, match="finetune.crop_size.*multiple of 128"):
        config_from_dict({"finetune": {"crop_size": 255}})  # TPSMM's frame sides
    check_extract_config(config_from_dict({}))


def test_settings_fingerprint_follows_the_extraction_settings_only():
    base = settings_fingerprint(extract_settings(config_from_dict({})))
    assert base == settings_fingerprint(extract_settings(config_from_dict({"finetune": {"lr": 1e-3, "epochs": 3}})))
    assert base == settings_fingerprint(extract_settings(config_from_dict({"anonymizer": {"kind": "diffslva"}})))
    for change in ({"finetune": {"crop_size": 128}}, {"finetune": {"crop_increase": 0.2}},
                   {"finetune": {"min_chunk_frames": 8}}, {"faces": {"detect_side": 320}},
                   {"faces": {"backend": "insightface"}}):
        assert settings_fingerprint(extract_settings(config_from_dict(change))) != base, change
    assert settings_fingerprint(extract_settings(config_from_dict({}), "abc")) != base


class FakeRay:
    def __init__(self, gpus):
        self.gpus = gpus

    def cluster_resources(self):
        return {"CPU": 2.0, **({"GPU": self.gpus} if self.gpus else {})}


def test_only_insightface_detection_takes_a_gpu():
    assert _extract_gpus(config_from_dict({"device": "cuda"}), FakeRay(2)) == (False, 0.0)  # dlib: CPU
    ins = {"faces": {"backend": "insightface"}}
    assert _extract_gpus(config_from_dict({**ins, "device": "auto"}), FakeRay(1)) == (True, 1.0)
    assert _extract_gpus(config_from_dict({**ins, "device": "auto"}), FakeRay(0)) == (False, 0.0)
    with pytest.raises(RunError, match="no GPU"):
        _extract_gpus(config_from_dict({**ins, "device": "cuda"}), FakeRay(0))


# ---- the index, its fragments and chunk URIs ------------------------------------------------------
def _row(clip="c1", k=0, **kw):
    row = {"clip_id": clip, "identity_id": "s1", "chunk_uri": f"chunks/{clip}/{k}.mp4", "frames": 40,
           "box": [10, 20, 110, 120], "chunk": k, "start_frame": 3, "start_s": 0.125, "fps": 24.0, "crop_size": 256,
           "src_width": 320, "src_height": 240, "sha256": "0" * 64, "bytes": 1000, "row_fp": "abc"}
    row.update(kw)
    return row


def test_index_schema():
    t = index_table([_row(), _row(k=1)])
    assert t.column_names[:5] == list(INDEX_COLUMNS)
    assert t.schema.field("box").type == pa.list_(pa.int32()) and pa.types.is_integer(t.schema.field("frames").type)
    assert validate_index(t).equals(t)
    # An index made elsewhere (a reference set): other int widths and string kinds are accepted and cast.
    ext = pa.table({"clip_id": pa.array(["v1"], pa.large_string()), "identity_id": ["id10001"],
                    "chunk_uri": ["s3://vox/crops/v1.mp4"], "frames": pa.array([64], pa.int32()),
                    "box": pa.array([[0, 0, 256, 256]], pa.list_(pa.int64())), "extra": [1.5]})
    got = validate_index(ext)
    assert got.schema.field("box").type == pa.list_(pa.int32()) and got.schema.field("frames").type == pa.int64()
    assert got.column("extra").to_pylist() == [1.5]
    with pytest.raises(ValueError, match="'identity_id' is missing"):
        validate_index(ext.drop_columns(["identity_id"]))
    with pytest.raises(ValueError, match="'frames' has type string"):
        validate_index(ext.set_column(3, "frames", pa.array(["64"])))
    with pytest.raises(ValueError, match="row 0: box"):
        validate_index(index_table([_row(box=[10, 20, 5, 120])]))
    with pytest.raises(ValueError, match="frames is 0"):
        validate_index(index_table([_row(frames=0)]))


def test_fragments_carry_rows_and_fingerprints():
    meta = {"clip_id": "c1", "status": "ok", "row_fp": "r", "settings_fp": "s", "attempts": 1}
    got_meta, rows = read_fragment(fragment_bytes([_row(), _row(k=1)], meta))
    assert got_meta == meta and [r["chunk_uri"] for r in rows] == ["chunks/c1/0.mp4", "chunks/c1/1.mp4"]
    assert rows[0]["box"] == [10, 20, 110, 120]
    empty_meta, empty = read_fragment(fragment_bytes([], dict(meta, status="no_face")))
    assert empty == [] and empty_meta["status"] == "no_face"
    buf = io.BytesIO()
    pq.write_table(index_table([_row()]), buf)
    with pytest.raises(ValueError, match="not a corpus-anon crop fragment"):
        read_fragment(buf.getvalue())
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_fragment(b"nope")


@pytest.mark.parametrize("meta,expected", [
    ({"status": "ok", "row_fp": "r", "settings_fp": "s"}, True),
    ({"status": "no_face", "row_fp": "r", "settings_fp": "s"}, True),
    ({"status": "short", "row_fp": "r", "settings_fp": "s"}, True),
    ({"status": "ok", "row_fp": "other", "settings_fp": "s"}, False),   # the source changed
    ({"status": "ok", "row_fp": "r", "settings_fp": "other"}, False),   # the settings changed
    ({"status": "error", "row_fp": "r", "settings_fp": "s", "attempts": 1}, False),  # retried
    ({"status": "error", "row_fp": "r", "settings_fp": "s", "attempts": 3}, True),   # given up
    (None, False),
])
def test_which_fragments_settle_a_clip(meta, expected):
    assert settled(meta, "r", "s", 3) is expected


def test_chunk_uris_relative_to_the_index_folder_or_absolute(tmp_path):
    assert resolve_chunk_uri("s3://b/crops", "chunks/c1/0.mp4") == "s3://b/crops/chunks/c1/0.mp4"
    assert resolve_chunk_uri("s3://b/crops", "s3://other/v.mp4") == "s3://other/v.mp4"
    assert resolve_chunk_uri("file:///data/crops", "/elsewhere/v.mp4") == "file:///elsewhere/v.mp4"
    assert resolve_chunk_uri("file:///data/crops/", "chunks/a/1.mp4") == "file:///data/crops/chunks/a/1.mp4"

    storage = Storage(StorageSettings(unrestricted=True))
    rows = [_row(), _row("c2", chunk_uri="s3://vox/v.mp4"), _row("c3", chunk_uri=str(tmp_path / "x.mp4"))]
    pq.write_table(index_table(rows), tmp_path / "index.parquet")
    for where in (str(tmp_path), f"file://{tmp_path}/index.parquet"):
        t = read_index(where, storage)
        assert t.column("chunk_uri").to_pylist() == [f"file://{tmp_path}/chunks/c1/0.mp4", "s3://vox/v.mp4",
                                                     f"file://{tmp_path}/x.mp4"]
        assert t.column("identity_id").to_pylist() == ["s1"] * 3
    with pytest.raises(FileNotFoundError, match="faces extract"):
        read_index(str(tmp_path / "nothing"), storage)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_index(str(tmp_path / "bad"), storage)


def test_settle_stage_skips_only_current_fragments(tmp_path):
    storage = Storage(StorageSettings(unrestricted=True))
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x" * 100)
    layout = CropLayout(f"file://{tmp_path}/out")
    stage = ExtractSettleStage(StorageSettings(unrestricted=True), layout, "s", 3)
    row = {"clip_id": "c1", "video_uri": str(video), "signer_id": "s1", "start_s": None, "end_s": 2.0}
    first = stage.one(row)
    assert first["action"] == "run"
    storage.write_bytes(layout.part("c1"), fragment_bytes([_row()], {"clip_id": "c1", "status": "ok",
                                                                      "row_fp": first["row_fp"], "settings_fp": "s"}))
    again = stage.one(row)
    assert again["action"] == "skip" and again["row_fp"] == first["row_fp"] and '"chunks/c1/0.mp4"' in again["result"]
    assert stage.one(dict(row, end_s=3.0))["action"] == "run"  # another segment of the source
    assert ExtractSettleStage(StorageSettings(unrestricted=True), layout, "t", 3).one(row)["action"] == "run"
    storage.write_bytes(layout.part("c1"), b"garbage")
    assert stage.one(row)["action"] == "run"


def test_purge_removes_every_object_of_withdrawn_clips(tmp_path):
    from corpus_anon.finetune.crops import purge_clips

    storage = Storage(StorageSettings(unrestricted=True))
    layout = CropLayout(f"file://{tmp_path}")
    for cid in ("gone", "kept"):
        for k in range(2):
            storage.write_bytes(layout.chunk(cid, k), b"mp4")
        storage.write_bytes(layout.part(cid), fragment_bytes([], {"clip_id": cid, "status": "ok"}))
    storage.write_text(layout.attempts("gone"), "{}")
    assert purge_clips(storage, layout, ["gone", "never-extracted"]) == 4
    assert not (tmp_path / "chunks" / "gone").exists() or not any((tmp_path / "chunks" / "gone").iterdir())
    assert not (tmp_path / "parts" / "gone.parquet").exists() and not (tmp_path / "attempts" / "gone.json").exists()
    assert (tmp_path / "chunks" / "kept" / "1.mp4").is_file() and (tmp_path / "parts" / "kept.parquet").is_file()


# ---- cutting: one streaming pass at the source resolution -----------------------------------------
def test_cut_chunks_crops_the_same_frames_the_first_pass_decoded(tmp_path):
    from corpus_anon.io import video
    from corpus_anon.finetune.extract import ChunkPlan, _resize, cut_chunks
    from tests.media import make_video, read_frames

    path = make_video(str(tmp_path / "v.mp4"), 48, 24, (160, 120))
    clip = video.decode_segment(path, 0.5, 1.75, short_side=64, max_clip_s=10, max_pixels=10**7)
    assert clip.n_frames == 30
    src, _, _ = read_frames(path)
    plans = [ChunkPlan(2, 10, (20, 10, 100, 90)), ChunkPlan(14, 30, (80, 40, 160, 120))]
    got = list(cut_chunks(path, clip, plans, 64))
    assert [p for p, _ in got] == plans
    for plan, crops in got:
        assert crops.shape == (plan.frames, 64, 64, 3) and crops.dtype == np.uint8
        x0, y0, x1, y1 = plan.box
        for i, crop in enumerate(crops):
            want = _resize(np.ascontiguousarray(src[12 + plan.start + i, y0:y1, x0:x1]), 64)  # 0.5 s = frame 12
            assert np.array_equal(crop, want)
    from corpus_anon.errors import ClipError

    with pytest.raises(ClipError, match="fewer frames"):
        list(cut_chunks(path, clip, [ChunkPlan(25, 40, (0, 0, 64, 64))], 64))


# ---- reference sets made elsewhere ------------------------------------------------------------------
def test_a_folder_of_crop_videos_is_indexed_for_fine_tuning(tmp_path):
    from fractions import Fraction

    from corpus_anon.finetune.crops import build_crop_index, read_index
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.io.video import encode_mp4

    storage = Storage(StorageSettings(unrestricted=True))
    root = tmp_path / "vox" / "train"
    root.mkdir(parents=True)
    made = {"id10001#7w0IBEWc9Qw#000993#001143.mp4": 12, "id10001#aaaaaaaaaaa#000010#000090.mp4": 9,
            "id10002#bbbbbbbbbbb#000100#000200.mp4": 15}
    rng = np.random.default_rng(0)
    for name, n in made.items():
        frames = rng.integers(0, 255, (n, 128, 128, 3), dtype=np.uint8)
        encode_mp4(frames, np.arange(n) / 25, Fraction(25), (128, 128), str(root / name), threads=1)
    dest, table = build_crop_index(str(tmp_path / "vox"), storage, r"(?P<identity>id\d+)#")
    assert dest.endswith("vox/index.parquet")
    back = read_index(str(tmp_path / "vox"), storage)
    rows = {r["chunk_uri"].rsplit("/", 1)[1]: r for r in back.to_pylist()}
    assert {k: r["frames"] for k, r in rows.items()} == made
    assert {r["identity_id"] for r in rows.values()} == {"id10001", "id10002"}
    assert all(r["box"] == [0, 0, 128, 128] and r["chunk_uri"].startswith("file://") for r in rows.values())
    with pytest.raises(ValueError, match="does not match 'train/id10001"):
        build_crop_index(str(tmp_path / "vox"), storage, r"speaker(\d+)")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_crop_index(str(tmp_path / "vox"), storage, "(")
    (root / "broken.mp4").write_bytes(b"not a video")
    _, table = build_crop_index(str(tmp_path / "vox"), storage)  # an unreadable file is left out, logged
    assert table.num_rows == 3 and not any("broken" in u for u in table.column("chunk_uri").to_pylist())
    for name in made:
        (root / name).unlink()
    with pytest.raises(ValueError, match="none of the 1 videos .*broken.mp4 is not a readable video"):
        build_crop_index(str(tmp_path / "vox"), storage)
    with pytest.raises(ValueError, match="no video files"):
        build_crop_index(str(tmp_path / "empty"), storage)
