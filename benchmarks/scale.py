"""P3 — scale: can the plan keep 32 GPUs busy over 10,000 clips?

    .venv/bin/python benchmarks/scale.py [--clips 10000] [--actors 32] [--standin-s 2.0]

A generated manifest of N clips (all cut from one small real video, so the settle stage stats a
real object per row), a local Ray with 32 *logical* GPUs, 32 anonymize actors whose model is a
declared fixed-cost stand-in (`CORPUS_ANON_BENCH_STANDIN_S`: a sleep of 2.0 s per clip; fetch,
decode, encode and upload skipped), so only the plan, the attempts/records I/O and Ray's
scheduling are measured. Prints achieved clips/s ÷ ideal (actors / standin_s), the driver's peak
RSS and the object store's peak use (polled every 2 s).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=10000)
    ap.add_argument("--actors", type=int, default=32)
    ap.add_argument("--standin-s", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["CORPUS_ANON_BENCH_STANDIN_S"] = str(args.standin_s)  # inherited by the local workers
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from corpus_anon.config import config_from_dict
    from corpus_anon.run.pipeline import run
    from tests.media import make_video

    root = args.out or tempfile.mkdtemp(prefix="scale-")
    os.makedirs(root, exist_ok=True)
    src = os.path.join(root, "src.mp4")
    make_video(src, 4, 8, (64, 48))
    n = args.clips
    pq.write_table(pa.table({"clip_id": [f"c{i:06d}" for i in range(n)], "video_uri": [src] * n,
                             "signer_id": [f"s{i % 100}" for i in range(n)]}), os.path.join(root, "m.parquet"))
    # 32 logical GPUs on a CPU machine; logical CPUs oversubscribed so the sleeping actors and Ray
    # Data's own tasks all fit (each actor holds a GPU and a sliver of a CPU).
    ray.init(num_gpus=args.actors, num_cpus=8, include_dashboard=False, logging_level="WARNING")
    cfg = config_from_dict({
        "manifest": {"uri": os.path.join(root, "m.parquet")}, "output": {"uri": os.path.join(root, "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "none"}, "gate": {"enabled": False},
        "device": "cuda",
        "resources": {"actors": args.actors, "gpus_per_actor": 1, "cpus_per_actor": 0.05,
                      "batch_size": args.batch_size, "max_attempts": 3},
        "storage": {"allowed_prefixes": {"read": [root], "write": [root]}},
    })
    peak_store = [0.0]
    stop = threading.Event()

    def poll() -> None:
        from ray._private.internal_api import memory_summary

        while not stop.is_set():
            try:
                text = memory_summary(stats_only=True)
                m = re.search(r"Plasma memory usage (\d+) MiB", text)
                if m:
                    peak_store[0] = max(peak_store[0], float(m.group(1)))
            except Exception:  # noqa: BLE001 - a missed poll is fine
                pass
            stop.wait(2.0)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.time()
    res = run(cfg)
    wall = time.time() - t0
    stop.set()
    ideal_rate = args.actors / args.standin_s
    rate = res.ran / wall
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"| clips | actors | stand-in s | wall s | clips/s | ideal clips/s | achieved/ideal | driver peak RSS GB | object store peak MiB |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    print(f"| {res.ran} | {args.actors} | {args.standin_s:g} | {wall:.1f} | {rate:.2f} | {ideal_rate:.1f} | "
          f"{rate / ideal_rate:.3f} | {rss_gb:.2f} | {peak_store[0]:.0f} |")
    print(f"counts {res.counts}; outputs under {root}")
    ray.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
