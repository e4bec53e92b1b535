"""Generate a 2,000-clip manifest (segments of a few real recordings) and print `corpus-anon plan`
for it, for each diffusion mode — the dry run a maintainer does before paying for GPUs.

    .venv/bin/python benchmarks/plan_2000.py [--out /tmp/plan2000]

The recordings are small synthetic MP4s (64x48, 30 fps, 60 s); segments are 2-8 s utterances
drawn with a fixed seed, 20 signers. Nothing is anonymized and nothing is written under the output.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/plan2000")
    ap.add_argument("--clips", type=int, default=2000)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.config import config_from_dict
    from corpus_anon.run.plan import make_plan
    from tests.media import make_video

    os.makedirs(args.out, exist_ok=True)
    sessions = []
    for i in range(4):
        path = os.path.join(args.out, f"session{i}.mp4")
        if not os.path.exists(path):
            make_video(path, 1800, 30, (64, 48))
        sessions.append(path)
    rng = np.random.default_rng(0)
    n = args.clips
    length = rng.uniform(2.0, 8.0, n)
    start = rng.uniform(0.0, 60.0 - length)
    table = pa.table({
        "clip_id": [f"utt{i:05d}" for i in range(n)],
        "video_uri": [sessions[i % 4] for i in range(n)],
        "signer_id": [f"signer{i % 20:02d}" for i in range(n)],
        "start_s": np.round(start, 3), "end_s": np.round(start + length, 3),
    })
    pq.write_table(table, os.path.join(args.out, "manifest.parquet"))
    store = os.path.join(args.out, "tiny-store")
    if not os.path.exists(os.path.join(store, "corpus-anon.lock.json")):
        from corpus_anon.models.tiny import make_tiny

        make_tiny(store)  # the plan reads the store's lock for the fingerprint, nothing else
    for kind, mode in (("pixelate", None), ("diffslva", "fast"), ("diffslva", "faithful")):
        cfg = config_from_dict({
            "manifest": {"uri": os.path.join(args.out, "manifest.parquet")},
            "output": {"uri": os.path.join(args.out, "runs")},
            "anonymizer": {"kind": kind}, "faces": {"backend": "none"},
            "models": {"profile": "tiny", "store": store},
            **({"diffusion": {"mode": mode}} if mode else {}),
            "resources": {"actors": 32},
            "storage": {"allowed_prefixes": {"read": [args.out], "write": [args.out]}},
        })
        for gpu in ("a100", "h100"):
            cfg.plan.gpu = gpu
            if kind == "diffslva":
                os.environ.setdefault("CORPUS_ANON_SECRET", "plan-benchmark-secret-0123456789abcdef")
            print(f"$ corpus-anon plan  ({kind}{'/' + mode if mode else ''}, {gpu}, 32 GPU actors)")
            print("\n".join(make_plan(cfg).lines()))
            print()


if __name__ == "__main__":
    main()
