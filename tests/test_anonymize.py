import importlib.util
from pathlib import Path

import numpy as np
import pytest

from corpus_anon.actor.anonymize import PixelateAnonymizer, build_anonymizer
from corpus_anon.config import config_from_dict
from corpus_anon.models.detect import CenterFaceDetector, installed_centerface
from tests.media import face_frames

FPS = 30.0
W, H = 480, 320
OTHER = (100, 20, 270, 180)  # y0, x0, y1, x1 of the second person's face in the frame


@pytest.fixture(scope="module")
def detector() -> CenterFaceDetector:
    return CenterFaceDetector(installed_centerface(), detect_side=480, threshold=0.3)


def detail(a: np.ndarray) -> float:
    """Mean horizontal gradient: mosaic cells are flat, faces and noise are not."""
    return float(np.abs(np.diff(a.astype(int), axis=-2)).mean())


def test_pixelate_hides_the_face_and_keeps_the_rest(detector):
    frames = np.stack(face_frames(12, (320, 240), face_px=96))
    anon = PixelateAnonymizer(detector, blocks=8, box_scale=1.3)
    res = anon.anonymize(frames, {"fps": FPS}, lambda: None)
    assert res.frames.shape == frames.shape and res.frames.dtype == np.uint8
    assert res.metrics["faces_found"] == 1 and res.metrics["signer_detected_frac"] == 1.0
    assert res.metrics["detector"] == "centerface"
    x0, y0 = 160 - 48, 120 - 48 - 20
    face_in = frames[:, y0 + 20 : y0 + 76, x0 + 20 : x0 + 76]
    face_out = res.frames[:, y0 + 20 : y0 + 76, x0 + 20 : x0 + 76]
    # The face region lost its detail (mosaic cells are flat) ...
    assert detail(face_out) < 0.35 * detail(face_in)
    # ... and the rest of the frame is untouched.
    assert np.array_equal(res.frames[:, :, :40], frames[:, :, :40])


def test_no_face_means_unchanged_frames(detector):
    frames = np.stack(face_frames(6, with_face=False))
    res = PixelateAnonymizer(detector).anonymize(frames, {"fps": FPS}, lambda: None)
    assert res.metrics["faces_found"] == 0
    assert np.array_equal(res.frames, frames)


def _two_people(n: int, hidden: set[int]) -> np.ndarray:
    """A signer (the astronaut, centre) and a second person (a face of insightface's t1.jpg, left);
    on the `hidden` frames the second face is covered by a patch of noise (new noise every frame, as
    a moving occluder: the place never looks the same twice, so no hold-while-unchanged applies),
    which no detector takes for a face but which shows whether it was pixelated."""
    from skimage import data, io
    from skimage.transform import resize

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (the package that ships t1.jpg) is not installed")
    t1 = io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")
    other = t1[250:420, 1100:1260]
    signer = (resize(data.astronaut()[30:200, 150:300], (150, 132), anti_aliasing=True) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    y0, x0, y1, x1 = OTHER
    out = []
    for t in range(n):
        img = np.full((H, W, 3), (180, 190, 200), np.uint8)
        img[60:210, 174 + (t % 3) : 306 + (t % 3)] = signer
        img[y0:y1, x0:x1] = rng.integers(0, 256, other.shape, dtype=np.uint8) if t in hidden else other
        out.append(img)
    return np.stack(out)


def test_a_second_face_missed_for_a_while_stays_hidden_across_the_gap_and_hold_s_after(detector):
    n, hold_s = 60, 0.3
    hold = int(np.ceil(hold_s * FPS))  # 9 frames
    hidden = set(range(15, 35)) | set(range(45, n))  # 20 frames in the middle, the last 15
    frames = _two_people(n, hidden)
    # The detector genuinely misses the covered face (and finds it everywhere else).
    y0, x0, y1, x1 = OTHER
    dets = detector.detect_batch(list(frames))
    seen = [any(f.box[0] < x1 and f.box[2] > x0 and f.box[1] < y1 and f.box[3] > y0 for f in d) for d in dets]
    assert [t for t in range(n) if seen[t]] == [t for t in range(n) if t not in hidden]

    anon = PixelateAnonymizer(detector, blocks=8, box_scale=1.3, hold_s=hold_s)
    res = anon.anonymize(frames, {"fps": FPS}, lambda: None)
    assert res.metrics["faces_found"] == 2
    inner = (slice(y0 + 40, y1 - 40), slice(x0 + 40, x1 - 40))  # well inside the face and the patch
    before = np.array([detail(frames[t][inner]) for t in range(n)])
    after = np.array([detail(res.frames[t][inner]) for t in range(n)])
    covered = after < 0.4 * before
    # hidden from the first frame through the gap to `hold` frames after the last detection (44) ...
    assert covered[: 45 + hold].all(), np.flatnonzero(~covered[: 45 + hold])
    # ... and not forever: the noise patch comes back untouched once the hold is over.
    assert not covered[45 + hold + 3 :].any()


def test_a_face_seen_on_one_frame_only_is_kept(detector):
    n, hold_s = 30, 0.2
    hold = int(np.ceil(hold_s * FPS))
    frames = _two_people(n, hidden=set(range(n)) - {12})
    res = PixelateAnonymizer(detector, blocks=8, box_scale=1.3, hold_s=hold_s).anonymize(frames, {"fps": FPS},
                                                                                        lambda: None)
    assert res.metrics["faces_found"] == 2
    y0, x0, y1, x1 = OTHER
    inner = (slice(y0 + 40, y1 - 40), slice(x0 + 40, x1 - 40))
    covered = [detail(res.frames[t][inner]) < 0.4 * detail(frames[t][inner]) for t in range(n)]
    assert [t for t in range(n) if covered[t]] == list(range(12 - hold, 12 + hold + 1))


def test_detect_every_holds_at_least_the_frames_between_runs(detector):
    assert PixelateAnonymizer(detector, detect_every=5, hold_s=0.0).hold_frames(30.0) == 4
    assert PixelateAnonymizer(detector, detect_every=1, hold_s=0.5).hold_frames(25.0) == 13


def test_build_anonymizer_uses_the_configured_detector(caplog):
    anon = build_anonymizer(config_from_dict({"anonymizer": {"kind": "pixelate", "pixelate": {"hold_s": 1.0}}}))
    assert anon.detector.name == "centerface" and anon.hold_s == 1.0
    haar = build_anonymizer(config_from_dict({"anonymizer": {"kind": "pixelate"}, "faces": {"detector": "haar"}}))
    assert haar.detector.name == "haar" and "Haar" in caplog.text


def test_a_track_is_held_while_its_place_looks_the_same():
    """A face the detector found only on frames 10-12 is hidden from frame 0 (its place showed the
    same face before) up to frame 15, where the picture there changes for good."""
    from skimage import data

    from corpus_anon.actor.anonymize import hold_while_unchanged

    face = data.astronaut()[30:190, 150:310]
    rng = np.random.default_rng(1)
    frames = np.zeros((24, 240, 320, 3), np.uint8)
    for t in range(24):
        frames[t] = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        if t <= 15:
            frames[t, 40:200, 80:240] = np.clip(face.astype(int) + (t % 3), 0, 255)  # near-still
    boxes = np.full((24, 4), np.nan)
    boxes[10:13] = [80, 40, 240, 200]
    hold_while_unchanged(frames, boxes)
    assert list(np.flatnonzero(~np.isnan(boxes[:, 0]))) == list(range(0, 16))
