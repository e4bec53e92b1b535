"""Can the corpus's own signers be re-identified from pixelated clips? (issue 13)

Six real people (the six faces of insightface's `t1.jpg`, found by CenterFace and cropped), two
synthetic signing clips each (the demo's renderer: torso, moving hands, the face photo), run through
the real `pixelate` pipeline on a local Ray with the default config (dlib embeddings). The run's
leave-one-out corpus re-identification (`summary.json` -> `reid`) answers: is each pixelated clip
closest to its own signer's other (original) clip? Chance is 1/6.

    .venv/bin/python benchmarks/reid_pixelate.py            # about 5 min on 2 CPUs
    .venv/bin/python benchmarks/reid_pixelate.py --seconds 2 --out /tmp/reid
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def six_faces() -> list:
    from skimage import io

    from corpus_anon.config import Config
    from corpus_anon.models.detect import build_detector

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("insightface (which ships t1.jpg) is not installed: pip install --no-deps insightface==2.1")
    t1 = io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")
    faces = build_detector(Config()).detect_batch([t1])[0]
    crops = []
    for f in sorted(faces, key=lambda f: f.box[0]):
        x0, y0, x1, y1 = f.box
        s = 1.3 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        crops.append(t1[int(max(0, cy - s / 2)) : int(cy + s / 2), int(max(0, cx - s / 2)) : int(cx + s / 2)])
    return crops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.config import config_from_dict
    from corpus_anon.demo import FPS, Signer, render_frame, write_video
    from corpus_anon.run.pipeline import run

    root = args.out or tempfile.mkdtemp(prefix="reid-pixelate-")
    os.makedirs(os.path.join(root, "corpus"), exist_ok=True)
    faces = six_faces()
    print(f"{len(faces)} faces found on t1.jpg", flush=True)
    rows = []
    n = int(round(args.seconds * FPS))
    for i, face in enumerate(faces):
        s = Signer(f"person{i + 1}", face, (60, 60, 90), (200, 205, 210))
        for k in range(2):
            path = os.path.join(root, "corpus", f"{s.signer_id}_clip{k + 1}.mp4")
            write_video(path, [render_frame(s, k * 7.3 + t / FPS) for t in range(n)])
            rows.append({"clip_id": f"{s.signer_id}_clip{k + 1}", "video_uri": path, "signer_id": s.signer_id})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, "manifest.parquet"))
    cfg = config_from_dict({
        "manifest": {"uri": os.path.join(root, "manifest.parquet")}, "output": {"uri": os.path.join(root, "out")},
        "anonymizer": {"kind": "pixelate"},
        "storage": {"allowed_prefixes": {"read": [root], "write": [os.path.join(root, "out")]}},
    })
    res = run(cfg)
    reid = res.summary.get("reid", {})
    print(json.dumps({"counts": res.counts, "exposure": res.summary.get("exposure"),
                      **{k: reid.get(k) for k in ("n_tested", "reid_top1", "reid_top1_originals", "reid_chance")}},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
