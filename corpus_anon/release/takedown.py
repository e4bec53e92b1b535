"""`corpus-anon takedown`: withdraw a signer or a clip everywhere the config's outputs reach (driver side).

Order: the tombstone first (private store, durable before anything is deleted), then every run
folder under `output.uri` (released or not, plus the runs the release lineage names): clips,
records, attempts, tracks, embeddings of the withdrawn clips (also of rows no longer in the
manifest), their metrics rows, `summary.json` (re-seeded lists, per-signer tables) and
`report.html` (rewritten from the scrubbed run); then every version under the release root (the
rows are removed from each manifest that listed them, the card and release.json are rewritten and
note it, the released files are deleted); then the crop and reference sets; then temporary files
a crashed write left on this machine. Fine-tuned checkpoints trained on the signer's crops cannot
be untrained: they are listed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from corpus_anon import __version__
from corpus_anon.config import Config, ConfigError
from corpus_anon.io.records import RunLayout, now_iso
from corpus_anon.release.publish import (EXCLUSION_REASONS, ReleaseError, ReleaseRoot, _content_digest,
                                         _read_parquet, _write_parquet, lineage_runs, migrate_release_root, versions,
                                         write_version)
from corpus_anon.io.storage import PolicyError, Storage, join, read_json, normalize_uri, uri_scheme
from corpus_anon.release.tombstones import (PSEUDONYM_HEX, add_tombstone, check_private_access, check_separation,
                                            private_uri, read_run_keys, read_tombstones, release_id, signer_pseudonym,
                                            tombstones_uri, withdrawn_sets, write_run_keys, write_tombstones)
from corpus_anon.io.scratch import TEMP_PREFIX, pid_alive, sweep_dead_temp_dirs

log = logging.getLogger(__name__)

RUN_ARTIFACTS = ("tracks", "embeddings")
STALE_TEMP_S = 3600.0
_TMP_NAME = re.compile(r"^\.?(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-\d+)?$")


@dataclass
class TakedownResult:
    versions_amended: list[str]
    rows_removed: int  # rows removed from the latest version
    released_objects_deleted: int
    run_clips_deleted: list[str]
    runs_cleaned: list[str]
    crop_clips_deleted: list[str] = field(default_factory=list)
    reference_clips_deleted: list[str] = field(default_factory=list)
    temp_files_deleted: int = 0
    checkpoints: list[str] = field(default_factory=list)  # fine-tunes that trained on the withdrawn crops
    latest: str | None = None


# ---- one run folder -------------------------------------------------------------------------------
def delete_run_clip(storage: Storage, layout: RunLayout, clip_id: str) -> int:
    """Delete a clip's run outputs: clips, record, attempts, tracks, embeddings. Returns objects deleted."""
    n = 0
    pattern = re.compile(re.escape(clip_id) + r"-[0-9a-f]+\.mp4")
    for uri in storage.list(join(layout.root, "clips")):
        if pattern.fullmatch(uri.rsplit("/", 1)[-1]):
            storage.delete(uri)
            n += 1
    for uri in (layout.record(clip_id), layout.attempts(clip_id), *(layout.artifact(k, clip_id) for k in RUN_ARTIFACTS)):
        if storage.exists(uri):
            storage.delete(uri)
            n += 1
    return n


def _names_in(storage: Storage, prefix: str, suffix: str) -> set[str]:
    return {u.rsplit("/", 1)[-1][: -len(suffix)] for u in storage.list(prefix, suffixes=(suffix,))}


def _run_clip_ids(storage: Storage, layout: RunLayout) -> set[str]:
    """Every clip id a run folder has any output of (metrics rows, records, attempts, artifacts, clips)."""
    ids = _names_in(storage, layout.records_prefix, ".json") | _names_in(storage, join(layout.root, "attempts"), ".json")
    ids |= _names_in(storage, join(layout.root, "tracks"), ".parquet")
    ids |= _names_in(storage, join(layout.root, "embeddings"), ".npz")
    for uri in storage.list(join(layout.root, "clips"), suffixes=(".mp4",)):
        m = re.fullmatch(r"(.+)-[0-9a-f]+\.mp4", uri.rsplit("/", 1)[-1])
        if m:
            ids.add(m.group(1))
    return ids


def _metrics(storage: Storage, layout: RunLayout) -> Any:
    try:
        return _read_parquet(storage, layout.metrics)
    except FileNotFoundError:
        return None


def _scrub_value(v: Any, needles: set[str]) -> Any:
    """`v` without dict keys or list items equal to a needle (recursively)."""
    if isinstance(v, dict):
        return {k: _scrub_value(x, needles) for k, x in v.items() if k not in needles}
    if isinstance(v, list):
        return [_scrub_value(x, needles) for x in v if not (isinstance(x, str) and x in needles)]
    return v


def _mentions(data: bytes, needles: set[str]) -> bool:
    return any(n.encode("utf-8") in data for n in needles if n)


def scrub_run(storage: Storage, layout: RunLayout, doomed: set[str], needles: set[str]) -> list[str]:
    """Remove withdrawn clips from one run folder: their outputs, metrics rows, summary entries, and
    the report (rewritten from what is left). Returns the clip ids whose outputs were deleted."""
    import pyarrow as pa

    table = _metrics(storage, layout)
    present = _run_clip_ids(storage, layout) | (set(table.column("clip_id").to_pylist()) if table is not None else set())
    present |= set(read_run_keys(storage, layout.root))
    gone = sorted(present & doomed)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: delete_run_clip(storage, layout, c), gone))
    changed = bool(gone)
    keys = read_run_keys(storage, layout.root)
    if set(keys) & doomed:
        write_run_keys(storage, layout.root, {c: v for c, v in keys.items() if c not in doomed})
        changed = True
    if table is not None:
        keep = [c not in doomed for c in table.column("clip_id").to_pylist()]
        if not all(keep):
            _write_parquet(storage, layout.metrics, table.filter(pa.array(keep)))
            changed = True
    try:
        raw = storage.read_bytes(layout.summary)
    except FileNotFoundError:
        raw = None
    if raw is not None and _mentions(raw, needles):
        summary = _scrub_value(json.loads(raw), needles)
        storage.write_text(layout.summary, json.dumps(summary, indent=2, sort_keys=True, default=str))
        changed = True
    from corpus_anon.run.report import report_uri, write_report

    report = report_uri(layout)
    try:
        stale = storage.exists(report) and (changed or _mentions(storage.read_bytes(report), needles))
    except FileNotFoundError:
        stale = False
    if stale:
        try:
            write_report(storage, layout)
        except Exception as e:  # noqa: BLE001 - a report that cannot be rewritten must not keep the clips
            log.warning("report.html of %s could not be rewritten (%s); it is deleted instead: run "
                        "`corpus-anon report` to write it again", layout.root, e)
            storage.delete(report)
        if storage.exists(report) and _mentions(storage.read_bytes(report), needles):
            storage.delete(report)
            log.warning("the rewritten %s still named a withdrawn clip; it is deleted", report)
    return gone


def run_folders(storage: Storage, output: str, private: str | None) -> list[RunLayout]:
    """Every run folder directly under an output root (a folder holding plan.json, config.yaml,
    records/ or metrics/), except the private store."""
    out = normalize_uri(output)
    found: set[str] = set()
    for uri in storage.list(out):
        rel = uri[len(out) + 1:]
        if "/" not in rel:
            continue
        first = rel.split("/", 1)[0]
        if private and normalize_uri(join(out, first)) == normalize_uri(private):
            continue
        found.add(first)
    return [RunLayout(out, f) for f in sorted(found)]


# ---- crop and reference sets ----------------------------------------------------------------------
def scrub_crops(storage: Storage, crops_uri: str, is_hit: Any) -> list[str]:
    """Delete a crop set's chunks of withdrawn clips and signers (`faces extract` output: face
    crops are biometric data) and drop them from its index. `is_hit(clip_id, identity_ids)`.
    Returns the clip ids purged."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from corpus_anon.finetune.crops import CropLayout, purge_clips, read_fragment

    layout = CropLayout(normalize_uri(crops_uri))

    def fragment(uri: str) -> str | None:
        try:
            meta, rows = read_fragment(storage.read_bytes(uri))
        except (ValueError, FileNotFoundError):
            return None
        ids = {r.get("identity_id") for r in rows} | {meta.get("identity_id")}
        return meta.get("clip_id") if is_hit(meta.get("clip_id"), ids) else None

    def attempt(uri: str) -> str | None:  # a clip killed before its fragment: chunks may be there
        try:
            meta = json.loads(storage.read_text(uri))
        except (ValueError, FileNotFoundError):
            return None
        return meta.get("clip_id") if is_hit(meta.get("clip_id"), {meta.get("identity_id")}) else None

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(fragment, storage.list(join(layout.root, "parts"))))
        found += list(pool.map(attempt, storage.list(join(layout.root, "attempts"))))
    doomed = {c for c in found if c}
    index = None
    if storage.exists(layout.index):
        index = pq.read_table(pa.BufferReader(storage.read_bytes(layout.index)))
        if "clip_id" in index.column_names:
            ident = index.column("identity_id").to_pylist() if "identity_id" in index.column_names else \
                [None] * index.num_rows
            doomed |= {c for c, i in zip(index.column("clip_id").to_pylist(), ident) if is_hit(c, {i})}
    if not doomed:
        return []
    purge_clips(storage, layout, sorted(doomed))
    if index is not None:
        kept = index.filter(pc.invert(pc.is_in(index.column("clip_id"), value_set=pa.array(sorted(doomed)))))
        buf = io.BytesIO()
        pq.write_table(kept, buf)
        storage.write_bytes(layout.index, buf.getvalue())
    log.info("takedown: deleted the face crops of %d clips from %s", len(doomed), layout.root)
    return sorted(doomed)


def scrub_index(storage: Storage, index_root: str, is_hit: Any) -> list[str]:
    """A reference set (`faces index`: index.parquet beside its crop files): delete the files of the
    rows of withdrawn clips or identities and drop the rows. Returns their clip ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus_anon.finetune.crops import INDEX_NAME

    root = normalize_uri(index_root)
    uri = join(root, INDEX_NAME)
    try:
        index = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    except FileNotFoundError:
        return []
    rows = index.to_pylist()
    hit = [is_hit(r.get("clip_id"), {r.get("identity_id")}) for r in rows]
    if not any(hit):
        return []
    for r, h in zip(rows, hit):
        if h and r.get("chunk_uri"):
            chunk = r["chunk_uri"] if "://" in r["chunk_uri"] else join(root, r["chunk_uri"])
            storage.delete(chunk)
    buf = io.BytesIO()
    pq.write_table(index.filter(pa.array([not h for h in hit])), buf)
    storage.write_bytes(uri, buf.getvalue())
    return sorted({str(r.get("clip_id")) for r, h in zip(rows, hit) if h})


def finetuned_checkpoints(storage: Storage, cfg: Config) -> list[str]:
    """Fine-tuned TPSMM checkpoints that may have trained on the corpus's crop set: every model under
    `finetune.out`, and every fine-tune registered in the model store (a checkpoint with training JSON)."""
    found: list[str] = []
    if cfg.finetune.out:
        try:
            found += storage.list(cfg.finetune.out, suffixes=(".pth.tar",))
        except (PolicyError, OSError) as e:
            log.warning("cannot list finetune.out %s (%s)", cfg.finetune.out, e)
    if cfg.models.store:
        try:
            for uri in storage.list(join(cfg.models.store), suffixes=(".pth.tar",)):
                info = read_json(storage, uri.removesuffix(".pth.tar") + ".json")
                if isinstance(info, dict) and info.get("init"):
                    found.append(uri)
        except (PolicyError, OSError) as e:
            log.warning("cannot list the model store %s (%s)", cfg.models.store, e)
    return sorted(set(found))


# ---- temporary files ------------------------------------------------------------------------------
def scrub_temp_files(roots: Iterable[str], names: set[str]) -> int:
    """Delete what crashed writes left on this machine: hidden `.NAME.tmp-PID-N` files (and the
    release copy's `NAME.tmp-PID`) under local roots whose writer is gone or whose name holds a
    withdrawn id, empty local folders named after a withdrawn clip, the temp folders of dead workers
    (their sources carry random names), and files named after a withdrawn clip in live workers'
    `corpus-anon-*` folders. Returns files (and folders) deleted."""
    n = 0

    def named(fname: str) -> bool:  # {id}, {id}.json.tmp-…, {id}-{row_fp}.mp4, {id}.src: never another id's prefix
        bare = fname[1:] if fname.startswith(".") else fname
        return any(bare == x or (bare.startswith(x) and bare[len(x)] in ".-") for x in names if x)

    for root in roots:
        if uri_scheme(root) != "file":
            continue  # S3 objects appear whole or not at all (see storage.write_bytes)
        base = normalize_uri(root)[len("file://"):]
        for dirpath, _, files in os.walk(base, topdown=False):
            for f in files:
                m = _TMP_NAME.match(f)
                path = os.path.join(dirpath, f)
                # A writer on another machine sharing this disk is not visible here: only files an hour
                # old count as abandoned by their pid alone.
                if m and (named(f) or (not pid_alive(int(m.group("pid")))
                                       and time.time() - os.path.getmtime(path) > STALE_TEMP_S)):
                    os.remove(path)
                    n += 1
            # a local folder named after a withdrawn clip (a crop set's chunks/{clip_id}/), now empty
            if dirpath != base and named(os.path.basename(dirpath)) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    # Crashed or killed actors' temp folders (random source names: nothing there can be attributed,
    # so everything of a dead process goes), then files named after a withdrawn clip in live ones.
    n += sweep_dead_temp_dirs(min_age_s=0)  # a takedown errs toward deleting: no age guard
    tmp = tempfile.gettempdir()
    try:
        folders = [d for d in os.listdir(tmp) if d.startswith(TEMP_PREFIX)]
    except OSError:
        folders = []
    for d in folders:
        for dirpath, _, files in os.walk(os.path.join(tmp, d)):
            for f in files:
                if named(f):
                    try:
                        os.remove(os.path.join(dirpath, f))
                        n += 1
                    except OSError:
                        pass
    return n


# ---- the release root -----------------------------------------------------------------------------
def amend_versions(storage: Storage, root: ReleaseRoot, hit: "_Hit") -> tuple[list[str], int, int]:
    """Remove withdrawn rows from every version's manifest (finished or not), rewrite its card and
    release.json (with a dated note), delete the released files. Returns (versions amended, rows
    removed from the latest, released objects deleted)."""
    from corpus_anon.release.publish import latest_version

    latest = latest_version(storage, root)
    finished = set(versions(storage, root))
    amended: list[str] = []
    latest_removed = 0
    doomed_files: set[str] = set()
    kept_files: set[str] = set()
    manifests = storage.list(join(root.uri, "releases"), suffixes=("manifest.parquet",))
    for uri in manifests:
        v = uri.rstrip("/").split("/")[-2]
        rows = _read_parquet(storage, uri).to_pylist()
        bad = [r for r in rows if hit(r)]
        kept = [r for r in rows if not hit(r)]
        kept_files |= {r.get("clip_uri") for r in kept}
        if not bad:
            continue
        doomed_files |= {r["clip_uri"] for r in bad if r.get("clip_uri")}
        if v == latest:
            latest_removed = len(bad)
        meta = read_json(storage, root.meta(v)) if v in finished else None
        if meta is None:  # an unfinished version: nothing points at it; its rows still go
            _write_parquet(storage, uri, _table(kept, list(rows[0].keys())))
            amended.append(v)
            continue
        counts = dict(meta.get("counts") or {})
        excluded = dict(counts.get("excluded") or {k: 0 for k in EXCLUSION_REASONS})
        excluded["withdrawn"] = int(excluded.get("withdrawn") or 0) + len(bad)
        counts.update(released=len(kept), excluded=excluded,
                      released_unchecked=sum(1 for r in kept if r.get("checked") is False))
        meta.update(counts=counts, content_digest=_content_digest(kept),
                    amendments=[*(meta.get("amendments") or []), {"at": now_iso(), "rows_removed": len(bad),
                                                                  "corpus_anon_version": __version__}])
        meta.setdefault("columns", list(rows[0].keys()))
        write_version(storage, root, v, kept, meta, set_latest=False)
        amended.append(v)
    # The `datasets` metadata files at the root, whichever version they were written for (a release that
    # raced this takedown may have written one from rows read before it), before any clip goes.
    from corpus_anon.release.hf import scrub_metadata

    scrubbed = scrub_metadata(storage, root.uri, hit)
    if scrubbed:
        log.info("takedown: removed withdrawn rows from %s", ", ".join(scrubbed))
    # Released files of withdrawn clips, also those a crashed release copied but never listed.
    rids = set(hit.rids)
    for uri in storage.list(join(root.uri, "clips")):
        name = uri.rsplit("/", 1)[-1]
        if uri in doomed_files or (name[:PSEUDONYM_HEX] in rids and uri not in kept_files):
            doomed_files.add(uri)
    deleted = 0
    for uri in sorted(doomed_files - kept_files):
        if storage.exists(uri):
            storage.delete(uri)
            deleted += 1
    return sorted(amended), latest_removed, deleted


def _table(rows: list[dict[str, Any]], columns: list[str]) -> Any:
    import pyarrow as pa

    return pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns}) if rows else \
        pa.table({c: pa.array([], pa.string()) for c in columns})


class _Hit:
    """Which release rows a takedown removes (by release id or signer pseudonym)."""

    def __init__(self, rids: set[str], signers: set[str]) -> None:
        self.rids, self.signers = rids, signers

    def __call__(self, r: dict[str, Any]) -> bool:
        return r.get("release_id") in self.rids or r.get("signer_pseudonym") in self.signers


# ---- the takedown ---------------------------------------------------------------------------------
def _signer_map(storage: Storage, cfg: Config, runs: list[RunLayout]) -> dict[str, str]:
    """clip id → signer id from every place that pairs them: the current manifest and every run's
    metrics table."""
    out: dict[str, str] = {}
    tables = []
    if cfg.manifest.uri:
        try:
            from corpus_anon.run.manifest import read_manifest

            tables.append(read_manifest(cfg.manifest.uri, storage))
        except Exception as e:  # noqa: BLE001 - the runs' own tables still pair them
            log.warning("the takedown could not read the manifest %s (%s); it uses the runs' metrics tables",
                        cfg.manifest.uri, e)
    for layout in runs:
        t = _metrics(storage, layout)
        if t is not None:
            tables.append(t)
    for t in tables:
        if "clip_id" in t.column_names and "signer_id" in t.column_names:
            out.update({c: s for c, s in zip(t.column("clip_id").to_pylist(), t.column("signer_id").to_pylist())
                        if c is not None and s is not None})
    return out


def takedown(cfg: Config, storage: Storage, release_root: str | None = None, *, secret: bytes,
             signer: str | None = None, clip: str | None = None) -> TakedownResult:
    """Withdraw a signer or a clip (a source clip id, or a release id from a published manifest)
    from everything the config's outputs reach; see the module docstring for the order."""
    from corpus_anon.secret import MIN_SECRET_BYTES

    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"a takedown needs CORPUS_ANON_SECRET of at least {MIN_SECRET_BYTES} bytes.")
    if bool(signer) == bool(clip):
        raise ConfigError("give exactly one of --signer ID or --clip ID.")
    store = private_uri(cfg)
    if not store:
        raise ConfigError("a takedown needs --config naming output.uri (or release.private_uri): the tombstones "
                          "live in the private store and every run under output.uri is cleaned.")
    root_uri = release_root or cfg.release.root
    check_separation(cfg, root_uri)
    check_private_access(storage, store, write=True)
    try:
        root = ReleaseRoot(storage.check_write(root_uri)) if root_uri else None
        for uri in (cfg.output.uri, cfg.finetune.crops_uri, cfg.finetune.reference_uri):
            if uri:
                storage.check_write(uri)
    except PolicyError as e:
        raise ConfigError(f"{e.args[0].rstrip('.')}; a takedown deletes there.") from None
    if root is not None:
        migrate_release_root(storage, root, store)
    tomb_uri = tombstones_uri(cfg)
    tomb = read_tombstones(storage, tomb_uri)
    if signer:
        add_tombstone(tomb, "signer", signer_pseudonym(secret, signer))
    else:
        rid = clip if re.fullmatch(r"[0-9a-f]{%d}" % PSEUDONYM_HEX, clip or "") else release_id(secret, clip or "")
        add_tombstone(tomb, "clip", rid)
    write_tombstones(storage, tomb_uri, tomb)  # durable before anything is deleted
    clips, signers = withdrawn_sets(tomb)  # every tombstone: a takedown run again finishes an earlier one

    runs = run_folders(storage, cfg.output.uri, store) if cfg.output.uri else []
    if root is not None:
        known = {normalize_uri(x.root) for x in runs}
        for r in sorted(lineage_runs(storage, store, root)):
            if normalize_uri(r) not in known:
                parent, _, fp = normalize_uri(r).rpartition("/")
                runs.append(RunLayout(parent, fp))
    signer_of = _signer_map(storage, cfg, runs)

    def doomed_id(cid: str | None, identities: Iterable[Any] = ()) -> bool:
        if not cid:
            return False
        if release_id(secret, cid) in clips:
            return True
        sids = {signer_of.get(cid), *identities}
        return any(signer_pseudonym(secret, s) in signers for s in sids if s)

    candidates: set[str] = set(signer_of)
    doomed: set[str] = set()
    for layout in runs:
        candidates |= _run_clip_ids(storage, layout)
        doomed |= {c for c, (r, s) in read_run_keys(storage, layout.root).items() if r in clips or s in signers}
    doomed |= {c for c in candidates if doomed_id(c)}
    withdrawn_signers = {s for s in set(signer_of.values()) if signer_pseudonym(secret, s) in signers}
    if signer:
        withdrawn_signers.add(signer)
    needles = doomed | withdrawn_signers | {release_id(secret, c) for c in doomed}
    hit = _Hit(clips | {release_id(secret, c) for c in doomed}, signers)

    gone: set[str] = set()
    cleaned: list[str] = []
    for layout in runs:
        try:
            g = scrub_run(storage, layout, doomed, needles)
        except PolicyError as e:
            raise ReleaseError(f"the run {layout.root} cannot be cleaned ({e}); add it to "
                               "storage.allowed_prefixes.write and run the takedown again.") from None
        if g:
            cleaned.append(layout.cfg_fp)
            gone |= set(g)
    amended, latest_removed, released_deleted = ([], 0, 0)
    if root is not None:
        amended, latest_removed, released_deleted = amend_versions(storage, root, hit)

    def crop_hit(cid: str | None, identities: set[Any]) -> bool:
        return doomed_id(cid, identities) or bool(cid and cid in doomed)

    crops_gone = scrub_crops(storage, cfg.finetune.crops_uri, crop_hit) if cfg.finetune.crops_uri else []
    ref_gone: list[str] = []
    if cfg.finetune.reference_uri:  # indexed by `faces index`, or itself cut by `faces extract`
        ref_gone = sorted(set(scrub_index(storage, cfg.finetune.reference_uri, crop_hit))
                          | set(scrub_crops(storage, cfg.finetune.reference_uri, crop_hit)))
    roots = [u for u in (cfg.output.uri, root_uri, cfg.finetune.crops_uri, cfg.finetune.reference_uri) if u]
    gone_ids = doomed | set(crops_gone) | set(ref_gone)
    temp = scrub_temp_files(roots, gone_ids | {release_id(secret, c) for c in gone_ids})
    checkpoints = finetuned_checkpoints(storage, cfg) if (crops_gone or ref_gone) else []
    from corpus_anon.release.publish import latest_version

    latest = latest_version(storage, root) if root is not None else None
    log.info("takedown: %d run clips in %d runs, %d versions amended, %d released files, %d crop-set clips, "
             "%d reference clips, %d temporary files; checkpoints that trained on them: %d", len(gone), len(cleaned),
             len(amended), released_deleted, len(crops_gone), len(ref_gone), temp, len(checkpoints))
    return TakedownResult(amended, latest_removed, released_deleted, sorted(gone), cleaned, crops_gone, ref_gone,
                          temp, checkpoints, latest)
