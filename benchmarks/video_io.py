"""Decode + H.264 encode throughput: corpus_anon.io.video (PyAV) vs the ffmpeg CLI, one thread each.

Input: a synthetic 512x512, 120-frame, 30 fps H.264 (High, crf 18) clip: the public-domain
astronaut photo from scikit-image panning across the frame, a moving bar, and seeded sensor-like
noise (so the encoder has real work). Each repetition runs every variant once, in turn
(alternating), on the same CPU; the table holds the median over the repetitions.

Variants
  corpus_anon.io.video      decode_segment(short_side=512) + encode_mp4(crf 23, veryfast): the product
  ffmpeg CLI             ffmpeg -threads 1 -i in.mp4 -c:v libx264 -preset veryfast -crf 23
                         -threads 1 -x264-params threads=1 -pix_fmt yuv420p -movflags +faststart
  ffmpeg CLI, rgb24 hop  the same with -vf format=rgb24,format=yuv420p: the two colour conversions
                         the product does (it hands RGB frames to the model and back)
  encode-only rows       encode_mp4 vs a copy of its video path with x264-params asm=AVX2 (x264's
                         CPU flags up to AVX2, i.e. no AVX-512), on the frames decoded once; and
                         encode_mp4 called from a worker thread (output bytes compared)

One thread: corpus_anon.io.video takes no thread setting. decode_segment sets thread_type AUTO with
PyAV's default thread_count 0 (auto) and encode_mp4 passes no `threads`, so the encoder picks its
own (seen: threads=2 lookahead_threads=2 on 2 CPUs). Both count the CPUs in the calling thread's
affinity mask, so this script pins itself (and the ffmpeg child, which inherits it) to one CPU;
the table shows `threads=` from the x264 options string in every output (its SEI) and the most
extra OS threads seen during a product run. `--no-pin` also runs the product unpinned.

    .venv/bin/python benchmarks/video_io.py            # about a minute
    .venv/bin/python benchmarks/video_io.py --reps 3 --frames 30
    .venv/bin/python benchmarks/video_io.py --breakdown   # + a second table: ms/frame per stage

Needs the `ffmpeg` CLI: exits 2 with the install command when it is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

INSTALL_HINT = "apt-get install -y --no-install-recommends ffmpeg   (Debian/Ubuntu, as root)"
CRF, PRESET = 23, "veryfast"


def make_input(path: str, n_frames: int = 120, size: int = 512, fps: int = 30, seed: int = 0) -> str:
    """A camera-like H.264 input: panning photo + moving bar + noise, High profile, crf 18."""
    import av
    from skimage import data
    from skimage.transform import resize

    base = data.astronaut()
    if base.shape[:2] != (size, size):
        base = (resize(base, (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    with av.open(path, "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = size, size, "yuv420p"
        vs.options = {"preset": "medium", "crf": "18", "threads": "1"}
        for i in range(n_frames):
            img = np.roll(base, (i, 2 * i), axis=(0, 1)).astype(np.int16)
            x = (i * 5) % (size - 24)
            img[:, x : x + 24] = 255 - img[:, x : x + 24]
            img += rng.normal(0, 3, img.shape).round().astype(np.int16)
            f = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            f.pts = i
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
    return path


# ---- helpers ------------------------------------------------------------------------------------
def x264_settings(path: str) -> str:
    """The options string libx264 writes into its SEI ('x264 - core N rM - ... options: ...')."""
    with open(path, "rb") as f:
        blob = f.read(1 << 20)
    m = re.search(rb"x264 - core [^\x00]*", blob)
    return m.group(0).decode("ascii", "replace") if m else ""


def x264_opt(settings: str, key: str) -> str | None:
    m = re.search(rf"(?:^| ){re.escape(key)}=(\S+)", settings)
    return m.group(1) if m else None


def md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()[:12]


class ThreadPeak:
    """Most OS threads of this process seen while the block runs (sampled every 50 ms: codec
    threads live as long as their codec; sampling every 2 ms took the pinned CPU from the product)."""

    def __enter__(self) -> "ThreadPeak":
        self.base = len(os.listdir("/proc/self/task"))  # before the sampler thread exists
        self.peak, self._stop = self.base, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, len(os.listdir("/proc/self/task")) - 1)  # minus the sampler

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


# ---- the variants -------------------------------------------------------------------------------
def run_product(src: str, out: str, frames_out: list | None = None) -> dict:
    from corpus_anon.io.video import decode_segment, encode_mp4

    with ThreadPeak() as tp:
        t0 = time.perf_counter()
        clip = decode_segment(src, 0.0, None, short_side=512, max_clip_s=60.0, max_pixels=8_294_400)
        t1 = time.perf_counter()
        encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out, crf=CRF, preset=PRESET)
        t2 = time.perf_counter()
    if frames_out is not None:
        frames_out[:] = [clip]
    return {"n": clip.n_frames, "s": t2 - t0, "decode_s": t1 - t0, "encode_s": t2 - t1, "threads": tp.extra}


def encode_copy(clip, path: str, extra: dict[str, str]) -> None:
    """encode_mp4's video path (no audio) line for line, with extra libx264 options."""
    import av

    ow, oh = clip.out_size
    tb = Fraction(1, 90000)
    with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vs = out.add_stream("libx264", rate=clip.fps)
        vs.width, vs.height = ow, oh
        vs.pix_fmt = "yuv420p"
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = {"crf": str(CRF), "preset": PRESET, **extra}
        last_pts = -1
        for img, t in zip(clip.frames, clip.timestamps):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if (img.shape[1], img.shape[0]) != (ow, oh):
                interp = "AREA" if img.shape[1] > ow else "BICUBIC"
                vf = vf.reformat(width=ow, height=oh, format="yuv420p", interpolation=interp)
            else:
                vf = vf.reformat(format="yuv420p")
            pts = max(int(round(float(t) / tb)), last_pts + 1)
            last_pts = pts
            vf.pts = pts
            vf.time_base = tb
            for pkt in vs.encode(vf):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)


def run_encode(clip, out: str, how: str) -> dict:
    from corpus_anon.io.video import encode_mp4

    t0 = time.perf_counter()
    if how == "encode_mp4":
        encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out, crf=CRF, preset=PRESET)
    elif how == "encode_mp4 in a worker thread":
        with ThreadPoolExecutor(1) as ex:
            ex.submit(encode_mp4, clip.frames, clip.timestamps, clip.fps, clip.out_size, out,
                      crf=CRF, preset=PRESET).result()
    elif how == "copy, default asm":
        encode_copy(clip, out, {})
    elif how == "copy, x264-params asm=AVX2":
        encode_copy(clip, out, {"x264-params": "asm=AVX2"})
    else:
        raise ValueError(how)
    return {"n": clip.n_frames, "s": time.perf_counter() - t0}


def ffmpeg_cmd(src: str, out: str, rgb_hop: bool = False, asm: str | None = None) -> list[str]:
    params = "threads=1" + (f":asm={asm}" if asm else "")
    return (["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "info", "-nostats", "-benchmark", "-threads", "1",
             "-i", src, "-an", "-filter_threads", "1"]
            + (["-vf", "format=rgb24,format=yuv420p"] if rgb_hop else [])
            + ["-c:v", "libx264", "-preset", PRESET, "-crf", str(CRF), "-threads", "1",
               "-x264-params", params, "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-y", out])


def run_ffmpeg(cmd: list[str], n: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    m = re.search(r"rtime=([\d.]+)s", proc.stderr + proc.stdout)
    return {"n": n, "s": wall, "rtime_s": float(m.group(1)) if m else float("nan")}


# ---- where the product's time goes (--breakdown) ------------------------------------------------
def breakdown(src: str, clip, reps: int) -> None:
    """Per-stage ms/frame of the product's path and of alternatives, alternating, median."""
    import av

    from corpus_anon.io.video import decode_segment, encode_mp4

    n = clip.n_frames
    w, h = clip.frames.shape[2], clip.frames.shape[1]
    with av.open(src) as c:
        yuv = [f for f in c.decode(video=0)]
    tmp = os.path.dirname(src)

    def dec(convert: bool) -> None:
        with av.open(src) as c:
            c.streams.video[0].thread_type = "AUTO"
            for f in c.decode(video=0):
                if convert:
                    f.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()

    def conv(how: str) -> list:
        if how == "from_ndarray":
            return [av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv420p") for a in clip.frames]
        if how == "from_numpy_buffer":
            return [av.VideoFrame.from_numpy_buffer(a, format="rgb24").reformat(format="yuv420p") for a in clip.frames]
        import cv2

        return [av.VideoFrame.from_ndarray(cv2.cvtColor(a, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
                for a in clip.frames]

    def enc_yuv() -> None:
        with av.open(os.path.join(tmp, "bd.mp4"), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            vs = out.add_stream("libx264", rate=clip.fps)
            vs.width, vs.height, vs.pix_fmt = yuv[0].width, yuv[0].height, "yuv420p"  # the source's size
            vs.options = {"crf": str(CRF), "preset": PRESET}
            for i, f in enumerate(yuv):
                f.pts = i
                for p in vs.encode(f):
                    out.mux(p)
            for p in vs.encode(None):
                out.mux(p)

    stages = [
        ("libavcodec decode, no conversion (PyAV)", lambda: dec(False)),
        ("decode + reformat to rgb24 (decode_segment's per-frame work, frames dropped)", lambda: dec(True)),
        ("decode_segment (all: + timestamps, list of frames, np.stack)", lambda: decode_segment(
            src, 0.0, None, short_side=512, max_clip_s=60.0, max_pixels=8_294_400)),
        ("np.stack of the decoded frames", lambda: np.stack(list(clip.frames))),
        ("rgb24 -> yuv420p: VideoFrame.from_ndarray + reformat (encode_mp4's)", lambda: conv("from_ndarray")),
        ("rgb24 -> yuv420p: VideoFrame.from_numpy_buffer + reformat (no copy)", lambda: conv("from_numpy_buffer")),
        ("rgb24 -> yuv420p: cv2.cvtColor RGB2YUV_I420 + from_ndarray", lambda: conv("cv2")),
        ("libx264 encode + mux from yuv420p frames (PyAV, no conversion)", enc_yuv),
        ("encode_mp4 (all)", lambda: encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size,
                                                os.path.join(tmp, "bd2.mp4"), crf=CRF, preset=PRESET)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in stages}
    for rep in range(reps):
        for name, fn in (stages if rep % 2 == 0 else stages[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000 / n)
    ref = np.stack([f.to_ndarray() for f in conv("from_ndarray")])
    same_buf = np.array_equal(ref, np.stack([f.to_ndarray() for f in conv("from_numpy_buffer")]))
    cv = np.stack([f.to_ndarray() for f in conv("cv2")]).astype(np.int16)
    print(f"# where the time goes: {n} frames {w}x{h}, one CPU, {reps} alternating reps, median ms/frame")
    print("| stage | ms/frame | min-max |")
    print("|---|---|---|")
    for name, _ in stages:
        v = times[name]
        print(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f}-{max(v):.2f} |")
    print(f"# from_numpy_buffer output equals from_ndarray's: {same_buf}; cv2 I420 vs swscale: max |diff| "
          f"{int(np.abs(cv - ref).max())}, mean {float(np.abs(cv - ref).mean()):.3f} (not bit-identical)")


# ---- main ---------------------------------------------------------------------------------------
def pin_to_one_cpu(cpu: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the last allowed)")
    ap.add_argument("--no-pin", action="store_true", help="also run the product unpinned (its default threads)")
    ap.add_argument("--breakdown", action="store_true", help="also print per-stage ms/frame (a second table)")
    ap.add_argument("--keep", default=None, help="write the clips into this folder and keep them")
    args = ap.parse_args()
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        print(f"video_io.py needs the ffmpeg CLI on PATH; install it with:\n  {INSTALL_HINT}", file=sys.stderr)
        return 2
    import av

    all_cpus = set(os.sched_getaffinity(0))
    tmp_ctx = tempfile.TemporaryDirectory(prefix="video-io-") if args.keep is None else None
    tmp = args.keep or tmp_ctx.name
    os.makedirs(tmp, exist_ok=True)
    src = make_input(os.path.join(tmp, "in.mp4"), args.frames, args.size)
    cpu = pin_to_one_cpu(args.cpu)
    n = args.frames

    variants: list[tuple[str, Callable[[str], dict]]] = []
    clip_box: list = []
    run_product(src, os.path.join(tmp, "warm.mp4"), clip_box)  # warm-up; also the frames for encode rows
    clip = clip_box[0]
    assert clip.n_frames == n, (clip.n_frames, n)
    variants.append(("corpus_anon.io.video decode_segment + encode_mp4",
                     lambda o: run_product(src, o)))
    variants.append(("ffmpeg CLI (-threads 1, x264 threads=1)", lambda o: run_ffmpeg(ffmpeg_cmd(src, o), n)))
    variants.append(("ffmpeg CLI, + rgb24 round trip", lambda o: run_ffmpeg(ffmpeg_cmd(src, o, True), n)))
    variants.append(("ffmpeg CLI, x264 asm=AVX2", lambda o: run_ffmpeg(ffmpeg_cmd(src, o, asm="AVX2"), n)))
    for how in ("encode_mp4", "copy, default asm", "copy, x264-params asm=AVX2", "encode_mp4 in a worker thread"):
        variants.append((f"encode only: {how}", lambda o, how=how: run_encode(clip, o, how)))
    if args.no_pin:
        def unpinned(o: str) -> dict:
            os.sched_setaffinity(0, all_cpus)
            try:
                return run_product(src, o)
            finally:
                os.sched_setaffinity(0, {cpu})
        variants.append((f"corpus_anon.io.video, unpinned ({len(all_cpus)} CPUs, its own threads)", unpinned))

    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    outs: dict[str, str] = {}
    for rep in range(args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]  # alternate, and flip the order each rep
        for name, fn in order:
            out = os.path.join(tmp, f"out{variants.index((name, fn))}.mp4")
            results[name].append(fn(out))
            outs[name] = out

    x264_pyav = x264_settings(outs[variants[0][0]])
    x264_cli = x264_settings(outs[variants[1][0]])
    print(f"# {n} frames {args.size}x{args.size} 30 fps H.264 in; libx264 {PRESET} crf {CRF} out; "
          f"{args.reps} alternating reps, median; pinned to CPU {cpu} of {sorted(all_cpus)}")
    print(f"# PyAV {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
          f"{x264_pyav.split(' - ')[1] if ' - ' in x264_pyav else '?'}; ffmpeg CLI "
          f"{subprocess.run([ffmpeg, '-version'], capture_output=True, text=True).stdout.split()[2]}, "
          f"{x264_cli.split(' - ')[1] if ' - ' in x264_cli else '?'}")
    print("| variant | frames/s (median) | min-max | vs ffmpeg CLI (ratio of medians) | paired ratio (median of "
          "per-rep ratios) | ffmpeg's own rtime frames/s | x264 threads | extra OS threads | output md5 |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref_name = variants[1][0]
    ref_fps = statistics.median(n / r["s"] for r in results[ref_name])
    ref_fps_rt = statistics.median(n / r["rtime_s"] for r in results[ref_name])
    med: dict[str, float] = {}
    for name, _ in variants:
        fps = [r["n"] / r["s"] for r in results[name]]
        med[name] = statistics.median(fps)
        s = x264_settings(outs[name])
        thr = x264_opt(s, "threads") or "?"
        extra = max((r.get("threads", -1) for r in results[name]), default=-1)
        ratio = paired = ""
        if not name.startswith("encode only"):
            ratio = f"{med[name] / ref_fps:.2f}x"
            # The same rep's ffmpeg run saw the same machine load: the per-rep ratio drifts less.
            paired = f"{statistics.median((r['n'] / r['s']) / (q['n'] / q['s']) for r, q in zip(results[name], results[ref_name])):.2f}x"
        rt = [r["n"] / r["rtime_s"] for r in results[name] if "rtime_s" in r]
        rtime = f"{statistics.median(rt):.1f}" if rt else ""
        print(f"| {name} | {med[name]:.1f} | {min(fps):.1f}-{max(fps):.1f} | {ratio} | {paired} | {rtime} | {thr} | "
              f"{extra if extra >= 0 else ''} | {md5(outs[name])} |")
    prod = results[variants[0][0]]
    print(f"# product split (median): decode {statistics.median(n / r['decode_s'] for r in prod):.1f} frames/s, "
          f"encode {statistics.median(n / r['encode_s'] for r in prod):.1f} frames/s")
    print(f"# ffmpeg CLI by its own -benchmark rtime (no process start): {ref_fps_rt:.1f} frames/s; "
          f"product / that = {med[variants[0][0]] / ref_fps_rt:.2f}x")
    a, b = med["encode only: copy, default asm"], med["encode only: copy, x264-params asm=AVX2"]
    print(f"# asm=AVX2 vs default (PyAV encode): {b / a:.3f}x; ffmpeg CLI asm=AVX2 vs default: "
          f"{med['ffmpeg CLI, x264 asm=AVX2'] / ref_fps:.3f}x")
    if args.breakdown:
        print()
        breakdown(src, clip, args.reps)
    if tmp_ctx is not None:
        tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
