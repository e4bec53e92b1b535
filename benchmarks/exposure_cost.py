"""The exposure check: its cost per frame, and how far pixelate's mosaic is from "the same person".

    .venv/bin/python benchmarks/exposure_cost.py                 # both parts, 48 frames, 3 repeats
    .venv/bin/python benchmarks/exposure_cost.py --part cost --frames 24 --repeat 1   # a quick look
    .venv/bin/python benchmarks/exposure_cost.py --part mosaic --box-scale 1.0 --widths 80 166   # another mosaic

Part `cost`, at the demo's work size (its 320x240 clips at `video.short_side` 512: 704x512 frames,
faces 166 px; `faces.detect_side` 320 as in the demo's config; the real `FaceAnalyzer` with the dlib
backend and the configured detector), for clips with 1 and 2 real faces (insightface's `t1.jpg`):

- `detect output`: `FaceAnalyzer.detect_all` on the anonymized frames — the detection the check adds
  (the original's detections are shared with the signer's track, which needed them before);
- `embed + judge`: `ExposureCheck` built on the original's detections and run on the output;
- for two outputs: `pixelate` (the real anonymizer; no face found in its output, so the check
  samples every `gate.max_gap_frames + 1`-th frame) and `new face` (another real person pasted where
  each face is, as `diffslva` would synthesize one: a face in the output on every frame, so every
  frame is checked).

ms per frame = time / frames, the median of `--repeat` runs after one warm-up run: wall time, and this process's CPU time
(`time.process_time`, all its threads), which moves less when other work shares the machine.

Part `mosaic`: t1.jpg's six faces, scaled so the faces are 60-240 px wide (`--widths`), pixelated
with pixelate's defaults (8 blocks, box x1.5; `--blocks`, `--box-scale`) at 8 sub-block offsets; the dlib distance between the original face and
the output at the same keypoints (what the check compares). dlib judges < 0.6 the same person: a
mosaic under it would make every pixelated clip `leak`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

W, H, FACE = 704, 512, 166
T1_BOXES = {"t1a": (448, 271, 139, 139), "t1b": (729, 356, 114, 114), "t1c": (1114, 277, 118, 118)}


def t1_image() -> np.ndarray:
    import insightface
    from skimage import io

    return io.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))[..., :3]


def faces_from_t1() -> dict[str, np.ndarray]:
    from corpus_anon.demo import _crop, _resize

    t1 = t1_image()
    return {k: _resize(_crop(t1, *b), FACE) for k, b in T1_BOXES.items()}


def clip(people: list[np.ndarray], n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """People side by side on a plain background, swaying; returns frames and each face's top-left at t=0."""
    frames = np.empty((n, H, W, 3), np.uint8)
    xs = [W // 2 - FACE // 2] if len(people) == 1 else [W // 2 - FACE - 40, W // 2 + 40]
    for t in range(n):
        frames[t] = (150, 160, 170)
        dx = int(round(6 * np.sin(2 * np.pi * 0.4 * t / 24)))
        for x, face in zip(xs, people):
            frames[t, 120 : 120 + FACE, x + dx : x + dx + FACE] = face
    return frames, [(x, 120) for x in xs]


def analyzer():
    from corpus_anon.config import config_from_dict
    from corpus_anon.actor.identity import FaceAnalyzer

    cfg = config_from_dict({"faces": {"backend": "dlib", "detect_side": 320}})
    return cfg, FaceAnalyzer(cfg)


def part_cost(n: int, repeat: int) -> None:
    from corpus_anon.actor.anonymize import build_anonymizer
    from corpus_anon.actor.exposure import ExposureCheck

    cfg, fa = analyzer()
    pix = build_anonymizer(cfg, "cpu")
    faces = faces_from_t1()
    print(f"frames {W}x{H}, faces {FACE} px, {n} frames, detector {cfg.faces.detector}, backend "
          f"{fa.backend.name}, gate.max_gap_frames {cfg.gate.max_gap_frames}, median of {repeat}")
    print("| faces | output | frames checked | detect output ms/frame (CPU) | embed + judge ms/frame (CPU) "
          "| total ms/frame (CPU) |")
    print("|---|---|---|---|---|---|")
    warm, _ = clip([faces["t1a"]], 8)
    ExposureCheck(fa.backend, warm, fa.detect_all(warm), cfg.gate.max_gap_frames).run(warm, fa.detect_all(warm))
    for people in ([faces["t1a"]], [faces["t1a"], faces["t1c"]]):
        orig, _ = clip(people, n)
        dets = fa.detect_all(orig)
        outputs = {"pixelate": pix.anonymize(orig, {"clip_id": "b"}, lambda: None).frames,
                   "new face": clip([faces["t1b"]] * len(people), n)[0]}
        for name, out in outputs.items():
            t_det, t_chk, c_det, c_chk, checked = [], [], [], [], 0
            for _ in range(repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                out_dets = fa.detect_all(out)
                t1, c1 = time.perf_counter(), time.process_time()
                ex = ExposureCheck(fa.backend, orig, dets, cfg.gate.max_gap_frames).run(out, out_dets)
                t2, c2 = time.perf_counter(), time.process_time()
                t_det.append(t1 - t0)
                t_chk.append(t2 - t1)
                c_det.append(c1 - c0)
                c_chk.append(c2 - c1)
                checked = ex.metrics["frames_checked"]
                assert ex.metrics["exposed_frames"] == 0, ex.metrics

            def ms(xs: list[float]) -> float:
                return 1000 * statistics.median(xs) / n

            print(f"| {len(people)} | {name} | {checked} of {n} | {ms(t_det):.1f} ({ms(c_det):.1f}) | "
                  f"{ms(t_chk):.1f} ({ms(c_chk):.1f}) | {ms(t_det) + ms(t_chk):.1f} "
                  f"({ms(c_det) + ms(c_chk):.1f}) |")


def part_mosaic(widths_px: list[int], blocks: int, box_scale: float) -> None:
    import cv2

    from corpus_anon.models import facetrack
    from corpus_anon.actor.anonymize import pixelate_region

    _, fa = analyzer()
    be = fa.backend
    t1 = t1_image()
    base = fa.detect(t1)
    widths = [float(f.box[2] - f.box[0]) for f in base]
    print(f"t1.jpg: {len(base)} faces, {min(widths):.0f}-{max(widths):.0f} px wide at 1280x886")
    print(f"pixelate blocks {blocks}, box_scale {box_scale}")
    print("| face width px | pairs | min distance | median | max | judged same person (< 0.6) |")
    print("|---|---|---|---|---|---|")
    everything = []
    for target in widths_px:
        k = target / float(np.median(widths))
        img = cv2.resize(t1, (int(round(t1.shape[1] * k)), int(round(t1.shape[0] * k))),
                         interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        faces = fa.detect(img)
        h, w = img.shape[:2]
        dist = []
        for off in range(8):
            shifted = np.ascontiguousarray(np.roll(img, (off, off), axis=(0, 1)))
            found = [f for f in fa.detect(shifted)]
            out = shifted.copy()
            for f in found:
                pixelate_region(out, facetrack.expand_box(f.box, box_scale, w, h), blocks)
            for f in found:
                o = be.embed(shifted, [f])[0]
                a = be.embed_at(out, f.kps if f.kps is not None else f.box)
                dist.append(float(be.score(o, a)))
        everything += dist
        same = sum(1 for d in dist if be.same_person(d))
        print(f"| {target} | {len(dist)} ({len(faces)} faces x 8 offsets) | {min(dist):.3f} | "
              f"{statistics.median(dist):.3f} | {max(dist):.3f} | {same} |")
    print(f"all: {len(everything)} pairs, min {min(everything):.3f}, "
          f"{sum(1 for d in everything if be.same_person(d))} judged the same person")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("cost", "mosaic", "both"), default="both")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[60, 80, 120, 166, 240], help="mosaic: face widths, px")
    ap.add_argument("--blocks", type=int, default=8, help="mosaic: pixelate.blocks")
    ap.add_argument("--box-scale", type=float, default=1.5, help="mosaic: pixelate.box_scale")
    args = ap.parse_args()
    if args.part in ("cost", "both"):
        part_cost(args.frames, args.repeat)
    if args.part in ("mosaic", "both"):
        part_mosaic(args.widths, args.blocks, args.box_scale)


if __name__ == "__main__":
    main()
