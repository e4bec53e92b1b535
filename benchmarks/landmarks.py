"""Landmark model speed on this machine's CPU: MediaPipe's face mesh (with and without the refine pass),
palm detection and hand landmarks, each at batch 1 and batch 8, and a clip's landmarks per frame.

Frames are real photos shipped in installed packages: insightface's `t1.jpg` (six faces, for the mesh;
the boxes come from CenterFace) and a crop of it around one player with two hands in view (380 x 450,
for palm detection, hand landmarks and the clip row). Each row is the median over `--reps` timed runs
after one warm-up; "ms per item" is the call's time divided by the faces, frames or hands in it.
OpenCV's TFLite importer runs the networks on its own CPU threads (`--threads`, 0 = OpenCV's default).

    .venv/bin/python benchmarks/landmarks.py                 # about 20 s on 2 CPUs
    .venv/bin/python benchmarks/landmarks.py --reps 9 --threads 1
    .venv/bin/python benchmarks/landmarks.py --quick         # one timed run each (the test's smoke run)
    .venv/bin/python benchmarks/landmarks.py --demo-clip 3   # measure_original on a 3 s demo clip, before/after
    .venv/bin/python benchmarks/landmarks.py --demo-clip 2 --t1   # ... on t1.jpg's player, panned (real hands)
    .venv/bin/python benchmarks/landmarks.py --demo-clip 2 --overlay   # ... a real hand sweeping over a face
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

PLAYER = (900, 250, 1280, 700)  # t1.jpg's crop around Phoebe: her two hands and a third at the edge


def t1_image() -> np.ndarray:
    from skimage import io

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("insightface (which ships t1.jpg) is not installed: pip install --no-deps insightface==2.1")
    return io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import cv2

    from corpus_anon.config import Config
    from corpus_anon.models.detect import CenterFaceDetector, installed_centerface
    from corpus_anon.models.landmarks import Landmarks
    from corpus_anon.models.hands import HandLandmarker, hand_roi
    from corpus_anon.models.facemesh import FaceMesh
    from corpus_anon.models.mediapipe_common import installed_mediapipe_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="OpenCV threads (0 = OpenCV's default)")
    ap.add_argument("--quick", action="store_true", help="one timed run per row")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    if args.threads:
        cv2.setNumThreads(args.threads)
    cfg = Config()
    t1 = t1_image()
    x0, y0, x1, y1 = PLAYER
    player = np.ascontiguousarray(t1[y0:y1, x0:x1])

    faces = CenterFaceDetector(installed_centerface(), detect_side=cfg.faces.detect_side,
                               threshold=cfg.faces.det_threshold).detect(t1)
    boxes, kps = [f.box for f in faces], [f.kps for f in faces]
    hands = HandLandmarker(installed_mediapipe_file("palm_detection_full.tflite"),
                           installed_mediapipe_file("hand_landmark_full.tflite"), max_hands=cfg.landmarks.max_hands,
                           palm_threshold=cfg.landmarks.palm_threshold, hand_threshold=cfg.landmarks.hand_threshold,
                           batch_size=8)
    rois = [hand_roi(p) for p in hands.palms([player])[0]]
    if not rois:
        raise SystemExit("no palm found on the player crop of t1.jpg; the hand rows need one")

    rows: list[tuple[str, int, float]] = []
    for refine in (True, False):
        mesh = FaceMesh(installed_mediapipe_file("face_landmark.tflite"), batch_size=8, refine=refine)
        label = "face mesh, refine (ms/face)" if refine else "face mesh, one pass (ms/face)"
        one = timed(lambda: [mesh.mesh([t1], [b], [k]) for b, k in zip(boxes, kps)], reps) / len(boxes)
        eight = [boxes[i % len(boxes)] for i in range(8)], [kps[i % len(kps)] for i in range(8)]
        batch = timed(lambda: mesh.mesh([t1] * 8, *eight), reps) / 8
        rows += [(label, 1, one), (label, 8, batch)]
    hands.batch_size = 1
    rows.append(("palm detection (ms/frame)", 1, timed(lambda: hands.palms([player]), reps)))
    hands.batch_size = 8
    rows.append(("palm detection (ms/frame)", 8, timed(lambda: hands.palms([player] * 8), reps) / 8))
    r8 = [rois[i % len(rois)] for i in range(8)]
    hands.batch_size = 1
    rows.append(("hand landmarks (ms/hand)", 1, timed(lambda: hands.landmarks([player], rois[:1]), reps)))
    hands.batch_size = 8
    rows.append(("hand landmarks (ms/hand)", 8, timed(lambda: hands.landmarks([player] * 8, r8), reps) / 8))
    # A clip's landmarks (Landmarks.clip): one face mesh (refine) and the hands on every frame.
    face = max((f for f in CenterFaceDetector(installed_centerface(), detect_side=cfg.faces.detect_side,
                                              threshold=cfg.faces.det_threshold).detect(player)),
               key=lambda f: f.score)
    bundle = Landmarks(FaceMesh(installed_mediapipe_file("face_landmark.tflite"), batch_size=8), hands,
                       face_threshold=cfg.landmarks.face_threshold)
    clip = np.stack([player] * 8)
    cbox = np.tile(face.box, (8, 1))
    per_frame = timed(lambda: bundle.clip(clip, cbox, [face.kps] * 8), reps) / 8
    rows.append(("clip: face mesh + hands (ms/frame)", 8, per_frame))

    print(f"cv2 {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads, median of {reps} run(s); "
          f"{len(boxes)} faces of t1.jpg, {len(rois)} palms on the player crop {player.shape[1]}x{player.shape[0]}")
    print("| row | batch | ms per item |")
    print("|---|---|---|")
    for label, batch, sec in rows:
        print(f"| {label} | {batch} | {sec * 1000:.1f} |")


def demo_clip(seconds: float, source: str = "demo", threads: int = 0) -> None:
    """``enhance.measure_original`` on a clip of ``seconds`` at 24 fps: ``demo`` (``corpus_anon.demo``'s
    first signer, rendered, 320 x 240, drawn hands), ``t1`` (the player crop of t1.jpg, 380 x 450, a real
    signer's two real hands, panned 2 px right and 1 px down a frame) or ``overlay`` (480 x 480: Phoebe's
    raised hand cut from t1.jpg sweeping from the left across skimage's astronaut's face), before (palms on
    every frame, every hand measured) and after (``measure_original``: ``track_hands`` with palm detection
    every ``HAND_DETECT_EVERY`` frames, hands near the face only): milliseconds per frame, and
    the recall of the tracked hands against the every-frame ones (a hand is found when a tracked hand's
    box overlaps it with IoU > 0.5), over every hand, over those near the face (what is tracked) and over
    the hands the face module counts (those ``handlayer.hand_model_layer`` puts on the face), and the
    share of that layer's pixels kept."""
    import cv2

    from corpus_anon import demo
    from corpus_anon.config import Config
    from corpus_anon.actor.enhance import measure_original
    from corpus_anon.actor.handlayer import hand_model_layer
    from corpus_anon.actor.tube import fill_missing_boxes, tube_box
    from corpus_anon.models.detect import CenterFaceDetector, installed_centerface
    from corpus_anon.models.landmarks import Landmarks
    from corpus_anon.models.hands import (HAND_DETECT_EVERY, HandLandmarker, NEAR_FACE, box_iou, boxes_meet,
                                          near_face_zone, roi_box)
    from corpus_anon.models.facemesh import FaceMesh
    from corpus_anon.models.mediapipe_common import installed_mediapipe_file

    if threads:
        cv2.setNumThreads(threads)
    cfg = Config()
    n = int(round(seconds * demo.FPS))
    if source == "t1":
        x0, y0, x1, y1 = PLAYER
        crop = np.ascontiguousarray(t1_image()[y0:y1, x0:x1])
        frames = np.stack([cv2.warpAffine(crop, np.float32([[1, 0, 2.0 * t - n], [0, 1, 1.0 * t - n / 2]]),
                                          (crop.shape[1], crop.shape[0]), borderMode=cv2.BORDER_REPLICATE)
                           for t in range(n)])
    elif source == "overlay":
        from skimage import data

        hand = t1_image()[395:545, 960:1120]  # Phoebe's raised right hand with its chip, 160 x 150
        face = cv2.resize(data.astronaut()[20:220, 140:310], (200, 235), interpolation=cv2.INTER_AREA)
        frames = np.empty((n, 480, 480, 3), np.uint8)
        for t in range(n):
            f = np.full((480, 480, 3), (180, 190, 200), np.uint8)
            f[60:295, 140:340] = face
            x = int(round(-40 + 300 * t / max(n - 1, 1)))  # the hand sweeps from the left across the face
            lo, hi = max(0, x), min(480, x + 160)
            f[170:320, lo:hi] = hand[:, lo - x:hi - x]
            frames[t] = f
    else:
        name, face = demo.demo_faces()[0]
        signer = demo.Signer("signer1", face, (40, 60, 110), (200, 205, 210), anchors=demo.FACE_ANCHORS.get(name))
        frames = np.stack([demo.render_frame(signer, i / demo.FPS) for i in range(n)])
    det = CenterFaceDetector(installed_centerface(), detect_side=cfg.faces.detect_side,
                             threshold=cfg.faces.det_threshold)
    boxes = np.full((len(frames), 4), np.nan)
    for t, fs in enumerate(det.detect_batch(list(frames))):
        if fs:
            boxes[t] = max(fs, key=lambda f: f.score).box
    lm = cfg.landmarks
    bundle = Landmarks(FaceMesh(installed_mediapipe_file("face_landmark.tflite")),
                       HandLandmarker(installed_mediapipe_file("palm_detection_full.tflite"),
                                      installed_mediapipe_file("hand_landmark_full.tflite"), max_hands=lm.max_hands,
                                      palm_threshold=lm.palm_threshold, hand_threshold=lm.hand_threshold),
                       face_threshold=lm.face_threshold, hand_space=lm.hand_space)
    t0 = time.perf_counter()
    before = bundle.clip(frames, fill_missing_boxes(boxes), None, hands=True)
    t_before = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = measure_original(bundle, frames, boxes, None)
    t_after = time.perf_counter() - t0
    filled = fill_missing_boxes(boxes)
    tube = tube_box(boxes, frames.shape[2], frames.shape[1])
    ref_layer, _ = hand_model_layer(before.hands, filled, tube, neighbours=0)
    new_layer, _ = hand_model_layer(after.hands, filled, tube)
    counted = [[h for h in hs if hand_model_layer([[h]], filled[t:t + 1], tube, neighbours=0)[0].any()]
               for t, hs in enumerate(before.hands)]
    near = [[h for h in hs if boxes_meet(roi_box(h.roi), near_face_zone(filled[t]))] for t, hs in enumerate(before.hands)]

    def recall(ref: list[list[Any]]) -> tuple[int, int]:
        hit = sum(any(box_iou(h.box, g.box) > 0.5 for g in after.hands[t]) for t, hs in enumerate(ref) for h in hs)
        return hit, sum(len(hs) for hs in ref)

    print(f"{source} clip: {n} frames {frames.shape[2]}x{frames.shape[1]}, {int(np.isfinite(boxes).all(axis=1).sum())} "
          f"with a face box, hand_space {lm.hand_space}, cv2 {cv2.getNumThreads()} threads")
    print(f"before (palms every frame, all hands): {t_before / n * 1000:.1f} ms/frame, "
          f"{sum(map(len, before.hands))} hands")
    print(f"after (track_hands, palms every {HAND_DETECT_EVERY} frames, near_face {NEAR_FACE}): "
          f"{t_after / n * 1000:.1f} ms/frame, {sum(map(len, after.hands))} hands")
    for label, ref in (("every hand", before.hands),
                       (f"hands near the face (square meets the box x {NEAR_FACE})", near),
                       ("hands on the face (the layer's)", counted)):
        hit, total = recall(ref)
        print(f"recall, {label}: {hit}/{total}")
    covered = (ref_layer & new_layer).sum() / max(int(ref_layer.sum()), 1)
    print(f"hand layer pixels of the every-frame run kept by the tracked run (+-1 frame): {covered:.3f}")


if __name__ == "__main__":
    if "--demo-clip" in sys.argv:
        i = sys.argv.index("--demo-clip")
        demo_clip(float(sys.argv[i + 1]) if len(sys.argv) > i + 1 else 3.0,
                  "t1" if "--t1" in sys.argv else "overlay" if "--overlay" in sys.argv else "demo")
    else:
        main()
