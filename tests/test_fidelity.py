"""Linguistic fidelity by landmarks: the marker and hand agreement metrics, measured with MediaPipe's
real face mesh and hands on the demo's animated real faces, and the columns an actor writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from corpus_anon import demo

from corpus_anon.actor import identity

from corpus_anon.actor import metrics
from corpus_anon.run.summaries import fidelity_summary, parse_nmm_series
from corpus_anon.models.landmarks import Landmarks
from corpus_anon.models.hands import Hand, HandLandmarker
from corpus_anon.models.facemesh import FaceMesh, expression_features
from corpus_anon.models.mediapipe_common import installed_mediapipe_file

T = 24  # one second of the demo at 24 fps
START = 1.9  # signer1 raises the brows fully in this second and opens the mouth twice


@pytest.fixture(scope="module")
def mesh() -> FaceMesh:
    return FaceMesh(installed_mediapipe_file("face_landmark.tflite"))


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, np.ndarray]:
    """The demo's first signer (skimage's astronaut photo), animated, and the face's box per frame."""
    name, face = demo.demo_faces()[0]
    signer = demo.Signer("signer1", face, (40, 60, 110), (200, 205, 210), anchors=demo.FACE_ANCHORS[name])
    frames = np.stack([demo.render_frame(signer, START + k / demo.FPS) for k in range(T)])
    # render_frame puts the 78 px face photo at the swaying centre (W / 2 + 6 sin(2 pi 0.4 t), 78 + ...)
    cx = demo.W / 2 + 6 * np.sin(2 * np.pi * 0.4 * (START + np.arange(T) / demo.FPS))
    boxes = np.stack([cx - 30, np.full(T, 48.0), cx + 30, np.full(T, 118.0)], axis=1)
    return frames, boxes


def features(mesh: FaceMesh, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return np.array([expression_features(r.points) for r in mesh.mesh(list(frames), list(boxes))])


# ---- the metric functions --------------------------------------------------------------------------
def series(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24
    return np.stack([0.14 + 0.03 * np.sin(2 * np.pi * 0.4 * t), 0.3 + 0.02 * rng.standard_normal(n),
                     0.03 + 0.03 * np.abs(np.sin(2 * np.pi * 2 * t)), 0.45 + 0.01 * np.cos(2 * np.pi * t)], axis=1)


def test_identical_series_agree_perfectly_and_noise_does_not() -> None:
    o = series()
    same = metrics.nmm_agreement(o, o.copy())
    assert same["nmm_corr"] == pytest.approx(1.0) and same["nmm_mae"] == 0.0 and same["nmm_frames"] == 30
    assert all(same[f"nmm_{s}_corr"] == pytest.approx(1.0) for s in ("brow", "eye", "mouth", "width"))
    other = metrics.nmm_agreement(o, series(seed=1)[::-1].copy())
    assert other["nmm_corr"] < 0.5 and other["nmm_mae"] > 0.005


def test_a_static_face_has_no_marker_correlation_and_a_flat_anonymization_has_zero() -> None:
    o = series()
    o[:, 0] = 0.15  # brows never move
    a = o.copy()
    a[:, 2] = 0.03  # the anonymized mouth never opens
    out = metrics.nmm_agreement(o, a)
    assert out["nmm_brow_corr"] is None and out["nmm_static"] == "brow_raise" and out["nmm_brow_mae"] == 0.0
    assert out["nmm_mouth_corr"] == 0.0 and out["nmm_mouth_mae"] > 0.01
    assert out["nmm_corr"] == pytest.approx(np.mean([1.0, 0.0, 1.0]))
    still = np.tile(o[:1], (30, 1))
    assert metrics.nmm_agreement(still, still)["nmm_corr"] is None
    assert metrics.nmm_agreement(still, still)["nmm_static"] == ",".join(metrics.NMM_SERIES)


def test_missing_meshes_are_skipped_and_too_few_frames_give_none() -> None:
    o, a = series(), series()
    a[::2] = np.nan
    out = metrics.nmm_agreement(o, a)
    assert out["nmm_frames"] == 15 and out["nmm_corr"] == pytest.approx(1.0)
    a[:-2] = np.nan
    few = metrics.nmm_agreement(o, a)
    assert few["nmm_frames"] == 1 and few["nmm_corr"] is None and few["nmm_mae"] is None
    with pytest.raises(ValueError, match=r"two \(N, 4\) feature arrays of one shape"):
        metrics.nmm_agreement(o, o[:, :3])


def hand(x: float, y: float, scale: float = 40.0, right: bool = True, seed: int = 0) -> Hand:
    pts = np.random.default_rng(seed).uniform(0, 1, (21, 3)).astype(np.float32) * scale
    pts[0, :2], pts[1, :2] = 0, scale  # its box is scale x scale: size = scale * sqrt(2)
    pts[:, :2] += (x, y)
    return Hand(pts, presence=0.99, handedness=0.9 if right else 0.1, palm_score=0.8)


def shifted(h: Hand, dx: float, dy: float = 0.0) -> Hand:
    p = h.points.copy()
    p[:, :2] += (dx, dy)
    return Hand(p, h.presence, h.handedness, h.palm_score)


def test_identical_hands_agree_perfectly() -> None:
    frames = [[hand(10, 10), hand(200, 20, right=False, seed=1)], [hand(12, 10)], []]
    out = metrics.hand_agreement(frames, [list(f) for f in frames])
    assert out == {"hand_lm_err": 0.0, "hand_lm_frames": 2, "hand_lm_recall": 1.0, "hand_presence_agree": 1.0,
                   "hand_frames_orig": 2, "hand_frames_anon": 2}


@pytest.mark.parametrize("scale", [30.0, 80.0])
def test_a_hand_shifted_by_d_pixels_raises_the_error_by_d_over_its_size(scale: float) -> None:
    h = hand(50, 60, scale)
    size = scale * np.sqrt(2)
    assert h.size == pytest.approx(size)
    errs = []
    for d in (2.0, 4.0, 8.0, 16.0):
        out = metrics.hand_agreement([[h]] * 5, [[shifted(h, d * 0.6, d * 0.8)]] * 5)
        assert out["hand_lm_err"] == pytest.approx(d / size, rel=1e-5) and out["hand_lm_frames"] == 5
        errs.append(out["hand_lm_err"])
    assert errs[1] == pytest.approx(2 * errs[0], rel=1e-5) and errs[3] == pytest.approx(8 * errs[0], rel=1e-5)


def test_hands_pair_by_handedness_and_position_not_by_order() -> None:
    left, right = hand(10, 10, right=False), hand(30, 10, seed=2)  # overlapping boxes, other sides
    out = metrics.hand_agreement([[left, right]], [[shifted(right, 1), shifted(left, 1)]])
    assert out["hand_lm_err"] == pytest.approx(1 / left.size, rel=1e-5)
    # a hand far from every original hand is another hand, not the same one moved
    far = metrics.hand_agreement([[left]], [[shifted(left, 500)]])
    assert far["hand_lm_err"] is None and far["hand_lm_frames"] == 0 and far["hand_presence_agree"] == 1.0


def test_presence_agreement_counts_frames_with_as_many_hands() -> None:
    h = hand(10, 10)
    out = metrics.hand_agreement([[h], [h], [h], []], [[h], [], [h], [h]])
    assert out["hand_presence_agree"] == 0.5 and out["hand_lm_frames"] == 2 and out["hand_lm_err"] == 0.0
    assert out["hand_frames_orig"] == 3 and out["hand_frames_anon"] == 3
    assert out["hand_lm_recall"] == pytest.approx(2 / 3)  # the output lost the hand on one of 3 hand frames
    lost = metrics.hand_agreement([[h]] * 4, [[]] * 4)
    assert lost["hand_lm_recall"] == 0.0 and lost["hand_lm_err"] is None and lost["hand_presence_agree"] == 0.0
    none = metrics.hand_agreement([], [])
    assert none["hand_presence_agree"] is None and none["hand_lm_err"] is None and none["hand_lm_recall"] is None
    with pytest.raises(ValueError, match="the hands of the same frames"):
        metrics.hand_agreement([[h]], [])


def test_series_json_round_trips_rounded_with_gaps() -> None:
    o, a = series(4), series(4, seed=3)
    a[1] = np.nan
    text = metrics.nmm_series_json([0, 5, 10, 15], o, a)
    back = parse_nmm_series(text)
    assert back["frames"] == [0, 5, 10, 15] and back["anon"]["brow_raise"][1] is None
    assert back["orig"]["mouth_open"][2] == round(float(o[2, 2]), 3)
    assert len(text) < 400 and parse_nmm_series("") is None and parse_nmm_series("[1]") is None


def test_fidelity_summary_takes_medians_over_finished_clips() -> None:
    rows = [{"status": "ok", "nmm_corr": 0.2, "hand_lm_err": 0.1, "hand_frames_orig": 3, "nmm_frames": 10},
            {"status": "leak", "nmm_corr": 0.4, "hand_lm_err": None, "hand_frames_orig": 0, "nmm_frames": 10},
            {"status": "ok", "nmm_corr": None, "nmm_static": "brow_raise,eye_open,mouth_open,mouth_width",
             "nmm_frames": 10},
            {"status": "error", "nmm_corr": 0.9}]
    s = fidelity_summary(rows)
    assert s["nmm_corr"] == pytest.approx(0.3) and s["n_nmm_corr"] == 2 and s["n_clips"] == 3
    assert s["hand_lm_err"] == pytest.approx(0.1) and s["n_hand_lm_err"] == 1
    assert s["n_static_face"] == 1 and s["n_no_hands"] == 1 and s["expr_fidelity"] is None
    json.dumps(s)


# ---- the demo's faces move, and the real mesh sees it ------------------------------------------------
def test_demo_anchors_are_where_the_mesh_puts_the_features(mesh: FaceMesh) -> None:
    for name, face in demo.demo_faces():
        f = demo._resize(face, 78)
        p = mesh.mesh([f], [[16, 16, 62, 66]])[0].points[:, :2] / 78
        a = demo.FACE_ANCHORS[name]
        assert abs(p[[63, 105, 66, 293, 334, 296], 1].mean() - a.brow_y) < 0.02, name
        assert abs(p[[159, 145, 386, 374], 1].mean() - a.eye_y) < 0.02, name
        assert abs(p[13, 1] - a.mouth_y) < 0.02 and abs(p[[13, 14], 0].mean() - a.mouth_x) < 0.02, name


def test_the_demo_face_raises_its_brows_and_moves_its_mouth(mesh: FaceMesh, clip) -> None:
    frames, boxes = clip
    f = features(mesh, frames, boxes)
    drive = np.array([demo.expression_at(START + k / demo.FPS, demo.hash_phase(
        demo.Signer("signer1", frames[0], (0, 0, 0), (0, 0, 0)))) for k in range(T)])
    assert np.ptp(drive[:, 0]) > 0.5 and np.ptp(drive[:, 1]) > 0.5  # the window holds a raise and openings
    assert f[:, 0].std() > metrics.NMM_MIN_STD and f[:, 2].std() > metrics.NMM_MIN_STD
    assert np.corrcoef(f[:, 0], drive[:, 0])[0, 1] > 0.6  # the mesh's brow raise follows the animation
    name, face = demo.demo_faces()[0]
    still = demo.Signer("signer1", face, (40, 60, 110), (200, 205, 210))
    f0 = features(mesh, np.stack([demo.render_frame(still, START + k / demo.FPS) for k in range(T)]), boxes)
    assert f[:, 0].std() > 2 * f0[:, 0].std() and f[:, 2].std() > 2 * f0[:, 2].std()


def test_identical_clip_agrees_perfectly_and_a_pixelated_face_loses_the_markers(mesh: FaceMesh, clip) -> None:
    from corpus_anon.actor.anonymize import pixelate_region
    from corpus_anon.models.facetrack import expand_box

    frames, boxes = clip
    lm = Landmarks(mesh, None)
    same, orig_lm = identity.landmark_fidelity(lm, frames, frames.copy(), boxes, None, 0)
    assert same["nmm_corr"] == 1.0 and same["nmm_mae"] == 0.0 and same["nmm_frames"] == T
    assert same["nmm_anon_score"] > 0.9 and same["landmark_frames"] == T
    assert same["hand_lm_err"] is None and "no hand model ran" in same["landmark_note"]
    pix = frames.copy()
    for t in range(T):  # what the pixelate pass does: 8 blocks over the box grown 1.5 times
        pixelate_region(pix[t], expand_box(boxes[t], 1.5, demo.W, demo.H), 8)
    lost, again = identity.landmark_fidelity(lm, frames, pix, boxes, None, 0, orig_lm)
    assert again is orig_lm  # the original was not meshed again
    print(f"pixelated: nmm_corr {lost['nmm_corr']} (brow {lost['nmm_brow_corr']}, mouth {lost['nmm_mouth_corr']}), "
          f"mae {lost['nmm_mae']}, anonymized face probability {lost['nmm_anon_score']}")
    assert lost["nmm_frames"] == T and lost["nmm_corr"] < 0.5 and lost["nmm_mae"] > 0.01
    series = parse_nmm_series(lost["nmm_series"])
    assert series["frames"] == list(range(T)) and len(series["orig"]["brow_raise"]) == T


@pytest.fixture(scope="module")
def hand_model() -> HandLandmarker:
    return HandLandmarker(installed_mediapipe_file("palm_detection_full.tflite"),
                          installed_mediapipe_file("hand_landmark_full.tflite"))


@pytest.fixture(scope="module")
def encoded_hands(tmp_path_factory, hand_model: HandLandmarker) -> tuple[np.ndarray, list]:
    """One second of the demo's third signer through its H.264 encode, and the hands MediaPipe finds.
    The demo's hand shapes (an ellipse and four bars) pass for hands: over the demo's four signers the
    palm detector finds them on 57 of 64 encoded frames (54 of 64 raw ones). Real hands (insightface's
    t1.jpg) are tested in tests/test_landmarks.py; this clip gives a moving face and hands together."""
    import av

    name, face = demo.demo_faces()[2]
    signer = demo.Signer("signer3", face, (30, 90, 60), (210, 195, 175), anchors=demo.FACE_ANCHORS[name])
    path = str(tmp_path_factory.mktemp("hands") / "clip.mp4")
    demo.write_video(path, [demo.render_frame(signer, 7.3 + k / demo.FPS) for k in range(T)])
    with av.open(path) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return frames, hand_model.detect_batch(list(frames))


def test_real_hand_landmarks_shifted_by_d_pixels_give_an_error_near_d_over_the_hand_size(hand_model,
                                                                                       encoded_hands) -> None:
    frames, hands = encoded_hands
    with_hand = sum(1 for h in hands if h)
    assert with_hand >= 6, [len(h) for h in hands]
    size = float(np.mean([h.size for hs in hands for h in hs]))
    same = metrics.hand_agreement(hands, identity.hands_at(hand_model, list(frames), hands))
    assert same["hand_lm_err"] == 0.0 and same["hand_lm_recall"] == 1.0 and same["hand_presence_agree"] == 1.0
    errs = []
    for d in (2, 4, 8):
        moved = np.roll(frames, d, axis=2)  # every pixel d to the right: the hands move d pixels
        out = metrics.hand_agreement(hands, identity.hands_at(hand_model, list(moved), hands))
        assert out["hand_lm_frames"] >= with_hand // 2
        print(f"shift {d} px: hand_lm_err {out['hand_lm_err']:.4f}, d / size {d / size:.4f}")
        assert out["hand_lm_err"] == pytest.approx(d / size, rel=0.35)
        errs.append(out["hand_lm_err"])
    assert errs[0] < errs[1] < errs[2]


def test_hands_are_looked_for_where_the_originals_were(mesh: FaceMesh, hand_model, encoded_hands) -> None:
    """The clip path with the hand model: identical clips keep every hand; a clip whose hands are
    painted over loses them (the hand network at the original's squares finds no hand there)."""
    frames, hands = encoded_hands
    boxes = np.tile([[124.0, 38.0, 196.0, 122.0]], (T, 1))
    lm = Landmarks(mesh, hand_model)
    same, orig_lm = identity.landmark_fidelity(lm, frames, frames.copy(), boxes, None, 0)
    assert same["hand_model"] == "mediapipe-hands" and same["hand_lm_err"] == 0.0 and same["hand_lm_recall"] == 1.0
    assert same["hand_frames_orig"] == sum(1 for h in orig_lm.hands if h) >= 6
    painted = frames.copy()
    for t, hs in zip(orig_lm.frames, orig_lm.hands):
        for h in hs:  # the background colour over each hand's box, grown by 4 px
            x0, y0, x1, y1 = np.round(h.box + [-4, -4, 4, 4]).astype(int).clip(0)
            painted[t, y0:y1, x0:x1] = frames[0, 0, 0]
    lost, _ = identity.landmark_fidelity(lm, frames, painted, boxes, None, 0, orig_lm)
    assert lost["hand_lm_recall"] < 0.2 and lost["hand_presence_agree"] < 0.6
    assert lost["nmm_corr"] > 0.9  # the face is (nearly) untouched


class CountingMesh:
    """The real face mesh, counting the faces it is asked to mesh."""

    def __init__(self, inner: FaceMesh) -> None:
        self.inner, self.faces = inner, 0

    def mesh(self, frames, boxes, kps=None, **kw):
        self.faces += len(frames)
        return self.inner.mesh(frames, boxes, kps, **kw)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_the_gates_measurement_of_the_original_gives_the_same_numbers_with_fewer_meshes(
        mesh: FaceMesh, hand_model, encoded_hands) -> None:
    """The gate meshes the original on every frame (boxes with the gaps filled) for the face module; the
    metrics take its rows at their frames, NaN where the track has no box, instead of meshing again."""
    from corpus_anon.actor.anonymize import pixelate_region
    from corpus_anon.actor.enhance import measure_original
    from corpus_anon.models.facetrack import expand_box

    frames, _ = encoded_hands
    boxes = np.tile([[124.0, 38.0, 196.0, 122.0]], (T, 1))
    boxes[[3, 5, 10]] = np.nan  # the detector missed the face on three frames, two of them metric frames
    counting = CountingMesh(mesh)
    lm = Landmarks(counting, hand_model, hand_space=6.0)
    gate = measure_original(lm, frames, boxes, None, hands=False)
    assert np.isfinite(gate.face[[3, 10]]).all()  # the filled boxes mesh the face where the detector missed it
    anon = frames.copy()
    for t in range(T):
        if np.isfinite(boxes[t]).all():
            pixelate_region(anon[t], expand_box(boxes[t], 1.5, anon.shape[2], anon.shape[1]), 8)
    counting.faces = 0
    again, orig_again = identity.landmark_fidelity(lm, frames, anon, boxes, None, 8)
    meshed_again = counting.faces
    counting.faces = 0
    reused, orig_reused = identity.landmark_fidelity(lm, frames, anon, boxes, None, 8, measured=gate)
    idx = identity.metric_frames(T, 8)
    with_box = int(np.isfinite(boxes[idx]).all(axis=1).sum())
    assert with_box == 6 and meshed_again == 2 * with_box and counting.faces == with_box  # the output only
    assert orig_reused.frames.tolist() == idx.tolist()
    assert np.isnan(orig_reused.face[[1, 3]]).all() and np.isnan(orig_reused.face_score[[1, 3]]).all()
    np.testing.assert_allclose(orig_reused.face, orig_again.face, atol=1e-3)
    assert [len(h) for h in orig_reused.hands] == [len(h) for h in orig_again.hands] and sum(map(len, orig_again.hands))
    assert reused["hand_model"] == "mediapipe-hands" and reused["hand_frames_orig"] == again["hand_frames_orig"] > 0
    for k, v in again.items():
        if isinstance(v, float):
            assert reused[k] == pytest.approx(v, abs=2e-4), k
        elif k != "nmm_series":
            assert reused[k] == v, k
    assert reused["nmm_frames"] == with_box and again["nmm_corr"] < 0.9
    with pytest.raises(ValueError, match="must hold every metric frame, got none for frames"):
        identity.original_at(identity.original_at(gate, boxes, [0, 1]), boxes, [0, 2])


def test_metric_frames_spread_over_the_clip_and_no_landmarks_says_why() -> None:
    assert identity.metric_frames(10, 0).tolist() == list(range(10))
    assert identity.metric_frames(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert identity.metric_frames(3, 48).tolist() == [0, 1, 2] and identity.metric_frames(0, 4).size == 0
    off = identity.no_landmarks("landmarks.enabled is false")
    assert off["nmm_corr"] is None and off["hand_lm_err"] is None and off["landmark_frames"] == 0
    assert off["landmark_note"] == "landmarks.enabled is false" and set(identity.LANDMARK_COLUMNS) <= set(off)


def test_face_analyzer_puts_the_columns_into_every_evaluation(clip) -> None:
    """The actor's path: the real detector and dlib track the animated face, the landmark columns come
    out of `evaluate` beside the older heuristics; with landmarks off they are None with the reason."""
    from corpus_anon.actor.anonymize import pixelate_region
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.facetrack import expand_box
    from corpus_anon.actor.identity import FaceAnalyzer

    pytest.importorskip("dlib")
    frames, _ = clip
    fa = FaceAnalyzer(config_from_dict({"faces": {"backend": "dlib"}, "landmarks": {"metric_frames": 8}}))
    assert fa.landmarks is not None and fa.landmarks.hands is not None
    track = fa.track(frames)
    assert track.present.all()
    pix = frames.copy()
    for t, f in enumerate(track.faces):
        pixelate_region(pix[t], expand_box(f.box, 1.5, demo.W, demo.H), 8)
    same = fa.landmark_metrics(frames, frames.copy(), track)
    assert same["landmark_frames"] == 8 and same["nmm_frames"] == 8 and same["nmm_corr"] == 1.0
    assert same["hand_model"] == "mediapipe-hands" and same["t_landmarks_s"] > 0
    short = frames[:8]  # evaluate also runs the identity, edge and flow metrics: a short clip keeps it quick
    track8 = fa.track(short)
    lost = fa.evaluate(short, pix[:8], track8, False, 0.05).metrics
    assert lost["nmm_frames"] == 8 and lost["nmm_corr"] < 0.5 and "expr_fidelity" in lost and "hand_fidelity" in lost
    assert parse_nmm_series(lost["nmm_series"])["frames"] == list(range(8))
    # the gate's measurement of the original (every frame, as for the face module) spares meshing it again
    from corpus_anon.actor.enhance import measure_original

    measured = measure_original(fa.landmarks, short, track8.boxes(), None, hands=False)
    counting = fa.landmarks.face_mesh = CountingMesh(fa.landmarks.face_mesh)
    reused = fa.evaluate(short.copy(), pix[:8], track8, False, 0.05, orig_landmarks=measured).metrics
    assert counting.faces == 8  # the anonymized faces only
    for k in identity.LANDMARK_COLUMNS:
        assert reused[k] == (pytest.approx(lost[k], abs=2e-4) if isinstance(lost[k], float) else lost[k]), k
    off = FaceAnalyzer(config_from_dict({"faces": {"backend": "dlib"}, "landmarks": {"enabled": False}}))
    assert off.landmarks is None
    m = off.landmark_metrics(frames, pix, track)
    assert m["nmm_corr"] is None and m["hand_lm_err"] is None
    assert m["landmark_note"].startswith("landmarks.enabled is false")
