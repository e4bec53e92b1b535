"""P2 — overlap: does fetching, decoding, encoding and uploading stay off the model's critical path?

    .venv/bin/python benchmarks/overlap.py          # 32 clips: batch sizes 1, 4, 8; 4 with one batch per actor; naive
    .venv/bin/python benchmarks/overlap.py --clips 8 --batch-sizes 4 --single "" --no-naive   # a quick look

32 synthetic clips of 3 s at 30 fps (the demo's signer generator: a real face photo on a moving
body), the real plan (`corpus_anon.run.pipeline.run`: settle stage, one anonymize actor, records) with
the tiny profile (`diffusion.mode` fast by default, `video.short_side` 128), torch limited to one
thread (OMP/MKL_NUM_THREADS=1 and torch.set_num_threads(1) in the actor) so that the actor's I/O
threads have the machine's other core. Face analysis and the gate are off by default: they run
under the model lock too, so with `--faces` the model time below is t_anonymize_s + t_faces_s.

For each batch size with `resources.concurrent_batches` 2 (the default: one batch on the model,
one fetching or publishing), and for `--single` batch sizes also with 1 (the earlier design: one
batch per actor at a time): overhead = wall ÷ model time, where wall runs from the first clip's fetch (the
`started_at` of its attempt, written just before its download) to the last record's `finished_at`,
and model time is Σ t_anonymize_s over the run's records (the anonymizer's own time, measured in
the actor). 1.00 means the model never waited. The naive row runs the same `ClipProcessor` steps in
this process, one after another per clip (fetch → decode → anonymize → encode → upload), timed the
same way. Storage is the local file system. Prints one table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch loads anywhere (the actors inherit it)
    os.environ[_var] = "1"


# Synthetic identities need a secret; the driver drops it from its environment after reading it,
# so each run sets it again. A fixed value: these clips are synthetic.
SECRET = "overlap-benchmark-secret-not-for-real-data-0123456789"


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def make_corpus(root: str, clips: int, seconds: float) -> str:
    """`clips` demo-style clips (3 signers, different moments of their signing) and their manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.demo import FPS, Signer, demo_faces, render_frame, write_video

    faces = demo_faces()
    palette = [((40, 60, 110), (200, 205, 210)), ((120, 40, 40), (185, 200, 180)), ((30, 90, 60), (210, 195, 175))]
    signers = [Signer(f"signer{i + 1}", face, *palette[i]) for i, (_, face) in enumerate(faces[:3])]
    os.makedirs(os.path.join(root, "corpus"), exist_ok=True)
    rows = []
    n = int(round(seconds * FPS))
    for i in range(clips):
        s = signers[i % len(signers)]
        path = os.path.join(root, "corpus", f"clip{i:03d}.mp4")
        if not os.path.exists(path):
            write_video(path, [render_frame(s, 1.7 * i + k / FPS) for k in range(n)])
        rows.append({"clip_id": f"clip{i:03d}", "video_uri": path, "signer_id": s.signer_id})
    manifest = os.path.join(root, "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def base_config(root: str, manifest: str, args: argparse.Namespace) -> dict:
    cfg = {
        "manifest": {"uri": manifest},
        "anonymizer": {"kind": "diffslva"},
        "models": {"profile": "tiny", "store": os.path.join(root, "store"), "cache_dir": os.path.join(root, "cache")},
        "diffusion": {"mode": args.mode},
        "video": {"short_side": args.short_side, "threads": 1},
        "faces": {"backend": "dlib" if args.faces else "none", "enhance": False, "detect_side": 320},
        "gate": {"enabled": bool(args.faces)},
        "device": "cpu",
        "resources": {"actors": 1, "cpus_per_actor": 0.5, "io_threads": 2},
        "storage": {"allowed_prefixes": {"read": [root], "write": [root]}},
    }
    return cfg


def model_seconds(metrics: dict, faces: bool) -> float:
    return float(metrics.get("t_anonymize_s") or 0.0) + (float(metrics.get("t_faces_s") or 0.0) if faces else 0.0)


def run_plan(root: str, manifest: str, args: argparse.Namespace, batch_size: int, concurrent: int) -> dict:
    from corpus_anon.config import config_from_dict
    from corpus_anon.run.pipeline import run
    from corpus_anon.io.records import read_record
    from corpus_anon.io.storage import Storage, StorageSettings

    data = base_config(root, manifest, args)
    data["output"] = {"uri": os.path.join(root, f"plan-b{batch_size}-c{concurrent}")}
    data["resources"]["batch_size"] = batch_size
    data["resources"]["concurrent_batches"] = concurrent
    cfg = config_from_dict(data)
    os.environ["CORPUS_ANON_SECRET"] = SECRET
    res = run(cfg)
    storage = Storage(StorageSettings.from_config(cfg, None))
    starts, ends, model = [], [], 0.0
    import pyarrow.parquet as pq

    for cid in pq.read_table(manifest).column("clip_id").to_pylist():
        rec = read_record(storage, res.layout, cid)
        att = json.loads(storage.read_text(res.layout.attempts(cid)))
        starts.append(_ts(att["started_at"]))
        ends.append(_ts(rec["finished_at"]))
        model += model_seconds(rec["metrics"], args.faces)
    wall = max(ends) - min(starts)
    return {"variant": f"plan, batch_size {batch_size}, concurrent_batches {concurrent}", "wall": wall, "model": model, "counts": res.counts,
            "run_wall": res.wall_s}


def run_naive(root: str, manifest: str, args: argparse.Namespace) -> dict:
    """The same steps, strictly one after another, in this process."""
    import pyarrow.parquet as pq
    import torch

    from corpus_anon.config import config_from_dict
    from corpus_anon.run.pipeline import assign_identities
    from corpus_anon.io.records import RunLayout
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.actor.worker import ClipProcessor, _ctx

    torch.set_num_threads(1)
    data = base_config(root, manifest, args)
    data["output"] = {"uri": os.path.join(root, "naive")}
    cfg = config_from_dict(data)
    storage = Storage(StorageSettings.from_config(cfg, None))
    os.environ["CORPUS_ANON_SECRET"] = SECRET
    table, _ = assign_identities(pq.read_table(manifest), cfg)
    layout = RunLayout(os.path.join(root, "naive"), "naive")
    proc = ClipProcessor(cfg, storage, layout, "cpu")
    model = 0.0
    t0 = time.time()
    for i, row in enumerate(table.to_pylist()):
        row["row_fp"] = f"naive{i:04d}"
        p = proc.prepare(row)  # fetch + decode
        if p.record is not None:
            raise SystemExit(f"naive loop: {row['clip_id']} failed: {p.record['error']}")
        ctx = _ctx(row, p.clip.fps)
        t1 = time.monotonic()
        result = proc.anonymizer.anonymize(p.clip.frames, ctx, p.deadline.check)
        t_anon = time.monotonic() - t1
        result, extra, status, artifacts = proc.assess(p, ctx, result)
        metrics = dict(extra, t_anonymize_s=t_anon)
        rec = proc.publish(p, result.frames, metrics, status, artifacts)  # encode + upload + verify
        if rec["status"] == "error":
            raise SystemExit(f"naive loop: {row['clip_id']} failed: {rec['error']}")
        model += model_seconds(metrics, args.faces)
    proc.close()
    return {"variant": "naive sequential loop", "wall": time.time() - t0, "model": model, "counts": {},
            "run_wall": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--single", default="4",
                    help="batch sizes to run also with resources.concurrent_batches 1 (one batch per actor at a "
                         "time, the design before concurrent batches)")
    ap.add_argument("--mode", default="fast", choices=("fast", "faithful"))
    ap.add_argument("--short-side", type=int, default=128)
    ap.add_argument("--faces", action="store_true", help="dlib face analysis and the gate on (model time += t_faces_s)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = os.path.abspath(args.out or tempfile.mkdtemp(prefix="overlap-"))
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    manifest = make_corpus(root, args.clips, args.seconds)
    if not os.path.exists(os.path.join(root, "store", "corpus-anon.lock.json")):
        from corpus_anon.models.tiny import make_tiny

        make_tiny(os.path.join(root, "store"))
    print(f"# corpus of {args.clips} clips x {args.seconds:g} s ready in {time.time() - t0:.1f} s under {root}",
          flush=True)
    import ray

    ray.init(include_dashboard=False, logging_level="WARNING")
    rows = []
    variants = [(int(b), 2) for b in args.batch_sizes.split(",") if b]
    variants += [(int(b), 1) for b in args.single.split(",") if b]
    for bs, conc in variants:
        rows.append(run_plan(root, manifest, args, bs, conc))
        print(f"# {rows[-1]['variant']}: {rows[-1]['wall'] / rows[-1]['model']:.3f}", flush=True)
    ray.shutdown()
    if not args.no_naive:
        rows.append(run_naive(root, manifest, args))
    cpu = os.cpu_count()
    print(f"\n# {args.clips} clips x {args.seconds:g} s at 30 fps, short side {args.short_side}, diffusion.mode "
          f"{args.mode}, tiny profile, one actor, torch 1 thread, {cpu} CPUs, faces {'on' if args.faces else 'off'}; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| variant | wall s (first fetch to last record) | model s (Σ t_anonymize_s"
          f"{' + t_faces_s' if args.faces else ''}) | wall ÷ model | goal | counts |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        goal = "≤ 1.15" if r["variant"] == "plan, batch_size 4, concurrent_batches 2" else ""
        print(f"| {r['variant']} | {r['wall']:.1f} | {r['model']:.1f} | {r['wall'] / r['model']:.3f} | {goal} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r['counts'].items()))} |")
    sys.stdout.flush()
    os._exit(0)  # pyarrow can abort in interpreter teardown


if __name__ == "__main__":
    main()
