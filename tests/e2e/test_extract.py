"""`faces extract` on the demo corpus (real face photos, the real dlib detector) on a local Ray:
square face crops of the signer, an index that holds the detected faces, and reruns that resume."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from corpus_anon.config import config_from_dict
from tests.media import make_video, read_frames

pytestmark = pytest.mark.e2e

CROP, MIN_FRAMES, MAX_FRAMES = 256, 8, 16  # the default crop size


def _corpus(root):
    from corpus_anon.demo import synthesize_corpus
    from corpus_anon.run.manifest import write_manifest
    from corpus_anon.io.storage import Storage, StorageSettings

    table = synthesize_corpus(str(root), seconds=1.5)  # 36 frames a clip at 24 fps
    extra = pa.table({
        "clip_id": ["noface", "broken"],
        "video_uri": [make_video(str(root / "corpus" / "noface.mp4"), 36, 24, (160, 120)),
                      str(root / "corpus" / "broken.mp4")],
        "signer_id": ["signer9", "signer9"], "start_s": pa.array([None, None], pa.float64()),
        "end_s": pa.array([None, None], pa.float64()), "gloss": ["-", "-"],
    })
    (root / "corpus" / "broken.mp4").write_text("not a video\n")
    table = pa.concat_tables([table, extra])
    write_manifest(table, str(root / "manifest.parquet"), Storage(StorageSettings(allowed_write=(str(root),))))
    return table


def _render_time(clip_id, source_frame):
    """The demo renderer's time of a source frame (see demo.synthesize_corpus)."""
    if clip_id.startswith("signer1_"):
        return source_frame / 24
    return (int(clip_id[-1]) - 1) * 7.3 + source_frame / 24


def test_extract_demo_corpus_then_resume(ray_cluster, tmp_path):
    from corpus_anon.io import video
    from corpus_anon.finetune.extract import extract_faces
    from corpus_anon.finetune.crops import read_index
    from corpus_anon.actor.identity import FaceAnalyzer
    from corpus_anon.io.storage import Storage, StorageSettings

    root = tmp_path / "demo"
    table = _corpus(root)
    manifest = {r["clip_id"]: r for r in table.to_pylist()}
    out = root / "crops"
    cfg = config_from_dict({
        "manifest": {"uri": str(root / "manifest.parquet")},
        "storage": {"allowed_prefixes": {"read": [str(root)], "write": [str(out)]}},
        "faces": {"detect_side": 320},
        "finetune": {"crop_size": CROP, "min_chunk_frames": MIN_FRAMES, "max_chunk_frames": MAX_FRAMES},
        "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 4, "max_attempts": 1},
    })

    s1 = extract_faces(cfg, str(out))
    assert (s1["seen"], s1["done"], s1["skipped"], s1["failed"], s1["no_face"]) == (8, 7, 0, 1, 1)
    faced = [c for c in manifest if c.startswith("signer")]
    assert len(faced) == 6 and s1["short"] == 0
    summary = json.loads((out / "extract.json").read_text())
    assert summary["chunks"] == s1["chunks"] and summary["settings"]["crop_size"] == CROP
    assert summary["counts"] == {"ok": 6, "no_face": 1, "short": 0, "error": 1}  # the broken clip is counted

    storage = Storage(StorageSettings.from_config(cfg, None))
    index = read_index(str(out), storage)
    rows = index.to_pylist()
    assert len(rows) == s1["chunks"] and sum(r["frames"] for r in rows) == s1["frames"]
    assert {r["clip_id"] for r in rows} == set(faced)  # every demo clip, no chunk of the faceless or broken one
    stored = pa.parquet.read_table(out / "index.parquet")
    assert stored.column("chunk_uri").to_pylist()[0].startswith("chunks/")  # relative on disk

    faces = FaceAnalyzer(cfg)
    sources = {}
    for r in rows:
        assert r["identity_id"] == manifest[r["clip_id"]]["signer_id"]
        assert MIN_FRAMES <= r["frames"] <= MAX_FRAMES
        x0, y0, x1, y1 = r["box"]
        assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 320 and y1 <= 240
        path = r["chunk_uri"].removeprefix("file://")
        frames, ts, fps = read_frames(path)
        assert frames.shape == (r["frames"], CROP, CROP, 3) and float(fps) == 24 == r["fps"]
        assert np.allclose(np.diff(ts), 1 / 24, atol=1e-3)
        assert faces.detect(frames[len(frames) // 2]), f"no face in the middle crop of {r['chunk_uri']}"
        # The fixed box holds the signer's face in every frame of the chunk: the boxes the detector
        # finds on the clip decoded as the job decodes it, and the face the demo pasted there.
        clip_row = manifest[r["clip_id"]]
        key = (clip_row["video_uri"], clip_row["start_s"])
        if key not in sources:
            clip = video.decode_segment(clip_row["video_uri"], clip_row["start_s"], clip_row["end_s"],
                                        short_side=cfg.faces.detect_side, max_clip_s=60, max_pixels=10**7)
            sources[key] = clip
        clip = sources[key]
        scale = np.array([320 / clip.frames.shape[2], 240 / clip.frames.shape[1]] * 2)
        first = r["start_frame"]
        offset = int(round((clip.start_s or 0.0) * 24))
        assert first + offset == int(round(r["start_s"] * 24))
        for j in range(r["frames"]):
            if j % 3 == 0:
                found = faces.detect(clip.frames[first + j])
                assert found, (r["clip_id"], first + j)
                bx = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box * scale
                assert x0 <= bx[0] + 1e-6 and y0 <= bx[1] + 1e-6 and x1 >= bx[2] - 1e-6 and y1 >= bx[3] - 1e-6, (r, bx)
            # The demo's face: a 58 px face at (cx, cy + 6) (demo._crop's margins on a 78 px photo);
            # its central 44 px lie inside the box.
            t = _render_time(r["clip_id"], offset + first + j)
            cx, cy = 160 + 6 * np.sin(2 * np.pi * 0.4 * t), 78 + 6 + 2 * np.sin(2 * np.pi * 0.7 * t)
            assert x0 <= cx - 22 and cx + 22 <= x1 and y0 <= cy - 22 and cy + 22 <= y1, (r, t)

    # A rerun skips every clip (the broken one has used its one attempt) and writes the same index.
    s2 = extract_faces(cfg, str(out))
    assert (s2["skipped"], s2["done"], s2["failed"], s2["chunks"]) == (8, 0, 1, s1["chunks"])
    assert read_index(str(out), storage).equals(index)

    # A lost fragment (a job killed before it was written): only that clip is redone.
    victim = "signer2_clip1"
    (out / "parts" / f"{victim}.parquet").unlink()
    before = {r["chunk_uri"]: r["box"] for r in rows if r["clip_id"] == victim}
    s3 = extract_faces(cfg, str(out))
    assert (s3["skipped"], s3["done"], s3["chunks"]) == (7, 1, s1["chunks"])
    again = read_index(str(out), storage).to_pylist()
    assert {r["chunk_uri"]: r["box"] for r in again if r["clip_id"] == victim} == before
    assert os.path.isfile(out / "parts" / f"{victim}.parquet")

    # A takedown withdraws signer3: the next extraction leaves their clips out and deletes their crops.
    from corpus_anon.release.publish import signer_pseudonym

    secret = "extract-test-secret-of-at-least-32-bytes"
    (root / "release").mkdir()
    (root / "release" / "tombstones.json").write_text(json.dumps(
        {"entries": [{"kind": "signer", "pseudonym": signer_pseudonym(secret.encode(), "signer3")}]}))
    os.environ["CORPUS_ANON_SECRET"] = secret  # the driver drops it again before Ray starts
    try:
        s4 = extract_faces(cfg.model_copy(update={"release": cfg.release.model_copy(
            update={"root": str(root / "release")})}), str(out))
    finally:
        os.environ.pop("CORPUS_ANON_SECRET", None)
    assert (s4["seen"], s4["skipped"], s4["withdrawn"]) == (6, 6, 2)
    left = read_index(str(out), storage).to_pylist()
    assert {r["identity_id"] for r in left} == {"signer1", "signer2"}
    assert len(left) == s1["chunks"] - sum(r["clip_id"].startswith("signer3") for r in rows)
    assert not list((out / "parts").glob("signer3_*")) and not any((out / "chunks").glob("signer3_*/*.mp4"))
