"""`corpus-anon faces finetune`: data-parallel TPSMM fine-tuning with Ray Train (METHOD.md §6.2 step 5).

The driver (`finetune`) checks everything before a worker starts: the corpus's crop set and the
reference set (`corpus_anon.finetune.crops.read_index`), the starting checkpoint (`finetune.init`: a
TPSMM name in the model store, or a URI), the VGG-19 of the perceptual loss (staged from the
model store), and that `finetune.out` is writable. It then runs a Ray Train `TorchTrainer`
whose workers each load the model, wrap it in DDP and train on their share of every epoch's
pairs (`BalancedPairSampler`, drawn from a generator seeded by (seed, rank, epoch)).

Layout under `finetune.out`:

    runs/{run}/epoch-{NNNNNN}/   one checkpoint (Ray Train's experiment folder `run`, one per invocation)
        tpsmm.pth.tar            the TPSMM with its background predictor, exactly what `load_tpsmm` loads
        state.pt                 optimizer, scheduler, epoch, global step and the per-epoch history
        finetune.json            the training summary, with the size and sha256 of the two files above
    tpsmm-finetuned.pth.tar      the final model, published when the run reaches its epochs
    tpsmm-finetuned.json         its summary: `corpus-anon models add-tpsmm` copies it beside the model

Resume. A job that is killed, or rerun with more epochs, continues from the latest complete
checkpoint under `out/runs/` (epoch, global step, optimizer, scheduler and loss history carry on;
the pairs of the remaining epochs are those an uninterrupted run draws). The driver finds it
itself, rather than through Ray Train's own restoration (same `RunConfig.name` +
`ray.train.get_checkpoint()`): that restores from a snapshot of Ray's checkpoint manager which
only the same Ray version reads and which breaks when a checkpoint folder is gone, while this
lookup needs nothing but the checkpoint folders. A checkpoint counts only when its
`finetune.json` parses and both files it lists have their recorded sizes (Ray copies a checkpoint
folder file by file, so a job killed mid-copy leaves an incomplete one, which is skipped); the
workers check the sha256 when they load it. Each invocation is a new Ray Train run (its own
`runs/{run}` folder, keeping its last `KEEP_CHECKPOINTS` checkpoints), so Ray's state never
carries over. A checkpoint whose training settings differ from the config's is refused, not
continued. Ray Train's FailureConfig stays at no retries: rerunning the job is the retry.

torch and ray.train are imported inside functions; importing this module is light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from corpus_anon.config import Config, ConfigError, FinetuneSection, resolve_endpoint
from corpus_anon.errors import one_sentence
from corpus_anon.io.records import now_iso
from corpus_anon.io.storage import PolicyError, Storage, StorageSettings, join, normalize_uri

if TYPE_CHECKING:
    import pyarrow as pa

    from corpus_anon.finetune.data import BalancedPairSampler, FrameSource, PairSpec

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
MODEL_NAME = "tpsmm-finetuned.pth.tar"
JSON_NAME = "tpsmm-finetuned.json"
CKPT_MODEL = "tpsmm.pth.tar"
CKPT_STATE = "state.pt"
CKPT_JSON = "finetune.json"
STATE_VERSION = 1
KEEP_CHECKPOINTS = 2  # per run (invocation); the latest is what a rerun resumes from
PREFETCH_BATCHES = 2  # batches loaded ahead of the one training
LOADER_THREADS = 2
MAX_BAD_CHUNKS = 20  # chunks that fail to load before a worker gives up
LOSS_KEYS = ("perceptual", "equivariance", "warp", "bg", "total")
# Settings a resumed run must share with the checkpoint it continues (epochs, workers, batch size,
# pairs per epoch and resources may change).
RESUME_KEYS = ("init", "crops_uri", "reference_uri", "reference_ratio", "crop_size", "seed", "lr", "milestones",
               "weight_decay", "grad_clip", "w_perceptual", "w_equivariance", "w_warp", "w_bg", "bg_start_epoch",
               "dropout_start", "dropout_max", "dropout_inc_epochs", "dropout_epochs")


# ---- small shared helpers -------------------------------------------------------------------------
def steps_per_epoch(pairs_per_epoch: int, workers: int, batch_size: int) -> int:
    """Steps every worker takes per epoch: enough for `pairs_per_epoch` pairs over all workers."""
    return max(1, math.ceil(pairs_per_epoch / (workers * batch_size)))


def epoch_seed(seed: int, rank: int, epoch: int) -> list[int]:
    """The entropy of worker `rank`'s generators in `epoch` (pairs and torch's randomness)."""
    return [seed & 0xFFFFFFFF, rank, epoch]


def _is_store_name(init: str) -> bool:
    return "://" not in init and "/" not in init and "\\" not in init


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(models: dict[str, Any], init: str | None, storage: Storage,
                workdir: str) -> tuple[Path | None, Path]:
    """(starting TPSMM checkpoint, VGG-19 file) on this node: the model store staged once per node
    (verified against its lock); `init` from the store by name, else downloaded from its URI
    (None: only the VGG-19, for a run that resumes from a checkpoint)."""
    from corpus_anon.models.registry import (ModelStoreError, stage, staged_paths, tpsmm_checkpoint,
                                             verify_staged)

    profile, store = models["profile"], models["store"]
    staged = stage(profile, store, models.get("cache_dir"), storage)
    vgg = staged_paths(staged, profile).vgg19
    if vgg is None:
        raise ModelStoreError(f"the model store {store} has no VGG-19 weights for the perceptual loss.")
    if init is None:
        return None, vgg
    if _is_store_name(init):
        path = tpsmm_checkpoint(staged, profile, init, verify_staged(staged, profile))
    else:
        path = Path(workdir) / "init.pth.tar"
        storage.download(init, str(path))
    return path, vgg


# ---- checkpoints on storage -----------------------------------------------------------------------
def find_checkpoints(out: str, storage: Storage) -> list[tuple[str, dict[str, Any]]]:
    """Complete checkpoints under `out/runs/` as (folder URI, its finetune.json), oldest epoch first."""
    found = []
    for uri in storage.list(join(normalize_uri(out), RUNS_DIR), suffixes=("/" + CKPT_JSON,)):
        folder = uri.rsplit("/", 1)[0]
        try:
            info = json.loads(storage.read_text(uri))
            files = info["files"]
            ok = all(int(storage.info(join(folder, name))["size"]) == int(files[name]["bytes"])
                     for name in (CKPT_MODEL, CKPT_STATE))
            epoch = int(info["epochs"])
        except FileNotFoundError:
            ok = False
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring checkpoint %s: its %s is unreadable (%s)", folder, CKPT_JSON, e)
            continue
        if not ok:
            log.warning("ignoring incomplete checkpoint %s (a file is missing or partly written)", folder)
            continue
        found.append((epoch, str(info.get("finished_at", "")), folder, info))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(folder, info) for _, _, folder, info in found]


def latest_checkpoint(out: str, storage: Storage) -> tuple[str, dict[str, Any]] | None:
    """The complete checkpoint with the most epochs under `out` (the newest among equals), or None."""
    found = find_checkpoints(out, storage)
    return found[-1] if found else None


def _comparable(key: str, value: Any) -> Any:
    if key in ("crops_uri", "reference_uri") and value:
        return normalize_uri(str(value))
    if isinstance(value, list):
        return [float(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def check_resumable(info: dict[str, Any], f: FinetuneSection, folder: str) -> None:
    """ConfigError when a checkpoint was trained with other settings than the config's."""
    theirs = info.get("config") or {}
    mine = f.model_dump(mode="json")
    diff = [k for k in RESUME_KEYS if _comparable(k, theirs.get(k)) != _comparable(k, mine.get(k))]
    if diff:
        shown = "; ".join(f"{k} is {theirs.get(k)!r} there and {mine.get(k)!r} here" for k in diff[:4])
        raise ConfigError(f"finetune.out holds a fine-tune with other settings ({folder}: {shown}); set them back "
                          "to continue it, or choose a new finetune.out to start over.")


# ---- the training loop (one per Ray Train worker) -------------------------------------------------
def _worker_logging(level: int) -> None:
    """Worker processes do not run the CLI: show this package's progress at the driver's level
    (Ray forwards worker output to the driver)."""
    pkg = logging.getLogger("corpus_anon")
    pkg.setLevel(level)
    if not logging.getLogger().handlers and not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)


class _PairLoader:
    """Loads an epoch's pairs on threads, `PREFETCH_BATCHES` batches ahead of training. A chunk that
    fails to load is logged and left out from then on; its pair is replaced by a fresh draw from a
    generator seeded by (seed, rank, epoch, pair), so reruns still draw alike."""

    def __init__(self, sampler: BalancedPairSampler, source: FrameSource, size: int, seed: int, rank: int) -> None:
        self.sampler, self.source, self.size = sampler, source, size
        self.seed, self.rank = seed, rank
        self.bad: dict[str, str] = {}

    def _pair(self, spec: PairSpec, epoch: int, index: int) -> np.ndarray:
        from corpus_anon.finetune.data import load_pair

        rng = None
        for _ in range(1000):
            if spec.chunk_uri not in self.bad:
                try:
                    return load_pair(spec, self.source, self.size, self.sampler.chunk_frames(spec.chunk_uri))
                except Exception as e:  # noqa: BLE001 - one bad chunk must not end a long run
                    self.bad[spec.chunk_uri] = one_sentence(e)
                    log.warning("crop chunk %s left out: %s", spec.chunk_uri, self.bad[spec.chunk_uri])
                    if len(self.bad) > MAX_BAD_CHUNKS:
                        raise RuntimeError(f"{len(self.bad)} crop chunks failed to load (the last: "
                                           f"{self.bad[spec.chunk_uri]})") from None
            if rng is None:
                rng = np.random.default_rng([*epoch_seed(self.seed, self.rank, epoch), index])
            spec = self.sampler.draw(rng)
        raise RuntimeError("no loadable crop chunk was drawn in 1000 tries.")

    def batches(self, specs: list[PairSpec], batch_size: int, epoch: int) -> Iterator[np.ndarray]:
        """(B, 2, S, S, 3) uint8 arrays for consecutive `batch_size` slices of `specs`."""
        n = len(specs) // batch_size
        with ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="pairs") as pool:
            pending: list[list[Future]] = []

            def submit(b: int) -> None:
                pending.append([pool.submit(self._pair, specs[i], epoch, i)
                                for i in range(b * batch_size, (b + 1) * batch_size)])

            for b in range(min(n, PREFETCH_BATCHES + 1)):
                submit(b)
            for b in range(n):
                futures = pending.pop(0)
                if b + PREFETCH_BATCHES + 1 < n:
                    submit(b + PREFETCH_BATCHES + 1)
                yield np.stack([fu.result() for fu in futures])


def _summary(config: dict[str, Any], history: list[dict[str, Any]], step: int, world: int) -> dict[str, Any]:
    """The training summary (a checkpoint's finetune.json and the published JSON, without files)."""
    secs = sum(h["seconds"] for h in history)
    steps = sum(h["steps"] for h in history)
    pairs = sum(h["pairs"] for h in history)
    return {
        "init": config["finetune"]["init"],
        "epochs": len(history),
        "steps": step,
        "workers": world,
        "data": config["data"],
        "losses": [{"epoch": h["epoch"], **{k: h[k] for k in LOSS_KEYS}} for h in history],
        "lr": [h["lr"] for h in history],
        "epoch_seconds": [h["seconds"] for h in history],
        "steps_per_s": round(steps / secs, 4) if secs > 0 else None,
        "pairs_per_s": round(pairs / secs, 4) if secs > 0 else None,
        "config": config["finetune"],
        "run": config["run"],
        "finished_at": now_iso(),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: see the module docstring. `config` is what `finetune` built."""
    import torch
    import torch.distributed as dist

    import ray.train
    import ray.train.torch as rtt
    from corpus_anon.finetune.data import FrameSource, check_size, to_tensors
    from corpus_anon.finetune.train import TrainModel, build_optimizer, seed_everything, train_step, with_bg_predictor
    from corpus_anon.models.vgg import load_vgg19
    from corpus_anon.models.tpsmm import load_tpsmm, save_checkpoint

    _worker_logging(int(config.get("log_level", logging.INFO)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    f = FinetuneSection(**config["finetune"])
    total = int(config["total_epochs"])
    size = check_size(f.crop_size)
    storage = Storage(config["storage"])
    sampler: BalancedPairSampler = config["sampler"]
    work = tempfile.mkdtemp(prefix=f"corpus-anon-finetune-{rank}-")
    try:
        device = rtt.get_device()
        resume = config.get("resume")
        init_path, vgg_path = model_files(config["models"], None if resume else f.init, storage, work)
        state = None
        seed_everything(f.seed)  # a fresh background predictor is the same on every rank
        if resume:
            local = {}
            for name in (CKPT_MODEL, CKPT_STATE):
                local[name] = os.path.join(work, name)
                storage.download(join(resume["uri"], name), local[name])
                if _sha256(local[name]) != resume["files"][name]["sha256"]:
                    raise RuntimeError(f"checkpoint file {join(resume['uri'], name)} does not match the sha256 its "
                                       f"{CKPT_JSON} records.")
            tpsmm = load_tpsmm(local[CKPT_MODEL])
            # Tensors, numbers, lists and dicts only: no pickled code runs from shared storage.
            state = torch.load(local[CKPT_STATE], map_location="cpu", weights_only=True)
        else:
            tpsmm = load_tpsmm(init_path)
        tpsmm = with_bg_predictor(tpsmm)
        vgg = load_vgg19(vgg_path)
        model = rtt.prepare_model(TrainModel(tpsmm, vgg, f).train(),
                                  parallel_strategy_kwargs={"find_unused_parameters": True})
        core = getattr(model, "module", model)
        optimizer, scheduler = build_optimizer(model, f)
        start, step, history = 0, 0, []
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
            if rank == 0:
                log.info("resuming from %s: epoch %d, step %d", resume["uri"], start, step)
        steps = steps_per_epoch(f.pairs_per_epoch, world, f.batch_size)
        source = FrameSource(storage, os.path.join(work, "chunks"))
        loader = _PairLoader(sampler, source, size, f.seed, rank)
        for epoch in range(start, total):
            seed_everything(int(np.random.SeedSequence(epoch_seed(f.seed, rank, epoch)).generate_state(1)[0]))
            rng = np.random.default_rng(epoch_seed(f.seed, rank, epoch))
            specs = sampler.draw_many(rng, steps * f.batch_size)
            lr = float(optimizer.param_groups[0]["lr"])
            sums = np.zeros(len(LOSS_KEYS))
            t0 = time.perf_counter()
            for pairs in loader.batches(specs, f.batch_size, epoch):
                src, drv = to_tensors(pairs, device)
                losses = train_step(model, optimizer, src, drv, epoch, f)
                sums += [losses[k] for k in LOSS_KEYS]
                step += 1
            scheduler.step()
            seconds = time.perf_counter() - t0
            means = torch.tensor(sums / steps, dtype=torch.float64)
            if world > 1 and dist.is_available() and dist.is_initialized():
                means = means.to(device)
                dist.all_reduce(means)
                means = means.cpu() / world
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in zip(LOSS_KEYS, means.tolist())}, "lr": lr,
                   "steps": steps, "pairs": steps * f.batch_size * world, "seconds": round(seconds, 3)}
            history.append(row)
            metrics = {**row, "step": step, "steps_per_s": steps / seconds, "pairs_per_s": row["pairs"] / seconds}
            if rank == 0:
                log.info("epoch %d/%d: total %.4g (perceptual %.4g, equivariance %.4g, warp %.4g, bg %.4g), "
                         "lr %.3g, %.2f steps/s, %.1f pairs/s", epoch + 1, total, row["total"], row["perceptual"],
                         row["equivariance"], row["warp"], row["bg"], lr, metrics["steps_per_s"],
                         metrics["pairs_per_s"])
            name = f"epoch-{epoch + 1:06d}"
            if (epoch + 1) % f.checkpoint_every and epoch + 1 != total:
                ray.train.report(metrics)
            elif rank != 0:
                ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            else:
                with tempfile.TemporaryDirectory(dir=work) as d:
                    save_checkpoint(core.tpsmm, os.path.join(d, CKPT_MODEL), epoch=epoch + 1)
                    torch.save({"version": STATE_VERSION, "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                                "history": history}, os.path.join(d, CKPT_STATE))
                    info = _summary(config, history, step, world)
                    info["files"] = {n: {"bytes": os.path.getsize(os.path.join(d, n)),
                                         "sha256": _sha256(os.path.join(d, n))} for n in (CKPT_MODEL, CKPT_STATE)}
                    Path(d, CKPT_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=name)
        if rank == 0:
            log.info("worker 0 done: %d epochs, %d steps; chunk source %s", len(history), step, source.stats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the driver -----------------------------------------------------------------------------------
def _read_set(uri: str, storage: Storage, field: str) -> "pa.Table":
    from corpus_anon.finetune.crops import read_index

    try:
        table = read_index(uri, storage)
    except (FileNotFoundError, ValueError, PolicyError) as e:
        raise ConfigError(f"finetune.{field}: {e}") from None
    if table.num_rows == 0:
        raise ConfigError(f"finetune.{field}: the crop set {uri} has no chunks; extract faces into it first.")
    for u in table.column("chunk_uri").to_pylist():
        try:
            storage.check_read(u)
        except PolicyError as e:
            raise ConfigError(f"finetune.{field}: a chunk of the crop set cannot be read: {e}") from None
    first = table.column("chunk_uri")[0].as_py()
    if not storage.exists(first):
        raise ConfigError(f"finetune.{field}: the crop set's chunk {first} does not exist; was the set moved?")
    return table


def _check_models(cfg: Config, storage: Storage, workdir: str) -> tuple[Path, Path]:
    """The starting checkpoint and VGG-19 on this node, both loaded once to prove they load."""
    from corpus_anon.models.vgg import load_vgg19
    from corpus_anon.models.tpsmm import load_tpsmm
    from corpus_anon.models.registry import VGG19_FILE, ModelStoreError, tpsmm_relpath

    f = cfg.finetune
    if _is_store_name(f.init):
        try:
            tpsmm_relpath(cfg.models.profile, f.init)
        except ValueError as e:
            raise ConfigError(f"finetune.init: {e}") from None
    try:
        init, vgg = model_files(cfg.models.model_dump(mode="json"), f.init, storage, workdir)
        assert init is not None
    except FileNotFoundError:
        raise ConfigError(f"finetune.init {f.init} does not exist.") from None
    except PolicyError as e:
        raise ConfigError(f"finetune.init: {e}") from None
    except ModelStoreError as e:
        msg = str(e)
        if "VGG-19" in msg:
            raise ConfigError(f"{msg.rstrip('.')}: put torchvision's {VGG19_FILE} into the store's vgg19 folder "
                              "and record its lock again.") from None
        if "TPSMM checkpoint" in msg:
            raise ConfigError(f"finetune.init: {msg}") from None
        raise
    try:
        load_tpsmm(init)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one sentence
        raise ConfigError(f"finetune.init {f.init} is not a loadable TPSMM checkpoint ({one_sentence(e)})") from None
    try:
        load_vgg19(vgg)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the model store's VGG-19 file does not load ({one_sentence(e)})") from None
    return init, vgg


def _use_gpu(cfg: Config, ray: Any) -> bool:
    from corpus_anon.run.pipeline import RunError

    f = cfg.finetune
    cluster = float(ray.cluster_resources().get("GPU", 0))
    use = f.use_gpu if f.use_gpu is not None else (cfg.device == "cuda" or (cfg.device == "auto" and cluster > 0))
    if use and cluster < f.workers:
        raise RunError(f"fine-tuning on GPUs needs one per worker ({f.workers}) but the Ray cluster has {cluster:g}; "
                       "add GPU workers, lower finetune.workers, or set finetune.use_gpu: false.")
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus < f.workers * f.cpus_per_worker:
        log.warning("the Ray cluster has %g CPUs and the %d workers ask for %g each: training waits until "
                    "nodes join", cpus, f.workers, f.cpus_per_worker)
    return bool(use)


def _arrow_storage(uri: str, storage: Storage) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig; the filesystem is None locally."""
    fs, path = storage.arrow_filesystem(uri)
    if normalize_uri(uri).startswith("file://"):
        return path, None
    return path, fs


def _publish(out: str, folder: str, info: dict[str, Any], storage: Storage, workdir: str) -> tuple[str, str]:
    """Copy a checkpoint's model to out/tpsmm-finetuned.pth.tar and write its JSON beside it (last)."""
    model_uri, json_uri = join(out, MODEL_NAME), join(out, JSON_NAME)
    local = os.path.join(workdir, "published.pth.tar")
    storage.download(join(folder, CKPT_MODEL), local)
    if _sha256(local) != info["files"][CKPT_MODEL]["sha256"]:
        from corpus_anon.run.pipeline import RunError

        raise RunError(f"{join(folder, CKPT_MODEL)} does not match the sha256 its {CKPT_JSON} records.")
    storage.upload(local, model_uri)
    published = {k: v for k, v in info.items() if k != "files"}
    published.update({"checkpoint": folder, "sha256": info["files"][CKPT_MODEL]["sha256"], "finished_at": now_iso()})
    storage.write_text(json_uri, json.dumps(published, indent=2, sort_keys=True))
    return model_uri, json_uri


def finetune(cfg: Config, *, epochs: int | None = None) -> dict[str, Any]:
    """Fine-tune TPSMM on `cfg.finetune` (see the module docstring) up to `epochs` epochs in all
    (default `finetune.epochs`), continuing from the latest checkpoint under `finetune.out`.

    Returns the published JSON's content (init, epochs, steps, workers, data, losses, lr,
    epoch_seconds, steps_per_s, pairs_per_s, config, run, checkpoint, sha256, finished_at) plus
    `model_uri`, `json_uri`, `resumed_from` (the epoch it continued from, 0 for a fresh start),
    `epochs_run` (epochs trained now) and `seconds`. Raises ConfigError (one sentence per problem)
    before any training when the config, crop sets or models cannot be used, RunError when the job
    cannot start or fails."""
    from corpus_anon.finetune.data import BalancedPairSampler
    from corpus_anon.run.pipeline import RunError, ensure_ray

    t_start = time.time()
    f = cfg.finetune
    total = f.epochs if epochs is None else int(epochs)
    problems = []
    if total < 1:
        problems.append(f"epochs must be at least 1, got {total}.")
    if not f.crops_uri:
        problems.append("finetune.crops_uri is not set; point it at the corpus's crop set (`corpus-anon faces "
                        "extract` writes one).")
    if not f.out:
        problems.append("finetune.out is not set; it is where the checkpoints and the fine-tuned model go.")
    if f.reference_ratio >= 1 and not f.reference_uri:
        problems.append("finetune.reference_ratio is 1 (every pair from the reference set) but "
                        "finetune.reference_uri is not set.")
    if not cfg.models.store:
        problems.append("models.store is not set; fine-tuning takes the VGG-19 of its perceptual loss (and "
                        "finetune.init, when it is a name) from the model store.")
    if problems:
        raise ConfigError("\n".join(problems))
    f = f.model_copy(update={"epochs": total})
    settings = StorageSettings.from_config(cfg, resolve_endpoint(cfg))
    storage = Storage(settings)
    out = normalize_uri(f.out)
    try:
        storage.check_write(out)
    except PolicyError as e:
        raise ConfigError(f"finetune.out: {e}") from None

    corpus = _read_set(f.crops_uri, storage, "crops_uri")
    reference = None
    if f.reference_uri and f.reference_ratio > 0:
        reference = _read_set(f.reference_uri, storage, "reference_uri")
    elif f.reference_uri:
        log.info("finetune.reference_ratio is 0: the reference set %s is not used", f.reference_uri)
    try:
        sampler = BalancedPairSampler(corpus, reference, f.reference_ratio)
    except ValueError as e:
        raise ConfigError(f"finetune: {e}") from None
    data = sampler.summary()

    with tempfile.TemporaryDirectory(prefix="corpus-anon-finetune-") as workdir:
        _check_models(cfg, storage, workdir)
        try:
            storage.probe_write(out)
        except Exception as e:  # noqa: BLE001
            raise RunError(f"cannot write to finetune.out {out} ({one_sentence(e).rstrip('.')}).") from None

        latest = latest_checkpoint(out, storage)
        resumed_from = 0
        resume = None
        if latest is not None:
            folder, info = latest
            check_resumable(info, f, folder)
            resumed_from = int(info["epochs"])
            resume = {"uri": folder, "files": info["files"]}
            if info.get("data") != data:
                # Crops removed (a takedown) or added: continuing would keep what the model learned
                # from data that is no longer there. Train again from finetune.init instead.
                raise ConfigError(f"the crop sets changed since the checkpoint {folder} ({info.get('data')} then, "
                                  f"{data} now); fine-tune into a new finetune.out (or delete this one) to train "
                                  "from finetune.init on the crops as they are now.")
        if resumed_from >= total:
            log.info("%s already holds %d trained epochs (%d asked for): publishing, no training", out,
                     resumed_from, total)
        else:
            log.info("fine-tuning TPSMM from %s on %d corpus chunks (%d identities) and %d reference chunks (%d "
                     "identities), reference share %g: epochs %d..%d, %d workers -> %s", f.init,
                     data["corpus_chunks"], data["corpus_identities"], data["reference_chunks"],
                     data["reference_identities"], data["reference_ratio"], resumed_from + 1, total, f.workers, out)

        if resumed_from < total:
            ray = ensure_ray()
            use_gpu = _use_gpu(cfg, ray)
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            run = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
            path, fs = _arrow_storage(join(out, RUNS_DIR), storage)
            config = {
                "finetune": f.model_dump(mode="json"), "total_epochs": total, "storage": settings,
                "models": cfg.models.model_dump(mode="json"), "resume": resume, "sampler": sampler, "data": data,
                "run": run, "log_level": logging.getLogger("corpus_anon").getEffectiveLevel(),
            }
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=f.workers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": f.cpus_per_worker}),
                run_config=RunConfig(name=run, storage_path=path, storage_filesystem=fs,
                                     checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                                     failure_config=FailureConfig(max_failures=0)),
            )
            log.info("Ray Train run %s: %d worker(s), %s, %g CPU(s) each", run, f.workers,
                     "one GPU each" if use_gpu else "no GPU", f.cpus_per_worker)
            try:
                trainer.fit()
            except Exception as e:  # noqa: BLE001 - a failed worker or controller is one sentence
                raise RunError(f"fine-tuning failed ({_first_line(e)}); rerun to continue from the latest "
                               "checkpoint.") from None

        found = [c for c in find_checkpoints(out, storage) if int(c[1]["epochs"]) == total]
        if not found:
            if resumed_from > total:
                raise ConfigError(f"finetune.out {out} holds a fine-tune of {resumed_from} epochs and no checkpoint "
                                  f"of epoch {total}; ask for at least {resumed_from} epochs, or choose a new "
                                  "finetune.out.")
            raise RunError(f"the run ended without a checkpoint of epoch {total} under {out}.")
        folder, info = found[-1]
        model_uri, json_uri = _publish(out, folder, info, storage, workdir)
    published = json.loads(storage.read_text(json_uri))
    summary = {**published, "model_uri": model_uri, "json_uri": json_uri, "resumed_from": resumed_from,
               "epochs_run": max(0, total - resumed_from), "seconds": round(time.time() - t_start, 3)}
    last = published["losses"][-1] if published["losses"] else {}
    log.info("faces finetune: %d epochs (%d now), %d steps, last total loss %s, %s steps/s -> %s",
             summary["epochs"], summary["epochs_run"], summary["steps"], last.get("total"), summary["steps_per_s"],
             model_uri)
    return summary


def _first_line(e: BaseException) -> str:
    """The gist of a Ray Train failure: the first failed worker's own exception, as `Type: message`."""
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        e = failures[min(failures)]
    e = getattr(e, "controller_failure", None) or e
    e = getattr(e, "_base_exc", None) or e  # Ray Train's wrapper that carries the worker's traceback
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(e).__name__}: {text}".rstrip(".: ")[:300]
