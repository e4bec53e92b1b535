import os
from fractions import Fraction

import av
import numpy as np
import pytest

from corpus_anon.errors import ClipError
from corpus_anon.io.video import decode_segment, encode_mp4, even_size, work_size
from tests.media import make_video, read_frames


def _decode(path, start=None, end=None, **kw):
    opts = dict(short_side=128, max_clip_s=60, max_pixels=10**8)
    opts.update(kw)
    return decode_segment(path, start, end, **opts)


def test_work_and_even_sizes():
    assert work_size(640, 480, 512) == (704, 512)
    assert work_size(480, 640, 512) == (512, 704)
    assert work_size(1920, 1080, 512) == (896, 512)
    assert work_size(100, 100, 64) == (64, 64)
    for w, h in [(640, 480), (333, 201), (1280, 719)]:
        ww, hh = work_size(w, h, 512)
        assert ww % 64 == 0 and hh % 64 == 0
    assert even_size(333, 201) == (332, 200)
    assert even_size(640, 480) == (640, 480)


def test_segment_boundaries_frames_and_timestamps(tmp_path):
    src = make_video(str(tmp_path / "a.mp4"), n_frames=90, fps=30)
    whole = _decode(src)
    assert whole.n_frames == 90 and whole.fps == Fraction(30) and not whole.vfr
    seg = _decode(src, 0.5, 1.5)
    assert seg.n_frames == 30
    assert np.allclose(seg.timestamps, np.arange(30) / 30)
    # Frame 15 is the first one inside: same picture as whole-clip frame 15.
    assert np.abs(seg.frames[0].astype(int) - whole.frames[15].astype(int)).mean() < 2
    # [start, end) is half-open: a boundary frame belongs to the next segment.
    a, b = _decode(src, 0.0, 1.0), _decode(src, 1.0, 2.0)
    assert a.n_frames == 30 and b.n_frames == 30
    assert seg.frames.shape[1:] == (128, 192, 3)  # 160x120 -> short side 128, multiples of 64


def test_encode_decode_roundtrip_keeps_frames_fps_and_size(tmp_path):
    src = make_video(str(tmp_path / "a.mp4"), n_frames=40, fps=25, size=(166, 122))
    clip = _decode(src)
    out = str(tmp_path / "o.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out, crf=10)
    frames, ts, fps = read_frames(out)
    assert frames.shape == (40, 122, 166, 3)
    assert fps == 25 and np.allclose(ts, np.arange(40) / 25, atol=1e-4)
    original, _, _ = read_frames(src)
    assert np.abs(frames.astype(int) - original.astype(int)).mean() < 6
    with av.open(out) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
    with open(out, "rb") as f:
        head = f.read(64 * 1024)
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head  # +faststart


def test_odd_source_size_is_written_even(tmp_path):
    # Odd sizes cannot be H.264 yuv420p sources either; the size rule applies to what we write.
    clip_frames = np.zeros((4, 64, 64, 3), np.uint8)
    out = str(tmp_path / "o.mp4")
    encode_mp4(clip_frames, np.arange(4) / 10, Fraction(10), even_size(101, 77), out)
    frames, _, _ = read_frames(out)
    assert frames.shape[1:3] == (76, 100)


def test_audio_dropped_by_default_and_copied_cut_on_request(tmp_path):
    src = make_video(str(tmp_path / "a.mp4"), n_frames=60, fps=30, audio=True)
    clip = _decode(src, 0.5, 1.5)
    assert clip.has_audio
    dropped = str(tmp_path / "drop.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, dropped)
    with av.open(dropped) as c:
        assert not c.streams.audio
    kept = str(tmp_path / "copy.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, kept, audio_from=(src, 0.5, 1.5))
    with av.open(kept) as c:
        a = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(a))
    # One second of audio (AAC adds up to one frame of priming/padding).
    assert abs(samples - 44100) <= 2048


def test_metadata_is_stripped(tmp_path):
    tags = {"location": "+40.7128-074.0060/", "make": "Apple", "model": "iPhone 15",
            "creation_time": "2024-01-01T00:00:00.000000Z", "comment": "signer: Jane Doe"}
    src = make_video(str(tmp_path / "a.mp4"), n_frames=10, metadata=tags)
    with av.open(src) as c:
        present = {k for k in tags if k in c.metadata}
    assert present, "the source should carry some of the tags for this test to mean anything"
    clip = _decode(src)
    out = str(tmp_path / "o.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out)
    with av.open(out) as c:
        kept = dict(c.metadata)
        for s in c.streams:
            kept.update(s.metadata)
    assert not (set(tags) & set(kept)), kept


def test_variable_frame_rate_timestamps_kept(tmp_path):
    pts = list(np.cumsum([0] + [1 / 30 if i % 3 else 1 / 10 for i in range(29)]))
    src = make_video(str(tmp_path / "vfr.mp4"), n_frames=30, fps=30, pts_s=pts)
    clip = _decode(src)
    assert clip.vfr
    assert np.allclose(clip.timestamps, pts, atol=1e-4)
    out = str(tmp_path / "o.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out)
    _, ts, _ = read_frames(out)
    assert np.allclose(ts, pts, atol=1e-4)


def test_limits_refuse_before_decoding(tmp_path):
    src = make_video(str(tmp_path / "a.mp4"), n_frames=60, fps=30, size=(160, 120))
    with pytest.raises(ClipError, match="max_pixels"):
        _decode(src, max_pixels=160 * 120 - 1)
    with pytest.raises(ClipError, match="max_clip_s"):
        _decode(src, max_clip_s=1.0)
    with pytest.raises(ClipError, match="max_clip_s"):
        _decode(src, 0.0, 1.5, max_clip_s=1.0)
    with pytest.raises(ClipError, match="past the end"):
        _decode(src, 5.0, 6.0)


def test_frames_growing_past_max_pixels_after_the_header_are_refused(tmp_path):
    from tests.bad_inputs.generate import h264_size_change

    # The header (probed from the first frames) says 160x120; an in-band SPS switches to 320x240.
    src = h264_size_change(str(tmp_path / "grow.ts"), (160, 120), 60, (320, 240), 3)
    with av.open(src) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (160, 120)
    with pytest.raises(ClipError, match=r"a frame of 320x240 at .* exceeds video.max_pixels \(19200\); "
                                        r"the stream's frame size grows after its header\.$"):
        _decode(src, max_pixels=160 * 120, short_side=64)  # a 64x64 working frame fits the limit
    assert _decode(src, max_pixels=320 * 240).n_frames == 63


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_display_rotation_is_applied_and_not_written_again(tmp_path, clockwise):
    from tests.bad_inputs.generate import set_display_rotation

    src = make_video(str(tmp_path / "a.mp4"), n_frames=6, fps=12, size=(160, 120))
    rotated = str(tmp_path / "r.mp4")
    with open(src, "rb") as f, open(rotated, "wb") as g:
        g.write(set_display_rotation(f.read(), clockwise))
    coded, _, _ = read_frames(rotated)  # PyAV leaves the display matrix to the caller
    clip = _decode(rotated, short_side=64)
    quarter = clockwise in (90, 270)
    assert (clip.src_width, clip.src_height) == ((120, 160) if quarter else (160, 120))
    assert clip.rotation == (360 - clockwise) % 360  # counter-clockwise, as FFmpeg reports it
    out = str(tmp_path / "o.mp4")
    encode_mp4(clip.frames, clip.timestamps, clip.fps, clip.out_size, out)
    frames, _, _ = read_frames(out)
    with av.open(out) as c:
        assert next(c.decode(video=0)).rotation == 0
    shown = np.rot90(coded, k=-clockwise // 90, axes=(1, 2)).astype(int)
    assert frames.shape == shown.shape
    assert np.abs(frames - shown).mean() < 8


@pytest.mark.parametrize("kind,needle", [
    ("corrupt", "not a readable video"),
    ("truncated", "starts like an MP4 but cannot be opened, so it is probably truncated"),
    ("text", "not a readable video"),
    ("empty", "the input is an empty file (0 bytes)."),
])
def test_bad_bytes_are_one_sentence_clip_errors(tmp_path, kind, needle):
    good = make_video(str(tmp_path / "good.mp4"), n_frames=60)
    data = open(good, "rb").read()
    bad = str(tmp_path / "bad.mp4")
    payload = {
        "corrupt": bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)),
        "truncated": data[: len(data) // 3],
        "text": b"this is not a video\n" * 50,
        "empty": b"",
    }[kind]
    with open(bad, "wb") as f:
        f.write(payload)
    with pytest.raises(ClipError) as e:
        _decode(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    assert needle in msg


def test_a_fixed_thread_count_gives_the_same_bytes_from_any_thread(tmp_path):
    """x264 with an explicit thread count is bit-reproducible, in the main thread or a pool's."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    from fractions import Fraction

    import numpy as np

    from corpus_anon.io.video import encode_mp4
    from tests.media import gradient_frame

    frames = np.stack([gradient_frame(i, 128, 96) for i in range(24)])
    ts = np.arange(24) / 24.0

    def enc(i: int) -> str:
        path = str(tmp_path / f"o{i}.mp4")
        encode_mp4(frames, ts, Fraction(24), (128, 96), path, threads=1)
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    with ThreadPoolExecutor(3) as pool:
        digests = {enc(0), *pool.map(enc, range(1, 7))}
    assert len(digests) == 1


# ---- hostile files: refused before decoding --------------------------------------------------------
class _Fifo:
    """A named pipe that serves `payload` to whoever opens it for reading, and records whether
    anyone did: the proof that a file was (or was never) opened."""

    def __init__(self, path: str, payload: bytes) -> None:
        import threading

        self.path, self.payload, self.opened, self._closing = path, payload, False, False
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with open(self.path, "wb") as f:  # blocks until a reader opens the pipe
            if not self._closing:
                self.opened = True
                try:
                    f.write(self.payload)
                except BrokenPipeError:
                    pass

    def close(self) -> bool:
        """Unblock the writer if nobody opened the pipe; whether someone else did."""
        opened = self.opened
        if not opened:
            self._closing = True
            with open(self.path, "rb"):
                pass
        self._thread.join(5)
        return opened


def test_an_ffconcat_script_is_refused_and_never_opens_the_file_it_names(tmp_path):
    victim = make_video(str(tmp_path / "victim.mp4"), n_frames=10, fps=10)
    script = tmp_path / "attacker.src"
    script.write_text("ffconcat version 1.0\nfile victim.src\n")
    payload = open(victim, "rb").read()

    # The control: FFmpeg's default probing opens the concat script and decodes the file it names.
    fifo = _Fifo(str(tmp_path / "victim.src"), payload)
    with av.open(str(script)) as c:
        assert c.format.name == "concat" and sum(1 for _ in c.decode(video=0)) == 10
    assert fifo.close()
    os.remove(tmp_path / "victim.src")

    fifo = _Fifo(str(tmp_path / "victim.src"), payload)
    with pytest.raises(ClipError) as e:
        _decode(str(script))
    assert not fifo.close(), "the concat script's target was opened"
    assert str(e.value) == ("the input is an FFmpeg concat script, not an allowed video container "
                            "(MP4/MOV, Matroska/WebM, AVI, MPEG-TS or MPEG-PS); refused before reading it.")


@pytest.mark.parametrize("kind,name", [("hls", "clip.mp4"), ("hls", "clip.m3u8"), ("png", "clip.mp4"),
                                       ("png", "clip.png"), ("raw_h264", "clip.mp4"), ("raw_h264", "clip.h264")])
def test_other_demuxers_are_refused_whatever_the_file_name(tmp_path, kind, name):
    import cv2

    from tests.media import gradient_frame

    path = str(tmp_path / name)  # the name may claim MP4 or the true format; the bytes decide
    if kind == "hls":
        make_video(str(tmp_path / "seg.ts"), n_frames=4)
        open(path, "w").write("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nseg.ts\n#EXT-X-ENDLIST\n")
    elif kind == "png":
        open(path, "wb").write(cv2.imencode(".png", gradient_frame(0, 64, 48))[1].tobytes())
    else:
        from tests.bad_inputs.generate import h264_size_change

        ts = h264_size_change(str(tmp_path / "a.ts"), (160, 120), 6, (160, 120), 0)
        with av.open(ts) as c, open(path, "wb") as f:  # the bare Annex B stream (FFmpeg's "h264" demuxer)
            for pkt in c.demux(video=0):
                f.write(bytes(pkt))
    with pytest.raises(ClipError, match=r"(not in|is an HLS playlist, not) an allowed video container \(MP4/MOV, "
                                        r"Matroska/WebM, AVI, MPEG-TS or MPEG-PS\); refused before reading it\.$"):
        _decode(path)


@pytest.mark.parametrize("fmt,codec", [("matroska", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4"),
                                       ("mpegts", "libx264"), ("mpeg", "mpeg2video"), ("mov", "libx264")])
def test_every_allowed_container_decodes(tmp_path, fmt, codec):
    from tests.media import make_container_video

    path = make_container_video(str(tmp_path / "clip.src"), fmt, n_frames=12, codec=codec, declared_fps=12)
    clip = _decode(path)
    assert clip.n_frames == 12 and abs(float(clip.fps) - 12) < 0.1 and (clip.src_width, clip.src_height) == (160, 120)


def test_a_path_is_always_a_file_name_never_a_protocol(tmp_path, monkeypatch):
    make_video(str(tmp_path / "a.mp4"), n_frames=6)
    monkeypatch.chdir(tmp_path)
    with av.open("concat:a.mp4|a.mp4") as c:  # the control: FFmpeg's concat protocol reads a.mp4
        assert sum(1 for _ in c.decode(video=0)) == 6
    with pytest.raises(ClipError, match=r"^the input is not a readable video \(No such file or directory\)\.$"):
        _decode("concat:a.mp4|a.mp4")  # here it is the name of a file, which does not exist


def test_a_very_wide_stream_is_refused_by_its_aspect_ratio_before_decoding(tmp_path):
    from corpus_anon.io.video import check_frame_size

    # The 16x518400 stream: within max_pixels at its own size, a ~25 GB working frame.
    with pytest.raises(ClipError, match=r"frames of 16x518400 have an aspect ratio of 32400.0, above "
                                        r"video.max_aspect \(4\); refused before decoding\.$"):
        check_frame_size(16, 518400, short_side=512, max_pixels=3840 * 2160, max_aspect=4.0,
                         when="refused before decoding")
    src = make_video(str(tmp_path / "wide.mp4"), n_frames=4, size=(320, 16))
    with pytest.raises(ClipError, match=r"frames of 320x16 have an aspect ratio of 20.0, above "
                                        r"video.max_aspect \(4\); refused before decoding\.$"):
        _decode(src)
    assert _decode(src, max_aspect=20.0).frames.shape[1:] == (128, 2560, 3)


def test_the_working_frame_obeys_max_pixels(tmp_path):
    src = make_video(str(tmp_path / "a.mp4"), n_frames=4, size=(640, 160))
    # 102,400 px at its own size, 2048x512 = 1,048,576 px once its short side is scaled to 512.
    with pytest.raises(ClipError, match=r"frames of 640x160 would be worked on at 2048x512, above "
                                        r"video.max_pixels \(500000\); refused before decoding\.$"):
        _decode(src, short_side=512, max_pixels=500_000)
    assert _decode(src, short_side=128, max_pixels=500_000).frames.shape[1:] == (128, 512, 3)


def test_the_first_decoded_frame_is_checked_again(tmp_path):
    from tests.bad_inputs.generate import h264_size_change

    # The header (probed from the first frames) says 160x120; from 5 s on the frames are 640x32.
    src = h264_size_change(str(tmp_path / "a.ts"), (160, 120), 60, (640, 32), 12)
    with pytest.raises(ClipError, match=r"frames of 640x32 have an aspect ratio of 20.0, above video.max_aspect "
                                        r"\(4\); the stream's header said 160x120\.$"):
        _decode(src, 5.0, 6.0)


def test_frames_are_capped_by_max_clip_s_times_max_fps_whatever_the_header_says(tmp_path):
    from tests.media import make_container_video

    # 150 frames 10 ms apart (100 fps); the Matroska header declares 10000 fps.
    src = make_container_video(str(tmp_path / "a.mkv"), "matroska", 150, (64, 48), declared_fps=10000,
                               interval_s=0.01)
    with av.open(src) as c:
        assert c.streams.video[0].average_rate == 10000
    with pytest.raises(ClipError) as e:
        _decode(src, max_clip_s=10, max_fps=10)
    assert str(e.value) == ("the clip has more than 100 frames, the most video.max_clip_s (10 s) x "
                            "video.max_fps (10) allow, whatever its header's rate (10000 fps) says.")
    clip = _decode(src, max_clip_s=10, max_fps=120)
    assert clip.n_frames == 150 and clip.fps == 100  # a rate above max_fps is measured, not trusted
    # The header declaring 1 fps changes nothing: the count of frames decides.
    low = make_container_video(str(tmp_path / "b.mkv"), "matroska", 150, (64, 48), declared_fps=1,
                               interval_s=0.01)
    with pytest.raises(ClipError, match="more than 100 frames"):
        _decode(low, max_clip_s=10, max_fps=10)
    assert _decode(low, max_clip_s=10, max_fps=120).n_frames == 150


def test_the_frame_buffer_is_not_sized_from_the_headers_rate(tmp_path):
    import tracemalloc

    from tests.media import make_container_video

    # The header claims 10000 fps over 1.49 s: trusting it would reserve 14,900 frames (183 MB at
    # 64x64); the cap of 10 s x 30 fps is 300 frames (3.7 MB).
    src = make_container_video(str(tmp_path / "a.mkv"), "matroska", 150, (64, 48), declared_fps=10000,
                               interval_s=0.01)
    tracemalloc.start()
    try:
        clip = _decode(src, short_side=64, max_clip_s=10, max_fps=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clip.n_frames == 150 and clip.frames.shape[1:] == (64, 64, 3)
    assert peak < 300 * 64 * 64 * 3 + (4 << 20), peak
