import numpy as np

from corpus_anon.models.facetrack import build_tracks, expand_box, fill_boxes, signer_track, smooth_boxes


def test_tracks_and_signer_rule():
    W, H = 640, 480
    dets = []
    for t in range(20):
        boxes = [[290 + t, 150, 370 + t, 230]]  # the signer: large, central, every frame
        if t < 10:
            boxes.append([10, 10, 60, 60])  # a bystander at the corner
        if t % 2 == 0:
            boxes.append([500, 300, 620, 420])  # a large face at the edge, half the frames
        dets.append(np.array(boxes, float))
    tracks = build_tracks(dets)
    assert len(tracks) == 3
    s = signer_track(tracks, W, H)
    assert tracks[s].boxes[0][0] == 290 and len(tracks[s].frames) == 20
    assert signer_track([], W, H) is None


def test_fill_holds_and_interpolates():
    from corpus_anon.models.facetrack import Track

    tr = Track([2, 6], [np.array([0, 0, 10, 10.]), np.array([4, 0, 14, 10.])])
    full = fill_boxes(tr, 10)
    assert np.allclose(full[0], [0, 0, 10, 10]) and np.allclose(full[9], [4, 0, 14, 10])
    assert np.allclose(full[4], [2, 0, 12, 10])
    held = fill_boxes(tr, 10, hold=1)
    assert np.isnan(held[0, 0]) and not np.isnan(held[1, 0]) and np.isnan(held[8, 0])
    sm = smooth_boxes(held, 3)
    assert np.isnan(sm[0, 0]) and np.allclose(sm[4], [2, 0, 12, 10])
    assert expand_box(np.array([10, 10, 20, 20.]), 2.0, 22, 100) == (5, 5, 22, 25)


def test_cover_holds_every_track_over_its_span_and_hold_frames_beyond():
    from corpus_anon.models.facetrack import Track, cover_boxes

    n = 40
    gappy = Track([10, 25], [np.array([0, 0, 10, 10.]), np.array([30, 0, 40, 10.])])  # missed on 11-24
    single = Track([30], [np.array([100, 100, 120, 120.])])  # seen on one frame only
    signer = Track([5, 6], [np.array([50, 50, 90, 90.])] * 2)
    a, b, c = cover_boxes([gappy, single, signer], n, hold=3, whole=2)
    assert list(np.flatnonzero(~np.isnan(a[:, 0]))) == list(range(7, 29))  # span 10-25, +-3
    assert np.allclose(a[17], [14, 0, 24, 10])  # interpolated across the gap (smoothing keeps a line)
    assert list(np.flatnonzero(~np.isnan(b[:, 0]))) == list(range(27, 34))  # a single detection is kept
    assert not np.isnan(c[:, 0]).any()  # the signer: the whole clip
