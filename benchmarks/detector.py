"""Face detector speed and recall: CenterFace (onnxruntime) batch 1 vs 8, and Haar vs CenterFace on t1.jpg.

Frames are real photos shipped in installed packages: insightface's `t1.jpg` (six people, 1280x886)
and a 640x480 frame made from it (for the ms/frame rows). Each row is the median over `--reps`
timed runs after one warm-up; ms/frame = the call's time / frames in it. CenterFace runs at
`--detect-side` (the config's `faces.detect_side`, 480 by default) with the config's `faces.det_threshold`.

    .venv/bin/python benchmarks/detector.py                 # about 30 s on 2 CPUs
    .venv/bin/python benchmarks/detector.py --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def t1_image() -> np.ndarray:
    from skimage import io

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("insightface (which ships t1.jpg) is not installed: pip install --no-deps insightface==2.1")
    return io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    import cv2

    from corpus_anon.models.detect import CenterFaceDetector, HaarDetector, installed_centerface

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--detect-side", type=int, default=480)
    ap.add_argument("--threads", type=int, default=0, help="cv2 threads for Haar (0 = OpenCV's default)")
    args = ap.parse_args()
    if args.threads:
        cv2.setNumThreads(args.threads)
    t1 = t1_image()
    frame = cv2.resize(t1, (640, 480), interpolation=cv2.INTER_AREA)
    from corpus_anon.config import Config

    cf = CenterFaceDetector(installed_centerface(), detect_side=args.detect_side,
                            threshold=Config().faces.det_threshold, batch_size=8)
    rows = []
    for batch in (1, 8):
        frames = [frame] * batch
        s, dets = timed(lambda: cf.detect_batch(frames), args.reps)
        rows.append((f"CenterFace 640x480 at {args.detect_side}, batch {batch}", 1000 * s / batch, len(dets[0])))
    s, dets = timed(lambda: cf.detect_batch([t1]), args.reps)
    rows.append((f"CenterFace t1.jpg 1280x886 at {args.detect_side}", 1000 * s, len(dets[0])))
    for side in (320, args.detect_side):
        haar = HaarDetector(detect_side=side)
        s, dets = timed(lambda: haar.detect_batch([t1]), args.reps)
        rows.append((f"Haar t1.jpg 1280x886 at {side}", 1000 * s, len(dets[0])))
    print(f"| {'detector, frame, detection size, batch':52} | ms/frame | faces (t1.jpg has 6) |")
    print(f"|{'-' * 54}|---------:|---------------------:|")
    for name, ms, n in rows:
        print(f"| {name:52} | {ms:8.1f} | {n:20d} |")


if __name__ == "__main__":
    main()
