"""The exposure check on real faces (insightface's `t1.jpg`) with the real dlib models: every original
face track, every frame the detector missed, runs of exposed frames counted whole."""

from __future__ import annotations

import numpy as np
import pytest

from corpus_anon.models import facetrack
from corpus_anon.actor.exposure import ExposureCheck, gap_ok, longest_run, sample_frames
from corpus_anon.run.summaries import summary_counts

W, H, PX = 480, 360, 130
N = 24
SKIN = (200, 170, 140)


@pytest.fixture(scope="module")
def backend():
    from corpus_anon.models.faces import build_face_backend, dlib_model_dir

    return build_face_backend("dlib", dlib_model_dir(), upsample=0)


@pytest.fixture(scope="module")
def people() -> tuple[np.ndarray, np.ndarray]:
    """Two real faces from t1.jpg (via the demo's crops), PX square."""
    pytest.importorskip("insightface")
    from corpus_anon.demo import _resize, demo_faces

    faces = dict(demo_faces())
    return _resize(faces["t1a"], PX), _resize(faces["t1c"], PX)


def a_box(i: int) -> tuple[int, int, int, int]:
    """Where person A's photo (the signer: the more central face) is pasted on frame i."""
    dx = int(round(4 * np.sin(i / 4)))
    return 70 + dx, 60, 70 + dx + PX, 60 + PX


def b_box(i: int) -> tuple[int, int, int, int]:
    """Where person B's photo is pasted on frame i (x0, y0, x1, y1)."""
    dx = int(round(4 * np.sin(i / 4)))
    return 300 - dx, 80, 300 - dx + PX, 80 + PX


def two_person_clip(people: tuple[np.ndarray, np.ndarray], n: int = N, occluded: set[int] = frozenset(),
                    hand: tuple[float, float] = (0.2, 0.6)) -> np.ndarray:
    """Person A (left, the signer) and B (right, a bystander), swaying a little; on `occluded`
    frames a skin-coloured 'hand' covers B's face from `hand[0]` to `hand[1]` of its height: the
    default hides the eyes, which makes dlib's HOG detector miss B while B stays recognizable."""
    a, b = people
    out = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        img = out[i]
        img[:] = (150, 160, 170)
        ax0, ay0, ax1, ay1 = a_box(i)
        img[ay0:ay1, ax0:ax1] = a
        x0, y0, x1, y1 = b_box(i)
        img[y0:y1, x0:x1] = b
        if i in occluded:
            img[y0 + int(hand[0] * PX) : y0 + int(hand[1] * PX), x0 + PX // 6 : x1 - PX // 6] = SKIN
    return out


def detect(backend, frames: np.ndarray) -> list[list]:
    return [backend.detect(f) for f in frames]


def pixelate(frames: np.ndarray, dets: list[list], interpolate: bool = True) -> np.ndarray:
    """pixelate's defaults (8 blocks, box x1.5) on the detected faces: along whole tracks
    (`interpolate`), or only on the frames where the detector found them."""
    from corpus_anon.actor.anonymize import pixelate_region

    out = frames.copy()
    n, h, w = frames.shape[:3]
    if interpolate:
        boxes = [np.array([f.box for f in d]).reshape(-1, 4) for d in dets]
        per_frame = [[] for _ in range(n)]
        for tr in facetrack.build_tracks(boxes):
            filled = facetrack.fill_boxes(tr, n, hold=None)
            for t in range(n):
                per_frame[t].append(filled[t])
    else:
        per_frame = [[f.box for f in d] for d in dets]
    for t in range(n):
        for box in per_frame[t]:
            pixelate_region(out[t], facetrack.expand_box(box, 1.5, w, h), 8)
    return out


def restore_b(out: np.ndarray, orig: np.ndarray, frames: range | list[int]) -> np.ndarray:
    """The output with B's original pixels back on `frames` (an anonymizer that missed B there)."""
    out = out.copy()
    for t in frames:
        x0, y0, x1, y1 = b_box(t)
        out[t, y0 - 40 : y1 + 40, x0 - 40 : x1 + 40] = orig[t, y0 - 40 : y1 + 40, x0 - 40 : x1 + 40]
    return out


@pytest.fixture(scope="module")
def clip(backend, people):
    frames = two_person_clip(people)
    dets = detect(backend, frames)
    assert all(len(d) == 2 for d in dets), [len(d) for d in dets]
    return frames, dets


def test_properly_hidden_clip_has_no_exposed_frame(backend, clip):
    frames, dets = clip
    out = pixelate(frames, dets)
    ex = ExposureCheck(backend, frames, dets, max_gap=4).run(out, detect(backend, out))
    m = ex.metrics
    assert m["faces_tracked"] == 2
    assert m["exposed_frames"] == 0 and m["max_exposed_run"] == 0 and not ex.leak
    assert m["exposure_covered"] is True
    assert m["frames_checked"] >= N // 5
    # The mosaic is judged another person, by a margin (dlib: distance >= 0.6 is not the same person).
    assert m["id_worst"] > 0.6
    for tr in ex.tracks:
        assert gap_ok(tr.checked, tr.span[0], tr.span[1], 4)


def test_unhidden_second_face_counts_every_exposed_frame(backend, clip):
    frames, dets = clip
    out = restore_b(pixelate(frames, dets), frames, range(7, 11))
    ex = ExposureCheck(backend, frames, dets, max_gap=4).run(out, detect(backend, out))
    assert ex.exposed == [7, 8, 9, 10]
    assert ex.metrics["exposed_frames"] == 4 and ex.metrics["max_exposed_run"] == 4 and ex.leak
    assert ex.metrics["id_worst"] < 0.1  # the same pixels: distance about 0
    b_track = next(tr for tr in ex.tracks if tr.exposed)
    assert b_track.exposed == [7, 8, 9, 10]
    assert sum(1 for tr in ex.tracks if tr.exposed) == 1  # A stayed hidden


def test_face_missed_by_the_original_detector_is_still_checked(backend, people):
    """B is behind a hand on frames 9-11: the detector misses B there, and so does an anonymizer that
    pixelates only detected faces. The check embeds B's interpolated place and finds all three."""
    occluded = {9, 10, 11}
    frames = two_person_clip(people, occluded=occluded)
    dets = detect(backend, frames)
    missed = [t for t in range(N) if len(dets[t]) < 2]
    assert missed == sorted(occluded), missed
    out = pixelate(frames, dets, interpolate=False)
    out_dets = detect(backend, out)
    assert all(not any(facetrack.iou(np.array(b_box(t)), f.box) > 0.2 for f in out_dets[t]) for t in occluded)
    ex = ExposureCheck(backend, frames, dets, max_gap=4).run(out, out_dets)
    assert ex.exposed == [9, 10, 11] and ex.metrics["max_exposed_run"] == 3
    # Whole-track pixelation (what `pixelate` does) covers the same gap: nothing exposed.
    hidden = pixelate(frames, dets, interpolate=True)
    assert ExposureCheck(backend, frames, dets, max_gap=4).run(hidden, detect(backend, hidden)).metrics[
        "exposed_frames"] == 0


def test_face_found_late_is_checked_back_to_the_clips_start(backend, people):
    """B is behind a hand on frames 0-5, so its track starts at 6; the check walks back while the
    original still shows B and finds the unhidden frames before the track."""
    frames = two_person_clip(people, occluded=set(range(6)))
    dets = detect(backend, frames)
    out = pixelate(frames, dets, interpolate=False)  # B unhidden on 0-5
    ex = ExposureCheck(backend, frames, dets, max_gap=4).run(out, detect(backend, out))
    assert ex.exposed == list(range(6))


def test_output_detection_overlapping_an_original_face_is_checked(backend, clip):
    """With max_gap large, sampling alone would skip frame 12; an output face there is checked."""
    frames, dets = clip
    out = restore_b(pixelate(frames, dets), frames, [12])
    out_dets = detect(backend, out)
    only_ends = ExposureCheck(backend, frames, dets, max_gap=64).run(out, [[] for _ in out_dets])
    assert only_ends.exposed == []  # the ends alone miss it: this is what the overlap rule is for
    ex = ExposureCheck(backend, frames, dets, max_gap=64).run(out, out_dets)
    assert ex.exposed == [12]


def test_original_embeddings_are_reused_across_outputs(backend, clip):
    frames, dets = clip
    chk = ExposureCheck(backend, frames, dets, max_gap=4)
    first = chk.run(pixelate(frames, dets), detect(backend, pixelate(frames, dets)))
    cached = len(chk._orig_emb)
    leaky = restore_b(pixelate(frames, dets), frames, [3])
    second = chk.run(leaky, detect(backend, leaky))
    assert first.metrics["exposed_frames"] == 0 and second.exposed == [3]
    assert len(chk._orig_emb) <= cached + 3  # only frame 3 (a face in the output) and its neighbours are new


def test_no_face_in_the_original_checks_nothing(backend, people):
    frames = np.full((4, H, W, 3), 128, np.uint8)
    ex = ExposureCheck(backend, frames, [[] for _ in frames], 4).run(frames, [[] for _ in frames])
    assert ex.metrics == {"faces_tracked": 0, "frames_checked": 0, "exposed_frames": 0, "max_exposed_run": 0,
                          "exposure_covered": True, "id_worst": None}


def test_mismatched_inputs_are_refused(backend, clip):
    frames, dets = clip
    with pytest.raises(ValueError, match="detections for each of the 24 frames"):
        ExposureCheck(backend, frames, dets[:3])
    with pytest.raises(ValueError, match="differ in shape"):
        ExposureCheck(backend, frames, dets).run(frames[:3], dets[:3])


# ---- pure helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_gap", [0, 1, 4, 7])
def test_sampled_frames_never_leave_a_gap_and_include_every_missed_frame(max_gap):
    rng = np.random.default_rng(max_gap)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        detected = rng.random(n) < rng.uniform(0.3, 1.0)
        lo, hi = sorted(int(v) for v in rng.integers(0, n, 2))
        detected[lo] = detected[hi] = True
        f = sample_frames(lo, hi, detected, max_gap)
        assert f == sorted(set(f)) and f[0] == lo and f[-1] == hi
        assert gap_ok(f, lo, hi, max_gap)
        assert {t for t in range(lo, hi + 1) if not detected[t]} <= set(f)
    assert sample_frames(0, 20, np.ones(21, bool), 4) == [0, 5, 10, 15, 20]


def test_gap_ok_and_longest_run():
    assert gap_ok([0, 5, 10], 0, 10, 4) and not gap_ok([0, 6, 10], 0, 10, 4)
    assert not gap_ok([1, 5, 10], 0, 10, 4) and not gap_ok([], 0, 0, 4)
    assert longest_run([]) == 0 and longest_run([3]) == 1 and longest_run([1, 2, 3, 7, 8]) == 3


def test_summary_counts():
    recs = [
        {"clip_id": "a", "status": "ok", "metrics": {"exposed_frames": 0, "faces_tracked": 1, "exposure_covered": True}},
        {"clip_id": "b", "status": "leak", "metrics": {"exposed_frames": 5, "faces_tracked": 2,
                                                       "exposure_covered": False}},
        {"clip_id": "c", "status": "error", "metrics": {}},
        {"clip_id": "d", "exposed_frames": 2, "faces_tracked": 1},  # a flat metrics row
    ]
    assert summary_counts(recs) == {"clips_checked": 3, "clips_exposed": 2, "exposed_frames": 7, "faces_tracked": 4,
                                    "clips_not_covered": 1, "exposed_clips": ["b", "d"], "not_covered_clips": ["b"]}
