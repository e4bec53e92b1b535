"""The per-clip gate with the exposure check (gate.assess_clip), on real faces from `t1.jpg`, the real
`pixelate` anonymizer and the real dlib face models."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from corpus_anon.actor.gate import FAULT_EXPOSE_ENV, assess_clip, fault_expose_frames
from tests.test_exposure import H, b_box, people, two_person_clip  # noqa: F401 - `people` is a fixture


@pytest.fixture(scope="module")
def proc():
    from corpus_anon.config import config_from_dict
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.actor.worker import ClipProcessor

    # Detection at the clip's own size (360 px), where a hand over most of B's face hides it.
    cfg = config_from_dict({"anonymizer": {"kind": "pixelate"}, "faces": {"backend": "dlib", "detect_side": H}})
    p = ClipProcessor(cfg, Storage(StorageSettings()), None)
    yield p
    p.close()


def prepared(clip_id: str, frames: np.ndarray):
    from corpus_anon.actor.worker import Deadline, Prepared

    clip = SimpleNamespace(frames=frames, src_width=frames.shape[2], src_height=frames.shape[1])
    return Prepared({"clip_id": clip_id}, 1, Deadline(time.monotonic() + 600, 600), clip=clip)


def assess(proc, clip_id: str, frames: np.ndarray):
    result = proc.anonymizer.anonymize(frames, {"clip_id": clip_id}, lambda: None)
    return assess_clip(proc, prepared(clip_id, frames), {"clip_id": clip_id}, result)


def b_untouched(orig: np.ndarray, out: np.ndarray) -> list[int]:
    """Frames on which person B's face shows in the output exactly as in the original."""
    frames = []
    for t in range(len(orig)):
        x0, y0, x1, y1 = b_box(t)
        diff = np.abs(orig[t, y0:y1, x0:x1].astype(int) - out[t, y0:y1, x0:x1].astype(int)).mean()
        if diff < 2.0:
            frames.append(t)
    return frames


def test_occluded_second_person_is_never_released_visible(proc, people):
    """B is behind a hand on frames 8-11 (the detector misses B there): whatever pixelate does with
    that, the result is either B hidden on every frame or a `leak` clip, never an `ok` clip with B."""
    occluded = {8, 9, 10, 11}
    orig = two_person_clip(people, n=20, occluded=occluded, hand=(0.1, 0.7))
    found = proc.faces.detect_all(orig)
    assert [t for t in range(20) if len(found[t]) < 2] == sorted(occluded)  # the detector misses B there
    result, metrics, status, _ = assess(proc, "occluded", orig)
    shown = b_untouched(orig, result.frames)
    assert status == "leak" or not shown, (status, shown)
    assert metrics["faces_tracked"] >= 2 and metrics["exposure_covered"] is True
    assert (metrics["exposed_frames"] > 0) == (status == "leak")
    assert metrics["frames_checked"] >= 20 // 5 + len(occluded)  # every missed frame is checked


def test_second_person_left_visible_makes_the_clip_leak(proc, people):
    """pixelate's output with the bystander's original pixels back on frames 3-6 (an anonymizer that
    missed B there): `leak`, all four frames counted, the run of them too, although the signer's own
    identity metrics (A, well hidden) see nothing."""
    orig = two_person_clip(people, n=20)
    result = proc.anonymizer.anonymize(orig, {"clip_id": "bystander"}, lambda: None)
    assert not b_untouched(orig, result.frames)
    for t in range(3, 7):
        x0, y0, x1, y1 = b_box(t)
        result.frames[t, y0 - 30 : y1 + 30, x0 - 30 : x1 + 30] = orig[t, y0 - 30 : y1 + 30, x0 - 30 : x1 + 30]
    _, metrics, status, _ = assess_clip(proc, prepared("bystander", orig), {"clip_id": "bystander"}, result)
    assert status == "leak" and metrics["leak"] is True
    assert metrics["exposed_frames"] == 4 and metrics["max_exposed_run"] == 4
    assert metrics["id_match_rate"] == 0.0 and metrics["id_mean_same"] is False  # the signer-only gate passes
    assert metrics["id_worst"] < 0.1 and metrics["id_worst_signer"] > 0.6


def test_signer_forced_unpixelated_on_three_frames_is_leak(proc, people, monkeypatch):
    orig = two_person_clip(people, n=20)
    _, clean, clean_status, _ = assess(proc, "signer", orig)
    assert clean_status == "ok" and clean["exposed_frames"] == 0 and clean["leak"] is False
    assert clean["id_worst"] > 0.6 and clean["id_worst_signer"] >= clean["id_worst"]
    monkeypatch.setenv(FAULT_EXPOSE_ENV, "signer:5,6,7")
    result, metrics, status, _ = assess(proc, "signer", orig)
    # Exactly the three frames: their neighbours 4 and 8 were checked too, and are hidden.
    assert status == "leak" and metrics["exposed_frames"] == 3 and metrics["max_exposed_run"] == 3
    assert np.array_equal(result.frames[5:8], orig[5:8])  # what would have been published
    # The signer-only metrics sample 16 of 20 frames: they may or may not see three frames;
    # the exposure check always does.
    for col in ("faces_tracked", "frames_checked", "exposed_frames", "max_exposed_run", "exposure_covered",
                "id_worst", "id_worst_signer", "t_exposure_s"):
        assert col in metrics


def test_fault_hook_is_inert_unless_set(monkeypatch):
    monkeypatch.delenv(FAULT_EXPOSE_ENV, raising=False)
    assert fault_expose_frames("c", 10) == []
    monkeypatch.setenv(FAULT_EXPOSE_ENV, "a:1,2,99; c:0,3,3,12")
    assert fault_expose_frames("c", 10) == [0, 3] and fault_expose_frames("a", 10) == [1, 2]
    assert fault_expose_frames("b", 10) == []


def test_a_diffslva_clip_gets_the_mesh_module_and_its_original_is_measured_once_across_reseeds(
        tmp_path, monkeypatch):
    """The gate wiring on the tiny profile: the face module runs with the landmark models (mesh mask,
    hands by the hand model, the neutral-key rule's column), a leaking clip is re-seeded, and the
    original's landmarks are measured once for every attempt, without dlib's keypoints."""
    import corpus_anon.actor.enhance as enhance
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.tiny import make_tiny
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.actor.worker import ClipProcessor
    from tests.media import face_frames

    make_tiny(tmp_path / "store")
    cfg = config_from_dict({
        "anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
        "models": {"profile": "tiny", "store": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "faces": {"backend": "dlib", "enhance": True, "enhance_size": 128},
        "gate": {"max_reseeds": 1},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
    })
    measured = []
    real = enhance.measure_original

    def counted(landmarks, orig, boxes, kps=None, hands=True, check=None):
        measured.append(kps)
        return real(landmarks, orig, boxes, kps, hands=hands, check=check)

    monkeypatch.setattr(enhance, "measure_original", counted)
    # frame 2 shows the original face again in every attempt: the exposure check leaks each one
    monkeypatch.setenv(FAULT_EXPOSE_ENV, "wired:2")
    frames = np.stack(face_frames(4, (256, 192), 96))
    p = ClipProcessor(cfg, Storage(StorageSettings.from_config(cfg, None)), None)
    try:
        assert p.faces.landmarks is not None and p.faces.landmarks.hands is not None
        ctx = {"clip_id": "wired", "seed": 3, "base_seed": 3, "prompt": "a person", "fps": 6.0}
        result = p.anonymizer.anonymize(frames, ctx, lambda: None)
        result, metrics, status, _ = assess_clip(p, prepared("wired", frames), ctx, result)
    finally:
        p.close()
    assert status == "leak" and metrics["seed_attempt"] == 1 and metrics["exposed_frames"] >= 1
    assert measured == [None]  # once for both attempts; dlib's keypoints are not the mesh's
    m = result.metrics
    assert m["enhanced"] is True and m["enhance_mask"] == "mesh" and m["enhance_hands"] == "mediapipe-hands"
    assert m["enhance_source_rule"] in ("neutral-key", "key", "score") and m["enhance_source_frame"] is not None
