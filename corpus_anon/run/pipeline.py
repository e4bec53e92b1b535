"""The Ray Data plan (driver side; imports no torch, diffusers, insightface, onnxruntime or cv2).

    manifest ─validate─▶ settle (tasks: row fingerprint, existing record → skip | run)
             ─▶ anonymize actor pool (fetch/decode ahead, encode/upload/verify behind)
             ─▶ records ─▶ metrics/metrics.parquet, summary.json

Rows carry only URIs, numbers and short strings; frames stay inside the actors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from corpus_anon import __version__
from corpus_anon.config import Config, ConfigError, config_to_yaml, output_fingerprint, resolve_endpoint
from corpus_anon.errors import one_sentence
from corpus_anon.run.manifest import ManifestError, passthrough_columns, read_manifest, validate_table
from corpus_anon.io.records import (RunLayout, now_iso, read_record, row_fingerprint, seed_start, settle, source_inputs,
                                 write_record)
from corpus_anon.secret import drop_secret_from_env
from corpus_anon.io.storage import PolicyError, Storage, StorageSettings

log = logging.getLogger(__name__)

RECORD_COLUMNS = ("clip_id", "status", "error", "output_uri", "sha256", "bytes", "attempts",
                  "row_fp", "cfg_fp", "finished_at", "reidentified")
METRIC_COLUMNS = ("n_frames", "fps", "width", "height", "duration_s",
                  "t_fetch_s", "t_anonymize_s", "t_publish_s")


class RunError(RuntimeError):
    """The run cannot start or finish (infrastructure or setup); one sentence."""


@dataclass
class RunResult:
    layout: RunLayout
    counts: dict[str, int]
    planned: int
    ran: int
    skipped: int
    wall_s: float
    metrics_uri: str
    summary: dict[str, Any] = field(default_factory=dict)


# ---- stages ---------------------------------------------------------------------------------------
class SettleStage:
    """Ray Data task stage: the row fingerprint and the existing record decide skip or run."""

    def __init__(self, storage: StorageSettings, layout: RunLayout, max_attempts: int,
                 reseed_limit: int | None = None) -> None:
        self.storage = Storage(storage)
        self.layout = layout
        self.max_attempts = max_attempts
        self.reseed_limit = reseed_limit

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        ident, boxes_digest = source_inputs(self.storage, row)
        row_fp = row_fingerprint(ident, row.get("start_s"), row.get("end_s"), row.get("prompt"),
                                 row.get("seed"), boxes_digest)
        rec = read_record(self.storage, self.layout, row["clip_id"])
        action = settle(rec, row_fp, self.max_attempts, self.reseed_limit)
        start = seed_start(rec) if action == "run" and rec and rec.get("row_fp") == row_fp else 0
        return {"row_fp": row_fp, "action": action, "seed_start": start,
                "record": json.dumps(rec, sort_keys=True) if action == "skip" else ""}

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.select([c for c in _WORK_COLUMNS if c in batch.column_names]).to_pylist()
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(self.one, rows))
        return pa.table({
            "clip_id": [r["clip_id"] for r in rows],
            "row_fp": [o["row_fp"] for o in out],
            "action": [o["action"] for o in out],
            "seed_start": pa.array([o["seed_start"] for o in out], pa.int64()),
            "record": [o["record"] for o in out],
        })


_WORK_COLUMNS = ("clip_id", "video_uri", "signer_id", "start_s", "end_s", "prompt", "seed", "face_boxes_uri")


# ---- the driver ---------------------------------------------------------------------------------
def ensure_ray() -> Any:
    """Connect to RAY_ADDRESS when set, else start a local Ray (reuses an initialized one).

    The secret is dropped from the driver's environment first: local workers inherit it."""
    import ray

    drop_secret_from_env()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 include_dashboard=False if address is None else None)
    return ray


def _wait_for_gpus(ray: Any, cfg: Config, request: Any = None, sleep: Any = time.sleep,
                   clock: Any = time.monotonic) -> float:
    """Ask the autoscaler for one GPU bundle per actor and wait up to `resources.gpu_wait_s` for
    GPUs to join (a cluster whose GPU workers scale from zero has none when the run starts)."""
    per = cfg.resources.gpus_per_actor or 1.0
    need = per * cfg.resources.actors
    if request is None:
        from ray.autoscaler.sdk import request_resources as request
    request(bundles=[{"GPU": per}] * cfg.resources.actors)
    log.info("asked the autoscaler for %g GPU(s); waiting up to %.0f s", need, cfg.resources.gpu_wait_s)
    deadline = clock() + cfg.resources.gpu_wait_s
    have = float(ray.cluster_resources().get("GPU", 0))
    while have < need and clock() < deadline:
        sleep(5.0)
        have = float(ray.cluster_resources().get("GPU", 0))
    return have


def release_gpu_request(ray: Any, cfg: Config, request: Any = None) -> None:
    """Withdraw the run's standing GPU request, so the autoscaler can scale the GPUs back down."""
    if cfg.device != "cuda" or cfg.resources.gpu_wait_s <= 0:
        return
    try:
        if request is None:
            from ray.autoscaler.sdk import request_resources as request
        request(bundles=[])
    except Exception as e:  # noqa: BLE001 - best effort; the autoscaler's idle timeout still applies
        log.warning("could not withdraw the GPU request (%s)", e)


def _resolve_gpus(cfg: Config, ray: Any, request: Any = None, sleep: Any = time.sleep,
                  clock: Any = time.monotonic) -> tuple[bool, float]:
    """(use_gpu, gpus_per_actor) from `device` and what the cluster has; fail early if impossible."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    if cfg.device == "cuda" and cfg.resources.gpu_wait_s > 0:
        need = (cfg.resources.gpus_per_actor or 1.0) * cfg.resources.actors
        if cluster_gpus < need:
            cluster_gpus = _wait_for_gpus(ray, cfg, request, sleep, clock)
        if cluster_gpus <= 0:
            raise RunError(f"device is 'cuda' but no GPU joined the Ray cluster within resources.gpu_wait_s "
                           f"({cfg.resources.gpu_wait_s:g} s); check the GPU worker group and its quota.")
    if cfg.device == "cuda" and cluster_gpus <= 0:
        raise RunError("device is 'cuda' but the Ray cluster has no GPU resources; add GPU workers, set "
                       "resources.gpu_wait_s on an autoscaling cluster, or set device: cpu.")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus > 0)
    if cfg.anonymizer.kind == "pixelate" and cfg.device != "cuda":
        use_gpu = False  # the baseline runs on CPU; do not hold GPUs for it
    gpus = cfg.resources.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if use_gpu else 0.0
    if gpus > 0 and gpus > cluster_gpus:
        raise RunError(f"resources.gpus_per_actor is {gpus:g} but the cluster has {cluster_gpus:g} GPU(s).")
    return use_gpu, gpus


def checked_manifest(cfg: Config, storage: Storage) -> tuple[str, Any, int]:
    """The checks every run and dry run makes first: the URI policy, the model settings, the
    manifest's rows, and the takedown tombstones. Returns (output root, manifest without
    withdrawn clips, number of withdrawn rows dropped); writes nothing."""
    if not cfg.manifest.uri:
        raise ConfigError("no manifest given: set manifest.uri or pass --manifest.")
    if not cfg.output.uri:
        raise ConfigError("no output given: set output.uri or pass --output.")
    try:
        out = storage.check_write(cfg.output.uri)
        storage.check_read(cfg.manifest.uri)
        if cfg.anonymizer.kind == "diffslva":
            if not cfg.models.store:
                raise ConfigError("anonymizer.kind 'diffslva' needs models.store (see `corpus-anon models`).")
        if cfg.faces.detector == "scrfd" and cfg.faces.backend != "insightface":
            raise ConfigError("faces.detector 'scrfd' is insightface's buffalo_l detector: it needs "
                              "faces.backend: insightface.")
        if cfg.faces.backend == "insightface" and not (cfg.models.store or cfg.faces.model_root):
            raise ConfigError("faces.backend 'insightface' needs models.store (with insightface/models/buffalo_l/ "
                              "in its lock) or faces.model_root.")
        if cfg.models.store and _uses_store(cfg):
            storage.check_read(cfg.models.store)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    table = read_manifest(cfg.manifest.uri, storage)
    problems = validate_table(table, cfg, storage)
    if problems:
        raise ManifestError(problems, cfg.manifest.uri)
    withdrawn = 0
    # Takedowns: no run recreates a withdrawn clip. The tombstones live in the private store (and,
    # from older versions, possibly still in release.root).
    from corpus_anon.release import tombstones as tb

    tb.check_separation(cfg)
    tb.check_private_access(storage, tb.private_uri(cfg), write=False)
    try:
        tomb = tb.load_tombstones(storage, cfg)
    except (PolicyError, tb.TombstoneError) as e:
        raise ConfigError(str(e)) from None
    except PermissionError as e:  # denied by the store itself: nothing may run unchecked against takedowns
        raise RunError(f"reading the tombstones in {tb.private_uri(cfg)} was denied "
                       f"({one_sentence(e).rstrip('.')}).") from None
    if tomb["entries"]:
        from corpus_anon import secret as sec

        raw = sec.read_secret("a run with withdrawn clips") if os.environ.get(sec.SECRET_ENV) else None
        where = tb.tombstones_uri(cfg) or "the private store"
        table, withdrawn = tb.apply_tombstones(table, tomb, raw, where)
        if withdrawn:
            log.info("%d manifest rows are withdrawn (tombstones in %s) and are not run", withdrawn, where)
    return out, table, withdrawn


def _tombstone_keys(table: Any) -> tuple[list[str], list[str]] | None:
    """Each row's (release id, signer pseudonym) while the driver still holds the secret, so the
    workers and the end of the run can recognise a takedown made during the run; None without it."""
    from corpus_anon import secret as sec
    from corpus_anon.release.tombstones import row_keys

    if not os.environ.get(sec.SECRET_ENV):
        log.info("no CORPUS_ANON_SECRET: a takedown made while this run is in progress is applied by the "
                 "takedown itself and by the next run, not by this run")
        return None
    try:
        return row_keys(table, sec.read_secret("the tombstone check"))
    except ConfigError as e:
        log.warning("the run cannot re-check tombstones while it runs: %s", e)
        return None


def _drop_withdrawn_during_run(storage: Storage, cfg: Config, layout: RunLayout, table: Any,
                               records: dict[str, dict[str, Any]],
                               keys: tuple[list[str], list[str]]) -> tuple[Any, int]:
    """Clips withdrawn by a takedown while the run was in progress leave the run: their outputs are
    deleted and their rows leave the metrics table, the summary and the report."""
    import pyarrow as pa

    from corpus_anon.release.tombstones import tombstones_uri, withdrawn_rows

    ids = table.column("clip_id").to_pylist()
    late = set(withdrawn_rows(storage, tombstones_uri(cfg), {c: (r, s) for c, r, s in zip(ids, *keys)}))
    if not late:
        return table, 0
    from corpus_anon.release.takedown import delete_run_clip

    for cid in late:
        delete_run_clip(storage, layout, cid)
        records.pop(cid, None)
    from corpus_anon.release.tombstones import read_run_keys, write_run_keys

    write_run_keys(storage, layout.root, {c: v for c, v in read_run_keys(storage, layout.root).items() if c not in late})
    log.info("%d clips were withdrawn while the run was in progress; their outputs are deleted", len(late))
    return table.filter(pa.array([c not in late for c in ids])), len(late)


def configure_data_context() -> None:
    """Ray Data's progress bars on a terminal only (in job logs and CI the per-clip INFO lines say
    it), and no plan dump at start."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False


def prepare_run(cfg: Config, storage: Storage) -> tuple[Any, RunLayout, int]:
    """Validate everything that can be checked before work starts; return (manifest without
    withdrawn clips, layout, number of withdrawn rows dropped)."""
    out, table, withdrawn = checked_manifest(cfg, storage)
    extra: dict[str, Any] = {}
    if cfg.models.store and _uses_store(cfg):
        extra["models"] = model_lock_digest(cfg, storage)
    if cfg.anonymizer.kind == "diffslva":
        table, kid = assign_identities(table, cfg)
        if kid:
            extra["key_id"] = kid
    layout = RunLayout(out, output_fingerprint(cfg, extra))
    # The pre-flight write check: a real write (and delete) under the output, after validation so
    # that a rejected config or manifest leaves nothing behind.
    try:
        storage.probe_write(out)
    except PermissionError as e:
        raise RunError(f"writing to the output {out} was denied ({one_sentence(e).rstrip('.')}).") from None
    except Exception as e:  # noqa: BLE001
        raise RunError(f"cannot write to the output {out} ({one_sentence(e).rstrip('.')}).") from None
    return table, layout, withdrawn


def _uses_store(cfg: Config) -> bool:
    """Whether the actors load anything from models.store (diffusion, or face files without a
    faces.model_root of the user's own)."""
    return (cfg.anonymizer.kind == "diffslva" or (cfg.faces.backend != "none" and not cfg.faces.model_root)
            or _needs_centerface(cfg))


def _needs_centerface(cfg: Config) -> bool:
    """Whether the actors detect faces with CenterFace (pixelate always detects; face analysis does
    unless faces.backend is none)."""
    return cfg.faces.detector == "centerface" and (cfg.anonymizer.kind == "pixelate" or cfg.faces.backend != "none")


def model_lock_digest(cfg: Config, storage: Storage) -> str:
    """A digest of the model store's lock file: staged model files change the fingerprint. Also
    checks, before any work, that the lock lists every model file the config needs."""
    from corpus_anon.models.registry import LOCK_NAME

    uri = cfg.models.store.rstrip("/") + "/" + LOCK_NAME
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"the model store has no {LOCK_NAME}; run `corpus-anon models stage --record` "
                          "once (or `corpus-anon models make-tiny` for the tiny profile).") from None
    try:
        files = json.loads(data).get("files", {})
    except (ValueError, AttributeError):
        raise ConfigError(f"{uri} is not a corpus-anon lock file.") from None
    if cfg.faces.backend != "none" and not cfg.faces.model_root:
        need = {"dlib": "dlib/shape_predictor_5_face_landmarks.dat",
                "insightface": "insightface/models/buffalo_l/det_10g.onnx"}[cfg.faces.backend]
        if need not in files:
            raise ConfigError(f"faces.backend '{cfg.faces.backend}' needs {need.rsplit('/', 1)[0]}/ in the model "
                              "store's lock; stage it (see README, Models), set faces.model_root, or set "
                              "faces.backend: none.")
    if _needs_centerface(cfg) and "centerface/centerface.onnx" not in files:
        raise ConfigError("faces.detector 'centerface' needs centerface/centerface.onnx in the model store's lock; "
                          "add it with `corpus-anon models add-centerface STORE`.")
    from corpus_anon.models.registry import loaded_lock_digest, mediapipe_relpath, raft_relpath, tpsmm_relpath

    if cfg.faces.backend != "none" and cfg.landmarks.enabled:
        names = ["face_landmark.tflite"] + (["palm_detection_full.tflite", "hand_landmark_full.tflite"]
                                            if cfg.landmarks.hands else [])
        missing = [n for n in names if mediapipe_relpath(n) not in files]
        if missing:
            raise ConfigError(f"landmarks.enabled needs mediapipe/{missing[0]} in the model store's lock; add the "
                              "landmark models with `corpus-anon models add-mediapipe STORE` or set "
                              "landmarks.enabled: false.")
    flow = cfg.diffusion.flow
    if cfg.anonymizer.kind == "diffslva" and flow in ("raft-small", "raft-large"):
        # the file names of models/raft.py's RAFT_FILES, written here: that module imports torch
        need = raft_relpath({"raft-small": "raft-small.pth", "raft-large": "raft-sintel.pth"}[flow])
        if need not in files:
            raise ConfigError(f"diffusion.flow '{flow}' needs {need} in the model store's lock; add it with "
                              "`corpus-anon models add-raft STORE` or set diffusion.flow: dis.")
    reenacts = cfg.anonymizer.kind == "diffslva" and cfg.faces.enhance and cfg.faces.backend != "none"
    if reenacts:
        try:
            need = tpsmm_relpath(cfg.models.profile, cfg.faces.tpsmm)
        except ValueError as e:
            raise ConfigError(f"faces.tpsmm: {e}") from None
        if need not in files:
            raise ConfigError(f"faces.enhance needs the TPSMM checkpoint {need} (faces.tpsmm) in the model store's "
                              "lock; stage it (see README, Models), add a fine-tune with `corpus-anon models "
                              "add-tpsmm`, or set faces.enhance: false.")
    return loaded_lock_digest(cfg.models.profile, files, cfg.faces.tpsmm if reenacts else None)


def assign_identities(table: Any, cfg: Config) -> tuple[Any, str | None]:
    """Fill each row's `seed` and `prompt` on the driver: the manifest's when given, else
    HMAC(secret, "seed:" + signer_id) and a prompt from the bank. Returns (table, key id or None)."""
    import pyarrow as pa

    from corpus_anon import secret as sec

    n = table.num_rows
    seeds = table.column("seed").to_pylist() if "seed" in table.column_names else [None] * n
    prompts = table.column("prompt").to_pylist() if "prompt" in table.column_names else [None] * n
    kid = None
    if any(x is None for x in seeds):
        raw = sec.read_secret("anonymizer.kind 'diffslva' without a seed on every manifest row")
        kid = sec.key_id(raw)
        signers = table.column("signer_id").to_pylist()
        seeds = [int(x) if x is not None else sec.derive_seed(raw, sg) for x, sg in zip(seeds, signers)]
        del raw
    bank = cfg.diffusion.prompt_bank
    prompts = [p if p else sec.pick_prompt(bank, sd) for p, sd in zip(prompts, seeds)]
    for name, values, typ in (("seed", seeds, pa.int64()), ("prompt", prompts, pa.string())):
        arr = pa.array([int(v) if name == "seed" else v for v in values], typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table, kid


def _write_json(storage: Storage, uri: str, data: dict[str, Any]) -> None:
    storage.write_text(uri, json.dumps(data, indent=2, sort_keys=True, default=str))


def _blocks(ray: Any, table: Any, rows_per_block: int) -> Any:
    """A dataset of `table` in blocks of `rows_per_block` rows, so that batches spread over the
    actors one by one. The split runs as a Ray Data stage, beside the actors' start-up: cutting
    the blocks on the driver cost one object-store put each (10,000 clips in blocks of 4: 6.8 s)."""
    n = max(1, -(-table.num_rows // rows_per_block))
    return ray.data.from_arrow(table).repartition(n)


def run(cfg: Config, *, limit: int | None = None, refresh: bool = False) -> RunResult:
    """Run the plan for one config; returns counts. Raises ConfigError/ManifestError/RunError.

    `refresh`: also re-run `leak` clips from their last seed attempt, up to `refresh.max_reseeds`."""
    import pyarrow as pa

    t_start = time.time()
    settings = StorageSettings.from_config(cfg, resolve_endpoint(cfg))
    storage = Storage(settings)
    table, layout, withdrawn = prepare_run(cfg, storage)
    if limit is not None:
        table = table.slice(0, limit)
    planned = table.num_rows
    try:
        storage.write_text(layout.config, config_to_yaml(cfg))
        _write_json(storage, layout.plan, {"planned_clips": planned, "started_at": now_iso(),
                                           "cfg_fp": layout.cfg_fp, "manifest": cfg.manifest.uri,
                                           "version": __version__})
        storage.write_text(layout.latest_pointer, layout.cfg_fp)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"cannot write to the output {layout.root} ({type(e).__name__}: {e}).") from None
    log.info("run %s: %d clips planned -> %s", layout.cfg_fp, planned, layout.root)

    keys = _tombstone_keys(table)
    if keys is not None:
        from corpus_anon.release.tombstones import save_run_keys

        save_run_keys(storage, layout.root, table.column("clip_id").to_pylist(), keys)
    ray = ensure_ray()
    try:
        use_gpu, gpus = _resolve_gpus(cfg, ray)
        from ray.data import ActorPoolStrategy

        configure_data_context()

        res = cfg.resources
        work = table.select([c for c in _WORK_COLUMNS if c in table.column_names])
        if keys is not None:  # each row's pseudonyms: workers re-check the tombstones before publishing
            from corpus_anon.release.tombstones import TOMB_COLUMNS

            for name, values in zip(TOMB_COLUMNS, keys):
                work = work.append_column(name, pa.array(values, pa.string()))
        settled = (
            _blocks(ray, work, 64)
            .map_batches(SettleStage, fn_constructor_kwargs={"storage": settings, "layout": layout,
                                                             "max_attempts": res.max_attempts,
                                                             "reseed_limit": cfg.refresh.max_reseeds if refresh else None},
                         batch_format="pyarrow", batch_size=64, num_cpus=0.25,
                         compute=ActorPoolStrategy(size=1))
            .to_arrow_refs()
        )
        settled_table = pa.concat_tables(ray.get(settled)) if settled else None
        records: dict[str, dict[str, Any]] = {}
        decisions = {r["clip_id"]: r for r in settled_table.to_pylist()} if settled_table is not None else {}
        for cid, d in decisions.items():
            if d["action"] == "skip":
                records[cid] = json.loads(d["record"])
        run_ids = [cid for cid, d in decisions.items() if d["action"] == "run"]
        log.info("%d clips settled earlier are skipped; %d to process", len(records), len(run_ids))

        if run_ids:
            import pyarrow.compute as pc

            todo = work.filter(pc.is_in(work.column("clip_id"), value_set=pa.array(run_ids)))
            todo = todo.append_column("row_fp", pa.array([decisions[c]["row_fp"] for c in
                                                         todo.column("clip_id").to_pylist()]))
            todo = todo.append_column("seed_start", pa.array([int(decisions[c]["seed_start"] or 0) for c in
                                                             todo.column("clip_id").to_pylist()], pa.int64()))
            from corpus_anon.actor.worker import AnonymizeWorker

            ds = _blocks(ray, todo, res.batch_size).map_batches(
                AnonymizeWorker,
                fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "storage": settings,
                                       "layout": layout, "use_gpu": use_gpu},
                # Several batches per actor at once: one on the model (the worker's lock), the others
                # fetching or publishing, so batch boundaries do not idle the GPU (benchmarks/overlap.py).
                compute=ActorPoolStrategy(size=res.actors, max_concurrent_calls_per_actor=res.concurrent_batches,
                                          max_tasks_in_flight_per_actor=res.concurrent_batches,
                                          enable_true_multi_threading=res.concurrent_batches > 1),
                batch_format="pyarrow",
                batch_size=res.batch_size,
                num_cpus=res.cpus_per_actor,
                num_gpus=gpus,
                # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1 (2.60; passing
                # them is deprecated): a dead actor is restarted and its batches retried without limit.
                # A clip that kills the process every time is stopped by its durable attempt counter
                # (resources.max_attempts), not by Ray; see worker.py. tests/e2e/test_faults.py checks both.
            )
            done = 0
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for cid, rec in zip(batch.column("clip_id").to_pylist(), batch.column("record").to_pylist()):
                    rec = json.loads(rec)
                    records[cid] = rec
                    done += 1
                    m = rec.get("metrics") or {}
                    secs = sum(float(m.get(k) or 0.0) for k in ("t_fetch_s", "t_anonymize_s", "t_faces_s", "t_publish_s"))
                    log.info("[%d/%d] %s %s in %.1f s%s", done, len(run_ids), cid, rec["status"], secs,
                             f": {rec['error']}" if rec.get("error") else "")
    finally:
        release_gpu_request(ray, cfg)

    missing = [c for c in table.column("clip_id").to_pylist() if c not in records]
    if missing:
        raise RunError(f"{len(missing)} clip(s) came back without a record (first: {missing[0]}).")
    if keys is not None:
        table, late = _drop_withdrawn_during_run(storage, cfg, layout, table, records, keys)
        withdrawn += late
    reid = None
    if cfg.faces.backend != "none":
        reid = corpus_reidentification(storage, layout, table, records)
    metrics = metrics_table(table, records)
    buf = io.BytesIO()
    import pyarrow.parquet as pq

    pq.write_table(metrics, buf)
    storage.write_bytes(layout.metrics, buf.getvalue())
    counts: dict[str, int] = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    wall = time.time() - t_start
    summary = {
        "cfg_fp": layout.cfg_fp, "version": __version__, "planned": planned,
        "processed": len(run_ids), "skipped": planned - len(run_ids), "counts": counts,
        "wall_s": round(wall, 3), "clips_per_s": round(len(run_ids) / wall, 4) if wall > 0 else None,
        "finished_at": now_iso(), "metrics": layout.metrics, "anonymizer": cfg.anonymizer.kind,
        "withdrawn": withdrawn,
    }
    from corpus_anon.run.summaries import fidelity_summary

    # Linguistic fidelity at a glance: medians of the landmark agreement columns over ok/leak clips.
    summary["fidelity"] = fidelity_summary([dict(r.get("metrics") or {}, status=r.get("status"))
                                            for r in records.values()])
    if reid is not None:
        summary["reid"] = reid
        summary["reseeded_clips"] = sorted(c for c, r in records.items()
                                           if (r.get("metrics") or {}).get("seed_attempt"))
        from corpus_anon.run.summaries import summary_counts

        summary["exposure"] = summary_counts(records.values())
    _write_json(storage, layout.summary, summary)
    try:
        from corpus_anon.run.report import write_report

        log.info("review report: %s", write_report(storage, layout))
    except Exception as e:  # noqa: BLE001 - the report never fails a finished run
        log.warning("report.html could not be written (%s)", one_sentence(e))
    return RunResult(layout, counts, planned, len(run_ids), planned - len(run_ids), wall,
                     layout.metrics, summary)


def corpus_reidentification(storage: Storage, layout: RunLayout, table: Any,
                            records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Leave-one-out re-identification over the corpus's own signers (driver side, numpy only).

    Reads each clip's private mean embeddings, marks `reidentified` in the records that change,
    and returns the summary figures with the per-signer table."""
    import numpy as np

    from corpus_anon.run.summaries import leave_one_out_reid

    signer = dict(zip(table.column("clip_id").to_pylist(), table.column("signer_id").to_pylist()))
    candidates = [c for c, r in records.items() if r.get("status") in ("ok", "leak")]

    def load(cid: str) -> tuple[str, Any]:
        try:
            with np.load(io.BytesIO(storage.read_bytes(layout.artifact("embeddings", cid)))) as z:
                return cid, {k: z[k] for k in z.files}
        except FileNotFoundError:
            return cid, None

    with ThreadPoolExecutor(16) as pool:
        loaded = dict(pool.map(load, candidates))
    items, kind, threshold = [], None, None
    for cid, z in loaded.items():
        if z is None:  # no face in the original: counted as n_no_face, never tested
            items.append({"clip_id": cid, "signer_id": signer[cid], "orig": None, "anon": None})
            continue
        kind = str(z["kind"])
        threshold = (records[cid].get("metrics") or {}).get("id_threshold", threshold)
        items.append({"clip_id": cid, "signer_id": signer[cid], "orig": z.get("orig"), "anon": z.get("anon")})
    if kind is None or threshold is None:
        return {"n_tested": 0, "note": "no clip had a face in its original"}
    summary, flags = leave_one_out_reid(items, kind, float(threshold))
    summary["id_score_kind"] = kind
    summary["id_threshold"] = float(threshold)
    for cid, flag in flags.items():
        rec = records[cid]
        if rec.get("reidentified") != flag:
            rec["reidentified"] = bool(flag)
            write_record(storage, layout, rec)
    return summary


def metrics_table(manifest: Any, records: dict[str, dict[str, Any]]) -> Any:
    """Exactly one row per manifest row: record fields, metrics, and the passthrough columns."""
    import pyarrow as pa

    ids = manifest.column("clip_id").to_pylist()
    metric_keys = list(METRIC_COLUMNS)
    for r in records.values():
        for k in r.get("metrics", {}):
            if k not in metric_keys:
                metric_keys.append(k)
    cols: dict[str, list[Any]] = {c: [] for c in RECORD_COLUMNS}
    cols.update({k: [] for k in metric_keys})
    for cid in ids:
        r = records[cid]
        for c in RECORD_COLUMNS:
            cols[c].append(r.get(c))
        m = r.get("metrics", {})
        for k in metric_keys:
            cols[k].append(m.get(k))
    out = pa.table({k: pa.array(v) for k, v in cols.items()})
    for c in ("video_uri", "signer_id", "start_s", "end_s", "prompt", "seed", *passthrough_columns(manifest)):
        if c in manifest.column_names and c not in out.column_names:
            out = out.append_column(c, manifest.column(c))
    return out
