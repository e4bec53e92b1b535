"""corpus_anon.actor.metrics: identity, leak gate, expression/hand fidelity, warp error, corpus re-identification."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from corpus_anon.actor import metrics as M
from corpus_anon.run.summaries import leave_one_out_reid
from corpus_anon.models import faces

COS_T = faces.INSIGHTFACE_THRESHOLD
EUC_T = faces.DLIB_THRESHOLD


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def texture(h: int, w: int, seed: int, cell: int = 4) -> np.ndarray:
    """Smooth random colour texture, uint8 (H, W, 3), blobs of about ``cell`` px (good for flow)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    big = cv2.resize(base, (base.shape[1] * cell, base.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
    return np.clip(big[:h, :w], 0, 255).round().astype(np.uint8)


# --- import hygiene ---------------------------------------------------------------------------


def test_metrics_module_imports_no_torch_or_cv2() -> None:
    code = ("import sys, corpus_anon.actor.metrics\n"
            "print(','.join(m for m in ('torch', 'cv2', 'corpus_anon.models.flow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- per-clip identity ------------------------------------------------------------------------


def test_face_fraction() -> None:
    assert M.face_fraction(np.array([True, False, True, True])) == 0.75
    assert M.face_fraction(np.zeros(0, dtype=bool)) == 0.0


def test_identical_embeddings_score_best_and_leak_cosine() -> None:
    e = unit_rows(np.random.default_rng(0).normal(size=(12, 512)))
    ident = M.identity_metrics(e, e.copy(), "cosine", COS_T)
    assert ident["id_orig_anon"] == pytest.approx(1.0)
    assert ident["id_worst"] == pytest.approx(1.0)
    assert ident["id_mean_score"] == pytest.approx(1.0)
    assert ident["id_match_rate"] == 1.0 and ident["id_mean_same"] is True
    assert ident["id_score_kind"] == "cosine" and ident["id_n_faces"] == 12
    assert M.leaks(ident)


def test_identical_embeddings_score_best_and_leak_euclidean() -> None:
    e = np.random.default_rng(1).normal(scale=0.1, size=(8, 128))
    ident = M.identity_metrics(e, e.copy(), "euclidean", EUC_T)
    assert ident["id_orig_anon"] == pytest.approx(0.0, abs=1e-12)
    assert ident["id_worst"] == pytest.approx(0.0, abs=1e-12)
    assert ident["id_match_rate"] == 1.0 and ident["id_mean_same"] is True
    assert M.leaks(ident)


def test_unrelated_embeddings_are_near_chance_and_do_not_leak_cosine() -> None:
    rng = np.random.default_rng(2)
    orig, anon = rng.normal(size=(40, 512)), rng.normal(size=(40, 512))
    ident = M.identity_metrics(orig, anon, "cosine", COS_T)
    # Random 512-d directions: cosine ~ N(0, 1/512), so |mean| and even the max stay far below tau.
    assert abs(ident["id_orig_anon"]) < 0.03
    assert 0.0 < ident["id_worst"] < 0.25
    assert abs(ident["id_mean_score"]) < 0.2
    assert ident["id_match_rate"] == 0.0 and ident["id_mean_same"] is False
    assert not M.leaks(ident)


def test_euclidean_scores_at_known_distances() -> None:
    rng = np.random.default_rng(3)
    orig = rng.normal(scale=0.1, size=(10, 128))
    u = unit_rows(rng.normal(size=128))
    far = M.identity_metrics(orig, orig + 1.0 * u, "euclidean", EUC_T)
    assert far["id_orig_anon"] == pytest.approx(1.0) and far["id_worst"] == pytest.approx(1.0)
    assert far["id_mean_score"] == pytest.approx(1.0)
    assert far["id_match_rate"] == 0.0 and far["id_mean_same"] is False and not M.leaks(far)
    # Half the frames at 0.3 (< 0.6: same person), half at 1.0: worst = the closest pair.
    d = np.where(np.arange(10) < 5, 0.3, 1.0)[:, None]
    mixed = M.identity_metrics(orig, orig + d * u, "euclidean", EUC_T)
    assert mixed["id_orig_anon"] == pytest.approx(0.65)
    assert mixed["id_worst"] == pytest.approx(0.3)
    assert mixed["id_match_rate"] == 0.5
    assert mixed["id_mean_score"] == pytest.approx(0.65) and mixed["id_mean_same"] is False
    assert M.leaks(mixed)  # 50 % of the frames re-identify the signer


@pytest.mark.parametrize("kind", ["cosine", "euclidean"])
def test_mean_embedding_catches_what_single_frames_hide(kind: str) -> None:
    """Per-frame noise around the original face: no single frame matches, but the noise averages
    out over the clip and the mean anonymized face is the signer's."""
    rng = np.random.default_rng(13)
    t, d = 60, 128
    orig = np.tile(rng.normal(scale=0.1, size=d), (t, 1))
    noise = unit_rows(rng.normal(size=(t, d)))
    if kind == "cosine":
        orig = unit_rows(orig)
        anon = orig + 2.0 * noise  # per frame cos ~ 1 / sqrt(5) = 0.45 < 0.6; the means ~ 0.97
        threshold = 0.6
    else:
        anon = orig + 1.0 * noise  # every frame exactly 1.0 away; the mean ~ 1 / sqrt(60) = 0.13
        threshold = EUC_T
    ident = M.identity_metrics(orig, anon, kind, threshold)
    assert ident["id_match_rate"] == 0.0
    assert ident["id_mean_same"] is True
    assert M.leaks(ident)


def test_id_orig_orig_splits_the_frames_with_a_face_in_half() -> None:
    u, w = np.eye(64)[0], 0.3 * np.eye(64)[0] + np.sqrt(1 - 0.09) * np.eye(64)[1]  # cos(u, w) = 0.3
    orig = np.full((10, 64), np.nan)
    orig[0:3], orig[3:6] = u, w  # faces at frames 0-5 only: halves are frames 0-2 and 3-5
    ident = M.identity_metrics(orig, orig.copy(), "cosine", COS_T)
    assert ident["id_orig_orig"] == pytest.approx(0.3)  # splitting all 10 frames would mix u into the 2nd half
    one = np.full((5, 64), np.nan)
    one[2] = u
    assert M.identity_metrics(one, one.copy(), "cosine", COS_T)["id_orig_orig"] is None


def test_frames_without_an_original_face_are_ignored() -> None:
    rng = np.random.default_rng(4)
    orig = unit_rows(rng.normal(size=(10, 128)))
    orig[[1, 4, 7]] = np.nan
    anon = orig.copy()
    anon[[1, 4, 7]] = rng.normal(size=(3, 128))  # whatever is there where the original has no face
    ident = M.identity_metrics(orig, anon, "cosine", COS_T)
    assert ident["id_n_faces"] == 7
    assert ident["id_match_rate"] == 1.0 and ident["id_orig_anon"] == pytest.approx(1.0)
    assert all(np.isfinite(v) for k, v in ident.items() if isinstance(v, float))
    anon[0] = np.nan  # the original has a face there: the anonymized frame must be embedded too
    with pytest.raises(ValueError, match="anon_at_orig"):
        M.identity_metrics(orig, anon, "cosine", COS_T)


def test_no_face_in_the_original_is_empty_and_not_a_leak() -> None:
    nan = np.full((6, 32), np.nan)
    ident = M.identity_metrics(nan, nan.copy(), "euclidean", EUC_T)
    assert ident == {"id_orig_orig": None, "id_orig_anon": None, "id_worst": None, "id_match_rate": 0.0,
                     "id_mean_score": None, "id_mean_same": False, "id_n_faces": 0, "id_score_kind": "euclidean"}
    assert not M.leaks(ident)
    with pytest.raises(ValueError, match="score kind"):
        M.identity_metrics(nan, nan, "manhattan", 1.0)


def test_leak_rules() -> None:
    base = {"id_orig_anon": 0.1, "id_mean_same": False, "id_match_rate": 0.0, "id_n_faces": 20}
    assert not M.leaks(base)
    assert M.leaks({**base, "id_mean_same": True})
    assert not M.leaks({**base, "id_match_rate": 0.05})  # at the limit: not above it
    assert M.leaks({**base, "id_match_rate": 0.06})
    assert not M.leaks({**base, "id_match_rate": 0.06}, max_match_rate=0.1)
    assert not M.leaks({**base, "id_orig_anon": None, "id_n_faces": 0, "id_match_rate": 0.0})


# --- expression fidelity ----------------------------------------------------------------------


def to_pixels(u: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Box-relative landmarks (T, 68, 2) → pixels in boxes (T, 4)."""
    return boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])


def test_expr_fidelity_identical_correlated_and_unrelated() -> None:
    rng = np.random.default_rng(5)
    t = 600
    boxes = np.tile([10.0, 20.0, 110.0, 140.0], (t, 1))
    u = 0.5 + rng.normal(scale=0.02, size=(t, 68, 2))
    orig = to_pixels(u, boxes)
    assert M.expr_fidelity(orig, orig.copy(), boxes) == pytest.approx(1.0)
    # anon = orig + independent noise of the same variance: r = s / sqrt(s^2 + s^2) = 1/sqrt(2).
    noisy = to_pixels(u + rng.normal(scale=0.02, size=u.shape), boxes)
    assert M.expr_fidelity(orig, noisy, boxes) == pytest.approx(1 / np.sqrt(2), abs=0.02)
    other = to_pixels(0.5 + rng.normal(scale=0.02, size=u.shape), boxes)
    assert abs(M.expr_fidelity(orig, other, boxes)) < 0.03


def test_expr_fidelity_normalises_by_the_face_box() -> None:
    rng = np.random.default_rng(6)
    t = 300
    # The head moves and scales a lot; the expressions of the two clips are unrelated.
    x0 = np.cumsum(rng.normal(scale=5, size=t)) + 200
    size = 100 + 20 * np.sin(np.arange(t) / 10)
    boxes = np.stack([x0, x0 / 2, x0 + size, x0 / 2 + 1.2 * size], axis=1)
    orig = to_pixels(0.5 + rng.normal(scale=0.02, size=(t, 68, 2)), boxes)
    anon = to_pixels(0.5 + rng.normal(scale=0.02, size=(t, 68, 2)), boxes)
    raw = np.corrcoef(orig[:, 30, 0], anon[:, 30, 0])[0, 1]
    assert raw > 0.9  # in pixels, head motion alone would look like perfect expression transfer
    assert abs(M.expr_fidelity(orig, anon, boxes)) < 0.05


def test_expr_fidelity_reads_brows_eyes_and_mouth_only() -> None:
    rng = np.random.default_rng(14)
    t = 200
    boxes = np.tile([0.0, 0.0, 100.0, 100.0], (t, 1))
    u = 0.5 + rng.normal(scale=0.02, size=(t, 68, 2))
    v = u.copy()
    other = np.r_[0:17, 27:36]  # jaw line and nose: identity-bearing shape, not grammar
    v[:, other] = 0.5 + rng.normal(scale=0.02, size=(t, other.size, 2))
    assert M.expr_fidelity(to_pixels(u, boxes), to_pixels(v, boxes), boxes) == pytest.approx(1.0)


def test_expr_fidelity_skips_missing_frames_and_constant_trajectories() -> None:
    rng = np.random.default_rng(7)
    t = 200
    boxes = np.tile([0.0, 0.0, 100.0, 100.0], (t, 1))
    u = 0.5 + rng.normal(scale=0.02, size=(t, 68, 2))
    orig, anon = to_pixels(u, boxes), to_pixels(u, boxes)
    anon[:, 20:26] = 50.0  # frozen brow in the anonymized clip: r undefined, skipped
    anon[::7] = np.nan  # no landmarks on some anonymized frames
    boxes_missing = boxes.copy()
    boxes_missing[3] = np.nan
    assert M.expr_fidelity(orig, anon, boxes_missing) == pytest.approx(1.0)
    assert M.expr_fidelity(np.full_like(orig, 5.0), anon, boxes) is None  # everything constant
    assert M.expr_fidelity(orig[:2], anon[:2], boxes[:2]) is None  # too few frames


# --- hands -------------------------------------------------------------------------------------

SKIN = (224, 172, 140)  # Cr ~157, Cb ~103: inside the skin box
BLUE = (40, 60, 200)
GRAY = (100, 100, 100)


def scene(t_len: int = 5, h: int = 96, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Gray background; a face box with a moving skin blob inside, a static skin blob, a moving
    skin blob (the hand) and a moving blue blob outside it."""
    frames = np.empty((t_len, h, w, 3), dtype=np.uint8)
    for t in range(t_len):
        f = frames[t]
        f[:] = GRAY
        cv2.rectangle(f, (24 + 2 * t, 24), (34 + 2 * t, 34), SKIN, -1)  # inside the face box
        cv2.rectangle(f, (46, 22 + 2 * t), (47, 30 + 2 * t), SKIN, -1)  # in the 20 % margin only
        cv2.rectangle(f, (70, 8), (85, 22), SKIN, -1)  # static skin
        cv2.rectangle(f, (55 + 3 * t, 60), (70 + 3 * t, 75), SKIN, -1)  # moving hand
        cv2.rectangle(f, (5 + 3 * t, 70), (20 + 3 * t, 85), BLUE, -1)  # moving, not skin
    boxes = np.tile([20.0, 20.0, 45.0, 45.0], (t_len, 1))
    return frames, boxes


def test_hand_mask_finds_moving_skin_outside_the_face_only() -> None:
    frames, boxes = scene()
    mask = M.hand_mask(frames, boxes)
    assert mask.shape == frames.shape[:3] and mask.dtype == bool
    t = 2
    hand = mask[t, 60:76, 55 + 3 * t:71 + 3 * t]
    assert hand.sum() > 30  # the moving hand's outline region
    assert not mask[:, 5:27, 66:90].any()  # static skin
    assert not mask[:, 17:49, 17:49].any()  # face box enlarged by 20 % (17.5..47.5)
    assert not mask[:, 65:90, :40].any()  # the moving blue blob
    # Without a face box, the skin moving inside it is found: the exclusion is what removes it.
    no_face = M.hand_mask(frames, np.full_like(boxes, np.nan))
    assert no_face[t, 24:35, 24:40].any()
    assert M.hand_mask(frames[:1], boxes[:1]).sum() == 0  # one frame: no motion


def hand_frames(t_len: int = 3, h: int = 64, w: int = 64) -> np.ndarray:
    frames = np.zeros((t_len, h, w, 3), dtype=np.uint8)
    for t in range(t_len):
        cv2.rectangle(frames[t], (12 + t, 14), (30 + t, 40), (255, 255, 255), -1)
        cv2.circle(frames[t], (45, 30 + t), 8, (200, 200, 200), -1)
        cv2.line(frames[t], (10, 52), (54, 50 - t), (180, 180, 180), 2)
    return frames


def test_hand_fidelity_identical_shifted_and_empty() -> None:
    orig = hand_frames()
    mask = np.zeros(orig.shape[:3], dtype=bool)
    mask[:, 4:60, 4:60] = True
    assert M.hand_fidelity(orig, orig.copy(), mask) == pytest.approx(1.0)
    near = np.roll(orig, 1, axis=2)  # 1 px: within the 2 px tolerance
    assert M.hand_fidelity(orig, near, mask) > 0.95
    far = np.roll(orig, 6, axis=2)  # 6 px: vertical edges no longer match
    f_far = M.hand_fidelity(orig, far, mask)
    assert f_far < 0.7
    assert M.hand_fidelity(orig, far, mask, tol_px=7) > 0.95
    # Changes outside the mask do not count.
    outside = orig.copy()
    outside[:, :, 61:] = 255 - outside[:, :, 61:]
    outside[:, 0:3] = 255
    assert M.hand_fidelity(orig, outside, mask) == pytest.approx(1.0)
    # No edges inside the mask (flat frames, or an empty mask): nothing to measure.
    flat = np.full_like(orig, 90)
    assert M.hand_fidelity(flat, flat.copy(), mask) is None
    assert M.hand_fidelity(orig, far, np.zeros_like(mask)) is None
    # The anonymized hands vanished: nothing recalled.
    assert M.hand_fidelity(orig, flat, mask) == 0.0


# --- temporal stability ----------------------------------------------------------------------


def translating(t_len: int, size: int = 64, step: int = 2, seed: int = 8) -> np.ndarray:
    big = texture(size + step * t_len + 8, size + 8, seed)
    return np.stack([big[step * t:step * t + size, 4:4 + size] for t in range(t_len)])


def test_warp_error_is_one_for_a_copy_and_above_for_flicker() -> None:
    orig = translating(6)
    assert M.warp_error(orig, orig.copy()) == pytest.approx(1.0, abs=1e-9)
    rng = np.random.default_rng(9)
    flicker = np.clip(orig + rng.normal(scale=8, size=orig.shape), 0, 255).astype(np.uint8)
    assert M.warp_error(orig, flicker) > 1.5
    # A constant anonymized clip is perfectly stable under the original's motion.
    assert M.warp_error(orig, np.full_like(orig, 77)) == pytest.approx(0.0, abs=1e-4)


def test_warp_error_undefined_cases_and_subsampling(monkeypatch: pytest.MonkeyPatch) -> None:
    orig = translating(12)
    assert M.warp_error(orig[:1], orig[:1]) is None
    flat = np.full((4, 64, 64, 3), 120, dtype=np.uint8)
    assert M.warp_error(flat, texture(64, 64, 3)[None].repeat(4, 0)) is None  # source error 0
    from corpus_anon.models import flow

    calls: list[int] = []
    real = flow.flow_pair

    def counting(cur: np.ndarray, ref: np.ndarray, *a: object, **k: object) -> flow.FlowPair:
        calls.append(1)
        return real(cur, ref, *a, **k)

    monkeypatch.setattr(flow, "flow_pair", counting)
    assert M.warp_error(orig, orig, max_pairs=3) == pytest.approx(1.0)
    assert len(calls) == 3


# --- corpus-level re-identification ---------------------------------------------------------


def corpus(rng: np.random.Generator, n_signers: int = 4, n_clips: int = 3, dim: int = 128,
           noise: float = 0.3) -> list[dict]:
    """Signer-specific unit directions + noise (cosine), anonymized embeddings random."""
    dirs = unit_rows(rng.normal(size=(n_signers, dim)))
    items = []
    for s in range(n_signers):
        for c in range(n_clips):
            o = dirs[s] + noise * unit_rows(rng.normal(size=dim))
            items.append({"clip_id": f"s{s}c{c}", "signer_id": f"s{s}", "orig": o,
                          "anon": unit_rows(rng.normal(size=dim))})
    return items


def test_reid_recognises_originals_and_not_random_anonymizations() -> None:
    items = corpus(np.random.default_rng(10))
    summary, flags = leave_one_out_reid(items, "cosine", COS_T)
    assert summary["n_tested"] == 12 and summary["n_left_out"] == 0 and summary["n_no_face"] == 0
    assert summary["reid_top1_originals"] == 1.0
    assert summary["reid_chance"] == pytest.approx(0.25)
    assert summary["reid_top1"] <= 0.5
    assert set(flags) == {it["clip_id"] for it in items} and not any(flags.values())
    for s in range(4):
        ps = summary["per_signer"][f"s{s}"]
        assert ps["n_clips"] == 3 and ps["id_orig_orig_xclip"] > 0.8 and abs(ps["id_orig_anon"]) < 0.3


def test_reid_flags_a_leaky_clip_and_leaves_out_single_clip_signers() -> None:
    rng = np.random.default_rng(11)
    items = corpus(rng)
    items[4]["anon"] = items[4]["orig"].copy()  # s1c1 was not anonymized at all
    lone = unit_rows(rng.normal(size=128))
    items.append({"clip_id": "lone", "signer_id": "s9", "orig": lone, "anon": lone.copy()})
    items.append({"clip_id": "noface", "signer_id": "s0", "orig": None, "anon": None})
    summary, flags = leave_one_out_reid(items, "cosine", COS_T)
    assert flags["s1c1"] is True
    assert sum(flags.values()) == 1  # the lone signer's leak has no gallery here (the per-clip gate has it)
    assert flags["lone"] is False and flags["noface"] is False
    assert summary["n_tested"] == 12 and summary["n_left_out"] == 1 and summary["n_no_face"] == 1
    assert summary["reid_chance"] == pytest.approx(1 / 5)  # the lone signer still serves as a distractor
    assert summary["per_signer"]["s9"] == {"id_orig_orig_xclip": None, "id_orig_anon": pytest.approx(1.0),
                                           "n_clips": 1}
    assert summary["per_signer"]["s0"]["n_clips"] == 3


def test_reid_euclidean() -> None:
    rng = np.random.default_rng(12)
    centres = rng.normal(scale=0.1, size=(4, 128))  # pairwise ~1.6 apart
    items = []
    for s in range(4):
        for c in range(3):
            items.append({"clip_id": f"{s}-{c}", "signer_id": s,
                          "orig": centres[s] + rng.normal(scale=0.02, size=128),
                          "anon": rng.normal(scale=0.1, size=128)})
    items[0]["anon"] = items[0]["orig"] + 0.01  # 0.11 away
    summary, flags = leave_one_out_reid(items, "euclidean", EUC_T)
    assert summary["reid_top1_originals"] == 1.0 and summary["reid_top1"] <= 0.5
    assert [k for k, v in flags.items() if v] == ["0-0"]
    assert summary["per_signer"][1]["id_orig_orig_xclip"] < 0.4


def test_reid_query_is_never_in_its_own_gallery() -> None:
    e = np.eye(16)
    # Signer a: clip a1 sits nearly alone on its own axis, leaning slightly towards signer b, and its
    # "anonymization" is a copy. In a gallery that included a1 itself, signer a would score
    # cos(a1, mean(a1, e1, e1)) = 1/sqrt(5) = 0.447 >= 0.4, win and be flagged; left out, signer a
    # scores 0 and signer b (0.0995) wins, below the threshold.
    a1 = unit_rows(e[0] + 0.1 * e[2])
    items = [{"clip_id": "a1", "signer_id": "a", "orig": a1, "anon": a1.copy()},
             {"clip_id": "a2", "signer_id": "a", "orig": e[1], "anon": e[5]},
             {"clip_id": "a3", "signer_id": "a", "orig": e[1], "anon": e[6]},
             {"clip_id": "b1", "signer_id": "b", "orig": e[2], "anon": e[7]},
             {"clip_id": "b2", "signer_id": "b", "orig": e[2], "anon": e[8]},
             {"clip_id": "c1", "signer_id": "c", "orig": e[3], "anon": e[9]},
             {"clip_id": "c2", "signer_id": "c", "orig": e[3], "anon": e[10]}]
    summary, flags = leave_one_out_reid(items, "cosine", 0.4)
    assert not any(flags.values())
    # a1 vs mean(a2, a3) = 0; a2 vs mean(a1, a3) = a3 vs mean(a1, a2) = 1/sqrt(2).
    assert summary["per_signer"]["a"]["id_orig_orig_xclip"] == pytest.approx(2 / np.sqrt(2) / 3)
    assert summary["per_signer"]["b"]["id_orig_orig_xclip"] == pytest.approx(1.0)
    assert summary["reid_top1_originals"] == pytest.approx(6 / 7)  # a1's own original cannot find signer a


def test_reid_rejects_bad_input() -> None:
    item = {"clip_id": "x", "signer_id": "s", "orig": np.ones(4), "anon": np.ones(4)}
    with pytest.raises(ValueError, match="duplicate"):
        leave_one_out_reid([item, dict(item)], "cosine", COS_T)
    with pytest.raises(ValueError, match="no anonymized"):
        leave_one_out_reid([{**item, "anon": None}], "cosine", COS_T)
    with pytest.raises(ValueError, match="one size"):
        leave_one_out_reid([item, {**item, "clip_id": "y", "orig": np.ones(5)}], "cosine", COS_T)
    summary, flags = leave_one_out_reid([], "cosine", COS_T)
    assert summary["n_tested"] == 0 and summary["reid_top1"] is None and flags == {}
