"""Video I/O with PyAV: decode a segment at the work resolution, encode H.264 MP4 that browsers play.

Rules:
- decode frames whose timestamp t satisfies start_s <= t < end_s, keep their timestamps and the
  source fps (variable frame rate is detected and reported, and kept on output);
- open sources only with the allowed demuxers (`ALLOWED_FORMATS`, judged on the bytes, never on the
  file name) and the `file` protocol: a concat script, an HLS playlist or an image sequence that
  names other files is refused before anything it names is opened;
- refuse a segment longer than `max_clip_s`, frames above `max_pixels`, a working frame above
  `max_pixels` or `max_aspect`, before decoding them (from the header) and again on the first decoded
  frame (headers lie);
- hold at most `max_clip_s` x `max_fps` frames, whatever rate the header claims;
- work resolution: short side scaled to `short_side`, each side rounded to a multiple of 64;
- output at the source's displayed size rounded down to even sides (yuv420p needs them),
  H.264 yuv420p with +faststart; audio dropped unless asked; no source metadata is copied.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from corpus_anon.errors import ClipError

log = logging.getLogger(__name__)

_EPS = 1e-9


def work_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) with the short side scaled to `short_side` and both rounded to multiples of 64."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad frame size {width}x{height}")
    k = short_side / min(width, height)
    w = max(64, int(round(width * k / 64)) * 64)
    h = max(64, int(round(height * k / 64)) * 64)
    return w, h


def even_size(width: int, height: int) -> tuple[int, int]:
    """The output size: the source's, rounded down to even sides (never below 2)."""
    return max(2, width - width % 2), max(2, height - height % 2)


@dataclass
class DecodedClip:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB at work resolution
    timestamps: np.ndarray  # (N,) seconds from the segment start
    fps: Fraction  # the source's average rate
    vfr: bool
    src_width: int  # displayed size of the source (after rotation)
    src_height: int
    start_s: float
    end_s: float | None
    rotation: int = 0
    has_audio: bool = False
    source_path: str = ""

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def out_size(self) -> tuple[int, int]:
        return even_size(self.src_width, self.src_height)

    @property
    def duration_s(self) -> float:
        if self.n_frames == 0:
            return 0.0
        return float(self.timestamps[-1]) + 1.0 / float(self.fps)


# The demuxers a source may be opened with (FFmpeg's names, as `container.format.name` reports
# them): ISO-BMFF (MP4/MOV), Matroska/WebM, AVI, MPEG-TS and MPEG-PS (`manifest build` lists .mpg
# files). None of them reads another file (the MOV demuxer follows external data references only
# with `enable_drefs`, off by default). Every other demuxer is refused: concat and HLS would decode
# files the script names, image2 a sequence of files, and each extra parser is attack surface.
ALLOWED_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "mpeg")
ALLOWED_LABEL = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS or MPEG-PS"
_OPEN_OPTIONS = {"format_whitelist": ",".join(ALLOWED_FORMATS), "protocol_whitelist": "file"}
# What a refused text file most likely is, for the error sentence (the first bytes).
_SCRIPTS = ((b"ffconcat", "an FFmpeg concat script"), (b"#EXTM3U", "an HLS playlist"))


def open_source(src: Any, name: str | None = None) -> Any:
    """Open a source video (a local path or a readable binary file object) for reading with only
    the allowed demuxers and the `file` protocol. FFmpeg probes the bytes, then refuses any other
    demuxer before it reads a header, so nothing a hostile file names is ever opened. Raises
    ClipError in one sentence."""
    import av

    shown = name or (src if isinstance(src, str) else getattr(src, "name", "the input"))
    # "file:" + an absolute path: a name such as "concat:a|b" or "http://..." stays a file name.
    target = "file:" + os.path.abspath(src) if isinstance(src, str) else src
    try:
        c = av.open(target, "r", container_options=dict(_OPEN_OPTIONS), metadata_errors="ignore")
    except av.FFmpegError as e:
        script = _script(src)
        if script:
            raise ClipError(f"the input is {script}, not an allowed video container ({ALLOWED_LABEL}); "
                            "refused before reading it.") from None
        if isinstance(e, av.ArgumentError):
            # EINVAL at open: FFmpeg recognised the bytes as a format outside the allow-list.
            raise ClipError(f"the input is not in an allowed video container ({ALLOWED_LABEL}); "
                            "refused before reading it.") from None
        raise ClipError(_unreadable(src, e) if isinstance(src, str) else
                        f"{shown} is not a readable video ({_ffmsg(e)}).") from None
    if c.format.name not in ALLOWED_FORMATS:  # the allow-list again, on the opened container
        c.close()
        raise ClipError(f"the input is a {c.format.name} file, not an allowed video container ({ALLOWED_LABEL}); "
                        "refused before decoding it.")
    return c


def _script(src: Any) -> str | None:
    """What a text file that names other files (concat script, HLS playlist) is, from its first
    bytes, for the error sentence; None for anything else."""
    head = b""
    try:
        if isinstance(src, str):
            with open(src, "rb") as f:
                head = f.read(64)
        elif hasattr(src, "seek"):
            src.seek(0)
            head = src.read(64)
    except (OSError, ValueError):
        return None
    return next((what for magic, what in _SCRIPTS if head.lstrip().startswith(magic)), None)


def _unreadable(path: str, e: Exception) -> str:
    """One sentence on why a file that FFmpeg cannot open is not a video we can read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        size, head = None, b""
    if size == 0:
        return "the input is an empty file (0 bytes)."
    if head[4:8] == b"ftyp":
        # An ISO-BMFF file header whose index (moov box) cannot be read: an interrupted upload.
        return f"the input starts like an MP4 but cannot be opened, so it is probably truncated ({_ffmsg(e)})."
    return f"the input is not a readable video ({_ffmsg(e)})."


def _ffmsg(e: Exception) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).split("\n")[0].rstrip(".")


def _video_stream(container):
    if not container.streams.video:
        raise ClipError("the input has no video stream.")
    return container.streams.video[0]


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def start_stream(container: Any, vs: Any, start_s: float, threads: int = 0) -> None:
    """Set up a video stream for decoding from `start_s`: codec threads, then a seek to the key
    frame at or before it. `decode_segment` and every pass that must see the same frames use it."""
    vs.thread_type = "AUTO"
    if threads:
        vs.codec_context.thread_count = int(threads)
    if start_s > 0:
        container.seek(int(start_s / vs.time_base), stream=vs, backward=True, any_frame=False)


def frame_time(frame: Any, index: int, time_base: Any, rate: Any) -> float:
    """A decoded frame's time in seconds: its pts, else its own time, else index / rate."""
    if frame.pts is not None and time_base is not None:
        return float(frame.pts * time_base)
    if frame.time is not None:
        return float(frame.time)
    if rate:
        return index / float(rate)
    raise ClipError("frames carry no timestamps and the stream no frame rate.")


def _expected_frames(duration: float | None, end_s: float | None, start: float, fps: Fraction | None,
                     max_clip_s: float, cap: int) -> int:
    """The header's estimate of the segment's frame count (a first allocation, not a limit), never
    above `cap`, the most frames a clip may have whatever the header says."""
    if not fps:
        return min(64, cap)
    end = end_s if end_s is not None else duration
    span = (end - start) if end is not None else max_clip_s
    return min(cap, max(8, int(min(span, max_clip_s) * float(fps)) + 2))


_FIRST_ALLOC_BYTES = 1 << 30  # a header with a wild frame rate must not reserve tens of GB up front


def _grow(buf: np.ndarray | None, n: int, shape: tuple[int, ...], expected: int, cap: int) -> np.ndarray:
    """A frame array with room for more frames (at most `cap` in all), holding the first `n` of `buf`."""
    per_frame = int(np.prod(shape))
    if buf is None:
        size = max(min(expected, _FIRST_ALLOC_BYTES // per_frame), 8)
    else:
        size = max(2 * len(buf), 8)
    out = np.empty((min(size, cap), *shape), dtype=np.uint8)
    if buf is not None:
        out[:n] = buf[:n]
    return out


def frame_cap(max_clip_s: float, max_fps: float) -> int:
    """The most frames a clip may have: `max_clip_s` x `max_fps`, whatever its header claims."""
    return max(1, int(math.floor(max_clip_s * max_fps + _EPS)))


def check_frame_size(width: int, height: int, *, short_side: int, max_pixels: int, max_aspect: float,
                     when: str) -> tuple[int, int]:
    """The working size (`work_size`) of frames of width x height, or a ClipError when the frames
    themselves or the working frame exceed `max_pixels`, or their aspect ratio `max_aspect`: a
    16x518400 stream passes a pixel limit at its own size but its working frame would not."""
    if width <= 0 or height <= 0:
        raise ClipError("the video stream reports no frame size.")
    if width * height > max_pixels:
        raise ClipError(f"frames of {width}x{height} exceed video.max_pixels ({max_pixels}); {when}.")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect + _EPS:
        raise ClipError(f"frames of {width}x{height} have an aspect ratio of {aspect:.1f}, above "
                        f"video.max_aspect ({max_aspect:g}); {when}.")
    w, h = work_size(width, height, short_side)
    if w * h > max_pixels:
        raise ClipError(f"frames of {width}x{height} would be worked on at {w}x{h}, above video.max_pixels "
                        f"({max_pixels}); {when}.")
    return w, h


def decode_segment(
    path: str,
    start_s: float | None,
    end_s: float | None,
    *,
    short_side: int,
    max_clip_s: float,
    max_pixels: int,
    max_aspect: float = 4.0,
    max_fps: float = 120.0,
    check: Callable[[], None] | None = None,
    threads: int = 0,
) -> DecodedClip:
    """Decode frames with start_s <= t < end_s at the work resolution. Raises ClipError.

    Every limit is checked on the header before decoding and again on what is decoded: the first
    frame's size, each frame's pixels, the frames' times and their count (at most
    `frame_cap(max_clip_s, max_fps)`), so a header that lies costs at most one frame."""
    import av

    start = float(start_s or 0.0)
    if end_s is not None and (math.isnan(end_s)):
        end_s = None
    if start < 0 or (end_s is not None and end_s <= start):
        raise ClipError(f"segment [{start}, {end_s}) is empty or negative.")
    if end_s is not None and end_s - start > max_clip_s + _EPS:
        raise ClipError(
            f"segment of {end_s - start:.2f} s is longer than video.max_clip_s ({max_clip_s} s)."
        )
    cap = frame_cap(max_clip_s, max_fps)
    sizes = dict(short_side=short_side, max_pixels=max_pixels, max_aspect=max_aspect)

    with open_source(path) as c:
        vs = _video_stream(c)
        cw, ch = vs.codec_context.width, vs.codec_context.height
        check_frame_size(cw, ch, when="refused before decoding", **sizes)
        duration = _duration(c, vs)
        if duration is not None and start >= duration - _EPS:
            raise ClipError(f"segment starts at {start:.2f} s, past the end of the video ({duration:.2f} s).")
        if end_s is None and duration is not None and duration - start > max_clip_s + _EPS:
            raise ClipError(
                f"the clip runs {duration - start:.2f} s, longer than video.max_clip_s ({max_clip_s} s)."
            )
        rate = vs.average_rate or vs.guessed_rate
        fps = Fraction(rate) if rate else None
        header_fps = fps
        if fps is not None and not 0 < fps <= max_fps:
            # A rate the clip cannot have: never trusted, measured from the frames' times instead.
            log.info("%s: the header's frame rate %.6g is outside (0, video.max_fps]; measured from the "
                     "frames instead", path, float(fps))
            fps = None
        start_stream(c, vs, start, threads)

        # Frames go into one preallocated array (grown by doubling when the header's estimate is
        # short, never past `cap`): no list of fresh per-frame arrays and no second copy for
        # np.stack; the decoder's own frame buffers are recycled right away.
        buf: np.ndarray | None = None
        n = 0
        times: list[float] = []
        rotation = 0
        size: tuple[int, int] | None = None
        src_w, src_h = cw, ch
        try:
            for i, frame in enumerate(c.decode(vs)):
                t = frame_time(frame, i, vs.time_base, fps)
                if frame.width * frame.height > max_pixels:
                    # The header can understate the size (an in-band SPS changes it mid-stream):
                    # stop at the first such frame instead of decoding the rest.
                    raise ClipError(
                        f"a frame of {frame.width}x{frame.height} at {t:.2f} s exceeds video.max_pixels "
                        f"({max_pixels}); the stream's frame size grows after its header."
                    )
                if t < start - _EPS:
                    continue
                if end_s is not None and t >= end_s - _EPS:
                    break
                if t - start > max_clip_s + _EPS:
                    raise ClipError(
                        f"the clip runs past video.max_clip_s ({max_clip_s} s) from {start:.2f} s."
                    )
                if n >= cap:
                    shown = f"{float(header_fps):.6g} fps" if header_fps else "none"
                    raise ClipError(
                        f"the clip has more than {cap} frames, the most video.max_clip_s ({max_clip_s:g} s) "
                        f"x video.max_fps ({max_fps:g}) allow, whatever its header's rate ({shown}) says."
                    )
                if size is None:
                    # The working size from the first decoded frame, checked again: headers lie.
                    src_w, src_h = frame.width, frame.height
                    size = check_frame_size(src_w, src_h, when="the stream's header said "
                                            f"{cw}x{ch}", **sizes)
                    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                    if rotation in (90, 270):
                        size = size[::-1]
                w, h = size
                coded = (h, w) if rotation in (90, 270) else (w, h)
                rgb = frame.reformat(
                    width=coded[0], height=coded[1], format="rgb24", interpolation="AREA"
                ).to_ndarray()
                if rotation:
                    # Rotate to the displayed orientation (display matrix rotation is counter-clockwise).
                    rgb = np.rot90(rgb, k=rotation // 90)
                if buf is None or n == len(buf):
                    buf = _grow(buf, n, rgb.shape, _expected_frames(duration, end_s, start, fps, max_clip_s, cap),
                                cap)
                buf[n] = rgb
                n += 1
                times.append(t)
                if check is not None and n % 16 == 0:
                    check()
        except av.FFmpegError as e:
            if not n:
                raise ClipError(f"the video could not be decoded ({_ffmsg(e)}).") from None
            raise ClipError(
                f"the video is corrupt after {n} frames ({_ffmsg(e)})."
            ) from None
        has_audio = bool(c.streams.audio)

    if not n:
        if duration is None or start < duration:
            raise ClipError(
                f"no frames were decoded in [{start:.2f}, {end_s}) s; the file may be truncated or the "
                "segment past its end."
            )
        raise ClipError(f"segment starts at {start:.2f} s, past the end of the video.")
    ts = np.asarray(times, dtype=np.float64) - start
    diffs = np.diff(ts)
    if fps is None:
        fps = Fraction(1 / float(np.median(diffs))).limit_denominator(1001) if len(diffs) else Fraction(25)
    vfr = bool(len(diffs) > 1 and (diffs.max() - diffs.min()) > 0.25 * float(np.median(diffs)))
    disp_w, disp_h = (src_h, src_w) if rotation in (90, 270) else (src_w, src_h)
    return DecodedClip(
        # a view when the estimate was close (untouched pages of the tail cost no memory), else a copy
        frames=buf[:n] if n >= 0.8 * len(buf) else buf[:n].copy(),
        timestamps=ts,
        fps=fps,
        vfr=vfr,
        src_width=disp_w,
        src_height=disp_h,
        start_s=start,
        end_s=end_s,
        rotation=rotation,
        has_audio=has_audio,
        source_path=path,
    )


def _audio_packets(src_path: str, start: float, end: float | None, out_stream) -> list:
    """Decode the source audio in [start, end), cut at sample precision, encode to the output's AAC."""
    import av

    packets = []
    with open_source(src_path) as c:
        if not c.streams.audio:
            return packets
        ain = c.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout=out_stream.layout.name, rate=out_stream.rate)
        if start > 0:
            c.seek(int(start / ain.time_base), stream=ain, backward=True)
        rate = out_stream.rate
        written = 0
        pending: list[np.ndarray] = []
        for frame in c.decode(ain):
            if frame.pts is None:
                continue
            t0 = float(frame.pts * ain.time_base)
            for rf in resampler.resample(frame):
                arr = rf.to_ndarray()  # (channels, samples) float32 planar
                n = arr.shape[1]
                t_first = t0
                t0 += n / rate
                lo = max(0, int(round((start - t_first) * rate)))
                hi = n if end is None else min(n, int(round((end - t_first) * rate)))
                if hi <= lo:
                    continue
                pending.append(arr[:, lo:hi])
            if end is not None and t0 >= end:
                break
        if not pending:
            return packets
        audio = np.concatenate(pending, axis=1)
        frame_size = out_stream.codec_context.frame_size or 1024
        for off in range(0, audio.shape[1], frame_size):
            chunk = np.ascontiguousarray(audio[:, off : off + frame_size])
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=out_stream.layout.name)
            af.sample_rate = rate
            af.pts = written
            af.time_base = Fraction(1, rate)
            written += chunk.shape[1]
            packets.extend(out_stream.encode(af))
        packets.extend(out_stream.encode(None))
    return packets


def _rgb_to_i420(img: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) to planar yuv420p (3H/2, W): BT.601 limited range, as swscale's default; OpenCV
    converts about 3x faster than swscale (benchmarks/README.md, P5), within 1 code value on average
    (chroma at sharp edges differs most)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2YUV_I420)


def encode_mp4(
    frames: np.ndarray,
    timestamps: np.ndarray,
    fps: Fraction,
    out_size: tuple[int, int],
    path: str,
    *,
    crf: int = 18,
    preset: str = "veryfast",
    audio_from: tuple[str, float, float | None] | None = None,
    check: Callable[[], None] | None = None,
    threads: int = 0,
) -> None:
    """Encode RGB frames (any size) to H.264 yuv420p MP4 at `out_size`, timestamps kept. With
    `threads` > 0, x264 uses exactly that many threads: the same frames then give the same bytes
    wherever they are encoded (with 0, x264 picks from the CPUs it sees)."""
    import av

    ow, oh = out_size
    if ow % 2 or oh % 2:
        raise ValueError(f"output size must be even, got {ow}x{oh}")
    if len(frames) != len(timestamps):
        raise ValueError("frames and timestamps differ in length")
    tb = Fraction(1, 90000)
    with av.open(path, "w", format="mp4", options={"movflags": "+faststart"}) as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height = ow, oh
        vs.pix_fmt = "yuv420p"
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = {"crf": str(crf), "preset": preset, **({"threads": str(int(threads))} if threads else {})}
        a_packets: list = []
        if audio_from is not None:
            src, a_start, a_end = audio_from
            with open_source(src) as probe_c:
                has_audio = bool(probe_c.streams.audio)
                rate = probe_c.streams.audio[0].rate if has_audio else 0
                chans = probe_c.streams.audio[0].channels if has_audio else 0
            if has_audio:
                ast = out.add_stream("aac", rate=rate or 48000)
                ast.layout = "stereo" if chans >= 2 else "mono"
                ast.options = {}
                a_packets = _audio_packets(src, a_start, a_end, ast)

        def mux_audio_until(t: float | None) -> None:
            while a_packets and (t is None or float(a_packets[0].pts * a_packets[0].time_base) <= t):
                out.mux(a_packets.pop(0))

        last_pts = -1
        for i, (img, t) in enumerate(zip(frames, timestamps)):
            if (img.shape[1], img.shape[0]) != (ow, oh):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                interp = "AREA" if img.shape[1] > ow else "BICUBIC"
                vf = vf.reformat(width=ow, height=oh, format="yuv420p", interpolation=interp)
            else:
                vf = av.VideoFrame.from_ndarray(_rgb_to_i420(img), format="yuv420p")
            pts = max(int(round(float(t) / tb)), last_pts + 1)
            last_pts = pts
            vf.pts = pts
            vf.time_base = tb
            for pkt in vs.encode(vf):
                out.mux(pkt)
            mux_audio_until(float(t))
            if check is not None and i % 16 == 15:
                check()
        for pkt in vs.encode(None):
            out.mux(pkt)
        mux_audio_until(None)
