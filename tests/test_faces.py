"""Face backends: insightface's real model zoo on tiny buffalo_l-layout ONNX files, and dlib's real
weights on real face photos shipped inside installed packages (nothing is committed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus_anon.models import faces as F
from tests import faces_fixtures as ff

SQUARE = (100, 150, 112)  # x0, y0, side: a 112-px square is copied 1:1 by norm_crop


def square_box(x0: int, y0: int, side: int) -> np.ndarray:
    return np.array([x0, y0, x0 + side, y0 + side], dtype=np.float64)


@pytest.fixture(scope="module")
def buffalo_root(tmp_path_factory) -> Path:
    return ff.stage_buffalo(tmp_path_factory.mktemp("insightface"))


@pytest.fixture(scope="module")
def insight(buffalo_root) -> F.InsightFaceBackend:
    return F.build_face_backend("insightface", buffalo_root)


# ---------------------------------------------------------------- module hygiene, arithmetic


def test_module_imports_no_heavy_library() -> None:
    code = (
        "import sys\nimport corpus_anon.models.faces\n"
        "print(','.join(m for m in ('insightface', 'onnxruntime', 'cv2', 'dlib', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_mean_embedding_arithmetic() -> None:
    e = np.array([[3.0, 4.0], [0.0, 2.0]])
    # cosine: rows normalised to (0.6, 0.8) and (0, 1), mean (0.3, 0.9), renormalised
    np.testing.assert_allclose(F.mean_embedding(e, "cosine"), np.array([0.3, 0.9]) / np.hypot(0.3, 0.9))
    np.testing.assert_allclose(F.mean_embedding(e, "euclidean"), [1.5, 3.0])
    with pytest.raises(ValueError, match="non-empty"):
        F.mean_embedding(np.zeros((0, 4)), "cosine")
    with pytest.raises(ValueError, match="score kind"):
        F.mean_embedding(e, "dot")


def test_score_broadcasting_and_rules() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([3.0, 0.0])
    np.testing.assert_allclose(F.score_embeddings(a, b, "cosine"), [1.0, 0.0])
    np.testing.assert_allclose(F.score_embeddings(a, b, "euclidean"), [2.0, np.sqrt(13.0)])
    assert isinstance(F.score_embeddings(b, b, "euclidean"), float)
    assert F.score_embeddings(a[:, None], a[None], "cosine").shape == (2, 2)
    np.testing.assert_array_equal(F.same_person_rule(np.array([0.45, 0.44]), "cosine", 0.45), [True, False])
    np.testing.assert_array_equal(F.same_person_rule(np.array([0.59, 0.6]), "euclidean", 0.6), [True, False])


# ---------------------------------------------------------------- insightface (tiny buffalo_l)


def test_insightface_detects_the_square_with_template_keypoints(insight) -> None:
    assert (insight.name, insight.score_kind, insight.threshold) == ("insightface", "cosine", 0.45)
    faces = insight.detect(ff.square_image([SQUARE]))
    assert len(faces) == 1
    f = faces[0]
    np.testing.assert_allclose(f.box, square_box(*SQUARE), atol=1.0)
    assert 0.5 < f.score <= 1.0
    np.testing.assert_allclose(f.kps, F.box_to_kps(f.box), atol=0.5)
    assert f.landmarks is None  # no 2d106det staged
    assert insight.detect(np.zeros((200, 300, 3), np.uint8)) == []


def test_insightface_box_is_mapped_back_through_the_letterbox(insight) -> None:
    faces = insight.detect(ff.square_image([(60, 40, 200)], size=(360, 480)))
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, square_box(60, 40, 200), atol=1.5)


def test_insightface_embedding_is_the_recognizer_on_the_rgb_aligned_crop(insight) -> None:
    img = ff.square_image([SQUARE])
    faces = insight.detect(img)
    emb = insight.embed(img, faces)
    assert emb.shape == (1, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    x0, y0, side = SQUARE
    crop = img[y0 : y0 + side, x0 : x0 + side]
    assert float(emb[0] @ ff.arcface_reference(crop)) > 0.9999
    # colour order matters to this check: the channel-swapped crop embeds elsewhere
    assert float(emb[0] @ ff.arcface_reference(crop[:, :, ::-1])) < 0.9


def test_insightface_scores_and_embed_at(insight) -> None:
    img = ff.square_image([SQUARE], seed=1)
    faces = insight.detect(img)
    e = insight.embed(img, faces)[0]
    assert insight.score(e, insight.embed(img.copy(), insight.detect(img.copy()))[0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(insight.embed_at(img, faces[0].kps), e, atol=1e-6)
    assert insight.score(insight.embed_at(img, faces[0].box), e) > 0.999
    other = ff.square_image([SQUARE], seed=2)  # same square, different texture: another "person"
    s = insight.score(e, insight.embed(other, insight.detect(other))[0])
    assert s < 0.3 and not insight.same_person(s)
    assert insight.same_person(1.0)


def test_insightface_embeds_a_batch_like_single_faces(insight) -> None:
    a, b = (40, 40, 150), (300, 260, 180)  # no shared rows or columns
    img = ff.square_image([a, b], seed=3)
    faces = insight.detect(img)
    assert len(faces) == 2
    emb = insight.embed(img, faces)
    assert emb.shape == (2, 512)
    for f, row in zip(faces, emb):
        alone = np.zeros_like(img)
        x0, y0, x1, y1 = f.box.round().astype(int)
        alone[y0:y1, x0:x1] = img[y0:y1, x0:x1]
        np.testing.assert_allclose(insight.embed_at(alone, f.kps), row, atol=1e-5)
    assert insight.score(emb[0], emb[1]) < 0.3
    assert insight.embed(img, []).shape == (0, 512)


def test_embed_at_sees_a_face_the_detector_misses(insight) -> None:
    img = ff.square_image([SQUARE], seed=4)
    face = insight.detect(img)[0]
    e = insight.embed(img, [face])[0]
    # Dimmed below the detector's brightness cut, the texture (the "identity") is unchanged.
    dimmed = (img.astype(np.float32) * 0.6).astype(np.uint8)
    assert insight.detect(dimmed) == []
    leak = insight.score(insight.embed_at(dimmed, face.kps), e)
    assert leak > 0.99 and insight.same_person(leak)
    # A really anonymized region (new texture) at the same place is not the same person.
    anon = ff.square_image([SQUARE], seed=5)
    assert not insight.same_person(insight.score(insight.embed_at(anon, face.kps), e))


def test_insightface_106_landmarks_when_staged(buffalo_root, tmp_path) -> None:
    pack = tmp_path / "models" / "buffalo_l"
    shutil.copytree(buffalo_root / "models" / "buffalo_l", pack)
    ff.export_landmark(pack / "2d106det.onnx")
    backend = F.build_face_backend("insightface", tmp_path)
    f = backend.detect(ff.square_image([SQUARE]))[0]
    assert f.landmarks.shape == (106, 2)
    centre = (f.box[:2] + f.box[2:]) / 2
    np.testing.assert_allclose(f.landmarks.mean(axis=0), centre, atol=1.0)
    # insightface's Landmark crops 1.5x the box side: ring radius 0.5 of a half-crop -> 0.375 side
    radius = np.linalg.norm(f.landmarks - centre, axis=1)
    np.testing.assert_allclose(radius, 0.375 * (f.box[2] - f.box[0]), rtol=0.03)
    assert F.build_face_backend("insightface", tmp_path, landmarks=False).detect(
        ff.square_image([SQUARE]))[0].landmarks is None


def test_signer_faces_follow_the_signer_track(insight) -> None:
    centre, corner = (250, 250, 140), (20, 20, 60)
    frames = [ff.square_image([centre, corner], seed=t) for t in range(3)] + [ff.square_image([corner], seed=9)]
    got = F.signer_faces(insight, frames)
    assert [g is None for g in got] == [False, False, False, True]
    for g in got[:3]:
        np.testing.assert_allclose(g.box, square_box(*centre), atol=1.0)
    assert F.signer_faces(insight, [np.zeros((64, 64, 3), np.uint8)]) == [None]


def test_clear_errors_for_missing_models_and_bad_input(tmp_path, buffalo_root, insight) -> None:
    with pytest.raises(FileNotFoundError, match="buffalo_l"):
        F.build_face_backend("insightface", tmp_path / "nowhere")
    only_rec = tmp_path / "rec" / "models" / "buffalo_l"
    only_rec.mkdir(parents=True)
    shutil.copy(buffalo_root / "models" / "buffalo_l" / "w600k_r50.onnx", only_rec)
    with pytest.raises(FileNotFoundError, match="no SCRFD detector"):
        F.build_face_backend("insightface", tmp_path / "rec")
    with pytest.raises(FileNotFoundError, match="shape_predictor_5_face_landmarks.dat"):
        F.build_face_backend("dlib", tmp_path)
    with pytest.raises(ValueError, match="Unknown face backend"):
        F.build_face_backend("facenet", tmp_path)
    with pytest.raises(ValueError, match="uint8 RGB"):
        insight.detect(np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="five keypoints"):
        insight.embed_at(np.zeros((10, 10, 3), np.uint8), np.zeros((3, 2)))


# ---------------------------------------------------------------- dlib (real weights, real faces)


@pytest.fixture(scope="module")
def dlib_root(tmp_path_factory) -> Path:
    pytest.importorskip("dlib")
    root = tmp_path_factory.mktemp("dlib")
    F.stage_dlib_models(root)
    return root


@pytest.fixture(scope="module")
def dlib_backend(dlib_root) -> F.DlibBackend:
    # upsample=0 finds all six t1.jpg faces (>= 80 px) at a quarter of the default's cost
    return F.build_face_backend("dlib", dlib_root, upsample=0)


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    insightface = pytest.importorskip("insightface")
    from skimage import io

    return io.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))


def test_dlib_model_files_are_located_and_staged(tmp_path) -> None:
    files = F.dlib_model_files()
    assert {"shape_predictor_5", "recognition"} <= set(files)
    staged = F.stage_dlib_models(tmp_path, landmarks_68=False)
    assert set(staged) == {"shape_predictor_5", "recognition"}
    for role, p in staged.items():
        assert p.parent == tmp_path and p.stat().st_size == files[role].stat().st_size


def test_clear_errors_when_a_library_is_missing(monkeypatch, dlib_root, buffalo_root) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` raise ImportError
    with pytest.raises(ImportError, match="needs dlib"):
        F.build_face_backend("dlib", dlib_root)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match="needs the insightface package"):
        F.build_face_backend("insightface", buffalo_root)


def _centres(faces: list[F.Face]) -> np.ndarray:
    return np.array([(f.box[:2] + f.box[2:]) / 2 for f in faces])


def test_dlib_tells_people_apart_on_real_photos(dlib_backend, t1) -> None:
    import cv2
    from skimage import data

    be = dlib_backend
    assert (be.name, be.score_kind, be.threshold) == ("dlib", "euclidean", 0.6)
    faces = be.detect(t1)
    assert len(faces) >= 4  # six measured
    emb = be.embed(t1, faces)
    assert emb.shape == (len(faces), 128)
    assert faces[0].kps.shape == (5, 2) and faces[0].landmarks.shape == (68, 2)
    np.testing.assert_allclose(be.embed_at(t1, faces[0].kps), emb[0], atol=1e-6)
    np.testing.assert_allclose(be.embed_at(t1, faces[0].box), emb[0], atol=1e-6)

    # Different people: every pair in the photo is over the 0.6 rule (measured 0.65-0.90).
    d = be.score(emb[:, None], emb[None])
    cross = d[~np.eye(len(faces), dtype=bool)]
    assert not be.same_person(cross).any()

    # The same people under small changes: each face is matched by position, stays under 0.6
    # (measured 0.05-0.28) and is nearer to its own original than to anyone else (others >= 0.62).
    h, w = t1.shape[:2]
    variants = {
        "flip": (np.ascontiguousarray(t1[:, ::-1]), lambda c: np.c_[w - c[:, 0], c[:, 1]]),
        "darker": ((t1 * 0.8).astype(np.uint8), lambda c: c),
        "scale0.9": (cv2.resize(t1, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA), lambda c: c / 0.9),
    }
    for name, (img, to_original) in variants.items():
        vf = be.detect(img)
        assert len(vf) == len(faces), name
        own = [int(np.argmin(np.linalg.norm(_centres(faces) - c, axis=1))) for c in to_original(_centres(vf))]
        assert sorted(own) == list(range(len(faces))), name
        dv = be.score(be.embed(img, vf)[:, None], emb[None])
        same = dv[np.arange(len(vf)), own]
        assert be.same_person(same).all(), (name, same)
        assert (np.argmin(dv, axis=1) == own).all(), name

    # Someone who is not in the photo.
    astro = data.astronaut()
    af = be.detect(astro)
    assert len(af) >= 1
    da = be.score(emb, be.embed(astro, af[:1])[0])  # measured 0.72-0.86
    assert not be.same_person(da).any()


def test_insightface_pack_is_staged_through_the_store_lock(buffalo_root, tmp_path) -> None:
    """buffalo_l files in a model store's insightface/models/buffalo_l/ are recorded in its lock,
    staged, verified, and loaded by FaceAnalyzer from the staged copy."""
    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.identity import FaceAnalyzer
    from corpus_anon.models import registry
    from corpus_anon.models.tiny import make_tiny
    from corpus_anon.io.storage import Storage, StorageSettings

    storage = Storage(StorageSettings(unrestricted=True))
    tiny = make_tiny(tmp_path / "tiny", faces=False)
    shutil.copytree(buffalo_root / "models", tiny / "insightface" / "models")
    registry.write_local_lock(tiny, "tiny")
    cfg = config_from_dict({"landmarks": {"enabled": False},  # this store is built without the landmark models
                            "faces": {"backend": "insightface", "detector": "scrfd"},
                            "models": {"profile": "tiny", "store": str(tiny), "cache_dir": str(tmp_path / "c")}})
    fa = FaceAnalyzer(cfg, "cpu", storage)
    assert fa.kind == "cosine" and fa.detector.name == "scrfd"
    # SCRFD through the insightface backend at faces.detect_side: the tiny det_10g finds the square
    (face,) = fa.detect(ff.square_image([SQUARE], size=(480, 640)))
    np.testing.assert_allclose(face.box, square_box(*SQUARE), atol=3)
    assert face.kps.shape == (5, 2)
    staged = registry.staged_dir_for("tiny", str(tiny), tmp_path / "c")
    assert (staged / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx").is_file()
    # Bytes that differ from the lock are refused before insightface sees them.
    onnx = staged / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    registry.stage("tiny", str(tiny), tmp_path / "c", storage)  # stages the good copy again
    assert registry.sha256_file(str(onnx)) == registry.verify_staged(staged, "tiny")[
        "insightface/models/buffalo_l/w600k_r50.onnx"]["sha256"]


def test_face_analyzer_finds_faces_with_centerface_and_dlib_identity_stays_sane(t1) -> None:
    """The default detector (CenterFace) feeds dlib's descriptors: dlib's 5 points are placed in
    CenterFace's boxes, and the identity rule still holds (same person < 0.6, others above)."""
    import cv2
    from skimage import data

    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.identity import FaceAnalyzer

    pytest.importorskip("dlib")
    fa = FaceAnalyzer(config_from_dict({"faces": {"backend": "dlib"}}))
    assert fa.detector.name == "centerface" and fa.backend.name == "dlib"
    faces = fa.detect(t1)
    assert len(faces) == 6  # dlib's HOG finds them too at upsample 0; CenterFace boxes are used
    be = fa.backend
    for f in faces:
        np.testing.assert_array_equal(f.kps, be.kps_at(t1, f.box))  # dlib's layout, not CenterFace's
        assert f.landmarks.shape == (68, 2)
    emb = be.embed(t1, faces)
    d = be.score(emb[:, None], emb[None])
    assert not be.same_person(d[~np.eye(6, dtype=bool)]).any()  # six people (measured >= 0.64)
    # Against dlib's own HOG boxes, each person is the same person (measured 0.04-0.14).
    hog = be.detect(t1)
    hog_emb = be.embed(t1, hog)
    own = [int(np.argmin(np.linalg.norm(_centres(hog) - c, axis=1))) for c in _centres(faces)]
    same = be.score(emb, hog_emb[own])
    assert be.same_person(same).all() and (same < 0.3).all(), same
    # The same people in a changed picture (flipped, darker, smaller), matched by position.
    h, w = t1.shape[:2]
    for img, to_original in ((np.ascontiguousarray(t1[:, ::-1]), lambda c: np.c_[w - c[:, 0], c[:, 1]]),
                             ((t1 * 0.8).astype(np.uint8), lambda c: c),
                             (cv2.resize(t1, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA), lambda c: c / 0.7)):
        vf = fa.detect(img)
        assert len(vf) == 6
        own = [int(np.argmin(np.linalg.norm(_centres(faces) - c, axis=1))) for c in to_original(_centres(vf))]
        dv = be.score(be.embed(img, vf), emb[own])
        assert be.same_person(dv).all(), dv
    astro = data.astronaut()
    (af,) = fa.detect(astro)
    assert not be.same_person(be.score(emb, be.embed(astro, [af])[0])).any()


def test_face_analyzer_detects_a_clip_in_batches() -> None:
    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.identity import FaceAnalyzer
    from tests.media import face_frames

    pytest.importorskip("dlib")
    fa = FaceAnalyzer(config_from_dict({"faces": {"backend": "dlib"}}))
    frames = np.stack(face_frames(10, (320, 240), face_px=96))
    calls = []
    dets = fa.detect_all(frames, check=lambda: calls.append(1))
    assert len(dets) == 10 and all(len(d) == 1 for d in dets) and len(calls) == 2  # batches of 8
    for t in (0, 9):
        (one,) = fa.detect(frames[t])
        np.testing.assert_allclose(one.box, dets[t][0].box, atol=1e-3)
    track = fa.track(frames, detections=dets)
    assert track.present.all() and track.n_tracks == 1
