"""`corpus-anon demo`: synthesize a small signing corpus and run every pass on embedded defaults.

The corpus: a few signers, each a real face photo that ships inside an installed package
(scikit-image's public-domain `astronaut`, and faces from insightface's sample `t1.jpg`),
composited on a body that sways, with hand-like shapes moving in front of it. One signer's clips
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


@dataclass
class Signer:
    signer_id: str
    face: np.ndarray  # (h, w, 3) uint8 RGB crop with some margin
    shirt: tuple[int, int, int]
    background: tuple[int, int, int]


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


def write_video(path: str, frames: list[np.ndarray], fps: int = FPS) -> None:
    from corpus_anon.video import encode_mp4

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
    signers = [Signer(f"signer{i + 1}", face, *palette[i % len(palette)]) for i, (_, face) in enumerate(faces[:3])]
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
    from corpus_anon.manifest import write_manifest
    from corpus_anon.pipeline import run
    from corpus_anon.storage import Storage, StorageSettings

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
    if not os.path.exists(lock) or any(k not in open(lock, encoding="utf-8").read() for k in ('"dlib/', '"centerface/')):
        from corpus_anon.models.registry import make_tiny

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
        from corpus_anon.release import release

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
