"""Facial expression enhancement: tube box, crops, source frame, face mask, colour transfer, the
hand layer (hands in front of the face stay on top) and the whole paste-back with a real TPSMM at
width 0.125 and random weights on small constructed clips. With landmarks: the mesh mask measured on
real faces (t1.jpg, the astronaut) against dlib's 68 landmarks, the neutral key frame as the source
on a real face whose mouth is opened, and hands on top from hand landmarks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from corpus_anon.actor.enhance import best_source_frame, enhance_clip
from corpus_anon.actor.handlayer import hand_layer
from corpus_anon.actor.masks import face_mask, match_colour
from corpus_anon.actor.tube import crop, fill_missing_boxes, tube_box, uncrop
from corpus_anon.models.reenact import Reenactor
from corpus_anon.models.tpsmm import TPSMM

T, H, W = 8, 120, 160
BG = (40, 80, 160)  # blue: not skin
FACE = (205, 150, 125)  # skin (YCrCb Cr 157, Cb 106)
FACE_LIGHT = (235, 180, 150)  # skin, 29 grey levels brighter
HAND_A, HAND_B = (235, 180, 150), (185, 125, 100)  # skin, grey 193 and 140
ANON_FACE = (170, 110, 90)  # skin of another tone: the synthesized face
DARK = (20, 20, 40)  # eyes and mouth: not skin
FACE_BOX = (62.0, 30.0, 102.0, 80.0)
HAND = 28


def _background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bg = np.empty((H, W, 3), dtype=np.int16)
    bg[:] = BG
    bg += rng.integers(-8, 9, size=(H, W, 1), dtype=np.int16)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _ellipse(box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    return ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1


def _draw_face(img: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int],
               mouth_h: int, stripes: tuple[int, int, int] | None = None) -> None:
    inside = _ellipse(box)
    img[inside] = colour
    if stripes is not None:  # a texture fixed to the face, so it moves with the head
        cols = np.arange(W)[None, :] - int(box[0])
        img[inside & np.broadcast_to((cols % 4) < 2, (H, W))] = stripes
    x0, y0, x1, y1 = (int(v) for v in box)
    cx = (x0 + x1) // 2
    ey = y0 + (y1 - y0) * 2 // 5
    img[ey:ey + 4, cx - 12:cx - 5] = DARK
    img[ey:ey + 4, cx + 5:cx + 12] = DARK
    my = y0 + (y1 - y0) * 3 // 4
    img[my:my + mouth_h, cx - 7:cx + 7] = DARK


def _hand_origin(t: int) -> tuple[int, int]:
    return 20 + 6 * t, 74 - 3 * t


def _draw_hand(img: np.ndarray, t: int) -> np.ndarray:
    """A striped skin square moving up and right by (6, -3) px a frame; returns its footprint."""
    x0, y0 = _hand_origin(t)
    foot = np.zeros((H, W), dtype=bool)
    foot[max(y0, 0):y0 + HAND, max(x0, 0):x0 + HAND] = True
    cols = np.arange(W)[None, :] - x0
    img[foot] = HAND_A
    img[foot & np.broadcast_to((cols % 4) < 2, (H, W))] = HAND_B
    return foot


MOUTH = [2, 4, 6, 8, 6, 4, 2, 4]


def _clip(with_hand: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orig, anon, hand footprints): a static head whose mouth opens and closes; the anonymized clip
    has another, textured, expressionless face and the same hand (the diffusion output keeps hands)."""
    rng = np.random.default_rng(1)
    bg = _background()
    orig = np.empty((T, H, W, 3), dtype=np.uint8)
    anon = np.empty((T, H, W, 3), dtype=np.uint8)
    feet = np.zeros((T, H, W), dtype=bool)
    grain = rng.integers(-25, 26, size=(H, W, 1))
    for t in range(T):
        orig[t] = bg
        _draw_face(orig[t], FACE_BOX, FACE, MOUTH[t])
        a = bg.copy()
        _draw_face(a, FACE_BOX, ANON_FACE, 3)
        face = _ellipse(FACE_BOX)
        a[face] = np.clip(a[face].astype(np.int16) + grain[face], 0, 255).astype(np.uint8)
        anon[t] = a
        if with_hand:
            feet[t] = _draw_hand(orig[t], t)
            _draw_hand(anon[t], t)
    return orig, anon, feet


@pytest.fixture(scope="module")
def reenactor() -> Reenactor:
    torch.manual_seed(0)
    return Reenactor(TPSMM.build(0.125))


# --------------------------------------------------------------------------------------------
# tube box, crops
# --------------------------------------------------------------------------------------------

def test_tube_box_is_the_enlarged_union_of_valid_boxes() -> None:
    boxes = np.array([[10, 20, 30, 50], [np.nan] * 4, [14, 18, 34, 48]], dtype=float)
    # union (10, 18, 34, 50): w 24, h 32; w_inc = max(.1, (1.2*32 - 24) / 48) = .3, h_inc = .1
    # x: 10 - 7.2, 34 + 7.2; y: 18 - 3.2, 50 + 3.2 -> floor / ceil
    assert tube_box(boxes, 100, 100) == (2, 14, 42, 54)
    # wide union: the height grows instead; h_inc = max(.1, (1.2*40 - 20) / 40) = .7, w_inc = .1
    assert tube_box(np.array([[20.0, 40.0, 60.0, 60.0]]), 200, 200) == (16, 26, 64, 74)


def test_tube_box_clips_to_the_frame_and_handles_no_face() -> None:
    # square 20 px box at the corner: both increments are exactly 0.1 (no float creep to 23)
    assert tube_box(np.array([[0.0, 0.0, 20.0, 20.0]]), 100, 100) == (0, 0, 22, 22)
    # 15 x 10 box: w_inc = .1, h_inc = max(.1, (1.2*15 - 10) / 20) = .4 -> (83.5, 86, 101.5, 104), clipped
    assert tube_box(np.array([[85.0, 90.0, 100.0, 100.0]]), 100, 100) == (83, 86, 100, 100)
    assert tube_box(np.full((3, 4), np.nan), 100, 100) is None
    assert tube_box(np.array([[10.0, 10.0, 10.0, 20.0]]), 100, 100) is None  # zero width is no box


def test_crop_uncrop_round_trip_approximates_the_region() -> None:
    ys, xs = np.mgrid[0:H, 0:W]
    img = np.stack([128 + 100 * np.sin(xs / 13.0), 128 + 100 * np.cos(ys / 11.0), np.full(xs.shape, 90.0)],
                   axis=-1)
    frames = np.repeat(img[None].astype(np.uint8), 2, axis=0)
    for box in [(30, 20, 110, 100), (30, 20, 130, 70), (5, 60, 40, 118)]:
        c = crop(frames, box, 128)
        assert c.shape == (2, 3, 128, 128) and c.dtype == torch.float32
        assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0
        back = uncrop(c, box)
        x0, y0, x1, y1 = box
        region = frames[:, y0:y1, x0:x1].astype(np.float32) / 255.0
        assert back.shape == region.shape
        assert float(np.abs(back - region).mean()) < 0.01


# --------------------------------------------------------------------------------------------
# source frame, face mask, colour transfer
# --------------------------------------------------------------------------------------------

def test_best_source_frame_prefers_high_score_without_hands() -> None:
    boxes = np.array([[20, 20, 40, 40]] * 5, dtype=float)
    boxes[4] = np.nan
    scores = np.array([0.5, 0.9, 0.95, np.nan, 0.99])
    hands = np.zeros((5, 64, 64), dtype=bool)
    assert best_source_frame(boxes, scores) == 2  # frame 4 has the top score but no box
    hands[2, 30, 30] = True  # a hand on frame 2's face
    assert best_source_frame(boxes, scores, hands) == 1
    hands[:, 5, 5] = True  # far from the face: does not count
    assert best_source_frame(boxes, scores, hands) == 1
    hands[:, 25, 25] = True  # every face covered: fall back to the top score
    assert best_source_frame(boxes, scores, hands) == 2
    with pytest.raises(ValueError, match="no frame"):
        best_source_frame(np.full((3, 4), np.nan), np.ones(3))


def test_face_mask_is_soft_one_inside_zero_far_away() -> None:
    box = (32.0, 24.0, 96.0, 104.0)
    m = face_mask(box, 128)
    assert m.shape == (128, 128) and m.dtype == np.float32
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert m[64, 64] > 0.99
    assert m[0, 0] == 0 and m[0, -1] == 0 and m[-1, 0] == 0 and m[-1, -1] == 0
    assert m[64, 28] < 0.05 and m[20, 64] < 0.05  # just outside the face box
    # feathered: sigma = 0.04 * sqrt(64 * 80) ~ 2.9 px, so the steepest step is ~ 1 / (sigma sqrt(2 pi)) ~ 0.14
    steps = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
    assert steps < 0.2
    # non-square crops follow (H, W)
    assert face_mask((10, 5, 50, 45), (60, 80)).shape == (60, 80)


def _lab_stats(rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2Lab)[mask]
    return lab.mean(axis=0), lab.std(axis=0)


def test_match_colour_moves_masked_statistics_and_smoothing_reduces_flicker() -> None:
    rng = np.random.default_rng(3)
    n, s = 6, 32
    ys, xs = np.mgrid[0:s, 0:s]
    inside = (xs - 16) ** 2 + (ys - 16) ** 2 < 12 ** 2
    pred = np.clip(0.45 + 0.06 * rng.standard_normal((n, s, s, 3)), 0, 1).astype(np.float32)
    target = np.zeros((n, s, s, 3), dtype=np.float32)  # outside the mask: black, which must not count
    jitter = np.where(np.arange(n) % 2 == 0, 0.06, -0.06)
    for t in range(n):
        tex = 0.1 * rng.standard_normal((s, s, 3))
        target[t][inside] = np.clip(np.array([0.7, 0.5, 0.4]) + jitter[t] + tex, 0, 1)[inside]
    mask = inside.astype(np.float32)

    out = match_colour(pred, target, mask, smooth=0)
    assert out.shape == pred.shape and out.dtype == np.float32
    for t in range(n):
        mo, so = _lab_stats(out[t], inside)
        mt, st = _lab_stats(target[t], inside)
        np.testing.assert_allclose(mo, mt, atol=0.6)
        np.testing.assert_allclose(so, st, rtol=0.06)

    def jumps(x: np.ndarray) -> float:
        lum = np.array([_lab_stats(f, inside)[0][0] for f in x])
        return float(np.abs(np.diff(lum)).max())

    smoothed = match_colour(pred, target, mask, smooth=2)
    assert jumps(smoothed) < 0.5 * jumps(out)
    # an empty mask everywhere leaves the prediction as it is
    np.testing.assert_array_equal(match_colour(pred, target, np.zeros((s, s))), pred)


# --------------------------------------------------------------------------------------------
# hands in front of the face
# --------------------------------------------------------------------------------------------

def _in_face(box: tuple[float, float, float, float] | np.ndarray) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_layer_keeps_expressions_and_finds_the_hand_over_the_face() -> None:
    orig, _, _ = _clip(with_hand=False)
    boxes = np.tile(FACE_BOX, (T, 1))
    face = _in_face(FACE_BOX)
    layer = hand_layer(orig, boxes)
    assert not (layer & face).any(), "the mouth opening must not count as a hand"

    orig, _, feet = _clip(with_hand=True)
    layer = hand_layer(orig, boxes)
    assert layer.shape == (T, H, W) and layer.dtype == bool
    connected_only = hand_layer(orig, boxes, min_area_frac=np.inf)
    for t in (4, 5, 6, 7):
        covered = feet[t] & face
        assert covered.any()
        assert layer[t][covered].all(), f"frame {t}: hand over the face not found"
        if t < 7:  # reaches in from outside the face box: found by connection alone
            assert connected_only[t][covered].all(), f"frame {t}: hand not connected to its outside part"
    # frame 7's hand is wholly inside the enlarged face box: only its size gives it away
    assert not connected_only[7][feet[7] & face].any()
    mouth = np.zeros((H, W), dtype=bool)
    mouth[62:80, 72:92] = True  # around the mouth while the hand is still away from it
    assert not layer[:3, mouth].any()
    # once the hand's moving region touches the mouth's, the mouth counts as hand too (documented)
    assert layer[4, mouth].any()


def test_hand_layer_ignores_head_motion() -> None:
    bg = _background()
    frames = np.empty((T, H, W, 3), dtype=np.uint8)
    boxes = np.zeros((T, 4))
    for t in range(T):
        box = (50.0 + 3 * t, 30.0, 90.0 + 3 * t, 80.0)  # a head shake: box and textured face move together
        boxes[t] = box
        frames[t] = bg
        _draw_face(frames[t], box, FACE, 3, stripes=FACE_LIGHT)
    layer = hand_layer(frames, boxes)
    for t in range(T):
        assert (layer[t] & _in_face(boxes[t])).mean() < 0.02 * _in_face(boxes[t]).mean()


# A face as video shows it: drawn 4x larger and area-averaged down, so it glides by fractions of a
# pixel; textured (shading fixed to the face), drifting, growing (towards the camera), turning (its
# width breathes), talking and blinking. Its boxes are what a detector gives: on a 4 px grid (HOG
# cells), so they jump while the face glides; aligning frames by them misaligns the face by pixels.
SS = 4
N_MOVE = 12
HAND_SKIN = (235, 185, 155)  # skin, about 30 grey levels lighter than FACE


def _face_track(t: int) -> tuple[float, float, float, float, float, float]:
    """(centre x, centre y, semi-axis x, semi-axis y, mouth opening, eye opening) of the head at t."""
    s = 1.0 + 0.01 * t
    ax = 19.0 * s * (1.0 - 0.04 * np.sin(0.9 * t))
    mouth = 0.06 + 0.1 * (0.5 + 0.5 * np.sin(1.3 * t))
    return 78.0 + 0.7 * t, 56.0 + 0.35 * t, ax, 24.0 * s, mouth, 0.09 if t % 5 else 0.02


def _hand_centre(t: int) -> tuple[float, float]:
    """Palm centre: from below left of the face, up and right across it, 7 and 5 px a frame."""
    return 30.0 + 7.0 * t, 104.0 - 5.0 * t


def _render_moving(t: int, hand: bool) -> tuple[np.ndarray, np.ndarray]:
    """Frame t of the moving face (with the hand, a uniform skin palm and four fingers): the uint8
    RGB frame and the hand's footprint."""
    ys, xs = (np.mgrid[0:H * SS, 0:W * SS] + 0.5) / SS
    img = np.empty((H * SS, W * SS, 3), dtype=np.float32)
    img[:] = BG
    cx, cy, ax, ay, mouth, eye = _face_track(t)
    u, v = (xs - cx) / ax, (ys - cy) / ay
    head = u ** 2 + v ** 2 <= 1
    shade = 1.0 + 0.07 * np.sin(5.0 * u + 1.0) * np.cos(4.0 * v) + 0.05 * np.sin(11.0 * u * v)
    img[head] = np.asarray(FACE, np.float32) * shade[head, None]
    for ex in (-0.38, 0.38):
        img[((u - ex) / 0.2) ** 2 + ((v + 0.2) / eye) ** 2 <= 1] = DARK
        img[(np.abs(u - ex) < 0.22) & (np.abs(v + 0.42) < 0.04)] = DARK  # brows
    img[(u / 0.32) ** 2 + ((v - 0.48) / mouth) ** 2 <= 1] = DARK
    foot = np.zeros((H * SS, W * SS), dtype=bool)
    if hand:
        hx, hy = _hand_centre(t)
        foot = ((xs - hx) / 11) ** 2 + ((ys - hy) / 13) ** 2 <= 1
        for k in range(4):  # fingers
            foot |= (np.abs(xs - (hx - 8 + 5.3 * k)) <= 2.0) & (ys >= hy - 26 + 2 * abs(k - 1.5)) & (ys <= hy)
        img[foot] = HAND_SKIN
    small = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    covered = cv2.resize(foot.astype(np.float32), (W, H), interpolation=cv2.INTER_AREA) > 0.5
    return np.clip(np.rint(small), 0, 255).astype(np.uint8), covered


def _moving_clip(hand: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, hand footprints, detector-like boxes) of the moving face, with or without a hand
    sweeping in from outside across it (it reaches the face box at frame 4)."""
    frames = np.empty((N_MOVE, H, W, 3), dtype=np.uint8)
    feet = np.zeros((N_MOVE, H, W), dtype=bool)
    boxes = np.zeros((N_MOVE, 4))
    for t in range(N_MOVE):
        frames[t], feet[t] = _render_moving(t, hand)
        cx, cy, ax, ay, _, _ = _face_track(t)
        exact = np.array([cx - 0.85 * ax, cy - 0.8 * ay, cx + 0.85 * ax, cy + 0.9 * ay])
        boxes[t] = np.round(exact / 4) * 4
    return frames, feet, boxes


def test_hand_layer_leaves_a_moving_talking_face_alone() -> None:
    frames, _, boxes = _moving_clip(hand=False)
    assert np.abs(np.diff(boxes, axis=0)).max() >= 4  # the boxes jump while the face glides
    layer = hand_layer(frames, boxes)
    for t in range(N_MOVE):
        box = _in_face(boxes[t])
        assert layer[t][box].mean() < 0.05, f"frame {t}: the face itself taken for a hand"


def test_hand_layer_finds_a_hand_sweeping_over_a_moving_face() -> None:
    frames, feet, boxes = _moving_clip(hand=True)
    layer = hand_layer(frames, boxes)
    overlapping = 0
    for t in range(N_MOVE):
        box = _in_face(boxes[t])
        covered = feet[t] & box
        if t <= 1:  # the hand is still away, below left of the face (and in the next frame too)
            assert not (cv2.dilate(feet[t + 1].astype(np.uint8), np.ones((11, 11), np.uint8)) & box).any()
            assert layer[t][box].mean() < 0.05, f"frame {t}: the face itself taken for a hand"
        if covered.sum() >= 50:
            overlapping += 1
            assert layer[t][covered].mean() > 0.9, f"frame {t}: the hand over the face not found"
    assert overlapping >= 6


def test_face_motion_follows_the_face_not_its_boxes() -> None:
    from corpus_anon.actor.handlayer import _box_motion, _face_motion

    frames, _, boxes = _moving_clip(hand=False)
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
    worst_box = worst = 0.0
    for t in range(N_MOVE - 1):
        (cx0, cy0, ax0, ay0, _, _), (cx1, cy1, ax1, ay1, _, _) = _face_track(t), _face_track(t + 1)
        corners = np.array([[boxes[t + 1, i], boxes[t + 1, j], 1.0] for i in (0, 2) for j in (1, 3)])
        # where each corner of the face box at t + 1 came from, truly and by each estimate
        truth = np.stack([cx0 + (corners[:, 0] - cx1) * ax0 / ax1, cy0 + (corners[:, 1] - cy1) * ay0 / ay1], 1)

        def err(m: np.ndarray) -> float:
            inv = np.linalg.inv(m[:, :2])
            back = (corners[:, :2] - m[:, 2]) @ inv.T
            return float(np.abs(back - truth).max())

        worst = max(worst, err(_face_motion(gray[t], gray[t + 1], boxes[t], boxes[t + 1])))
        worst_box = max(worst_box, err(_box_motion(boxes[t], boxes[t + 1])))
    assert worst_box > 3.0  # the boxes alone misalign the face by pixels ...
    assert worst < 1.0  # ... the estimate by a fraction of one


def test_fill_missing_boxes_interpolates_and_holds() -> None:
    b = np.array([[np.nan] * 4, [0, 0, 10, 10], [np.nan] * 4, [4, 4, 14, 14], [np.nan] * 4], dtype=float)
    f = fill_missing_boxes(b)
    np.testing.assert_allclose(f, [[0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 12, 12], [4, 4, 14, 14], [4, 4, 14, 14]])
    assert np.isnan(fill_missing_boxes(np.full((2, 4), np.nan))).all()


# --------------------------------------------------------------------------------------------
# the whole module
# --------------------------------------------------------------------------------------------

def test_enhance_clip_pastes_the_face_inside_the_tube_only(reenactor: Reenactor) -> None:
    orig, anon, _ = _clip(with_hand=False)
    boxes = np.tile(FACE_BOX, (T, 1))
    boxes[3] = np.nan  # one missed detection
    scores = np.linspace(0.8, 0.9, T)
    out, info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, batch_size=3)
    assert out.shape == anon.shape and out.dtype == np.uint8
    assert info["enhanced"] is True and info["reason"] is None
    assert info["source_frame"] == T - 1 and info["source_rule"] == "score" and info["source_is_key"] is None
    assert info["mask"] == "ellipse" and info["hand_source"] == "skin-motion"  # no landmarks: the rules as before
    assert info["hand_pixels_kept"] == 0.0
    x0, y0, x1, y1 = info["tube_box"]
    assert info["tube_box"] == tube_box(boxes, W, H)
    outside = np.ones((H, W), dtype=bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[:, outside], anon[:, outside])
    # the face centre changed in every frame, the missed one included
    cy, cx = 55, 82
    diff = np.abs(out[:, cy - 8:cy + 8, cx - 8:cx + 8].astype(int) - anon[:, cy - 8:cy + 8, cx - 8:cx + 8]).mean(
        axis=(1, 2, 3))
    assert (diff > 3).all()
    # the inputs are left alone
    assert np.isnan(boxes[3]).all()


def test_enhance_clip_keeps_hands_on_top(reenactor: Reenactor) -> None:
    orig, anon, feet = _clip(with_hand=True)
    boxes = np.tile(FACE_BOX, (T, 1))
    scores = np.full(T, 0.8)
    scores[5] = 0.99  # the most confident face has a hand on it: not the source
    out, info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128)
    bare, bare_info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, hands=False)
    assert info["enhanced"] and info["source_frame"] != 5 and bare_info["source_frame"] == 5
    assert 0.0 < info["hand_pixels_kept"] < 0.5 and bare_info["hand_pixels_kept"] == 0.0
    x0, y0, x1, y1 = info["tube_box"]
    tube = np.zeros((H, W), dtype=bool)
    tube[y0:y1, x0:x1] = True
    face = _in_face(FACE_BOX)
    for t in (4, 5, 6):
        hand = feet[t] & tube
        # without the hand rule the reenacted face covers part of the hand ...
        assert (bare[t][hand] != anon[t][hand]).any(axis=-1).sum() > 20
        # ... with it, every hand pixel is the diffusion output, bit for bit
        np.testing.assert_array_equal(out[t][hand], anon[t][hand])
        # while the rest of the face still changed
        rest = face & ~cv2.dilate(feet[t].astype(np.uint8), np.ones((21, 21), np.uint8)).astype(bool)
        assert np.abs(out[t][rest].astype(int) - anon[t][rest]).mean() > 3


def test_enhance_clip_without_a_face_returns_the_input(reenactor: Reenactor) -> None:
    orig, anon, _ = _clip(with_hand=False)
    out, info = enhance_clip(orig, anon, np.full((T, 4), np.nan), np.full(T, np.nan), reenactor, size=128)
    np.testing.assert_array_equal(out, anon)
    assert out is not anon
    assert info == {"enhanced": False, "tube_box": None, "source_frame": None, "source_is_key": None,
                    "source_rule": None, "mask": None, "mesh_frames": 0.0, "hand_source": None,
                    "hand_pixels_kept": 0.0, "reason": "no valid face box"}


def test_enhance_clip_rejects_bad_inputs(reenactor: Reenactor) -> None:
    orig, anon, _ = _clip(with_hand=False)
    boxes = np.tile(FACE_BOX, (T, 1))
    with pytest.raises(ValueError, match="multiple of 128"):
        enhance_clip(orig, anon, boxes, np.ones(T), reenactor, size=96)
    with pytest.raises(ValueError, match="one shape"):
        enhance_clip(orig, anon[:-1], boxes, np.ones(T), reenactor, size=128)
    with pytest.raises(ValueError, match="boxes"):
        enhance_clip(orig, anon, boxes[:-1], np.ones(T), reenactor, size=128)


def test_module_imports_no_cv2() -> None:
    import subprocess
    import sys

    code = "import sys, corpus_anon.actor.enhance; print('cv2' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# with landmarks: the mesh mask, the neutral key frame, hands on top from hand landmarks
# --------------------------------------------------------------------------------------------

def _bench_face_mask():
    """benchmarks/face_mask.py, for its measurement of the real faces (CenterFace, dlib, the mesh)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "face_mask.py"
    spec = importlib.util.spec_from_file_location("bench_face_mask", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_faces():
    pytest.importorskip("dlib")
    pytest.importorskip("insightface")  # ships t1.jpg; found by the benchmark, never imported there
    return _bench_face_mask().measure_faces()


def _dlib_alphas(mask: np.ndarray, lm68: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mask at dlib's brow points (17-26), lower-jaw points (6-10), and 36 pixels 1.5 face widths
    (jaw point 0 to 16) from the centre of the 68 points' box, those inside the image."""
    p = lm68.astype(int)
    centre = (lm68.min(axis=0) + lm68.max(axis=0)) / 2
    width = np.linalg.norm(lm68[16] - lm68[0])
    ang = np.arange(36) * np.pi / 18
    ring = np.floor(centre + 1.5 * width * np.stack([np.cos(ang), np.sin(ang)], 1)).astype(int)
    h, w = mask.shape
    ring = ring[(ring[:, 0] >= 0) & (ring[:, 0] < w) & (ring[:, 1] >= 0) & (ring[:, 1] < h)]
    return mask[p[17:27, 1], p[17:27, 0]], mask[p[6:11, 1], p[6:11, 0]], mask[ring[:, 1], ring[:, 0]]


def test_mesh_face_mask_covers_brows_and_chin_of_real_faces_where_the_box_ellipse_did_not(real_faces) -> None:
    from corpus_anon.actor.masks import FACE_OVAL, mesh_face_mask

    images, faces = real_faces
    assert sorted(f.image for f in faces) == ["astronaut"] + ["t1"] * 6
    got: dict[tuple[str, str], list[np.ndarray]] = {(m, part): [] for m in ("mesh", "ellipse")
                                                     for part in ("brow", "lower-jaw")}
    for f in faces:
        shape = images[f.image].shape[:2]
        mesh = mesh_face_mask(f.mesh, shape)
        for name, mask in (("mesh", mesh), ("ellipse", face_mask(f.box, shape))):
            brow, jaw, _ = _dlib_alphas(mask, f.dlib68)
            got[name, "brow"].append(brow)
            got[name, "lower-jaw"].append(jaw)
        far = _dlib_alphas(mesh, f.dlib68)[2]
        assert len(far) >= 18 and far.max() <= 0.1
        # 1 on the mesh's own face oval; feathered outward, and nothing beyond a quarter of the face's
        # height (forehead 10 to chin 152) from the oval
        oval = f.mesh[list(FACE_OVAL), :2]
        assert (mesh[oval[:, 1].astype(int), oval[:, 0].astype(int)] == 1.0).all()
        hard = np.zeros(shape, np.uint8)
        cv2.fillPoly(hard, [np.rint(oval).astype(np.int32)], 1)  # mesh points: pixel centres at integers
        dist = cv2.distanceTransform(1 - hard, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        height = np.linalg.norm(f.mesh[152, :2] - f.mesh[10, :2])
        assert mesh[dist > 0.25 * height].max() == 0.0
        assert 0.0 < mesh[(dist > 0.12 * height) & (dist < 0.16 * height)].mean() < 1.0
    # each part on its own: the brows (dlib 17-26) and the lower jaw (6-10)
    for (name, part), a in got.items():
        ok = (np.concatenate(a) >= 0.9).mean()
        if name == "mesh":
            assert ok >= 0.95, f"the mesh mask has {ok:.0%} of the {part} points at alpha >= 0.9"
        else:  # the ellipse in CenterFace's box, as shipped before the mesh
            assert ok < 0.6, (f"the box ellipse has {ok:.0%} of the {part} points; the test no longer shows "
                              "the difference")
    with pytest.raises(ValueError, match="468"):
        mesh_face_mask(np.zeros((68, 2)), 64)


def test_neutral_source_frame_is_the_key_frame_nearest_the_median_expression() -> None:
    from corpus_anon.actor.enhance import neutral_source_frame

    n = 9
    keys = [0, 3, 6, 8]
    boxes = np.tile([10.0, 10.0, 50.0, 60.0], (n, 1))
    scores = np.full(n, 0.9)
    scores[3] = 0.99  # the most confident face has its mouth wide open
    feats = np.tile([0.15, 0.35, 0.07, 0.47], (n, 1))
    feats[:, 2] = [0.08, 0.07, 0.07, 0.20, 0.07, 0.075, 0.09, 0.07, 0.07]
    free = np.ones(n, dtype=bool)
    # frames 1, 2, 4 and 7 sit on the median but are propagated frames; key frame 8 does too
    assert neutral_source_frame(boxes, scores, free, feats, keys) == (8, "neutral-key")
    free[8] = False  # a hand on it
    assert neutral_source_frame(boxes, scores, free, feats, keys) == (0, "neutral-key")
    scores[0] = 0.7  # below 0.8 x the best score: not confident
    assert neutral_source_frame(boxes, scores, free, feats, keys) == (6, "neutral-key")
    # each feature counts in units of its spread: a brow 1/2 spread off beats a mouth 2 spreads off,
    # though the brow's raw difference is the larger
    f2 = np.tile([0.15, 0.35, 0.07, 0.47], (8, 1))
    f2[:, 0] += [0.0, 0.04, -0.04, 0.04, -0.04, 0.0, 0.02, 0.0]  # brow: IQR 0.08
    f2[:, 2] += [0.0, 0.0025, -0.0025, 0.0025, -0.0025, 0.0, 0.0, 0.01]  # mouth: IQR 0.005
    b2, s2, free2 = np.tile([10.0, 10.0, 50.0, 60.0], (8, 1)), np.full(8, 0.9), np.ones(8, dtype=bool)
    assert neutral_source_frame(b2, s2, free2, f2, [6, 7]) == (6, "neutral-key")
    # fallbacks: no key frame meshed -> the best key frame with a face, hand-free first ...
    nomesh = feats.copy()
    nomesh[keys] = np.nan
    scores[:] = [0.9, 0.95, 0.9, 0.99, 0.9, 0.9, 0.91, 0.9, 0.98]
    assert neutral_source_frame(boxes, scores, free, nomesh, keys) == (3, "key")
    free[3] = False
    assert neutral_source_frame(boxes, scores, free, nomesh, keys) == (6, "key")
    # ... no key frame detected -> the best frame with a face (the rule without landmarks)
    undetected = boxes.copy()
    undetected[keys] = np.nan
    assert neutral_source_frame(undetected, scores, free, feats, keys) == (1, "score")
    # boxes that carry no scores (a user's face boxes): the mesh alone makes a face confident
    assert neutral_source_frame(boxes, np.full(n, np.nan), np.ones(n, bool), feats, keys) == (8, "neutral-key")
    # without key frames every frame is a candidate
    assert neutral_source_frame(boxes, np.full(n, 0.9), np.ones(n, bool), feats, None)[0] in (1, 2, 4, 7, 8)
    with pytest.raises(ValueError, match="no frame"):
        neutral_source_frame(np.full((n, 4), np.nan), scores, free, feats, keys)
    with pytest.raises(ValueError, match=r"key_frames must be frame indices in \[0, 9\)"):
        neutral_source_frame(boxes, scores, free, feats, [0, 9])


def _open_mouth(img: np.ndarray, centre_x: float, mouth_y: float, half_w: float, chin_y: float,
                gap: float) -> np.ndarray:
    """The face with its mouth opened by ``gap`` px: below the lips' line, between the mouth corners
    (a raised cosine across), the lower lip and jaw move down (fading out below the chin) and the
    opening is the mouth's dark inside."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    across = 0.5 + 0.5 * np.cos(np.pi * np.clip(np.abs(xs - centre_x) / half_w, 0, 1))
    fade = np.clip(1 - (ys - chin_y) / (0.5 * (chin_y - mouth_y)), 0, 1)
    src_y = ys - gap * across * np.clip(ys - mouth_y, 0, 1) * fade
    out = cv2.remap(img, xs, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out[(ys >= mouth_y) & (src_y < mouth_y) & (across > 0.05)] = (70, 25, 30)
    return out


@pytest.fixture(scope="module")
def face_mesh():
    from corpus_anon.models.facemesh import FaceMesh
    from corpus_anon.models.mediapipe_common import installed_mediapipe_file

    return FaceMesh(installed_mediapipe_file("face_landmark.tflite"))


def test_enhance_clip_takes_a_neutral_key_frame_not_the_open_mouth(reenactor: Reenactor, face_mesh) -> None:
    from skimage import data

    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.enhance import measure_original
    from corpus_anon.models.detect import build_detector
    from corpus_anon.models.landmarks import Landmarks
    from corpus_anon.models.facemesh import expression_features
    from corpus_anon.models.propagate import key_indices

    still = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    detector = build_detector(config_from_dict({}))
    p = face_mesh.mesh([still], [detector.detect(still)[0].box])[0].points
    gaps = [3, 0, 0, 12, 0, 0, 2]  # frame 3, a key frame, opens the mouth wide
    shifts = [0, 1, 2, 1, 0, -1, -2]  # the head drifts by a pixel or two
    orig = np.empty((len(gaps), 256, 256, 3), np.uint8)
    for t, (gap, dx) in enumerate(zip(gaps, shifts)):
        opened = _open_mouth(still, (p[61, 0] + p[291, 0]) / 2, (p[13, 1] + p[14, 1]) / 2,
                             (p[291, 0] - p[61, 0]) / 2, p[152, 1], gap)
        orig[t] = cv2.warpAffine(opened, np.float32([[1, 0, dx], [0, 1, 0]]), (256, 256), borderMode=cv2.BORDER_REFLECT)
    found = [detector.detect(f)[0] for f in orig]
    boxes = np.array([f.box for f in found])
    kps = [f.kps for f in found]
    scores = np.full(len(orig), 0.9)
    scores[3] = 0.99
    anon = np.ascontiguousarray(orig[..., ::-1])  # another face: the channels swapped
    keys = key_indices(len(orig), 3)
    assert keys == [0, 3, 6]
    landmarks = Landmarks(face_mesh)  # no hand model: hands by the moving-skin rule
    lm = measure_original(landmarks, orig, boxes, kps)
    mouth = np.array([expression_features(lm.face[t])[2] for t in range(len(orig))])
    assert mouth[3] > 1.8 * np.median(mouth), f"the mesh does not see the open mouth: {mouth.round(3)}"

    out, info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, landmarks=landmarks,
                             key_frames=keys, kps=kps)
    assert info["enhanced"] and info["source_frame"] in (0, 6), info
    assert info["source_is_key"] is True and info["source_rule"] == "neutral-key"
    assert info["mask"] == "mesh" and info["mesh_frames"] == 1.0 and info["hand_source"] == "skin-motion"
    # the paste follows each frame's mesh: the diffusion output bit for bit where the mesh mask is 0,
    # the reenacted face where it is 1
    from corpus_anon.actor.masks import mesh_face_mask

    for t in range(len(orig)):
        m = mesh_face_mask(lm.face[t], orig.shape[1:3])
        np.testing.assert_array_equal(out[t][m == 0], anon[t][m == 0])
    assert np.abs(out[6][m == 1].astype(int) - anon[6][m == 1]).mean() > 3
    # ... including the forehead and chin that the box ellipse half-blended or left out
    beyond = (m == 1) & (face_mask(boxes[6], orig.shape[1:3]) < 0.5)
    assert beyond.sum() > 100
    assert np.abs(out[6][beyond].astype(int) - anon[6][beyond]).mean() > 3
    # the same measurement handed in gives the same result
    again, info2 = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, clip_landmarks=lm, key_frames=keys)
    np.testing.assert_array_equal(again, out)
    assert info2["source_frame"] == info["source_frame"]
    # without landmarks (and hands, whose moving-skin rule may take the opening jaw for one) the
    # source is the most confident face: the open mouth
    _, before = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, key_frames=keys, hands=False)
    assert before["source_frame"] == 3 and before["mask"] == "ellipse" and before["source_is_key"] is True


def test_brow_raise_stays_when_the_mouth_opens_or_the_eyes_blink(face_mesh) -> None:
    from skimage import data

    from corpus_anon.config import config_from_dict
    from corpus_anon.models.detect import build_detector
    from corpus_anon.models.facemesh import expression_features

    still = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    box = build_detector(config_from_dict({})).detect(still)[0].box
    p = face_mesh.mesh([still], [box])[0].points
    height = p[152, 1] - p[10, 1]
    feats = []
    for gap in (0, 4, 8, 12, 16):  # the jaw drops by up to 0.29 of the face's height
        opened = _open_mouth(still, (p[61, 0] + p[291, 0]) / 2, (p[13, 1] + p[14, 1]) / 2,
                             (p[291, 0] - p[61, 0]) / 2, p[152, 1], gap)
        feats.append(expression_features(face_mesh.mesh([opened], [box])[0].points))
    f = np.array(feats)
    assert f[2:, 2].min() > 1.8 * f[0, 2], f"the mouth does not open in the mesh: {f[:, 2].round(3)}"
    # brow raise moves less than 3 % (measured 2.8 %; over the face's height, as before, 4.9 %)
    assert np.abs(f[:, 0] / f[0, 0] - 1).max() < 0.03, f[:, 0].round(4)
    assert 16 / height > 0.25
    # a blink (the lids meet halfway) changes eye openness and nothing of the brows'
    blink = p.copy()
    for upper, lower in ((159, 145), (386, 374)):
        blink[[upper, lower], :2] = (p[upper, :2] + p[lower, :2]) / 2
    a, b = expression_features(p), expression_features(blink)
    assert b[1] < 0.01 < a[1] and a[0] == b[0]


def _square_hand(t: int) -> "Hand":
    """Hand landmarks over ``_draw_hand``'s square at frame t: the wrist at the bottom middle, the
    knuckles across the middle, the fingertips along the top edge, the thumb on the left edge."""
    from corpus_anon.models.hands import Hand

    x0, y0 = _hand_origin(t)
    e = HAND - 1
    wrist = [(x0 + e / 2, y0 + e)]
    thumb = [(x0 + e * 0.3, y0 + e * 0.8), (x0 + e * 0.15, y0 + e * 0.6), (x0 + e * 0.05, y0 + e * 0.45),
             (x0, y0 + e * 0.3)]
    fingers = []
    for k in range(4):
        x = x0 + e * (0.3 + 0.7 * k / 3)
        fingers += [(x, y0 + e * 0.5), (x, y0 + e * 0.33), (x, y0 + e * 0.16), (x, y0)]
    pts = np.array(wrist + thumb + fingers, dtype=np.float32)
    return Hand(np.hstack([pts, np.zeros((21, 1), np.float32)]), presence=0.99, handedness=0.9, palm_score=0.9)


def test_hand_model_layer_counts_hands_that_reach_the_face() -> None:
    from corpus_anon.actor.handlayer import hand_model_layer, hand_region

    boxes = np.tile(FACE_BOX, (T, 1))
    boxes[6] = np.nan
    tube = tube_box(boxes, W, H)
    layer, free = hand_model_layer([[_square_hand(t)] for t in range(T)], boxes, tube, neighbours=0)
    # the enlarged face box starts at x 58; the square's right edge, plus 0.1 of its size, is at 55.8 at t = 1
    assert free.tolist() == [True, True, False, False, False, False, True, False]
    assert not layer[[0, 1, 6]].any()
    # by default each frame also keeps its neighbours' hands: frame 6 (no box) between two hands keeps
    # both, frame 1 takes frame 2's hand, and a frame is free only when its neighbours are
    united, united_free = hand_model_layer([[_square_hand(t)] for t in range(T)], boxes, tube)
    assert united_free.tolist() == [True, False, False, False, False, False, False, False]
    for t in range(T):
        np.testing.assert_array_equal(united[t], layer[max(t - 1, 0):t + 2].any(axis=0))
    assert united[6].any() and united[1].any()
    # the hand model missing the hand on frame 4 (between two frames that have it) leaves it kept there
    missed = [[_square_hand(t)] if t != 4 else [] for t in range(T)]
    own4, _ = hand_model_layer(missed, boxes, tube, neighbours=0)
    kept4, free4 = hand_model_layer(missed, boxes, tube)
    assert not own4[4].any() and not free4[4]
    np.testing.assert_array_equal(kept4[4], layer[3] | layer[5])
    x0, y0, x1, y1 = tube
    for t in (2, 4, 7):
        square = np.zeros((H, W), bool)
        hx, hy = _hand_origin(t)
        square[hy:hy + HAND, hx:hx + HAND] = True
        hull = np.zeros((H, W), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(np.rint(_square_hand(t).points[:, :2]).astype(np.int32)), 1)
        assert layer[t][hull[y0:y1, x0:x1] > 0].all(), f"frame {t}: the landmarks' hull is not covered"
        # a square is no hand: its corners beyond the thumb and the wrist stay out, the rest is covered
        assert layer[t][square[y0:y1, x0:x1]].mean() > 0.85
    # the dilation: 0.1 of the hand's size beyond a fingertip, not 0.15; the forearm stub past the wrist
    hand = _square_hand(3)
    hull, radius = hand_region(hand)
    assert radius == pytest.approx(0.1 * hand.size)
    poly = hull.astype(np.float32).reshape(-1, 1, 2)
    tip = hand.points[20, :2]  # the little finger's tip, on the top edge: above it is outside the hull

    def signed(p: np.ndarray) -> float:
        return cv2.pointPolygonTest(poly, (float(p[0]), float(p[1])), True)

    assert -radius <= signed(tip - (0, 0.09 * hand.size)) and signed(tip - (0, 0.15 * hand.size)) < -radius
    below = hand.points[0, :2] + (0, 0.3 * (hand.points[0, 1] - hand.points[9, 1]))
    assert signed(below) > 0


def test_enhance_clip_keeps_the_hand_hull_from_hand_landmarks_bit_for_bit(reenactor: Reenactor) -> None:
    from corpus_anon.actor.handlayer import _raster_region, hand_region
    from corpus_anon.models.landmarks import ClipLandmarks

    orig, anon, _ = _clip(with_hand=True)
    boxes = np.tile(FACE_BOX, (T, 1))
    scores = np.full(T, 0.8)
    scores[5] = 0.99  # the most confident face has a hand on it: not the source
    hands = [[_square_hand(t)] for t in range(T)]
    lm = ClipLandmarks(frames=np.arange(T), face=np.full((T, 468, 3), np.nan, np.float32),
                       face_score=np.full(T, np.nan), hands=hands, hand_model="mediapipe-hands")
    out, info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, clip_landmarks=lm)
    bare, bare_info = enhance_clip(orig, anon, boxes, scores, reenactor, size=128, clip_landmarks=lm, hands=False)
    assert info["hand_source"] == "mediapipe-hands" and bare_info["hand_source"] is None
    assert info["mask"] == "ellipse" and info["mesh_frames"] == 0.0  # no mesh on the drawn face: the ellipse
    assert info["source_frame"] in (0, 1) and info["source_rule"] == "score" and bare_info["source_frame"] == 5
    assert 0.0 < info["hand_pixels_kept"] < 0.6
    x0, y0, x1, y1 = info["tube_box"]
    for t in (3, 4, 5, 6):
        hull, radius = hand_region(hands[t][0])
        region = _raster_region(hull, radius, (x0, y0), (y1 - y0, x1 - x0))
        got, was, plain = out[t, y0:y1, x0:x1], anon[t, y0:y1, x0:x1], bare[t, y0:y1, x0:x1]
        assert (plain[region] != was[region]).any(axis=-1).sum() > 20  # the face would cover the hand ...
        np.testing.assert_array_equal(got[region], was[region])  # ... the hull keeps the diffusion output
        near = cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
        face = _in_face(FACE_BOX)[y0:y1, x0:x1] & ~near
        assert np.abs(got[face].astype(int) - was[face]).mean() > 3  # while the rest of the face changed


def test_frames_without_a_mesh_take_the_nearest_mesh_moved_with_the_box() -> None:
    from corpus_anon.actor.enhance import _mesh_points_per_frame
    from corpus_anon.models.landmarks import ClipLandmarks

    rng = np.random.default_rng(0)
    mesh = np.full((4, 468, 3), np.nan, np.float32)
    mesh[1] = np.hstack([rng.uniform(20, 40, (468, 2)), np.zeros((468, 1))])
    boxes = np.array([[10, 10, 50, 50], [20, 10, 60, 50], [30, 10, 70, 50], [20, 0, 100, 80]], dtype=float)
    lm = ClipLandmarks(frames=np.arange(4), face=mesh, face_score=np.array([np.nan, 0.9, 0.2, 0.3]))
    pts, own = _mesh_points_per_frame(lm, boxes)
    assert own.tolist() == [False, True, False, False]
    np.testing.assert_allclose(pts[0], mesh[1, :, :2] - (10, 0), atol=1e-4)
    np.testing.assert_allclose(pts[2], mesh[1, :, :2] + (10, 0), atol=1e-4)
    np.testing.assert_allclose(pts[3], (mesh[1, :, :2] - (40, 30)) * 2 + (60, 40), atol=1e-4)  # twice the size
