"""Versioned dataset releases and their dataset cards (driver side).

A release root holds only what is published:

    releases/v0001/manifest.parquet   the released clips, allow-listed columns only
    releases/v0001/README.md          the dataset card
    releases/v0001/release.json       what the card is made from (counts, figures, models; no private URI)
    releases/LATEST                   "v0001"; written last, after everything it names is verified
    clips/{release_id}-{sha12}.mp4    released clips, copied from a run's output (never an original)

Tombstones and lineage (which run each version came from) live in the private store
(`corpus_anon.release.tombstones`); takedowns are `corpus_anon.release.takedown`. Source clip ids
(`Cory_2013-6-27_sc115`) and signer ids carry names, so a release publishes keyed pseudonyms
(`release_id`, `signer_pseudonym`). A released object's key carries its content hash: a clip whose
pixels change gets a new object, so an older manifest keeps pointing at the bytes it lists.

A release refuses what was never checked: a clip is *unchecked* when its run had no face analysis
(`faces.backend: none`) or no gate (`gate.enabled: false`), or when its record does not say that
the exposure check covered every original face track (`exposure_covered`). Unchecked clips are left
out unless `allow_unchecked`, and then the card says how many were released so.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from corpus_anon import __version__
from corpus_anon.config import RELEASE_FORBIDDEN_COLUMNS, Config, ConfigError, load_config
from corpus_anon.io.records import RunLayout, now_iso, resolve_run
from corpus_anon.io.storage import PolicyError, Storage, StorageError, join, normalize_uri, read_json, uri_scheme
from corpus_anon.release.card import models_used, reid_figures, render_card
from corpus_anon.release.hf import write_hf_files
from corpus_anon.release.tombstones import (PSEUDONYM_HEX, TombstoneError, apply_tombstones, check_private_access,
                                            check_separation, lineage_uri, load_tombstones, migrate_public_tombstones,
                                            private_uri, release_id, signer_pseudonym, tombstones_uri, withdrawn_sets)

log = logging.getLogger(__name__)

# The pseudonym helpers a release's callers use with it, importable from here as well as from tombstones.
__all__ = ["PSEUDONYM_HEX", "apply_tombstones", "release_id", "signer_pseudonym", "tombstones_uri", "withdrawn_sets",
           "ReleaseError", "ReleaseResult", "ReleaseRoot", "release", "render_card"]

VERSION_RE = re.compile(r"^v(\d{4,})$")
# Columns every release has, in this order; then the metrics below, then `release.columns`.
BASE_COLUMNS = ("release_id", "clip_uri", "sha256", "bytes", "duration_s", "fps", "width", "height",
                "signer_pseudonym", "cfg_fp")
METRIC_COLUMNS = ("checked", "frames_checked", "exposed_frames", "n_frames", "id_score_kind", "id_threshold", "id_orig_orig", "id_orig_anon", "id_worst",
                  "id_match_rate", "face_frac_orig", "face_frac_anon",
                  # linguistic fidelity by landmarks (metrics.nmm_agreement / hand_agreement), then the
                  # older heuristics kept beside them so earlier releases compare
                  "nmm_corr", "nmm_mae", "nmm_brow_corr", "nmm_eye_corr", "nmm_mouth_corr", "nmm_width_corr",
                  "nmm_frames", "hand_lm_err", "hand_lm_frames", "hand_lm_recall", "hand_presence_agree",
                  "landmark_frames",
                  "expr_fidelity", "hand_fidelity",
                  "warp_error", "enhanced", "seed_attempt")
EXCLUSION_REASONS = ("status", "unchecked", "reidentified", "face_lost", "no_face", "excluded", "not_approved",
                     "withdrawn")


class ReleaseError(RuntimeError):
    """A release, refresh or takedown cannot go ahead (one sentence)."""


# ---- the release root -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseRoot:
    uri: str

    def version_dir(self, version: str) -> str:
        return join(self.uri, "releases", version)

    def manifest(self, version: str) -> str:
        return join(self.version_dir(version), "manifest.parquet")

    def card(self, version: str) -> str:
        return join(self.version_dir(version), "README.md")

    def meta(self, version: str) -> str:
        return join(self.version_dir(version), "release.json")

    @property
    def latest(self) -> str:
        return join(self.uri, "releases", "LATEST")

    def clip(self, rid: str, sha256: str) -> str:
        return join(self.uri, "clips", f"{rid}-{sha256[:12]}.mp4")


def latest_version(storage: Storage, root: ReleaseRoot) -> str | None:
    try:
        v = storage.read_text(root.latest).strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.match(v):
        raise ReleaseError(f"{root.latest} holds {v[:40]!r}, not a release version like v0001.")
    return v


def versions(storage: Storage, root: ReleaseRoot) -> list[str]:
    """Every version folder with a release.json (a version without one was never finished)."""
    found = set()
    for uri in storage.list(join(root.uri, "releases"), suffixes=("release.json",)):
        parts = uri.rstrip("/").split("/")
        if len(parts) >= 2 and VERSION_RE.match(parts[-2]):
            found.add(parts[-2])
    return sorted(found, key=lambda v: int(v[1:]))


def next_version(storage: Storage, root: ReleaseRoot) -> str:
    """One past the highest version folder present, finished or not: a version number that an
    interrupted release may have half-written is never reused."""
    highest = 0
    for uri in storage.list(join(root.uri, "releases")):
        for part in uri.split("/"):
            m = VERSION_RE.match(part)
            if m:
                highest = max(highest, int(m.group(1)))
    return f"v{highest + 1:04d}"


# ---- reading a run --------------------------------------------------------------------------------
def _read_parquet(storage: Storage, uri: str) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _write_parquet(storage: Storage, uri: str, table: Any) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_run(storage: Storage, run_uri: str) -> tuple[RunLayout, list[dict[str, Any]], dict[str, Any], Config | None]:
    """(layout, metrics rows, summary, the run's config) of a finished run."""
    try:
        layout = resolve_run(storage, run_uri)
    except FileNotFoundError as e:
        raise ReleaseError(str(e)) from None
    try:
        rows = _read_parquet(storage, layout.metrics).to_pylist()
    except FileNotFoundError:
        raise ReleaseError(f"{layout.root} has no metrics table: the run has not finished once; "
                           "run it to the end first.") from None
    summary = read_json(storage, layout.summary) or {}
    cfg = None
    try:
        import yaml

        cfg = Config.model_validate(yaml.safe_load(storage.read_text(layout.config)) or {})
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - an old or hand-edited config only loses the card's model list
        log.warning("could not read the run's config.yaml (%s); the card will not list its models", e)
    return layout, rows, summary, cfg


# ---- building a release ---------------------------------------------------------------------------
@dataclass
class ReleaseResult:
    version: str | None  # the version written, or None when nothing changed
    latest: str | None  # the version LATEST names after this call
    released: int
    excluded: dict[str, int]
    root: str
    new: bool = False
    withdrawn_rows: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest_uri(self) -> str | None:
        return ReleaseRoot(self.root).manifest(self.latest) if self.latest else None


def read_list_file(path: str | None) -> set[str]:
    """Ids, one per line (blank lines and `#` comments ignored), from a local file."""
    if not path:
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            return {ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()}
    except OSError as e:
        raise ReleaseError(f"cannot read {path} ({e.strerror}).") from None


def run_checked(run_cfg: Config | None) -> bool:
    """Whether the run's config checked its clips at all: face analysis on and the gate enabled. A
    run whose config.yaml is gone or unreadable counts as unchecked."""
    return run_cfg is not None and run_cfg.faces.backend != "none" and bool(run_cfg.gate.enabled)


def is_unchecked(row: dict[str, Any], checked_run: bool) -> bool:
    """Nothing proved this clip's faces hidden: its run did not check, or its record does not say
    the exposure check covered every original face track (older runs included)."""
    return not checked_run or row.get("exposure_covered") is not True or row.get("frames_checked") is None


def _exclusion(row: dict[str, Any], cfg: Config, rid: str, spseudo: str, exclude: set[str],
               approve: set[str] | None, withdrawn: tuple[set[str], set[str]], *, checked_run: bool = True,
               allow_unchecked: bool = False) -> str | None:
    if rid in withdrawn[0] or spseudo in withdrawn[1]:
        return "withdrawn"
    if row.get("status") != "ok":
        return "status"
    if is_unchecked(row, checked_run) and not allow_unchecked:
        return "unchecked"
    if cfg.release.exclude_reidentified and row.get("reidentified"):
        return "reidentified"
    if cfg.release.exclude_face_lost and row.get("face_lost"):
        return "face_lost"
    if row["clip_id"] in exclude or rid in exclude:
        return "excluded"
    approved = approve is not None and (row["clip_id"] in approve or rid in approve)
    if approve is not None and not approved:
        return "not_approved"
    # Face analysis ran but found no face in the original: the identity check had nothing to
    # compare (a missed detection leaves a pixelated clip's face untouched). Only an explicit
    # approval releases it (`release.exclude_unchecked`, named before the exposure check existed).
    frac = row.get("face_frac_orig")
    if cfg.release.exclude_unchecked and frac is not None and float(frac) == 0.0 and not approved:
        return "no_face"
    return None


def _release_row(row: dict[str, Any], rid: str, spseudo: str, clip_uri: str, columns: list[str],
                 checked: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"release_id": rid, "clip_uri": clip_uri, "signer_pseudonym": spseudo, "checked": checked}
    for c in BASE_COLUMNS:
        if c not in out:
            out[c] = row.get(c)
    for c in METRIC_COLUMNS:
        if c not in out:
            out[c] = row.get(c)
    for c in columns:
        out[c] = row.get(c)
    return out


def passthrough_in(metrics_columns: list[str]) -> list[str]:
    """The manifest passthrough columns of a run's metrics table (`pipeline.metrics_table` appends the
    manifest's columns after its own, starting with `video_uri`)."""
    from corpus_anon.run.manifest import OPTIONAL, REQUIRED

    if "video_uri" not in metrics_columns:
        return []
    tail = metrics_columns[metrics_columns.index("video_uri"):]
    return [c for c in tail if c not in REQUIRED + OPTIONAL]


def _check_columns(columns: list[str], metrics_columns: Iterable[str]) -> None:
    bad = [c for c in columns if c in RELEASE_FORBIDDEN_COLUMNS]
    if bad:
        raise ReleaseError(f"release.columns may not name {', '.join(bad)}.")
    allowed = passthrough_in(list(metrics_columns))
    missing = [c for c in columns if c not in allowed]
    if missing:
        raise ReleaseError(f"release.columns may name only the manifest's passthrough columns "
                           f"({', '.join(allowed) or 'it has none'}), not {', '.join(missing)}.")


def _content_digest(rows: list[dict[str, Any]]) -> str:
    blob = json.dumps(sorted(rows, key=lambda r: r["release_id"]), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _copy_verified(storage: Storage, src: str, dst: str, size: int, sha256: str, published: bool = False) -> str:
    """Copy one run-output clip to its release key (server-side on S3; a temporary name and a
    rename on local disk, so nothing partial is ever visible) and verify it; returns 'copied' or
    'present'. An object an earlier version published (and verified) with this hash is checked by
    size only, so a release of a large corpus does not read every old clip back."""
    storage.check_read(src)
    storage.check_write(dst)
    fs, dpath = storage.filesystem(dst)
    _, spath = storage.filesystem(src)
    if storage.exists(dst):
        info = storage.info(dst)
        if int(info.get("size", -1)) == int(size):
            if not published:
                storage.verify(dst, size, sha256)
            return "present"
    if uri_scheme(dst) == "file":
        def _local() -> None:
            os.makedirs(os.path.dirname(dpath), exist_ok=True)
            tmp = f"{dpath}.tmp-{os.getpid()}"
            fs.copy(spath, tmp)
            os.replace(tmp, dpath)
        storage.retry(f"copy {src}", _local)
    else:
        storage.retry(f"copy {src}", lambda: fs.copy(spath, dpath))
    storage.verify(dst, size, sha256)
    return "copied"


def write_version(storage: Storage, root: ReleaseRoot, version: str, rows: list[dict[str, Any]],
                  meta: dict[str, Any], *, set_latest: bool = True) -> None:
    """Write manifest, card and release.json of a version, verify them, then (a new version) LATEST."""
    import pyarrow as pa

    if any(k in meta for k in PRIVATE_META_KEYS):
        raise ReleaseError(f"release.json of {version} would name private locations ({', '.join(PRIVATE_META_KEYS)}).")
    columns = meta["columns"]
    table = pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns}) if rows else \
        pa.table({c: pa.array([], pa.string()) for c in columns})
    _write_parquet(storage, root.manifest(version), table)
    card = render_card(version, rows, meta)
    storage.write_text(root.card(version), card)
    storage.write_text(root.meta(version), json.dumps(meta, indent=2, sort_keys=True, default=str))
    for uri in (root.manifest(version), root.card(version), root.meta(version)):
        if not storage.exists(uri):
            raise StorageError(f"{uri} is not readable after writing it.")
    back = _read_parquet(storage, root.manifest(version))
    if back.num_rows != len(rows):
        raise StorageError(f"{root.manifest(version)} reads back {back.num_rows} rows, not {len(rows)}.")
    # What Hugging Face `datasets` loads: the version's metadata file at the root (and, for the latest
    # version, the root's default copies and card); before LATEST names the version.
    write_hf_files(storage, root.uri, version, rows, meta, card, latest=set_latest)
    # A takedown that amended this version since the read-back must not be undone by those files.
    now = _read_parquet(storage, root.manifest(version)).to_pylist()
    if sorted(str(r.get("release_id")) for r in now) != sorted(str(r.get("release_id")) for r in rows):
        log.warning("release %s: its manifest changed while it was written (a takedown?); its metadata files "
                    "follow the manifest as it is now", version)
        write_hf_files(storage, root.uri, version, now, meta, card, latest=set_latest)
    if set_latest:
        storage.write_text(root.latest, version)


# ---- lineage: which run each version came from (private) ------------------------------------------
PRIVATE_META_KEYS = ("run",)  # release.json of older versions named the run's URI here


def read_lineage(storage: Storage, store: str, root: ReleaseRoot) -> dict[str, Any]:
    data = read_json(storage, lineage_uri(store, root.uri)) or {}
    data.setdefault("release_root", root.uri)
    data.setdefault("versions", {})
    return data


def record_lineage(storage: Storage, store: str, root: ReleaseRoot, version: str, entry: dict[str, Any]) -> None:
    data = read_lineage(storage, store, root)
    data["versions"][version] = {**data["versions"].get(version, {}), **entry}
    storage.write_text(lineage_uri(store, root.uri), json.dumps(data, indent=2, sort_keys=True))


def lineage_runs(storage: Storage, store: str, root: ReleaseRoot) -> set[str]:
    """Every run URI a version of this root was made from."""
    return {v["run"] for v in read_lineage(storage, store, root)["versions"].values() if v.get("run")}


def migrate_release_root(storage: Storage, root: ReleaseRoot, store: str) -> None:
    """Bring a release root written by an older corpus-anon into today's layout: its public
    tombstones move into the private store, and the run URI each release.json named moves into the
    private lineage (the public release.json is rewritten without it)."""
    try:
        migrate_public_tombstones(storage, root.uri, join(store, "tombstones.json"))
    except TombstoneError as e:
        raise ReleaseError(str(e)) from None
    for v in versions(storage, root):
        meta = read_json(storage, root.meta(v)) or {}
        private = {k: meta.pop(k) for k in PRIVATE_META_KEYS if k in meta}
        if private:
            record_lineage(storage, store, root, v, {**private, "cfg_fp": meta.get("run_cfg_fp"),
                                                     "created_at": meta.get("created_at")})
            storage.write_text(root.meta(v), json.dumps(meta, indent=2, sort_keys=True, default=str))
            log.info("moved the run URI of %s from its public release.json into the private lineage", v)


def release_stores(cfg: Config, storage: Storage, out: str, run_output: str | None) -> tuple[ReleaseRoot, str]:
    """(release root, private store) after every pre-flight check: the storage policy, the release
    root apart from every private output and from the private store."""
    check_separation(cfg, out, extra=[("run output", run_output)] if run_output else ())
    store = private_uri(cfg, run_output)
    if not store:
        raise ConfigError("the private store for tombstones and lineage is unknown: set output.uri or "
                          "release.private_uri in the config.")
    check_private_access(storage, store, write=True)
    try:
        root = ReleaseRoot(storage.check_write(out))
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    return root, store


def _withdrawn(storage: Storage, cfg: Config, run_cfg: Config | None, output: str) -> tuple[set[str], set[str]]:
    """(release ids, signer pseudonyms) withdrawn in the release's private store and, when the run's
    own config names another one, in the run's: a release run without the takedown's config still
    honours what the takedown wrote."""
    try:
        tombs = [load_tombstones(storage, cfg, output)]
        if run_cfg is not None and tombstones_uri(run_cfg, output) != tombstones_uri(cfg, output):
            tombs.append(load_tombstones(storage, run_cfg, output))
    except TombstoneError as e:
        raise ReleaseError(str(e)) from None
    clips, signers = set(), set()
    for t in tombs:
        c, sg = withdrawn_sets(t)
        clips |= c
        signers |= sg
    return clips, signers


def release(cfg: Config, storage: Storage, run_uri: str, out: str | None = None, *, secret: bytes,
            exclude: set[str] | None = None, approve: set[str] | None = None,
            allow_unchecked: bool = False, threads: int = 8) -> ReleaseResult:
    """Release the clips of a finished run that pass every rule into the next version of `out`
    (default `release.root`); no new version when nothing changed. Clips nothing checked are left
    out unless `allow_unchecked`, and then the card says so."""
    from corpus_anon.secret import MIN_SECRET_BYTES

    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"a release needs CORPUS_ANON_SECRET of at least {MIN_SECRET_BYTES} bytes.")
    out = out or cfg.release.root
    if not out:
        raise ConfigError("no release root: pass --out or set release.root.")
    try:
        storage.check_read(run_uri)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    layout, rows, summary, run_cfg = read_run(storage, run_uri)
    root, store = release_stores(cfg, storage, out, layout.output)
    if run_cfg is not None:  # the run's own private outputs, when its config named others
        check_separation(run_cfg, root.uri, extra=[("run output", layout.output)])
    columns = list(cfg.release.columns)
    if rows:
        _check_columns(columns, list(rows[0].keys()))
    exclude = exclude or set()
    migrate_release_root(storage, root, store)
    withdrawn = _withdrawn(storage, cfg, run_cfg, layout.output)
    checked_run = run_checked(run_cfg)
    if not checked_run:
        why = "its config.yaml could not be read" if run_cfg is None else \
            "it had faces.backend: none" if run_cfg.faces.backend == "none" else "it had gate.enabled: false"
        log.warning("nothing in run %s was checked for identity leakage (%s)%s", layout.cfg_fp, why,
                    "; releasing its clips anyway (--allow-unchecked)" if allow_unchecked else
                    "; its clips are left out unless --allow-unchecked")
    excluded = {k: 0 for k in EXCLUSION_REASONS}
    chosen: list[tuple[dict[str, Any], str, str]] = []
    clips_prefix = layout.root + "/clips/"
    for row in rows:
        rid = release_id(secret, row["clip_id"])
        spseudo = signer_pseudonym(secret, row["signer_id"])
        reason = _exclusion(row, cfg, rid, spseudo, exclude, approve, withdrawn, checked_run=checked_run,
                            allow_unchecked=allow_unchecked)
        if reason:
            excluded[reason] += 1
            continue
        src = normalize_uri(row["output_uri"] or "")
        if not src.startswith(clips_prefix) or src == normalize_uri(str(row.get("video_uri") or "")):
            raise ReleaseError(f"the record of a clip points at {src or 'nothing'}, outside the run's clips/; "
                               "a release only copies anonymized run outputs.")
        chosen.append((row, rid, spseudo))
    released = [_release_row(row, rid, sp, root.clip(rid, row["sha256"]), columns,
                             checked=not is_unchecked(row, checked_run)) for row, rid, sp in chosen]
    digest = _content_digest(released)

    previous = latest_version(storage, root)
    if not released and previous is None:
        log.info("no clip of %s passes the release rules; no release written", layout.root)
        return ReleaseResult(None, None, 0, excluded, root.uri)
    published: dict[str, str] = {}
    if previous:
        prev_meta = read_json(storage, root.meta(previous)) or {}
        if prev_meta.get("content_digest") == digest:
            log.info("release %s already holds exactly these %d clips; no new version", previous, len(released))
            return ReleaseResult(None, previous, len(released), excluded, root.uri)
        prev = _read_parquet(storage, root.manifest(previous))
        published = dict(zip(prev.column("clip_uri").to_pylist(), prev.column("sha256").to_pylist())) \
            if prev.num_rows else {}

    def copy(item: tuple[tuple[dict[str, Any], str, str], dict[str, Any]]) -> str:
        (row, _, _), rel = item
        return _copy_verified(storage, row["output_uri"], rel["clip_uri"], int(row["bytes"]), row["sha256"],
                              published=published.get(rel["clip_uri"]) == row["sha256"])

    with ThreadPoolExecutor(max(1, threads)) as pool:
        outcomes = list(pool.map(copy, zip(chosen, released)))
    # A takedown may have landed while the clips were copied: nothing it withdrew may be published.
    now_withdrawn = _withdrawn(storage, cfg, run_cfg, layout.output)
    late = [(rel, outcome) for (row, rid, sp), rel, outcome in zip(chosen, released, outcomes)
            if rid in now_withdrawn[0] or sp in now_withdrawn[1]]
    if late:  # publish nothing: remove every object this release copied (older versions' stay)
        for rel, outcome in zip(released, outcomes):
            if outcome == "copied" and storage.exists(rel["clip_uri"]):
                storage.delete(rel["clip_uri"])
        raise ReleaseError(f"a takedown withdrew {len(late)} of this release's clips while it was being written; "
                           "nothing was published: run the release again.")
    version = next_version(storage, root)
    created = now_iso()
    meta = {
        "version": version, "created_at": created, "corpus_anon_version": __version__,
        "run_cfg_fp": layout.cfg_fp, "anonymizer": summary.get("anonymizer"),
        "content_digest": digest, "columns": [*BASE_COLUMNS, *METRIC_COLUMNS, *columns],
        "counts": {"source_rows": len(rows), "released": len(released), "excluded": excluded,
                   "released_unchecked": sum(1 for r in released if not r["checked"])},
        "audio": run_cfg.video.audio if run_cfg is not None else None,
        "reid": reid_figures(summary), "models": models_used(run_cfg, storage), "previous": previous,
        # the card's licence and Hub fields (hf.card_data), kept so a takedown re-renders the same header
        "license": cfg.release.license, "license_name": cfg.release.license_name,
        "license_link": cfg.release.license_link, "task_categories": list(cfg.release.task_categories),
        "language": list(cfg.release.language),
    }
    # Lineage first: a version whose run is not on record could not be taken down completely.
    record_lineage(storage, store, root, version, {"run": layout.root, "cfg_fp": layout.cfg_fp,
                                                   "created_at": created, "allow_unchecked": allow_unchecked})
    write_version(storage, root, version, released, meta)
    log.info("release %s: %d clips (%d copied, %d already there, %d unchecked), left out %s", version, len(released),
             outcomes.count("copied"), outcomes.count("present"), meta["counts"]["released_unchecked"],
             {k: v for k, v in excluded.items() if v})
    return ReleaseResult(version, version, len(released), excluded, root.uri, new=True,
                         details={"copied": outcomes.count("copied"), "present": outcomes.count("present"),
                                  "unchecked": meta["counts"]["released_unchecked"]})


def config_for(path: str | None) -> Config:
    """The config a release/takedown runs under (its storage policy and release section)."""
    return load_config(path) if path else Config()


def storage_for(cfg: Config) -> Storage:
    """The Storage a release, refresh or takedown uses: the config's policy and S3 endpoint."""
    from corpus_anon.config import resolve_endpoint
    from corpus_anon.io.storage import StorageSettings

    return Storage(StorageSettings.from_config(cfg, resolve_endpoint(cfg)))
