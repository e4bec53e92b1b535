"""Versioned dataset releases, takedowns and the tombstones every later run honours (driver side).

A release root looks like this:

    releases/v0001/manifest.parquet   the released clips, allow-listed columns only
    releases/v0001/README.md          the dataset card
    releases/v0001/release.json       what the card is made from (counts, figures, models, run)
    releases/LATEST                   "v0001"; written last, after everything it names is verified
    clips/{release_id}-{sha12}.mp4    released clips, copied from a run's output (never an original)
    tombstones.json                   withdrawn signers and clips (pseudonyms only), superseded versions

Source clip ids (`Cory_2013-6-27_sc115`) and signer ids carry names, so a release publishes keyed
pseudonyms instead: `release_id` = HMAC(secret, "release:" + clip_id) and `signer_pseudonym` =
HMAC(secret, "pseudonym:" + signer_id), both in other domains than the seed derivation
(`secret.derive_seed`). A released object's key carries its content hash: a clip whose pixels
change gets a new object, so an older manifest keeps pointing at the bytes it lists.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from corpus_anon import __version__
from corpus_anon.config import RELEASE_FORBIDDEN_COLUMNS, Config, ConfigError, load_config
from corpus_anon.records import RunLayout, now_iso, resolve_run
from corpus_anon.storage import PolicyError, Storage, StorageError, join, normalize_uri, uri_scheme

log = logging.getLogger(__name__)

PSEUDONYM_HEX = 16  # 64 bits: no collision in any corpus of realistic size
VERSION_RE = re.compile(r"^v(\d{4,})$")
# Columns every release has, in this order; then the metrics below, then `release.columns`.
BASE_COLUMNS = ("release_id", "clip_uri", "sha256", "bytes", "duration_s", "fps", "width", "height",
                "signer_pseudonym", "cfg_fp")
METRIC_COLUMNS = ("n_frames", "id_score_kind", "id_threshold", "id_orig_orig", "id_orig_anon", "id_worst",
                  "id_match_rate", "face_frac_orig", "face_frac_anon", "expr_fidelity", "hand_fidelity",
                  "warp_error", "enhanced", "seed_attempt")
CARD_METRICS = ("id_orig_anon", "id_worst", "id_match_rate", "id_orig_orig", "face_frac_orig", "face_frac_anon",
                "expr_fidelity", "hand_fidelity", "warp_error")
EXCLUSION_REASONS = ("status", "reidentified", "face_lost", "unchecked", "excluded", "not_approved", "withdrawn")


class ReleaseError(RuntimeError):
    """A release, refresh or takedown cannot go ahead (one sentence)."""


# ---- pseudonyms -----------------------------------------------------------------------------------
def _hmac_hex(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def release_id(secret: bytes, clip_id: str) -> str:
    return _hmac_hex(secret, "release:" + str(clip_id))


def signer_pseudonym(secret: bytes, signer_id: str) -> str:
    return _hmac_hex(secret, "pseudonym:" + str(signer_id))


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

    @property
    def tombstones(self) -> str:
        return join(self.uri, "tombstones.json")

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


def read_tombstones(storage: Storage, root: ReleaseRoot) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_text(root.tombstones))
    except FileNotFoundError:
        return {"entries": [], "superseded": {}}
    except ValueError as e:
        raise ReleaseError(f"{root.tombstones} is not valid JSON ({e}); fix it before releasing.") from None
    data.setdefault("entries", [])
    data.setdefault("superseded", {})
    return data


def withdrawn_sets(tombstones: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(release ids, signer pseudonyms) withdrawn so far."""
    clips = {e["pseudonym"] for e in tombstones["entries"] if e.get("kind") == "clip"}
    signers = {e["pseudonym"] for e in tombstones["entries"] if e.get("kind") == "signer"}
    return clips, signers


def apply_tombstones(table: Any, storage: Storage, release_root: str | None, secret: bytes | None) -> tuple[Any, int]:
    """Drop the manifest rows whose clip or signer was withdrawn (`tombstones.json` of the release
    root), so no run recreates them. Returns (table, rows dropped). Needs the secret only when
    something was withdrawn."""
    if not release_root:
        return table, 0
    tomb = read_tombstones(storage, ReleaseRoot(normalize_uri(release_root)))
    clips, signers = withdrawn_sets(tomb)
    if not clips and not signers:
        return table, 0
    if secret is None:
        raise ConfigError(f"{ReleaseRoot(normalize_uri(release_root)).tombstones} withdraws clips; the run needs "
                          "CORPUS_ANON_SECRET to recognise them.")
    import pyarrow as pa

    keep = [release_id(secret, c) not in clips and signer_pseudonym(secret, s) not in signers
            for c, s in zip(table.column("clip_id").to_pylist(), table.column("signer_id").to_pylist())]
    dropped = keep.count(False)
    return (table.filter(pa.array(keep)) if dropped else table), dropped


# ---- reading a run --------------------------------------------------------------------------------
def _read_parquet(storage: Storage, uri: str) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _write_parquet(storage: Storage, uri: str, table: Any) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _read_json(storage: Storage, uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None


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
    summary = _read_json(storage, layout.summary) or {}
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


def _exclusion(row: dict[str, Any], cfg: Config, rid: str, spseudo: str, exclude: set[str],
               approve: set[str] | None, withdrawn: tuple[set[str], set[str]]) -> str | None:
    if rid in withdrawn[0] or spseudo in withdrawn[1]:
        return "withdrawn"
    if row.get("status") != "ok":
        return "status"
    if cfg.release.exclude_reidentified and row.get("reidentified"):
        return "reidentified"
    if cfg.release.exclude_face_lost and row.get("face_lost"):
        return "face_lost"
    if row["clip_id"] in exclude or rid in exclude:
        return "excluded"
    approved = approve is not None and (row["clip_id"] in approve or rid in approve)
    if approve is not None and not approved:
        return "not_approved"
    # Face analysis ran but found no face in the original: the identity check never happened (a
    # missed detection leaves a pixelated clip's face untouched). Only an explicit approval releases it.
    frac = row.get("face_frac_orig")
    if cfg.release.exclude_unchecked and frac is not None and float(frac) == 0.0 and not approved:
        return "unchecked"
    return None


def _release_row(row: dict[str, Any], rid: str, spseudo: str, clip_uri: str, columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"release_id": rid, "clip_uri": clip_uri, "signer_pseudonym": spseudo}
    for c in BASE_COLUMNS:
        if c not in out:
            out[c] = row.get(c)
    for c in METRIC_COLUMNS:
        out[c] = row.get(c)
    for c in columns:
        out[c] = row.get(c)
    return out


def _check_columns(columns: list[str], available: Iterable[str]) -> None:
    bad = [c for c in columns if c in RELEASE_FORBIDDEN_COLUMNS]
    if bad:
        raise ReleaseError(f"release.columns may not name {', '.join(bad)}.")
    missing = [c for c in columns if c not in set(available)]
    if missing:
        raise ReleaseError(f"release.columns names {', '.join(missing)}, which the run's metrics table does not have.")


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


def _distribution(values: list[float]) -> dict[str, float] | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    if not vals:
        return None
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals),
            "mean": statistics.fmean(vals), "max": max(vals)}


def _reenactment_checkpoint(cfg: Config, storage: Storage | None) -> str:
    """Which TPSMM checkpoint the face module used: its name, sha256 from the store's lock and, for a
    fine-tune, its training summary (`<name>.json` beside it, written by `models add-tpsmm`)."""
    from corpus_anon.models.registry import LOCK_NAME, tpsmm_relpath

    name = cfg.faces.tpsmm
    if storage is None or not cfg.models.store:
        return name
    try:
        rel = tpsmm_relpath(cfg.models.profile, name)
        lock = json.loads(storage.read_text(join(cfg.models.store, LOCK_NAME)))
        sha = lock["files"][rel]["sha256"]
    except (KeyError, ValueError, TypeError):
        return f"{name} (not in the model store's lock now)"
    except OSError as e:  # the store unreadable under this config (PolicyError), or unreachable
        log.warning("the card names the reenactment checkpoint without its sha256: %s", e)
        return f"{name} (the model store could not be read for its sha256)"
    out = f"{name} (sha256 {sha[:16]})"
    try:
        info = _read_json(storage, join(cfg.models.store, rel.removesuffix(".pth.tar") + ".json"))
    except OSError:
        info = None
    if isinstance(info, dict) and info.get("init"):
        mix = info.get("data") or {}
        out += (f", fine-tuned from {info['init']} for {info.get('epochs', '?')} epochs on "
                f"{mix.get('corpus_chunks', '?')} corpus chunks ({mix.get('corpus_identities', '?')} signers) and "
                f"{mix.get('reference_chunks', 0)} reference chunks, reference share {mix.get('reference_ratio', '?')}")
    return out


def _models_used(cfg: Config | None, storage: Storage | None = None) -> list[dict[str, str]]:
    """The models behind a run, with their licences, for the card."""
    if cfg is None:
        return []
    from corpus_anon.models.registry import sources

    out: list[dict[str, str]] = []
    if cfg.anonymizer.kind == "pixelate":
        out.append({"role": "face detector", "name": "OpenCV Haar cascades (frontal + profile)",
                    "licence": "Intel License Agreement (BSD-style), shipped with OpenCV"})
    roles = set()
    if cfg.anonymizer.kind == "diffslva":
        roles |= {"pipeline", "controlnet", "hed", "vae", "lcm_lora"}
        if cfg.faces.enhance and cfg.faces.backend != "none":
            roles.add("tpsmm")
    if cfg.faces.backend != "none":
        roles.add(cfg.faces.backend)
    for src in sources(cfg.models.profile):
        if src.role in roles:
            name = src.hub_id or src.path or "(store root)"
            if src.role == "tpsmm":
                name = f"{name}/{_reenactment_checkpoint(cfg, storage)}"
            out.append({"role": src.role, "name": name, "licence": src.licence})
    if cfg.faces.backend != "none" and not any(m["role"] == cfg.faces.backend for m in out):
        out.append({"role": cfg.faces.backend, "name": cfg.faces.backend, "licence": "see README, Models"})
    return out


def _reid_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The corpus-level re-identification figures, without the per-signer table (signer ids)."""
    reid = summary.get("reid") or {}
    return {k: reid[k] for k in ("reid_top1", "reid_top1_originals", "reid_chance", "n_tested", "n_signers",
                                 "id_score_kind", "id_threshold") if k in reid}


def render_card(version: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                superseded: dict[str, str]) -> str:
    """The dataset card (README.md) of one version."""
    lines = [f"# Anonymized sign-language corpus — release {version}", ""]
    lines += [f"Made by corpus-anon {meta.get('corpus_anon_version', __version__)} on {meta['created_at']} "
              f"from run `{meta.get('run_cfg_fp')}` (anonymizer: {meta.get('anonymizer', 'unknown')}).", ""]
    lines += ["## Contents", "",
              f"- {len(rows)} clips from {len({r['signer_pseudonym'] for r in rows})} signers "
              f"(pseudonyms), in `clips/`, listed in `manifest.parquet`.",
              f"- Manifest rows of the source run: {meta['counts']['source_rows']}; released: {len(rows)}."]
    excl = {k: v for k, v in meta["counts"]["excluded"].items() if v}
    if excl:
        lines.append("- Left out: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(excl.items())) + ".")
    lines += ["", "Identifiers: `release_id` and `signer_pseudonym` are keyed pseudonyms; the source clip ids, "
              "signer ids and original videos are not part of this release.", ""]
    kind = next((r.get("id_score_kind") for r in rows if r.get("id_score_kind")), None)
    lines += ["## Metrics (per clip)", ""]
    if kind:
        better = "higher" if kind == "euclidean" else "lower"
        lines.append(f"Identity scores are {kind} ({'distance' if kind == 'euclidean' else 'similarity'}); "
                     f"for `id_orig_anon` and `id_worst`, {better} means less alike (better anonymized).")
        lines.append("")
    lines += ["| metric | n | min | median | mean | max |", "|---|---|---|---|---|---|"]
    for m in CARD_METRICS:
        d = _distribution([r.get(m) for r in rows])
        if d:
            lines.append(f"| `{m}` | {d['n']} | {d['min']:.3f} | {d['median']:.3f} | {d['mean']:.3f} | {d['max']:.3f} |")
    reid = meta.get("reid") or {}
    lines += ["", "## Re-identification (over the source run, leave-one-out)", ""]
    if reid.get("n_tested"):
        lines += [f"- anonymized clips re-identified as their own signer (top-1): {reid.get('reid_top1')}",
                  f"- the same test on the original clips: {reid.get('reid_top1_originals')}",
                  f"- chance: {reid.get('reid_chance')} ({reid.get('n_tested')} clips tested)"]
    else:
        lines.append("- not measured (no face analysis, or too few signers with several clips).")
    lines += ["", "## Models and licences", ""]
    for m in meta.get("models") or []:
        lines.append(f"- {m['role']}: {m['name']} — {m['licence']}")
    if not meta.get("models"):
        lines.append("- not recorded")
    lines += ["", "## Limits", "",
              "- Anonymization replaces the face and appearance; signing style, motion, body shape and "
              "handshapes still carry identity. People who know a signer may recognize them.",
              "- Identity scores come from a face embedder; a low score says that embedder does not match "
              "the faces, not that no person could.",
              "- insightface's buffalo_l weights are licensed for non-commercial research only; dlib's "
              "68-point landmark model was trained on data that excludes commercial use.",
              "- Clips can be withdrawn when consent is withdrawn; use the latest version only."]
    if superseded:
        lines += ["", "## Superseded versions", ""]
        for v, why in sorted(superseded.items()):
            lines.append(f"- {v}: {why}")
    lines += ["", "## Files", "", "`manifest.parquet` columns: " + ", ".join(f"`{c}`" for c in meta["columns"]) + "."]
    return "\n".join(lines) + "\n"


def _publish(storage: Storage, root: ReleaseRoot, version: str, rows: list[dict[str, Any]], meta: dict[str, Any],
             superseded: dict[str, str]) -> None:
    """Write manifest, card and release.json of a version, verify them, then LATEST."""
    import pyarrow as pa

    columns = meta["columns"]
    table = pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns}) if rows else \
        pa.table({c: pa.array([], pa.string()) for c in columns})
    _write_parquet(storage, root.manifest(version), table)
    storage.write_text(root.card(version), render_card(version, rows, meta, superseded))
    storage.write_text(root.meta(version), json.dumps(meta, indent=2, sort_keys=True, default=str))
    for uri in (root.manifest(version), root.card(version), root.meta(version)):
        if not storage.exists(uri):
            raise StorageError(f"{uri} is not readable after writing it.")
    back = _read_parquet(storage, root.manifest(version))
    if back.num_rows != len(rows):
        raise StorageError(f"{root.manifest(version)} reads back {back.num_rows} rows, not {len(rows)}.")
    storage.write_text(root.latest, version)


def release(cfg: Config, storage: Storage, run_uri: str, out: str | None = None, *, secret: bytes,
            exclude: set[str] | None = None, approve: set[str] | None = None,
            threads: int = 8) -> ReleaseResult:
    """Release the clips of a finished run that pass every rule into the next version of `out`
    (default `release.root`); no new version when nothing changed."""
    from corpus_anon.secret import MIN_SECRET_BYTES

    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"a release needs CORPUS_ANON_SECRET of at least {MIN_SECRET_BYTES} bytes.")
    out = out or cfg.release.root
    if not out:
        raise ConfigError("no release root: pass --out or set release.root.")
    try:
        root = ReleaseRoot(storage.check_write(out))
        storage.check_read(run_uri)
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    layout, rows, summary, run_cfg = read_run(storage, run_uri)
    columns = list(cfg.release.columns)
    if rows:
        _check_columns(columns, rows[0].keys())
    exclude = exclude or set()
    tomb = read_tombstones(storage, root)
    withdrawn = withdrawn_sets(tomb)
    excluded = {k: 0 for k in EXCLUSION_REASONS}
    chosen: list[tuple[dict[str, Any], str, str]] = []
    clips_prefix = layout.root + "/clips/"
    for row in rows:
        rid = release_id(secret, row["clip_id"])
        spseudo = signer_pseudonym(secret, row["signer_id"])
        reason = _exclusion(row, cfg, rid, spseudo, exclude, approve, withdrawn)
        if reason:
            excluded[reason] += 1
            continue
        src = normalize_uri(row["output_uri"] or "")
        if not src.startswith(clips_prefix) or src == normalize_uri(str(row.get("video_uri") or "")):
            raise ReleaseError(f"the record of a clip points at {src or 'nothing'}, outside the run's clips/; "
                               "a release only copies anonymized run outputs.")
        chosen.append((row, rid, spseudo))
    released = [_release_row(row, rid, sp, root.clip(rid, row["sha256"]), columns) for row, rid, sp in chosen]
    digest = _content_digest(released)

    previous = latest_version(storage, root)
    if not released and previous is None:
        log.info("no clip of %s passes the release rules; no release written", layout.root)
        return ReleaseResult(None, None, 0, excluded, root.uri)
    published: dict[str, str] = {}
    if previous:
        prev_meta = _read_json(storage, root.meta(previous)) or {}
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
    version = next_version(storage, root)
    meta = {
        "version": version, "created_at": now_iso(), "corpus_anon_version": __version__,
        "run": layout.root, "run_cfg_fp": layout.cfg_fp, "anonymizer": summary.get("anonymizer"),
        "content_digest": digest, "columns": [*BASE_COLUMNS, *METRIC_COLUMNS, *columns],
        "counts": {"source_rows": len(rows), "released": len(released), "excluded": excluded},
        "reid": _reid_figures(summary), "models": _models_used(run_cfg, storage), "previous": previous,
    }
    _publish(storage, root, version, released, meta, tomb["superseded"])
    log.info("release %s: %d clips (%d copied, %d already there), left out %s", version, len(released),
             outcomes.count("copied"), outcomes.count("present"), {k: v for k, v in excluded.items() if v})
    return ReleaseResult(version, version, len(released), excluded, root.uri, new=True,
                         details={"copied": outcomes.count("copied"), "present": outcomes.count("present")})


# ---- takedown -------------------------------------------------------------------------------------
@dataclass
class TakedownResult:
    version: str | None
    rows_removed: int
    released_objects_deleted: int
    run_clips_deleted: list[str]
    superseded: list[str]
    crop_clips_deleted: list[str] = field(default_factory=list)


def _delete_run_clip(storage: Storage, layout: RunLayout, clip_id: str) -> int:
    """Delete a clip's run outputs: clips, record, attempts, tracks, embeddings. Returns objects deleted."""
    n = 0
    for uri in storage.list(join(layout.root, "clips")):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith(clip_id + "-") and re.fullmatch(re.escape(clip_id) + r"-[0-9a-f]+\.mp4", name):
            storage.delete(uri)
            n += 1
    for uri in (layout.record(clip_id), layout.attempts(clip_id), layout.artifact("tracks", clip_id),
                layout.artifact("embeddings", clip_id)):
        if storage.exists(uri):
            storage.delete(uri)
            n += 1
    return n


def _scrub_run(storage: Storage, run_root: str, secret: bytes, clips: set[str], signers: set[str]) -> list[str]:
    """Remove withdrawn clips from one run's outputs and metrics table; returns their clip ids."""
    parent, _, cfg_fp = normalize_uri(run_root).rpartition("/")
    layout = RunLayout(parent, cfg_fp)
    try:
        table = _read_parquet(storage, layout.metrics)
    except FileNotFoundError:
        return []
    ids, sgn = table.column("clip_id").to_pylist(), table.column("signer_id").to_pylist()
    hit = [release_id(secret, c) in clips or signer_pseudonym(secret, s) in signers for c, s in zip(ids, sgn)]
    gone = [c for c, h in zip(ids, hit) if h]
    # Records of clips no longer in the manifest are not in the table: look at every record too.
    for uri in storage.list(layout.records_prefix, suffixes=(".json",)):
        cid = uri.rsplit("/", 1)[-1][:-5]
        if cid not in ids and release_id(secret, cid) in clips:
            gone.append(cid)
    if not gone:
        return []
    import pyarrow as pa

    for cid in gone:
        _delete_run_clip(storage, layout, cid)
    _write_parquet(storage, layout.metrics, table.filter(pa.array([not h for h in hit])))
    summary = _read_json(storage, layout.summary)
    if summary and isinstance((summary.get("reid") or {}).get("per_signer"), dict):
        per = summary["reid"]["per_signer"]
        for s in list(per):
            if signer_pseudonym(secret, s) in signers:
                del per[s]
        storage.write_text(layout.summary, json.dumps(summary, indent=2, sort_keys=True, default=str))
    return gone


def _scrub_crops(storage: Storage, crops_uri: str, secret: bytes, clips: set[str], signers: set[str]) -> list[str]:
    """Delete a crop set's chunks of withdrawn clips and signers (`faces extract` output: face
    crops are biometric data) and drop them from its index. Returns the clip ids purged."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from corpus_anon.extract import CropLayout, purge_clips, read_fragment

    layout = CropLayout(normalize_uri(crops_uri))

    def hit(cid: str | None, ids: set[Any]) -> bool:
        return bool(cid) and (release_id(secret, cid) in clips
                              or any(signer_pseudonym(secret, i) in signers for i in ids if i))

    def fragment(uri: str) -> str | None:
        try:
            meta, rows = read_fragment(storage.read_bytes(uri))
        except (ValueError, FileNotFoundError):
            return None
        ids = {r.get("identity_id") for r in rows} | {meta.get("identity_id")}
        return meta.get("clip_id") if hit(meta.get("clip_id"), ids) else None

    def attempt(uri: str) -> str | None:  # a clip killed before its fragment: chunks may be there
        try:
            meta = json.loads(storage.read_text(uri))
        except (ValueError, FileNotFoundError):
            return None
        return meta.get("clip_id") if hit(meta.get("clip_id"), {meta.get("identity_id")}) else None

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(fragment, storage.list(join(layout.root, "parts"))))
        found += list(pool.map(attempt, storage.list(join(layout.root, "attempts"))))
    doomed = sorted({c for c in found if c})
    if not doomed:
        return []
    purge_clips(storage, layout, doomed)
    if storage.exists(layout.index):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(layout.index)))
        kept = table.filter(pc.invert(pc.is_in(table.column("clip_id"), value_set=pa.array(doomed))))
        buf = io.BytesIO()
        pq.write_table(kept, buf)
        storage.write_bytes(layout.index, buf.getvalue())
    log.info("takedown: deleted the face crops of %d clips from %s", len(doomed), layout.root)
    return sorted(doomed)


def _scrub_crops_all(storage: Storage, crops_uris: list[str], secret: bytes, clips: set[str],
                     signers: set[str]) -> list[str]:
    gone: list[str] = []
    for crops in crops_uris:
        try:
            gone += _scrub_crops(storage, crops, secret, clips, signers)
        except PolicyError as e:
            raise ReleaseError(f"the face-crop set {crops} cannot be cleaned ({e}); add it to "
                               "storage.allowed_prefixes.write and run the takedown again.") from None
    return gone


def takedown(storage: Storage, release_root: str, *, secret: bytes, signer: str | None = None,
             clip: str | None = None, crops_uris: Iterable[str] = ()) -> TakedownResult:
    """Withdraw a signer or a clip: tombstone first, then a new version without it, then delete its
    released objects, its run outputs and its face crops in `crops_uris` (`finetune.crops_uri`);
    older versions that listed it are marked superseded."""
    from corpus_anon.secret import MIN_SECRET_BYTES

    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"a takedown needs CORPUS_ANON_SECRET of at least {MIN_SECRET_BYTES} bytes.")
    if bool(signer) == bool(clip):
        raise ConfigError("give exactly one of --signer ID or --clip ID.")
    try:
        root = ReleaseRoot(storage.check_write(release_root))
    except PolicyError as e:
        raise ConfigError(str(e)) from None
    crops_uris = list(crops_uris)
    all_versions = versions(storage, root)
    latest = latest_version(storage, root)
    if latest is None and not crops_uris:
        raise ReleaseError(f"{root.uri} has no release (no releases/LATEST) and no crop set was given "
                           "(finetune.crops_uri); there is nothing to withdraw from yet.")
    if signer:
        entry = {"kind": "signer", "pseudonym": signer_pseudonym(secret, signer)}
    else:
        # A source clip id, or a release id taken from a published manifest.
        rid = clip if re.fullmatch(r"[0-9a-f]{%d}" % PSEUDONYM_HEX, clip or "") else release_id(secret, clip)
        entry = {"kind": "clip", "pseudonym": rid}
    tomb = read_tombstones(storage, root)
    if not any(e.get("kind") == entry["kind"] and e.get("pseudonym") == entry["pseudonym"] for e in tomb["entries"]):
        tomb["entries"].append({**entry, "at": now_iso()})
    storage.write_text(root.tombstones, json.dumps(tomb, indent=2, sort_keys=True))  # durable before anything else
    clips, signers = withdrawn_sets(tomb)
    if latest is None:
        # Consent withdrawn before the first release (crops extracted for fine-tuning): the
        # tombstone keeps later runs, extractions and releases that use this root from bringing
        # the clips back, and the crops go now.
        crops_gone = _scrub_crops_all(storage, crops_uris, secret, clips, signers)
        log.info("takedown before any release: tombstone written, crop-set clips deleted: %d", len(crops_gone))
        return TakedownResult(None, 0, 0, [], [], crops_gone)

    def hit(r: dict[str, Any]) -> bool:
        return r.get("release_id") in clips or r.get("signer_pseudonym") in signers

    doomed: set[str] = set()
    runs: set[str] = set()
    superseded = dict(tomb["superseded"])
    latest_rows: list[dict[str, Any]] = []
    for v in all_versions:
        meta = _read_json(storage, root.meta(v)) or {}
        if meta.get("run"):
            runs.add(meta["run"])
        rows = _read_parquet(storage, root.manifest(v)).to_pylist()
        if v == latest:
            latest_rows = rows
        bad = [r for r in rows if hit(r)]
        if bad:
            doomed |= {r["clip_uri"] for r in bad}
            superseded.setdefault(v, f"lists clips withdrawn on {now_iso()[:10]} (their files are deleted); "
                                     "use the latest version")
    kept = [r for r in latest_rows if not hit(r)]
    new_version = None
    if len(kept) != len(latest_rows):
        prev_meta = _read_json(storage, root.meta(latest)) or {}
        new_version = next_version(storage, root)
        excluded = dict((prev_meta.get("counts") or {}).get("excluded") or {k: 0 for k in EXCLUSION_REASONS})
        excluded["withdrawn"] = excluded.get("withdrawn", 0) + len(latest_rows) - len(kept)
        meta = {**prev_meta, "version": new_version, "created_at": now_iso(), "corpus_anon_version": __version__,
                "previous": latest, "content_digest": _content_digest(kept),
                "counts": {**(prev_meta.get("counts") or {}), "released": len(kept), "excluded": excluded}}
        meta.setdefault("columns", list(latest_rows[0].keys()) if latest_rows else list(BASE_COLUMNS))
        meta.setdefault("counts", {}).setdefault("source_rows", len(latest_rows))
        tomb["superseded"] = superseded
        storage.write_text(root.tombstones, json.dumps(tomb, indent=2, sort_keys=True))
        _publish(storage, root, new_version, kept, meta, superseded)
    elif superseded != tomb["superseded"]:
        tomb["superseded"] = superseded
        storage.write_text(root.tombstones, json.dumps(tomb, indent=2, sort_keys=True))
    for uri in sorted(doomed):
        storage.delete(uri)
    gone: list[str] = []
    for run_root in sorted(runs):
        try:
            gone += _scrub_run(storage, run_root, secret, clips, signers)
        except PolicyError as e:
            raise ReleaseError(f"the release's source run {run_root} cannot be cleaned ({e}); add it to "
                               "storage.allowed_prefixes.write and run the takedown again.") from None
    crops_gone = _scrub_crops_all(storage, crops_uris, secret, clips, signers)
    log.info("takedown: %d released objects deleted, run clips deleted: %d, crop-set clips deleted: %d, "
             "new version %s", len(doomed), len(gone), len(crops_gone), new_version)
    return TakedownResult(new_version, len(latest_rows) - len(kept), len(doomed), sorted(set(gone)),
                          sorted(superseded), crops_gone)


def config_for(path: str | None) -> Config:
    """The config a release/takedown runs under (its storage policy and release section)."""
    return load_config(path) if path else Config()


# ---- refresh --------------------------------------------------------------------------------------
@dataclass
class RefreshResult:
    run: Any  # pipeline.RunResult
    release: ReleaseResult


def refresh(cfg: Config, *, limit: int | None = None) -> RefreshResult:
    """The scheduled refresh: run the current manifest (new and changed clips, retries, every clip
    when the config or models changed; withdrawn clips never), then release the next version to
    `release.root` only if what it would hold changed."""
    from corpus_anon.pipeline import run
    from corpus_anon.secret import read_secret

    if not cfg.release.root:
        raise ConfigError("refresh releases to release.root; set it in the config.")
    secret = read_secret("refresh")  # before the run: the driver drops it from its environment
    result = run(cfg, limit=limit, refresh=True)
    storage = Storage(_settings(cfg))
    rel = release(cfg, storage, result.layout.root, cfg.release.root, secret=secret)
    return RefreshResult(result, rel)


def _settings(cfg: Config) -> Any:
    from corpus_anon.config import resolve_endpoint
    from corpus_anon.storage import StorageSettings

    return StorageSettings.from_config(cfg, resolve_endpoint(cfg))


def storage_for(cfg: Config) -> Storage:
    return Storage(_settings(cfg))
