"""`corpus-anon demo`: synthesize a small signing corpus and run every pass on embedded defaults.

The corpus: a few signers, each a real face photo that ships inside an installed package
(scikit-image's public-domain `astronaut`, and faces from insightface's sample `t1.jpg`),
composited on a body that sways, with hand-like shapes moving in front of it. The face moves the way
a signer's face does: a smooth warp of the photo raises the brows and opens and closes the mouth
(`animate_face`), so the non-manual-marker metrics have a series to follow. One signer's clips
are segments of one longer recording, the way utterance annotations cut long sessions.
Everything runs on a local Ray with the local filesystem as the store.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

W, H, FPS = 320, 240, 24
SECRET_ENV = "CORPUS_ANON_SECRET"
# Documented, fixed secret for the demo's synthetic identities only: anyone can read it here.
DEMO_SECRET = "corpus-anon-demo-secret-public-do-not-use-for-real-data"


@dataclass(frozen=True)
class FaceAnchors:
    """Where a face photo's features are, as fractions of its square crop (measured once with the
    face mesh, `tests/test_fidelity.py` checks them): brow line, eye line, the upper lip's inner edge
    and the mouth's centre x, the chin, and the mouth's half width."""

    brow_y: float
    eye_y: float
    mouth_y: float
    mouth_x: float
    chin_y: float
    mouth_half: float


# Measured with MediaPipe's face mesh on the crops of `demo_faces`.
FACE_ANCHORS = {
    "astronaut": FaceAnchors(0.385, 0.488, 0.800, 0.492, 1.015, 0.174),
    "t1a": FaceAnchors(0.438, 0.507, 0.812, 0.432, 0.961, 0.117),
    "t1b": FaceAnchors(0.425, 0.497, 0.799, 0.464, 0.973, 0.124),
    "t1c": FaceAnchors(0.402, 0.515, 0.780, 0.491, 0.957, 0.124),
}


@dataclass
class Signer:
    signer_id: str
    face: np.ndarray  # (h, w, 3) uint8 RGB crop with some margin
    shirt: tuple[int, int, int]
    background: tuple[int, int, int]
    anchors: FaceAnchors | None = None  # None: the photo stays still


def expression_at(t: float, phase: float = 0.0) -> tuple[float, float]:
    """(brow raise, mouth opening), each in [0, 1], at time ``t`` seconds: brows raised and held over
    a question-like stretch about every 3 s, the mouth opening and closing at mouthing speed
    (about 2 syllables a second) in bursts."""
    brow = 0.5 - 0.5 * np.cos(2 * np.pi * 0.33 * t + phase)
    brow = float(np.clip(1.6 * brow - 0.3, 0.0, 1.0))  # held at the top and at rest
    mouth = max(0.0, float(np.sin(2 * np.pi * 2.1 * t + 2 * phase))) * (0.6 + 0.4 * float(np.sin(2 * np.pi * 0.45 * t)))
    return brow, float(np.clip(mouth, 0.0, 1.0))


# The widest opening of the lips, as a fraction of the face crop.
MOUTH_GAP = 0.09


def animate_face(face: np.ndarray, anchors: FaceAnchors, brow: float, mouth: float) -> np.ndarray:
    """The face photo (square uint8 RGB) with its brows raised by ``brow`` and its mouth opened by
    ``mouth`` (both in [0, 1]). A backward warp lifts the forehead and brows by up to 3.5 % of the crop,
    fading to nothing just above the eyes (no fold: the fade is wider than the lift); the lips part
    at the upper lip's inner edge, the lower lip and chin dropping by up to ``MOUTH_GAP`` of the crop
    (most at the mouth's centre, nothing beyond its corners), and the gap shows the mouth's dark
    inside."""
    import cv2

    n = face.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    a = anchors

    def smoothstep(x: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0.0, 1.0)
        return x * x * (3 - 2 * x)

    top, bottom = a.brow_y - 0.03, a.eye_y - 0.01
    lift = 0.035 * brow * (1 - smoothstep((yy - top) / max(bottom - top, 0.05)))
    lift *= np.exp(-0.5 * ((xx - a.mouth_x) / 0.32) ** 2)
    # The lower lip bends like an opening mouth: the drop is largest at the centre, 0 past the corners.
    bend = np.clip(1 - ((xx - a.mouth_x) / (1.15 * a.mouth_half)) ** 2, 0, 1)
    gap = MOUTH_GAP * mouth * bend
    below = yy > a.mouth_y
    # Below the chin the drop fades out over 0.15 of the crop (wider than the drop: no fold).
    drop = np.where(below, gap * (1 - smoothstep((yy - a.chin_y) / 0.15)), 0.0)
    inside = below & (yy < a.mouth_y + gap)
    map_y = np.where(inside, a.mouth_y, yy + lift - drop) * n  # output (x, y) shows the photo at map_y
    out = cv2.remap(face, (xx * n).astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    if mouth > 0:
        # The mouth's inside, soft at its rim so no hard edge is left for the mesh to lock onto.
        depth = np.where(inside, np.minimum(yy - a.mouth_y, a.mouth_y + gap - yy) * n, 0.0)
        alpha = np.clip(depth / 1.0, 0, 1)[..., None] * 0.9
        out = (alpha * np.array([60, 22, 28]) + (1 - alpha) * out).astype(np.uint8)
    return out


def _crop(img: np.ndarray, x: int, y: int, w: int, h: int, margin: float = 0.35) -> np.ndarray:
    cx, cy = x + w / 2, y + h / 2
    s = max(w, h) * (1 + margin)
    x0, y0 = int(max(0, cx - s / 2)), int(max(0, cy - s / 2 - 0.08 * s))
    return img[y0 : int(y0 + s), x0 : int(x0 + s)]


def demo_faces() -> list[tuple[str, np.ndarray]]:
    """Real face photos from installed packages (never committed to the repository)."""
    from skimage import data, io

    faces = [("astronaut", _crop(data.astronaut(), 177, 66, 95, 95))]
    try:
        import insightface

        t1 = io.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))
        for name, box in (("t1a", (448, 271, 139, 139)), ("t1b", (729, 356, 114, 114)),
                          ("t1c", (1114, 277, 118, 118))):
            faces.append((name, _crop(t1, *box)))
    except ImportError:  # insightface is installed by `make setup`; without it, fewer signers
        log.warning("insightface is not installed; the demo uses one face photo")
    return faces


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return (resize(img, (size, size), anti_aliasing=True) * 255).astype(np.uint8)


def render_frame(signer: Signer, t: float, face_px: int = 78) -> np.ndarray:
    """One frame: background, torso, the face photo (soft ellipse), and two moving 'hands'."""
    frame = np.empty((H, W, 3), np.uint8)
    frame[:] = signer.background
    yy, xx = np.mgrid[0:H, 0:W]
    sway_x = 6 * np.sin(2 * np.pi * 0.4 * t)
    sway_y = 2 * np.sin(2 * np.pi * 0.7 * t)
    cx, cy = W / 2 + sway_x, 78 + sway_y
    torso = ((xx - cx) / 95) ** 2 + ((yy - (cy + 150)) / 110) ** 2 <= 1
    frame[torso] = signer.shirt
    face = _resize(signer.face, face_px)
    if signer.anchors is not None:
        face = animate_face(face, signer.anchors, *expression_at(t, hash_phase(signer)))
    x0, y0 = int(round(cx - face_px / 2)), int(round(cy - face_px / 2))
    fy, fx = np.mgrid[0:face_px, 0:face_px]
    mask = np.clip(1.6 - 1.6 * (((fx - face_px / 2) / (face_px * 0.5)) ** 2
                                + ((fy - face_px / 2) / (face_px * 0.56)) ** 2), 0, 1)[..., None]
    region = frame[y0 : y0 + face_px, x0 : x0 + face_px]
    h, w = region.shape[:2]
    region[:] = (mask[:h, :w] * face[:h, :w] + (1 - mask[:h, :w]) * region).astype(np.uint8)
    skin = np.array([224, 172, 140])
    for k, phase in ((0, 0.0), (1, 1.7)):
        hx = cx + (-1) ** k * (55 + 25 * np.sin(2 * np.pi * 0.9 * t + phase))
        hy = cy + 95 + 40 * np.sin(2 * np.pi * 1.3 * t + phase)
        palm = ((xx - hx) / 16) ** 2 + ((yy - hy) / 20) ** 2 <= 1
        frame[palm] = skin
        for f in range(4):  # fingers
            fx0 = hx - 12 + 8 * f
            finger = (np.abs(xx - fx0) <= 2.5) & (yy >= hy - 38 + 4 * abs(f - 1.5)) & (yy <= hy - 10)
            frame[finger] = skin
    return frame


def hash_phase(signer: Signer) -> float:
    """A fixed phase per signer (from the id's characters), so signers do not move in step."""
    return float(sum(map(ord, signer.signer_id)) % 17) * 0.37


def write_video(path: str, frames: list[np.ndarray], fps: int = FPS) -> None:
    from corpus_anon.io.video import encode_mp4

    ts = np.arange(len(frames)) / fps
    encode_mp4(np.stack(frames), ts, Fraction(fps), (W, H), path, crf=20, preset="veryfast")


def synthesize_corpus(root: str, seconds: float = 3.0) -> Any:
    """Write the demo videos under `root/corpus/` and return the manifest table."""
    import pyarrow as pa

    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    palette = [((40, 60, 110), (200, 205, 210)), ((120, 40, 40), (185, 200, 180)),
               ((30, 90, 60), (210, 195, 175)), ((70, 70, 70), (175, 190, 215))]
    faces = demo_faces()
    signers = [Signer(f"signer{i + 1}", face, *palette[i % len(palette)], anchors=FACE_ANCHORS.get(name))
               for i, (name, face) in enumerate(faces[:3])]
    rows = []
    n = int(round(seconds * FPS))
    for si, s in enumerate(signers):
        if si == 0:
            # One long recording, two annotated utterances inside it.
            path = os.path.join(corpus, f"{s.signer_id}_session.mp4")
            write_video(path, [render_frame(s, i / FPS) for i in range(2 * n + FPS)])
            rows.append({"clip_id": f"{s.signer_id}_utt01", "video_uri": path, "signer_id": s.signer_id,
                         "start_s": 0.0, "end_s": seconds, "gloss": "HELLO"})
            rows.append({"clip_id": f"{s.signer_id}_utt02", "video_uri": path, "signer_id": s.signer_id,
                         "start_s": seconds + 1.0, "end_s": 2 * seconds + 1.0, "gloss": "THANK-YOU"})
        else:
            for k in range(2):
                path = os.path.join(corpus, f"{s.signer_id}_clip{k + 1}.mp4")
                write_video(path, [render_frame(s, k * 7.3 + i / FPS) for i in range(n)])
                rows.append({"clip_id": f"{s.signer_id}_clip{k + 1}", "video_uri": path,
                             "signer_id": s.signer_id, "start_s": None, "end_s": None,
                             "gloss": ["BOOK", "WHERE"][k]})
    schema = pa.schema([("clip_id", pa.string()), ("video_uri", pa.string()), ("signer_id", pa.string()),
                        ("start_s", pa.float64()), ("end_s", pa.float64()), ("gloss", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def pass_config(root: str, name: str, extra: dict[str, Any] | None = None) -> str:
    """Write `root/name/config.yaml` for one demo pass and return its path."""
    import yaml

    cfg: dict[str, Any] = {
        "manifest": {"uri": os.path.join(root, "manifest.parquet")},
        "output": {"uri": os.path.join(root, name)},
        "storage": {"allowed_prefixes": {"read": [root], "write": [root]}},
        "resources": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
        # The demo's faces are 100+ px at this size: detection at 320 px keeps the CPU demo short.
        "faces": {"detect_side": 320},
        # The fidelity metrics at 16 frames a clip: the palm detector costs about 0.1 s a frame on CPU
        # (it takes the demo's hand shapes for palms on about 9 encoded frames in 10); the face mesh
        # about 0.01 s.
        "landmarks": {"metric_frames": 16},
    }
    for k, v in (extra or {}).items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = os.path.join(root, name, "config.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_demo(out: str, only: tuple[str, ...] = ("pixelate", "diffslva")) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from corpus_anon.config import load_config
    from corpus_anon.run.manifest import write_manifest
    from corpus_anon.run.pipeline import run
    from corpus_anon.io.storage import Storage, StorageSettings

    root = os.path.abspath(out)
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    print(f"corpus-anon demo: synthesizing a corpus under {root}/corpus ...", flush=True)
    table = synthesize_corpus(root)
    storage = Storage(StorageSettings(allowed_write=(root,)))
    write_manifest(table, os.path.join(root, "manifest.parquet"), storage)
    signers = len(set(table.column("signer_id").to_pylist()))
    print(f"  {table.num_rows} clips from {signers} signers ({time.time() - t0:.1f} s)", flush=True)

    results = {}
    # Both passes take their model files (the dlib face files too) from one store, verified
    # against its lock; the tiny profile's diffusion models are random, its dlib files real.
    store = os.path.join(root, "models", "tiny")
    lock = os.path.join(store, "corpus-anon.lock.json")
    if not os.path.exists(lock) or any(k not in open(lock, encoding="utf-8").read()
                                       for k in ('"dlib/', '"centerface/', '"mediapipe/')):
        from corpus_anon.models.tiny import make_tiny

        print(f"writing the tiny model profile to {store} ...", flush=True)
        make_tiny(store)
    models = {"profile": "tiny", "store": store, "cache_dir": os.path.join(root, "models", "cache")}
    passes = [("pixelate", {"anonymizer": {"kind": "pixelate"}, "models": models})]
    if "diffslva" in only:
        passes.append(("diffslva", {
            "anonymizer": {"kind": "diffslva"},
            "models": models,
            # The tiny profile's pictures are noise; a small work size keeps the CPU demo short.
            "video": {"short_side": 128},
            "faces": {"enhance_size": 128},
            "resources": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 1},
        }))
    if not os.environ.get(SECRET_ENV):
        os.environ[SECRET_ENV] = DEMO_SECRET
        print(f"  using the fixed demo secret for synthetic identities and release pseudonyms (never for "
              f"real data): export {SECRET_ENV}={DEMO_SECRET}", flush=True)
    passes = [p for p in passes if p[0] in only]
    secret = os.environ.get(SECRET_ENV)
    for name, extra in passes:
        cfg_path = pass_config(root, name, extra)
        print(f"pass '{name}': corpus-anon run {cfg_path}", flush=True)
        if secret:
            os.environ[SECRET_ENV] = secret  # the driver drops it before Ray; each pass reads it again
        res = run(load_config(cfg_path))
        results[name] = res
        counts = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items()))
        print(f"  {res.planned} clips: {counts} in {res.wall_s:.1f} s", flush=True)
    released = None
    if "pixelate" in results:
        # The release step a maintainer runs next: pseudonymous ids, allow-listed columns, a card.
        from corpus_anon.release.publish import release

        os.environ[SECRET_ENV] = secret or DEMO_SECRET
        cfg = load_config(os.path.join(root, "pixelate", "config.yaml"))
        released = release(cfg, Storage(StorageSettings.from_config(cfg, None)), results["pixelate"].layout.root,
                           os.path.join(root, "release"), secret=(secret or DEMO_SECRET).encode())
        print(f"release of the pixelate pass: {released.latest}, {released.released} clips", flush=True)

    print("\nWhere everything is:")
    print(f"  corpus videos     {root}/corpus/")
    print(f"  manifest          {root}/manifest.parquet")
    for name, r in results.items():
        print(f"  pass '{name}'")
        print(f"    config          {root}/{name}/config.yaml   (rerun: corpus-anon run {root}/{name}/config.yaml)")
        print(f"    anonymized      {r.layout.root.removeprefix('file://')}/clips/")
        print(f"    metrics         {r.metrics_uri.removeprefix('file://')}")
        print(f"    summary         {r.layout.summary.removeprefix('file://')}")
        fid = r.summary.get("fidelity") or {}
        if fid.get("n_clips"):
            def med(k: str) -> str:
                return "–" if fid.get(k) is None else f"{fid[k]:.2f}"

            print(f"    fidelity (medians over {fid['n_clips']} clips): facial markers kept nmm_corr {med('nmm_corr')} "
                  f"(brow {med('nmm_brow_corr')}, mouth {med('nmm_mouth_corr')}); same hand on "
                  f"{med('hand_lm_recall')} of the original's hand frames, error {med('hand_lm_err')} hand sizes "
                  f"({fid.get('n_no_hands', 0)} clips with no hand found); edge heuristics expr "
                  f"{med('expr_fidelity')} hand {med('hand_fidelity')}")
        reid = r.summary.get("reid") or {}
        if reid.get("per_signer"):
            kind = ("Euclidean distance, lower = more alike" if reid.get("id_score_kind") == "euclidean"
                    else "cosine, higher = more alike")
            print(f"    identity ({kind}): re-id top-1 {reid['reid_top1']:.2f} anonymized vs "
                  f"{reid['reid_top1_originals']:.2f} originals (chance {reid['reid_chance']:.2f})")
            for sid, row in sorted(reid["per_signer"].items()):
                xo = row.get("id_orig_orig_xclip")
                print(f"      {sid:10s} original vs own other clips {xo if xo is None else round(xo, 3)}   "
                      f"original vs anonymized {row['id_orig_anon'] if row['id_orig_anon'] is None else round(row['id_orig_anon'], 3)}")
    if released is not None and released.latest:
        rel = os.path.join(root, "release", "releases", released.latest)
        print(f"  release           {rel}/manifest.parquet   (dataset card: {rel}/README.md)")
    if "diffslva" in results:
        print(f"  (the diffslva pass ran the tiny profile: random weights, so its pictures are noise; stage the\n"
              f"   real SD 1.5 + ControlNet-HED weights for real output, see README. To rerun it:\n"
              f"   export {SECRET_ENV}={DEMO_SECRET})")
    print(f"demo finished in {time.time() - t0:.1f} s")
    return results
