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
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
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
    from corpus_anon.models.landmarks import (FaceMesh, HandLandmarker, Landmarks, hand_roi,
                                              installed_mediapipe_file)

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


if __name__ == "__main__":
    main()
