"""Test media made on the fly (nothing binary is committed)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def gradient_frame(i: int, w: int, h: int) -> np.ndarray:
    """A frame whose content encodes its index (a moving bar over a gradient)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    img[..., 2] = (i * 7) % 256
    x = (i * 3) % max(1, w - 8)
    img[:, x : x + 8] = 255
    return img


def make_video(
    path: str,
    n_frames: int = 60,
    fps: int = 30,
    size: tuple[int, int] = (160, 120),
    *,
    audio: bool = False,
    metadata: dict[str, str] | None = None,
    pts_s: list[float] | None = None,
    frames: list[np.ndarray] | None = None,
) -> str:
    """H.264 MP4 with optional AAC audio (a sine), container metadata and explicit timestamps."""
    w, h = size
    tb = Fraction(1, 90000) if pts_s is not None else Fraction(1, fps)
    with av.open(path, "w", format="mp4") as c:
        for k, v in (metadata or {}).items():
            c.metadata[k] = v
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.options = {"preset": "ultrafast", "crf": "12"}
        ast = None
        if audio:
            ast = c.add_stream("aac", rate=44100)
            ast.layout = "stereo"
        for i in range(n_frames):
            img = frames[i] if frames is not None else gradient_frame(i, w, h)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = int(round(pts_s[i] / tb)) if pts_s is not None else i
            f.time_base = tb
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
        if ast is not None:
            total = int(44100 * n_frames / fps)
            n = 0
            while n < total:
                k = min(1024, total - n)
                arr = (0.3 * np.sin(np.arange(n, n + k) / 15.0))[None].repeat(2, 0).astype(np.float32)
                af = av.AudioFrame.from_ndarray(arr, format="fltp", layout="stereo")
                af.sample_rate, af.pts, af.time_base = 44100, n, Fraction(1, 44100)
                n += k
                for p in ast.encode(af):
                    c.mux(p)
            for p in ast.encode(None):
                c.mux(p)
    return path


def read_frames(path: str) -> tuple[np.ndarray, list[float], Fraction]:
    with av.open(path) as c:
        vs = c.streams.video[0]
        frames, ts = [], []
        for f in c.decode(vs):
            frames.append(f.to_ndarray(format="rgb24"))
            ts.append(float(f.pts * vs.time_base))
        return np.stack(frames), ts, Fraction(vs.average_rate)


def face_frames(n: int, size: tuple[int, int] = (320, 240), face_px: int = 96,
                with_face: bool = True) -> list[np.ndarray]:
    """Frames with the (public-domain) astronaut face from scikit-image pasted at the centre."""
    from skimage import data
    from skimage.transform import resize

    w, h = size
    face = (resize(data.astronaut()[40:190, 160:290], (face_px, face_px), anti_aliasing=True) * 255).astype(np.uint8)
    out = []
    for i in range(n):
        img = np.full((h, w, 3), (180, 190, 200), np.uint8)
        if with_face:
            x0 = w // 2 - face_px // 2 + int(4 * np.sin(i / 5))
            y0 = h // 2 - face_px // 2 - 20
            img[y0 : y0 + face_px, x0 : x0 + face_px] = face
        out.append(img)
    return out


def make_container_video(path: str, fmt: str, n_frames: int = 12, size: tuple[int, int] = (160, 120), *,
                         codec: str = "libx264", declared_fps: float = 12, interval_s: float | None = None,
                         time_base: Fraction | None = None, pix_fmt: str = "yuv420p") -> str:
    """A video in any container FFmpeg writes (`fmt`: "matroska", "avi", "mpegts", "mpeg", ...), its
    frames `interval_s` apart (default 1 / declared_fps) while the header declares `declared_fps`:
    Matroska stores the declared rate as it is given, so a header can lie about the frames' rate."""
    w, h = size
    interval = interval_s if interval_s is not None else 1.0 / declared_fps
    tb = time_base or Fraction(1, 1000)
    with av.open(path, "w", format=fmt) as c:
        vs = c.add_stream(codec, rate=Fraction(declared_fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            vs.time_base = vs.codec_context.time_base = tb
            vs.options = {"preset": "ultrafast"}
        for i in range(n_frames):
            f = av.VideoFrame.from_ndarray(gradient_frame(i, w, h), format="rgb24")
            if codec == "libx264":
                f.pts, f.time_base = int(round(i * interval / tb)), tb
            else:
                f.pts = i  # codecs with a fixed rate (mpeg2video, mpeg4 in AVI) count frames
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
    return path
