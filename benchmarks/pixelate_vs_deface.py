"""The product's `pixelate` step vs deface (the face-mosaic CLI people use today), frames/s on one CPU.

Issue 13, item 7. Same clips, same machine, one run, alternating, everything pinned to the same CPU
with `taskset -c CPU` (children inherit it: deface's ffmpeg encoder and onnxruntime threads too).

Clips: real videos nobody here made, read in place from Debian's `opencv-doc` examples
(`vtest.avi`, pedestrians, 768x576; `Megamind.avi`, an animated face, 720x528), cut to `--frames`
frames, plus one synthetic two-person clip made from insightface's `t1.jpg` faces (tests/media.py).
Missing opencv-doc: the script says how to install it and runs the synthetic clip alone.

deface runs from its own virtual environment (`benchmarks/.deface-venv`, created on first use with
`pip install deface==1.5.0`; never installed beside the product), as its CLI:
`deface IN -o OUT --replacewith mosaic --thresh 0.2 --scale WxH` where WxH is the frame scaled to the
product's detection size (`faces.detect_side`), so both detect at the same resolution. Its rate is the
steady state: (N - 1) / (t(N frames) - t(1 frame)), which removes its start-up and model load.

The product runs in a child process per clip (the same pinning): decode (`video.decode_segment` at the
work size), the anonymize step (`PixelateAnonymizer.anonymize`: detection + tracks + mosaic), the
exposure check (`gate`'s check: detection on every original and output frame, embeddings on the
checked frames) and the H.264 encode, each timed; model loading is outside every timer.

    .venv/bin/python benchmarks/pixelate_vs_deface.py                    # 3 reps x 3 clips x 150 frames
    .venv/bin/python benchmarks/pixelate_vs_deface.py --reps 5 --frames 300 --cpu 1

Table: per clip, the medians over the repetitions; `ratio` = product anonymize-step frames/s /
deface frames/s (the goal is >= 1.0); `full` = the product's whole per-clip cost (decode + anonymize +
exposure check + encode) in frames/s beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFACE_VENV = os.path.join(ROOT, "benchmarks", ".deface-venv")
DEFACE_VERSION = "1.5.0"
OPENCV_DOC = "/usr/share/doc/opencv-doc/examples/data"
REAL_CLIPS = ("vtest.avi", "Megamind.avi")
INSTALL_HINT = "apt-get install -y --no-install-recommends opencv-doc   (Debian, as root)"


def deface_bin() -> str:
    """deface's CLI in its own venv, created on first use."""
    exe = os.path.join(DEFACE_VENV, "bin", "deface")
    if not os.path.exists(exe):
        print(f"creating {DEFACE_VENV} with deface=={DEFACE_VERSION} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", DEFACE_VENV], check=True)
        subprocess.run([os.path.join(DEFACE_VENV, "bin", "python"), "-m", "pip", "install", "-q",
                        f"deface=={DEFACE_VERSION}"], check=True)
    return exe


def cut_clip(src: str, dst: str, n_frames: int) -> tuple[int, int, float, int]:
    """The first `n_frames` frames of `src` re-encoded losslessly-ish (H.264 crf 12) to `dst`; returns
    (width, height, fps, frames written)."""
    import av

    with av.open(src) as c:
        vs = c.streams.video[0]
        fps = float(vs.average_rate or 25)
        frames = []
        for f in c.decode(vs):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) >= n_frames:
                break
    h, w = frames[0].shape[:2]
    write_mp4(dst, frames, fps)
    return w, h, fps, len(frames)


def write_mp4(dst: str, frames: list, fps: float) -> None:
    import av
    from fractions import Fraction

    h, w = frames[0].shape[:2]
    with av.open(dst, "w") as out:
        s = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        s.options = {"crf": "12", "preset": "veryfast"}
        for fr in frames:
            vf = av.VideoFrame.from_ndarray(fr[: s.height, : s.width], format="rgb24")
            for p in s.encode(vf):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def synthetic_clip(dst: str, n_frames: int) -> tuple[int, int, float, int]:
    """Two real people (t1.jpg faces, the demo's crops) moving on a noisy background, 640x480, 25 fps."""
    import numpy as np

    from corpus_anon.demo import _resize, demo_faces

    faces = dict(demo_faces())
    people = [_resize(faces["t1a"], 160), _resize(faces["t1c"], 120)]
    rng = np.random.default_rng(0)
    bg = rng.integers(60, 120, (480, 640, 3), dtype=np.uint8)
    frames = []
    for t in range(n_frames):
        fr = bg.copy()
        for k, face in enumerate(people):
            fh, fw = face.shape[:2]
            x = 80 + 320 * k + int(20 * np.sin(t / 9 + k))
            y = 120 + int(10 * np.cos(t / 7 + k))
            fr[y : y + fh, x : x + fw] = face
        frames.append(fr)
    write_mp4(dst, frames, 25.0)
    return 640, 480, 25.0, len(frames)


def run_deface(exe: str, clip: str, out: str, scale: str, cpu: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["taskset", "-c", str(cpu), exe, clip, "-o", out, "--replacewith", "mosaic",
                    "--thresh", "0.2", "--scale", scale], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_product(clip: str, cpu: int) -> dict:
    out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, os.path.abspath(__file__), "--product", clip],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def product_child(clip: str) -> None:
    """One clip through the product's steps, each timed (runs in the pinned child)."""
    import numpy as np

    from corpus_anon.io import video
    from corpus_anon.actor.anonymize import build_anonymizer
    from corpus_anon.config import Config
    from corpus_anon.io.storage import Storage

    cfg = Config()
    anonymizer = build_anonymizer(cfg, "cpu", Storage())
    check_clip = exposure_checker(cfg)
    t0 = time.perf_counter()
    c = video.decode_segment(clip, None, None, short_side=cfg.video.short_side, max_clip_s=cfg.video.max_clip_s,
                             max_pixels=cfg.video.max_pixels, threads=1)
    t1 = time.perf_counter()
    res = anonymizer.anonymize(c.frames, {"fps": float(c.fps)}, lambda: None)
    t2 = time.perf_counter()
    exposure = check_clip(c.frames, res.frames, float(c.fps))
    t3 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        video.encode_mp4(res.frames, c.timestamps, c.fps, c.out_size, os.path.join(d, "o.mp4"), threads=1)
    t4 = time.perf_counter()
    print(json.dumps({"n": int(c.n_frames), "decode": t1 - t0, "anonymize": t2 - t1, "exposure": t3 - t2,
                      "encode": t4 - t3, "faces_found": res.metrics.get("faces_found"),
                      "exposed_frames": exposure.get("exposed_frames"),
                      "frames_checked": exposure.get("frames_checked"),
                      "work": list(np.asarray(c.frames).shape[1:3])}))


def exposure_checker(cfg):
    """The gate's exposure check as the actor runs it: CenterFace on every original and output frame,
    the tracks of all people, embeddings at the checked frames (gate.py, exposure.py)."""
    from corpus_anon.actor.exposure import ExposureCheck
    from corpus_anon.actor.identity import FaceAnalyzer

    analyzer = FaceAnalyzer(cfg, "cpu", None)

    def check(orig, anon, fps):
        dets = analyzer.detect_all(orig)
        ex = ExposureCheck(analyzer.backend, orig, dets, cfg.gate.max_gap_frames)
        return ex.run(anon, analyzer.detect_all(anon)).metrics

    return check


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU everything is pinned to")
    ap.add_argument("--product", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.product:
        product_child(args.product)
        return 0
    if not shutil.which("taskset"):
        print("needs taskset (util-linux)", file=sys.stderr)
        return 2
    exe = deface_bin()
    from corpus_anon.config import Config

    side = Config().faces.detect_side
    tmp = tempfile.mkdtemp(prefix="pix-vs-deface-")
    clips = []
    for name in REAL_CLIPS:
        src = os.path.join(OPENCV_DOC, name)
        if not os.path.exists(src):
            print(f"{src} is missing: {INSTALL_HINT}; running without it", flush=True)
            continue
        dst = os.path.join(tmp, name.rsplit(".", 1)[0] + ".mp4")
        clips.append((name, dst, *cut_clip(src, dst, args.frames)))
    dst = os.path.join(tmp, "two_people.mp4")
    clips.append(("two people (t1.jpg)", dst, *synthetic_clip(dst, args.frames)))
    firsts = {}
    for name, path, w, h, fps, n in clips:
        first = path.replace(".mp4", "-1.mp4")
        cut_clip(path, first, 1)
        firsts[path] = first
    rows: dict[str, dict[str, list[float]]] = {c[0]: {} for c in clips}
    for rep in range(args.reps):
        for name, path, w, h, fps, n in clips:
            k = side / min(w, h)
            scale = f"{int(round(w * k))}x{int(round(h * k))}"
            r = rows[name]
            # alternate which tool goes first
            order = ("deface", "product") if rep % 2 == 0 else ("product", "deface")
            for tool in order:
                if tool == "deface":
                    t_n = run_deface(exe, path, os.path.join(tmp, "d.mp4"), scale, args.cpu)
                    t_1 = run_deface(exe, firsts[path], os.path.join(tmp, "d1.mp4"), scale, args.cpu)
                    r.setdefault("deface_fps", []).append((n - 1) / max(1e-9, t_n - t_1))
                else:
                    p = run_product(path, args.cpu)
                    r.setdefault("anon_fps", []).append(p["n"] / p["anonymize"])
                    full = p["decode"] + p["anonymize"] + p["exposure"] + p["encode"]
                    r.setdefault("full_fps", []).append(p["n"] / full)
                    for key in ("decode", "anonymize", "exposure", "encode"):
                        r.setdefault(f"ms_{key}", []).append(1000 * p[key] / p["n"])
                    r["exposed_frames"] = [p["exposed_frames"]]
                    r["faces_found"] = [p["faces_found"]]
            print(f"rep {rep + 1}/{args.reps} {name}: deface {r['deface_fps'][-1]:.1f} fps, "
                  f"product anonymize {r['anon_fps'][-1]:.1f} fps, full {r['full_fps'][-1]:.1f} fps", flush=True)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    print()
    print(f"median of {args.reps} alternating reps, {args.frames} frames per clip, pinned to CPU {args.cpu}")
    print("| clip | deface frames/s | product anonymize frames/s | ratio | product full frames/s | "
          "ms/frame decode / anonymize / exposure check / encode | faces found | exposed frames |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path, w, h, fps, n in clips:
        m = med[name]
        print(f"| {name} {w}x{h}, {n} frames | {m['deface_fps']:.1f} | {m['anon_fps']:.1f} | "
              f"{m['anon_fps'] / m['deface_fps']:.2f} | {m['full_fps']:.1f} | {m['ms_decode']:.1f} / "
              f"{m['ms_anonymize']:.1f} / {m['ms_exposure']:.1f} / {m['ms_encode']:.1f} | "
              f"{int(m['faces_found'])} | {int(m['exposed_frames'] or 0)} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
