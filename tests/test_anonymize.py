import numpy as np

from corpus_anon.anonymize import PixelateAnonymizer
from tests.media import face_frames


def test_pixelate_hides_the_face_and_keeps_the_rest():
    frames = np.stack(face_frames(12, (320, 240), face_px=96))
    anon = PixelateAnonymizer(blocks=8, box_scale=1.3)
    res = anon.anonymize(frames, {}, lambda: None)
    assert res.frames.shape == frames.shape and res.frames.dtype == np.uint8
    assert res.metrics["faces_found"] >= 1 and res.metrics["signer_detected_frac"] > 0.5
    x0, y0 = 160 - 48, 120 - 48 - 20
    face_in = frames[:, y0 + 20 : y0 + 76, x0 + 20 : x0 + 76].astype(int)
    face_out = res.frames[:, y0 + 20 : y0 + 76, x0 + 20 : x0 + 76].astype(int)
    # The face region lost its detail (mosaic cells are flat) ...
    detail = lambda a: np.abs(np.diff(a, axis=2)).mean()
    assert detail(face_out) < 0.35 * detail(face_in)
    # ... and the rest of the frame is untouched.
    assert np.array_equal(res.frames[:, :, :40], frames[:, :, :40])


def test_no_face_means_unchanged_frames():
    frames = np.stack(face_frames(6, with_face=False))
    res = PixelateAnonymizer().anonymize(frames, {}, lambda: None)
    assert res.metrics["faces_found"] == 0
    assert np.array_equal(res.frames, frames)
