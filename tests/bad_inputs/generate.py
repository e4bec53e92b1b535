"""One function per kind of bad (or awkward) input: it writes the input into a `Dest` and returns
the manifest row(s) that use it.

Every function has the signature `make(dest, clip_id) -> list[row]`; a row is a dict with the
manifest's columns (`clip_id, video_uri, signer_id, start_s, end_s`). Videos are small (160x120 or
so, 12-24 frames, H.264 ultrafast) and made with `tests.media.make_video`; the expected outcome of
each kind lives in the table of `tests/e2e/test_bad_inputs.py`, not here.

Videos that a check compares against are also left in `dest.scratch` as `{clip_id}.src.mp4`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from tests.media import make_container_video, make_video

Row = dict[str, Any]
Maker = Callable[["Dest", str], list[Row]]

FPS = 12
N_FRAMES = 24
SIZE = (160, 120)

# The limits of the e2e run (tests/e2e/test_bad_inputs.py) that the hostile kinds are made against:
# every other input is far below them.
MAX_BYTES = 2_000_000  # video.max_bytes
MAX_CLIP_S = 10.0  # video.max_clip_s
MAX_FPS = 30.0  # video.max_fps: at most 300 frames

# several_faces: (centre x, centre y, side) in source pixels of a 240x120 frame. The middle face is
# the largest and most central, so the signer rule picks it; all are >= 56 px at the work size
# (short side 128), the smallest face OpenCV's Haar cascade finds in these frames.
SEVERAL_FACES_SIZE = (240, 120)
SEVERAL_FACES = ((120, 50, 70), (38, 64, 60), (202, 64, 60))
# good_face: one signer face large enough for dlib's HOG detector at work size 128.
GOOD_FACE = (80, 55, 80)


@dataclass
class Dest:
    """Where inputs are written: a local folder (`fs=None`) or `bucket/prefix` on an S3 filesystem
    (s3fs). `scratch` is a local folder where videos are built (and kept for comparisons)."""

    root: str
    scratch: str
    fs: Any = None

    def __post_init__(self) -> None:
        os.makedirs(self.scratch, exist_ok=True)
        if self.fs is None:
            os.makedirs(self.root, exist_ok=True)

    def uri(self, name: str) -> str:
        if self.fs is None:
            return os.path.join(self.root, name)
        return f"s3://{self.root.strip('/')}/{name}"

    def write(self, name: str, data: bytes) -> str:
        if self.fs is None:
            with open(self.uri(name), "wb") as f:
                f.write(data)
        else:
            self.fs.pipe(f"{self.root.strip('/')}/{name}", data)
        return self.uri(name)

    def scratch_path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def video(self, clip_id: str, **make_kw: Any) -> tuple[str, str]:
        """Make a video in scratch (`{clip_id}.src.mp4`), write it to the destination; (uri, local path)."""
        local = self.scratch_path(f"{clip_id}.src.mp4")
        make_video(local, **{"n_frames": N_FRAMES, "fps": FPS, "size": SIZE, **make_kw})
        with open(local, "rb") as f:
            return self.write(f"{clip_id}.mp4", f.read()), local


def row(clip_id: str, uri: str, start_s: float | None = None, end_s: float | None = None,
        signer_id: str | None = None) -> Row:
    return {"clip_id": clip_id, "video_uri": uri, "signer_id": signer_id or f"signer-{clip_id}"[:64],
            "start_s": start_s, "end_s": end_s}


def manifest_table(rows: list[Row]) -> Any:
    import pyarrow as pa

    schema = pa.schema([("clip_id", pa.string()), ("video_uri", pa.string()), ("signer_id", pa.string()),
                        ("start_s", pa.float64()), ("end_s", pa.float64()), ("kind", pa.string())])
    return pa.Table.from_pylist([{"kind": None, **r} for r in rows], schema=schema)


# ---- picture helpers ------------------------------------------------------------------------------
def astronaut_face(side: int, flip: bool = False) -> np.ndarray:
    """The public-domain astronaut face from scikit-image, `side` px square (as tests.media uses)."""
    from skimage import data
    from skimage.transform import resize

    face = (resize(data.astronaut()[40:190, 160:290], (side, side), anti_aliasing=True) * 255).astype(np.uint8)
    return np.ascontiguousarray(face[:, ::-1]) if flip else face


def face_boxes(placements: tuple[tuple[int, int, int], ...], i: int) -> list[tuple[int, int, int, int]]:
    """Where each face of `placements` is in frame i: (x0, y0, x1, y1) in source pixels."""
    dx = int(round(2 * np.sin(i / 4)))
    return [(cx - s // 2 + dx, cy - s // 2, cx - s // 2 + dx + s, cy - s // 2 + s) for cx, cy, s in placements]


def faces_frames(n: int, size: tuple[int, int], placements: tuple[tuple[int, int, int], ...]) -> list[np.ndarray]:
    """Frames with one astronaut face per placement (alternately mirrored), moving slightly."""
    w, h = size
    faces = [astronaut_face(s, flip=k % 2 == 1) for k, (_, _, s) in enumerate(placements)]
    out = []
    for i in range(n):
        img = np.full((h, w, 3), (180, 190, 200), np.uint8)
        for face, (x0, y0, x1, y1) in zip(faces, face_boxes(placements, i)):
            img[y0:y1, x0:x1] = face
        out.append(img)
    return out


# ---- MP4 surgery: a display matrix (rotation) in the track header ----------------------------------
def _boxes(data: bytes | bytearray, start: int, end: int):
    """(type, payload start, box end) of the ISO-BMFF boxes in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        yield kind.decode("latin-1"), pos + header, pos + size
        pos += size


def set_display_rotation(data: bytes, clockwise: int) -> bytes:
    """The MP4 with its (single) video track's tkhd matrix set to display the frames rotated
    `clockwise` degrees (90, 180 or 270), as phones write portrait video and as ffmpeg writes the
    `rotate` tag; the coded frames are unchanged."""
    out = bytearray(data)
    moov = next((b, e) for k, b, e in _boxes(out, 0, len(out)) if k == "moov")
    trak = next((b, e) for k, b, e in _boxes(out, *moov) if k == "trak")
    tkhd = next(b for k, b, e in _boxes(out, *trak) if k == "tkhd")
    version = out[tkhd]
    matrix_at = tkhd + 4 + (8 + 8 + 4 + 4 + 8 if version == 1 else 4 + 4 + 4 + 4 + 4) + 8 + 8
    w, h = (v >> 16 for v in struct.unpack(">II", out[matrix_at + 36 : matrix_at + 44]))
    one = 1 << 16
    a, b, c, d, tx, ty = {
        90: (0, one, -one, 0, h, 0), 180: (-one, 0, 0, -one, w, h), 270: (0, -one, one, 0, 0, w),
    }[clockwise % 360]
    out[matrix_at : matrix_at + 36] = struct.pack(">9i", a, b, 0, c, d, 0, tx << 16, ty << 16, 1 << 30)
    return bytes(out)


# ---- an H.264 stream whose frame size grows after its header -----------------------------------
def h264_size_change(path: str, small: tuple[int, int], n_small: int, big: tuple[int, int], n_big: int,
                     fps: int = FPS) -> str:
    """An MPEG-TS file with one H.264 stream: `n_small` frames at `small`, then an in-band SPS
    switches to `big`. With enough small frames first, FFmpeg's probe reports the small size only."""
    import av

    def encode(size: tuple[int, int], n: int) -> list[bytes]:
        w, h = size
        cc = av.CodecContext.create("libx264", "w")
        cc.width, cc.height, cc.pix_fmt = w, h, "yuv420p"
        cc.time_base, cc.framerate = Fraction(1, fps), Fraction(fps)
        cc.options = {"preset": "ultrafast"}
        out = []
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 60 + 3 * i, np.uint8), format="rgb24")
            frame.pts = i
            out += [bytes(pkt) for pkt in cc.encode(frame)]
        return out + [bytes(pkt) for pkt in cc.encode(None)]

    with av.open(path, "w", format="mpegts") as c:
        vs = c.add_stream("h264", rate=fps)
        vs.width, vs.height, vs.time_base = small[0], small[1], Fraction(1, fps)
        for i, data in enumerate(encode(small, n_small) + encode(big, n_big)):
            pkt = av.Packet(data)  # Annex B with in-band SPS/PPS, as x264 writes without global headers
            pkt.stream, pkt.time_base, pkt.pts, pkt.dts = vs, Fraction(1, fps), i, i
            c.mux(pkt)
    return path


# ---- error kinds: an error row, the other clips finish ------------------------------------------------
def corrupt_bytes(dest: Dest, clip_id: str) -> list[Row]:
    """Random bytes under a .mp4 name."""
    data = bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8))
    return [row(clip_id, dest.write(f"{clip_id}.mp4", data))]


def truncated_mp4(dest: Dest, clip_id: str) -> list[Row]:
    """The first third of a real MP4 (its moov atom, written last, is gone)."""
    _, local = dest.video(clip_id)
    with open(local, "rb") as f:
        data = f.read()
    return [row(clip_id, dest.write(f"{clip_id}.mp4", data[: len(data) // 3]))]


def empty_file(dest: Dest, clip_id: str) -> list[Row]:
    """A 0-byte object."""
    return [row(clip_id, dest.write(f"{clip_id}.mp4", b""))]


def not_a_video(dest: Dest, clip_id: str) -> list[Row]:
    """A text file under a .mp4 name."""
    return [row(clip_id, dest.write(f"{clip_id}.mp4", b"hello, I am a text file, not a video\n" * 20))]


def missing_object(dest: Dest, clip_id: str) -> list[Row]:
    """A URI under the allowed prefix where nothing was written."""
    return [row(clip_id, dest.uri(f"{clip_id}-never-written.mp4"))]


def segment_past_end(dest: Dest, clip_id: str) -> list[Row]:
    """A 2 s video and the segment [30, 31) s."""
    uri, _ = dest.video(clip_id)
    return [row(clip_id, uri, 30.0, 31.0)]


def frames_above_max_pixels(dest: Dest, clip_id: str) -> list[Row]:
    """DCI 4K frames (4096x2160 = 8,847,360 px), above the default video.max_pixels (3840x2160)."""
    frames = [np.zeros((2160, 4096, 3), np.uint8)] * 2
    uri, _ = dest.video(clip_id, n_frames=2, size=(4096, 2160), frames=frames)
    return [row(clip_id, uri)]


def frames_grow_above_max_pixels(dest: Dest, clip_id: str) -> list[Row]:
    """A stream whose header says 160x120 and whose frames switch to 4096x2160 after 60 frames."""
    local = h264_size_change(dest.scratch_path(f"{clip_id}.src.ts"), SIZE, 60, (4096, 2160), 2)
    with open(local, "rb") as f:
        return [row(clip_id, dest.write(f"{clip_id}.ts", f.read()))]


# ---- hostile kinds: refused before decoding, an error row each ------------------------------------
def ffconcat_script(dest: Dest, clip_id: str) -> list[Row]:
    """FFmpeg's concat script naming another clip's temp source (`good_face.src`: before the fix an
    actor kept each clip's source as `{clip_id}.src` in one folder): read as a video, it decodes
    that clip under this clip's id."""
    return [row(clip_id, dest.write(f"{clip_id}.mp4", b"ffconcat version 1.0\nfile good_face.src\n"))]


def aspect_too_wide(dest: Dest, clip_id: str) -> list[Row]:
    """A 16x518400 stream (FFV1 in Matroska; x264 refuses the size): exactly the default
    video.max_pixels at its own size, a ~25 GB working frame once its short side is scaled up."""
    local = make_container_video(dest.scratch_path(f"{clip_id}.src.mkv"), "matroska", 1, (16, 518400),
                                 codec="ffv1", pix_fmt="gray")
    with open(local, "rb") as f:
        return [row(clip_id, dest.write(f"{clip_id}.mkv", f.read()))]


def frame_rate_lie(dest: Dest, clip_id: str) -> list[Row]:
    """400 frames 10 ms apart (4 s at 100 fps) in Matroska whose header declares 10000 fps: a cap
    derived from the header would hold 200,000 frames; MAX_CLIP_S x MAX_FPS allows 300."""
    local = make_container_video(dest.scratch_path(f"{clip_id}.src.mkv"), "matroska", 400, (64, 48),
                                 declared_fps=10000, interval_s=0.01)
    with open(local, "rb") as f:
        return [row(clip_id, dest.write(f"{clip_id}.mkv", f.read()))]


def over_max_bytes(dest: Dest, clip_id: str) -> list[Row]:
    """A valid MP4 (a trailing 'free' box pads it) of MAX_BYTES + 500,000 bytes."""
    _, local = dest.video(clip_id)
    with open(local, "rb") as f:
        data = f.read()
    pad = MAX_BYTES + 500_000 - len(data)
    return [row(clip_id, dest.write(f"{clip_id}.mp4", data + struct.pack(">I4s", pad, b"free") + bytes(pad - 8)))]


# ---- reject kinds: the run refuses before any work ----------------------------------------------
def _one_video(dest: Dest, clip_id: str) -> str:
    return dest.video(clip_id, n_frames=12)[0]


def zero_length_segment(dest: Dest, clip_id: str) -> list[Row]:
    return [row(clip_id, _one_video(dest, clip_id), 1.0, 1.0)]


def segment_above_max_clip(dest: Dest, clip_id: str, max_clip_s: float = 60.0) -> list[Row]:
    return [row(clip_id, _one_video(dest, clip_id), 0.0, max_clip_s + 1.0)]


def duplicate_clip_ids(dest: Dest, clip_id: str) -> list[Row]:
    uri = _one_video(dest, clip_id)
    return [row(clip_id, uri, 0.0, 0.5), row(clip_id, uri, 0.5, 1.0)]


def _hostile_id(clip_id: str) -> Maker:
    def make(dest: Dest, name: str) -> list[Row]:
        return [row(clip_id, _one_video(dest, name), signer_id=f"signer-{name}")]

    return make


clip_id_traversal = _hostile_id("../x")
clip_id_slash = _hostile_id("a/b")
clip_id_nul = _hostile_id("a\x00b")
clip_id_too_long = _hostile_id("a" * 1000)
clip_id_trailing_newline = _hostile_id("abc\n")


def _uri(uri: str) -> Maker:
    def make(dest: Dest, clip_id: str) -> list[Row]:
        return [row(clip_id, uri)]

    return make


uri_file_outside = _uri("file:///etc/passwd")
uri_http = _uri("http://example.com/clip.mp4")
uri_other_bucket = _uri("s3://other-team/clip.mp4")


def uri_dotdot(dest: Dest, clip_id: str) -> list[Row]:
    """A URI that starts under the allowed prefix and climbs out of it with '..'."""
    if dest.fs is None:
        return [row(clip_id, dest.uri("../../../../../../etc/passwd"))]
    return [row(clip_id, dest.uri("../../other-team/clip.mp4"))]


# ---- ok kinds: processed correctly ----------------------------------------------------------------
def good_face(dest: Dest, clip_id: str) -> list[Row]:
    """The control: one signer face, centred."""
    uri, _ = dest.video(clip_id, frames=faces_frames(N_FRAMES, SIZE, (GOOD_FACE,)))
    return [row(clip_id, uri)]


def rotated_90(dest: Dest, clip_id: str) -> list[Row]:
    """Coded 160x120, displayed 120x160 (a display matrix rotating 90 degrees clockwise)."""
    _, local = dest.video(clip_id)
    with open(local, "rb") as f:
        data = set_display_rotation(f.read(), 90)
    with open(local, "wb") as f:
        f.write(data)
    return [row(clip_id, dest.write(f"{clip_id}.mp4", data))]


# Frame durations alternate 1/12 s and 1/4 s: 20 frames over about 2.6 s.
VFR_PTS = [float(t) for t in np.cumsum([0.0] + [1 / 12 if i % 3 else 1 / 4 for i in range(19)])]


def variable_frame_rate(dest: Dest, clip_id: str) -> list[Row]:
    uri, _ = dest.video(clip_id, n_frames=len(VFR_PTS), pts_s=VFR_PTS)
    return [row(clip_id, uri)]


def no_face(dest: Dest, clip_id: str) -> list[Row]:
    """Moving gradients and a bar, nothing like a face."""
    uri, _ = dest.video(clip_id)
    return [row(clip_id, uri)]


def several_faces(dest: Dest, clip_id: str) -> list[Row]:
    """Three faces; the middle one is the largest and most central (the signer)."""
    uri, _ = dest.video(clip_id, size=SEVERAL_FACES_SIZE,
                        frames=faces_frames(N_FRAMES, SEVERAL_FACES_SIZE, SEVERAL_FACES))
    return [row(clip_id, uri)]


KINDS: dict[str, Maker] = {
    # error
    "corrupt_bytes": corrupt_bytes, "truncated_mp4": truncated_mp4, "empty_file": empty_file,
    "not_a_video": not_a_video, "missing_object": missing_object, "segment_past_end": segment_past_end,
    "frames_above_max_pixels": frames_above_max_pixels, "frames_grow_above_max_pixels": frames_grow_above_max_pixels,
    "ffconcat_script": ffconcat_script, "aspect_too_wide": aspect_too_wide, "frame_rate_lie": frame_rate_lie,
    "over_max_bytes": over_max_bytes,
    # reject
    "zero_length_segment": zero_length_segment, "segment_above_max_clip": segment_above_max_clip,
    "duplicate_clip_ids": duplicate_clip_ids, "clip_id_traversal": clip_id_traversal,
    "clip_id_slash": clip_id_slash, "clip_id_nul": clip_id_nul, "clip_id_too_long": clip_id_too_long,
    "clip_id_trailing_newline": clip_id_trailing_newline, "uri_file_outside": uri_file_outside,
    "uri_http": uri_http, "uri_other_bucket": uri_other_bucket, "uri_dotdot": uri_dotdot,
    # ok
    "good_face": good_face, "rotated_90": rotated_90, "variable_frame_rate": variable_frame_rate,
    "no_face": no_face, "several_faces": several_faces,
}
