"""Propagation measured where it matters: key frames -> every frame, by each flow (issue 15, item 3).

Candidates: ``flowblend`` (corpus_anon.models.propagate.FlowBlendPropagator) with OpenCV DIS (medium,
today's default), with RAFT-small and with RAFT-large (the original princeton-vl checkpoints,
corpus_anon.models.raft, 12 iterations). No patch-based (Ebsynth-style) propagator is built yet.

Part 1, known motion, changed appearance (the case DiffSLVA is in: flows come from the original frames,
the key frames look different). Two sequences move by the SAME known, smooth motion: sequence A is
scikit-image's ``astronaut`` with a face from insightface's ``t1.jpg`` as an occluding moving patch
(a hand-sized ellipse), sequence B is ``coffee`` with a crop of ``chelsea`` as the patch. Scenes:
``global`` (the background sways, rotates and zooms, up to ~3.4 px per frame; the patch moves up to
~13 px per frame) and ``nonrigid`` (three smooth local bumps over a slowly drifting background, up to
~3.5 px per frame; the patch moves up to ~19 px per frame). Frames are rendered from the analytic
motion (bilinear), so the true backward flow of every pair is known. Flows are computed on A, key
frames taken from B, B's frames between the keys reconstructed, and compared with B's true frames:
PSNR / SSIM on the whole frame and on the moving regions (what moves against the scene, as hands do
against a swaying body: the patch where it is and where it is in either neighbouring key, and the
background whose local bump displacement differs by > 1 px from either key's). EPE: each flow's mean endpoint
error (px) against the known field over the pairs propagation used (pixels whose match is visible),
and for key-to-anchor spans of 1, 2 and 3 s (frame t -> frame 0, as the translator's fusions use),
there on the background and the patch apart.

Part 2, real video, identity translation: the original frames at the key positions stand in for the
translated keys, and the frames between them are reconstructed and compared with the originals
(moving regions: pixels whose blurred grey level differs by > 10 from either neighbouring key).
Videos no one here made: OpenCV's examples ``Megamind.avi``, ``tree.avi`` and ``vtest.avi`` from
Debian's ``opencv-doc`` package (read in place; ``apt-get install opencv-doc`` as root installs them,
or ``apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb DIR`` unpacks them without root, then
``--opencv-data DIR/usr/share/doc/opencv-doc/examples/data``; the part says so and skips those videos
when they are absent), plus a clip of the demo's signer
(``corpus_anon.demo.render_frame``: the astronaut's animated face, a swaying body, moving hands).
This part favours flows that minimise brightness error, so it is reported, not used alone to choose.

RAFT runs at small sizes on CPU (seconds per pair); the sizes are printed with the table.

    .venv/bin/python benchmarks/propagation.py            # full: 8-16 min on 2 busy CPU cores (477 s, 940 s)
    .venv/bin/python benchmarks/propagation.py --quick    # ~10 s: DIS + RAFT-small, 64-96 px, 3 frames of Megamind
    .venv/bin/python benchmarks/propagation.py --device cuda --size 320x240 --width 320   # on a GPU
    .venv/bin/python benchmarks/propagation.py --parts 1 --candidates dis,raft-large --size 320x240 --ks 5
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from corpus_anon.models import flow as fl  # noqa: E402
from corpus_anon.models.propagate import FlowBlendPropagator, key_indices  # noqa: E402

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
# (file, first frame used): segments where something moves.
OPENCV_VIDEOS = (("Megamind.avi", 60), ("tree.avi", 20), ("vtest.avi", 100))  # tree.avi decodes 68 frames
OPENCV_HINT = ("the OpenCV example videos are absent: install them with `make opencv-doc` or "
               "`apt-get install opencv-doc` (as root; "
               f"they land in {OPENCV_DATA}), or `apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb DIR` "
               "and pass --opencv-data DIR/usr/share/doc/opencv-doc/examples/data")
FPS = 30.0  # part 1's clock: spans of 1, 2, 3 s are 30, 60, 90 frames
ANCHOR_SPANS_S = (1, 2, 3)


# ---- flow candidates -----------------------------------------------------------------------------
class DisEstimator:
    """OpenCV DIS as a FlowEstimator: the same flows flowblend computes by default."""

    def __init__(self, preset: str = "medium") -> None:
        self.name, self.preset = f"dis-{preset}", preset

    def pair(self, current_rgb: np.ndarray, reference_rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return fl.backward_flows(current_rgb, reference_rgb, self.preset)


class CachedEstimator:
    """Remembers each (current, reference) pair's flows by content, so K=5 and K=10 and the EPE
    share them, and times the pairs it computes."""

    def __init__(self, inner: fl.FlowEstimator) -> None:
        self.inner, self.name = inner, inner.name
        self.cache: dict[tuple[bytes, bytes], tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds, self.computed = 0.0, 0

    @staticmethod
    def _key(img: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(img).tobytes() + str(img.shape).encode(), digest_size=16).digest()

    def pair(self, current_rgb: np.ndarray, reference_rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self._key(current_rgb), self._key(reference_rgb))
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = self.inner.pair(current_rgb, reference_rgb)
            self.seconds += time.perf_counter() - t
            self.computed += 1
        return self.cache[key]

    @property
    def s_per_pair(self) -> float:
        return self.seconds / max(1, self.computed)


def build_candidates(names: Sequence[str], device: str) -> list[CachedEstimator]:
    """The flow candidates by name (dis, raft-small, raft-large), each wrapped in a cache."""
    out = []
    for name in names:
        if name == "dis":
            out.append(CachedEstimator(DisEstimator()))
        elif name in ("raft-small", "raft-large"):
            from corpus_anon.models.raft import build_raft_flow

            out.append(CachedEstimator(build_raft_flow(name, device=device)))
        else:
            raise ValueError(f"candidate must be dis, raft-small or raft-large, got {name!r}.")
    return out


# ---- metrics -------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of uint8 images over the pixels of ``mask`` (all when None)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d.mean()) if mask is None else float(d[mask].mean()) if mask.any() else float("nan")
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (H, W) of uint8 RGB images (scikit-image, 7x7 window, mean over channels)."""
    from skimage.metrics import structural_similarity

    _, s = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    return s.mean(axis=2)


@dataclass
class Scores:
    """Running sums for one (case, K, candidate) row; frames are pooled (MSE averaged, then dB)."""

    se_all: float = 0.0
    n_all: int = 0
    se_mov: float = 0.0
    n_mov: int = 0
    ssim_all: list[float] = field(default_factory=list)
    ssim_mov: list[float] = field(default_factory=list)
    epe: list[float] = field(default_factory=list)

    def add(self, out: np.ndarray, ref: np.ndarray, moving: np.ndarray) -> None:
        d = ((out.astype(np.float64) - ref.astype(np.float64)) ** 2).mean(axis=2)
        s = ssim_map(out, ref)
        self.se_all += float(d.sum())
        self.n_all += d.size
        self.ssim_all.append(float(s.mean()))
        if moving.any():
            self.se_mov += float(d[moving].sum())
            self.n_mov += int(moving.sum())
            self.ssim_mov.append(float(s[moving].mean()))

    @staticmethod
    def _db(se: float, n: int) -> float:
        return float("nan") if n == 0 else float("inf") if se == 0 else 10 * math.log10(255.0 ** 2 * n / se)

    def row(self) -> tuple[float, float, float, float, float, float]:
        """(PSNR all, SSIM all, PSNR moving, SSIM moving, moving fraction, EPE or nan)."""
        mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        return (self._db(self.se_all, self.n_all), mean(self.ssim_all), self._db(self.se_mov, self.n_mov),
                mean(self.ssim_mov), self.n_mov / max(1, self.n_all), mean(self.epe))


# ---- part 1: known motion ------------------------------------------------------------------------
@dataclass(frozen=True)
class Bump:
    """A Gaussian displacement bump: centre (fractions of the frame), sigma px, direction, amplitude px, Hz, phase."""

    cx: float
    cy: float
    sigma: float
    angle: float
    amp: float
    hz: float
    phase: float


@dataclass(frozen=True)
class Scene:
    """A smooth known motion: background map psi_t (frame px -> frame px) and a moving elliptic patch."""

    name: str
    width: int
    height: int
    sway: tuple[float, float, float, float]  # x amp px, x Hz, y amp px, y Hz
    rot: tuple[float, float]  # rad amp, Hz
    zoom: tuple[float, float]  # relative amp, Hz
    bumps: tuple[Bump, ...]
    patch_path: tuple[float, float, float, float, float]  # x amp, x Hz, y amp, y Hz, y phase (frame fractions of amp)
    patch_radii: tuple[float, float] = (16.0, 13.0)

    def _s(self, t: float, hz: float, phase: float = 0.0) -> float:
        return math.sin(2 * math.pi * hz * t / FPS + phase)

    def psi(self, t: float, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where background point (px, py) of the base image appears in frame t."""
        cx, cy = self.width / 2, self.height / 2
        ax, hx, ay, hy = self.sway
        th = self.rot[0] * self._s(t, self.rot[1], 0.3)
        sc = 1 + self.zoom[0] * self._s(t, self.zoom[1], 1.1)
        dx, dy = px - cx, py - cy
        x = cx + sc * (math.cos(th) * dx - math.sin(th) * dy) + ax * self._s(t, hx)
        y = cy + sc * (math.sin(th) * dx + math.cos(th) * dy) + ay * self._s(t, hy, 1.0)
        for b in self.bumps:
            g = np.exp(-((px - b.cx * self.width) ** 2 + (py - b.cy * self.height) ** 2) / (2 * b.sigma ** 2))
            a = b.amp * self._s(t, b.hz, b.phase) * g
            x = x + a * math.cos(b.angle)
            y = y + a * math.sin(b.angle)
        return x, y

    def local(self, t: float, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bumps' part of psi_t at base point (px, py): the motion that is not the whole scene's."""
        x, y = np.zeros_like(px), np.zeros_like(py)
        for b in self.bumps:
            g = np.exp(-((px - b.cx * self.width) ** 2 + (py - b.cy * self.height) ** 2) / (2 * b.sigma ** 2))
            a = b.amp * self._s(t, b.hz, b.phase) * g
            x, y = x + a * math.cos(b.angle), y + a * math.sin(b.angle)
        return x, y

    def psi_inv(self, t: float, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The base point seen at frame-t pixel (x, y): psi_t^-1 by fixed-point iteration (the bumps are
        contractions: amplitude / sigma < 1)."""
        px, py = x.copy(), y.copy()
        for _ in range(30):
            qx, qy = self.psi(t, px, py)
            px, py = px - (qx - x), py - (qy - y)
        return px, py

    def patch_centre(self, t: float) -> tuple[float, float]:
        ax, hx, ay, hy, ph = self.patch_path
        return (self.width / 2 + ax * self._s(t, hx), self.height / 2 + ay * self._s(t, hy, ph))

    def in_patch(self, t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cx, cy = self.patch_centre(t)
        rx, ry = self.patch_radii
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = np.mgrid[0:self.height, 0:self.width].astype(np.float64)
        return xs, ys

    def render(self, t: float, base: np.ndarray, patch: np.ndarray, margin: int) -> np.ndarray:
        """Frame t: the base image (with ``margin`` px around the frame) moved by psi_t, the patch on top."""
        import cv2

        xs, ys = self.grid()
        px, py = self.psi_inv(t, xs, ys)
        frame = cv2.remap(base, (px + margin).astype(np.float32), (py + margin).astype(np.float32),
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        cx, cy = self.patch_centre(t)
        ph, pw = patch.shape[:2]
        u = (xs - cx + pw / 2 - 0.5).astype(np.float32)
        v = (ys - cy + ph / 2 - 0.5).astype(np.float32)
        patch_px = cv2.remap(patch, u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        inside = self.in_patch(t, xs, ys)
        frame[inside] = patch_px[inside]
        return frame

    def true_flow(self, j: float, k: float) -> tuple[np.ndarray, np.ndarray]:
        """(flow (H, W, 2) with frame_j(x) = frame_k(x + flow(x)), valid (H, W): the match is visible in k)."""
        xs, ys = self.grid()
        px, py = self.psi_inv(j, xs, ys)
        bx, by = self.psi(k, px, py)
        fx, fy = bx - xs, by - ys
        in_j = self.in_patch(j, xs, ys)
        (cjx, cjy), (ckx, cky) = self.patch_centre(j), self.patch_centre(k)
        fx[in_j], fy[in_j] = ckx - cjx, cky - cjy
        tx, ty = xs + fx, ys + fy
        inside = (tx >= 0) & (tx <= self.width - 1) & (ty >= 0) & (ty <= self.height - 1)
        valid = inside & (self.in_patch(k, tx, ty) == in_j)
        return np.stack((fx, fy), axis=-1).astype(np.float32), valid


def scenes(width: int, height: int) -> list[Scene]:
    """The two known-motion scenes at ``width`` x ``height`` (amplitudes scale with the width / 160)."""
    s = width / 160.0
    glob = Scene("global", width, height, sway=(18 * s, 0.8, 8 * s, 0.55), rot=(0.04, 0.4), zoom=(0.04, 0.3),
                 bumps=(), patch_path=(45 * s, 1.1, 24 * s, 1.7, 0.5), patch_radii=(16 * s, 13 * s))
    nonrigid = Scene("nonrigid", width, height, sway=(4 * s, 0.5, 0.0, 0.5), rot=(0.0, 0.0), zoom=(0.0, 0.0),
                     bumps=(Bump(0.25, 0.35, 20 * s, 0.3, 11 * s, 1.3, 0.0),
                            Bump(0.72, 0.30, 22 * s, 2.0, 12 * s, 1.0, 1.0),
                            Bump(0.50, 0.75, 18 * s, 4.2, 9 * s, 1.8, 2.0)),
                     patch_path=(52 * s, 1.6, 22 * s, 2.1, 0.9), patch_radii=(16 * s, 13 * s))
    return [glob, nonrigid]


def part1_images(width: int, height: int,
                 margin: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((background A, patch A), (background B, patch B)), uint8 RGB, backgrounds with ``margin`` px around."""
    import importlib.util

    from skimage import data, io
    from skimage.transform import resize

    def fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
        return (resize(img, (h, w), anti_aliasing=True) * 255).round().astype(np.uint8)

    bh, bw = height + 2 * margin, width + 2 * margin
    pw, ph = int(round(width * 40 / 160)), int(round(width * 34 / 160))
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.submodule_search_locations:
        t1 = io.imread(os.path.join(next(iter(spec.submodule_search_locations)), "data", "images", "t1.jpg"))
        patch_a = fit(t1[271:420, 440:600], ph, pw)  # a face of t1.jpg
    else:
        patch_a = fit(data.rocket()[100:300, 200:450], ph, pw)
    astro = data.astronaut()[:, 40:472]  # 512 x 432: the frame's aspect ratio, roughly
    coffee = data.coffee()
    return (fit(astro, bh, bw), patch_a), (fit(coffee, bh, bw), fit(data.chelsea()[50:250, 100:350], ph, pw))


def moving_mask_known(scene: Scene, j: int, neighbours: Sequence[int]) -> np.ndarray:
    """The parts of frame j that move against the scene (as hands do against a swaying body): the
    patch, where it is in a neighbouring key (what it covers or uncovers), and the background
    whose local (bump) displacement differs by > 1 px from a neighbouring key's."""
    xs, ys = scene.grid()
    px, py = scene.psi_inv(j, xs, ys)
    lx, ly = scene.local(j, px, py)
    mov = scene.in_patch(j, xs, ys)
    for k in neighbours:
        mov |= scene.in_patch(k, xs, ys)
        kx, ky = scene.local(k, px, py)
        mov |= np.hypot(lx - kx, ly - ky) > 1.0
    return mov


def epe(est: np.ndarray, true: np.ndarray, valid: np.ndarray) -> float:
    """Mean endpoint error in px over the valid pixels."""
    d = np.hypot(est[..., 0] - true[..., 0], est[..., 1] - true[..., 1])
    return float(d[valid].mean()) if valid.any() else float("nan")


def _np(flow: torch.Tensor) -> np.ndarray:
    return flow[0].permute(1, 2, 0).cpu().numpy()


def run_part1(cands: list[CachedEstimator], width: int, height: int, n_frames: int, ks: Sequence[int],
              spans: Sequence[int], device: str, log: Callable[[str], None],
              only: Sequence[str] | None = None) -> tuple[list[tuple], list[tuple]]:
    """Rows (scene, K, candidate, PSNR, SSIM, PSNR mov, SSIM mov, mov frac, EPE) and anchor-span rows, for
    the scenes named in ``only`` (all when None)."""
    margin = int(math.ceil(0.3 * width))
    (base_a, patch_a), (base_b, patch_b) = part1_images(width, height, margin)
    rows, span_rows = [], []
    for sc in scenes(width, height):
        if only is not None and sc.name not in only:
            continue
        seq_a = np.stack([sc.render(t, base_a, patch_a, margin) for t in range(n_frames)])
        seq_b = np.stack([sc.render(t, base_b, patch_b, margin) for t in range(n_frames)])
        for k_int in ks:
            keys = key_indices(n_frames, k_int)
            moving = {}
            for j in range(n_frames):
                if j not in keys:
                    pos = next(i for i, k in enumerate(keys) if k > j)
                    moving[j] = moving_mask_known(sc, j, (keys[pos - 1], keys[pos]))
            for cand in cands:
                t0 = time.perf_counter()
                prop = FlowBlendPropagator(estimator=cand)
                out = prop.propagate(seq_a, {k: seq_b[k] for k in keys}, device=device)
                s = Scores()
                for j, mov in moving.items():
                    s.add(out[j], seq_b[j], mov)
                    pos = next(i for i, k in enumerate(keys) if k > j)
                    for k in (keys[pos - 1], keys[pos]):
                        true, valid = sc.true_flow(j, k)
                        s.epe.append(epe(_np(cand.pair(seq_a[j], seq_a[k])[0]), true, valid))
                rows.append((sc.name, k_int, cand.name, *s.row()))
                log(f"part 1 {sc.name} K={k_int} {cand.name}: {rows[-1][3:]} ({time.perf_counter() - t0:.1f} s)")
        xs, ys = sc.grid()
        for cand in cands:
            vals = []
            for span in spans:
                t = int(round(span * FPS))
                true, valid = sc.true_flow(t, 0)
                est = _np(cand.pair(sc.render(t, base_a, patch_a, margin), seq_a[0])[0])
                patch = sc.in_patch(t, xs, ys)
                vals += [epe(est, true, valid & ~patch), epe(est, true, valid & patch)]
            span_rows.append((sc.name, cand.name, *vals))
            log(f"part 1 {sc.name} anchor spans {cand.name}: {vals}")
    return rows, span_rows


# ---- part 2: real video --------------------------------------------------------------------------
def read_video(path: str, start: int, n: int, width: int) -> tuple[np.ndarray, float]:
    """``n`` RGB frames from frame ``start``, resized to ``width`` (height rounded to even), and the fps."""
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames, i = [], 0
        while len(frames) < n:
            ok, bgr = cap.read()  # decoded in order: seeking is unreliable in these AVIs
            if not ok:
                break
            i += 1
            if i <= start:
                continue
            h = int(round(bgr.shape[0] * width / bgr.shape[1] / 2)) * 2
            frames.append(cv2.cvtColor(cv2.resize(bgr, (width, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if len(frames) < n:
        raise ValueError(f"{path} has fewer than {start + n} frames.")
    return np.stack(frames), fps


def demo_clip(n: int, width: int) -> tuple[np.ndarray, float]:
    """``n`` frames of the demo's first signer (the astronaut's animated face), resized to ``width``."""
    import cv2

    from corpus_anon import demo

    name, face = demo.demo_faces()[0]
    signer = demo.Signer("signer1", face, (40, 60, 110), (200, 205, 210), anchors=demo.FACE_ANCHORS.get(name))
    h = int(round(demo.H * width / demo.W / 2)) * 2
    frames = [cv2.resize(demo.render_frame(signer, 1.0 + i / demo.FPS), (width, h), interpolation=cv2.INTER_AREA)
              for i in range(n)]
    return np.stack(frames), float(demo.FPS)


def moving_mask_video(frames: np.ndarray, j: int, neighbours: Sequence[int]) -> np.ndarray:
    """Pixels whose blurred grey level in frame j differs by > 10 from a neighbouring key."""
    import cv2

    def grey(i: int) -> np.ndarray:
        return cv2.GaussianBlur(cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY).astype(np.float32), (5, 5), 1.5)

    g = grey(j)
    mov = np.zeros(g.shape, bool)
    for k in neighbours:
        mov |= np.abs(g - grey(k)) > 10
    return mov


def run_part2(cands: list[CachedEstimator], width: int, n_frames: int, ks: Sequence[int], device: str,
              videos: Sequence[tuple[str, int]], with_demo: bool, log: Callable[[str], None],
              data_dir: str = OPENCV_DATA) -> list[tuple]:
    """Rows (video, K, candidate, PSNR, SSIM, PSNR mov, SSIM mov, mov frac, nan); ``videos`` are read from
    ``data_dir``."""
    clips: list[tuple[str, np.ndarray, float]] = []
    present = [(f, s) for f, s in videos if os.path.isfile(os.path.join(data_dir, f))]
    if len(present) < len(videos):
        log(f"part 2: {OPENCV_HINT}; skipping "
            f"{', '.join(f for f, _ in videos if (f, _) not in present)}.")
    for f, start in present:
        frames, fps = read_video(os.path.join(data_dir, f), start, n_frames, width)
        clips.append((f"{f} @{start} ({fps:.0f} fps)", frames, fps))
    if with_demo:
        frames, fps = demo_clip(n_frames, width)
        clips.append((f"demo signer ({fps:.0f} fps)", frames, fps))
    rows = []
    for name, frames, _ in clips:
        for k_int in ks:
            keys = key_indices(len(frames), k_int)
            for cand in cands:
                t0 = time.perf_counter()
                out = FlowBlendPropagator(estimator=cand).propagate(frames, {k: frames[k] for k in keys}, device=device)
                s = Scores()
                for j in range(len(frames)):
                    if j in keys:
                        continue
                    pos = next(i for i, k in enumerate(keys) if k > j)
                    s.add(out[j], frames[j], moving_mask_video(frames, j, (keys[pos - 1], keys[pos])))
                rows.append((f"{name} {frames.shape[2]}x{frames.shape[1]}", k_int, cand.name, *s.row()))
                log(f"part 2 {name} K={k_int} {cand.name}: {rows[-1][3:]} ({time.perf_counter() - t0:.1f} s)")
    return rows


# ---- output --------------------------------------------------------------------------------------
def table(rows: list[tuple], first: str) -> str:
    lines = [f"| {first} | K | flow | PSNR dB | SSIM | PSNR moving | SSIM moving | moving % | EPE px |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        name, k, cand, p, s, pm, sm, frac, e = r
        lines.append(f"| {name} | {k} | {cand} | {p:.2f} | {s:.4f} | {pm:.2f} | {sm:.4f} | {100 * frac:.1f} | "
                     + ("–" if math.isnan(e) else f"{e:.2f}") + " |")
    return "\n".join(lines)


def span_table(rows: list[tuple], spans: Sequence[int]) -> str:
    lines = ["| scene | flow | " + " | ".join(f"{s} s: background | {s} s: patch" for s in spans) + " |",
             "|---|---|" + "--:|" * (2 * len(spans))]
    for name, cand, *vals in rows:
        lines.append(f"| {name} | {cand} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 32 or int(h) < 32:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, each at least 32, got {text!r}.")
    return int(w), int(h)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="seconds: DIS + RAFT-small, part 1 global only, one short clip")
    ap.add_argument("--candidates", default="dis,raft-small,raft-large")
    ap.add_argument("--size", type=parse_size, default=(160, 120), help="part 1 frame size WIDTHxHEIGHT")
    ap.add_argument("--width", type=int, default=160, help="part 2 frame width (height keeps the aspect ratio)")
    ap.add_argument("--frames", type=int, default=11, help="part 1 frames per sequence (keys at 0, K, ..., last)")
    ap.add_argument("--clip-frames", type=int, default=6, help="part 2 frames per clip (K=5: keys at 0 and 5)")
    ap.add_argument("--ks", default="5,10", help="part 1 key intervals (part 2 uses K=5)")
    ap.add_argument("--scenes", default="global,nonrigid", help="part 1 scenes")
    ap.add_argument("--parts", default="1,2", help="which parts to run")
    ap.add_argument("--opencv-data", default=OPENCV_DATA, help="folder holding the OpenCV example videos")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.quick:
        cands = build_candidates(("dis", "raft-small"), args.device)
        w, h = 64, 64
        n1, ks1, spans = 3, (2,), (1,)
        videos = [("Megamind.avi", 70)]
        width2, n2, ks2 = 96, 3, (2,)
    else:
        cands = build_candidates(tuple(c.strip() for c in args.candidates.split(",") if c.strip()), args.device)
        (w, h), n1, spans = args.size, args.frames, ANCHOR_SPANS_S
        ks1 = tuple(int(k) for k in args.ks.split(","))
        videos, width2, n2, ks2 = list(OPENCV_VIDEOS), args.width, args.clip_frames, (5,)
    parts = {p.strip() for p in args.parts.split(",")}
    rows1, span_rows, rows2 = [], [], []
    if "1" in parts:
        rows1, span_rows = run_part1(cands, w, h, n1, ks1, spans, args.device, log,
                                     only=("global",) if args.quick else args.scenes.split(","))
    present = [v for v in videos if os.path.isfile(os.path.join(args.opencv_data, v[0]))]
    if "2" in parts:
        rows2 = run_part2(cands, width2, n2, ks2, args.device, videos, with_demo=not (args.quick and present),
                          log=log, data_dir=args.opencv_data)
    iters = next((c.inner.iters for c in cands if hasattr(c.inner, "iters")), None)
    print(f"# Propagation: flowblend by flow ({args.device}, torch threads {args.threads}"
          + (f", RAFT {iters} iterations" if iters else "") + ")\n")
    if "1" in parts:
        print(f"Part 1, known motion, changed appearance: {w}x{h}, {n1} frames at {FPS:.0f} fps; "
              "flows on A, keys from B.\n")
        print(table(rows1, "scene"))
        print(f"\nKey-to-anchor spans (frame t -> frame 0, {w}x{h}): EPE px on the background and on the patch "
              "(the occluder, displaced up to the width of its path over a span):\n")
        print(span_table(span_rows, spans) + "\n")
    if "2" in parts:
        print(f"Part 2, real video, identity translation: width {width2}, {n2} frames per clip.\n")
        if len(present) < len(videos):
            print(f"Skipped: {OPENCV_HINT}.\n")
        print(table(rows2, "video") + "\n")
    print("| flow | s per flow pair (both directions) | pairs computed |\n|---|--:|--:|")
    for c in cands:
        print(f"| {c.name} | {c.s_per_pair:.3f} | {c.computed} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return {"part1": rows1, "spans": span_rows, "part2": rows2,
            "timing": {c.name: (c.s_per_pair, c.computed) for c in cands}}


if __name__ == "__main__":
    main()
