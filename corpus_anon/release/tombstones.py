"""Withdrawn signers and clips (tombstones), the private store that holds them, and the checks that
keep release roots and private outputs apart (driver side; workers use only `still_wanted`).

The private store (`release.private_uri`, default `{output.uri}/private`) is never published and
never lies inside a release root:

    {private}/tombstones.json                 withdrawn signers and clips: keyed pseudonyms only
    {private}/lineage/{root_key}.json         per release root: its URI and, per version, the run
                                              (URI, cfg_fp) it was made from and when

A run made with the secret also keeps `{run}/tombstone_keys.parquet` (clip_id, release_id,
signer_pseudonym of every clip it ever ran, kept when a clip leaves the manifest), so a takedown
recognises a signer's clips in run folders whose manifest no longer lists them.

`root_key` is the first 16 hex digits of sha256(release root URI). Pseudonyms are keyed with the
project secret: `release_id` = HMAC(secret, "release:" + clip_id) and `signer_pseudonym` =
HMAC(secret, "pseudonym:" + signer_id), in other domains than the seed derivation
(`secret.derive_seed`). A tombstone names only those, so the store reveals no name to someone
without the secret.

A run in progress honours a takedown made while it runs: the driver, which holds the secret, puts
each row's two pseudonyms into the rows it sends the workers (`TOMB_COLUMNS`), and a worker calls
`still_wanted` before it publishes a clip; the check needs no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any, Iterable

from corpus_anon.config import Config, ConfigError
from corpus_anon.io.records import now_iso
from corpus_anon.io.storage import PolicyError, Storage, join, normalize_uri, under_prefix

log = logging.getLogger(__name__)

PSEUDONYM_HEX = 16  # 64 bits: no collision in any corpus of realistic size
TOMBSTONES_NAME = "tombstones.json"
LEGACY_PUBLIC_TOMBSTONES = "tombstones.json"  # where versions before the private store kept them: the release root
# Row columns the driver adds for the workers' last check before publishing (no secret needed there).
TOMB_COLUMNS = ("tomb_release_id", "tomb_signer_pseudonym")
WITHDRAWN_ERROR = "the clip was withdrawn by a takedown while the run was in progress; it was not published."
STILL_WANTED_TTL_S = 5.0


class TombstoneError(ConfigError):
    """The tombstones cannot be read (one sentence): fix the file before anything runs."""


# ---- pseudonyms -----------------------------------------------------------------------------------
def _hmac_hex(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def release_id(secret: bytes, clip_id: str) -> str:
    return _hmac_hex(secret, "release:" + str(clip_id))


def signer_pseudonym(secret: bytes, signer_id: str) -> str:
    return _hmac_hex(secret, "pseudonym:" + str(signer_id))


# ---- where things live ----------------------------------------------------------------------------
def private_uri(cfg: Config, output: str | None = None) -> str | None:
    """The private store: `release.private_uri`, else `{output.uri}/private` (`output` stands in for
    output.uri, e.g. the output a released run lives in). None when neither is known."""
    if cfg.release.private_uri:
        return normalize_uri(cfg.release.private_uri)
    base = cfg.output.uri or output
    return join(normalize_uri(base), "private") if base else None


def tombstones_uri(cfg: Config, output: str | None = None) -> str | None:
    store = private_uri(cfg, output)
    return join(store, TOMBSTONES_NAME) if store else None


def lineage_uri(store: str, release_root: str) -> str:
    key = hashlib.sha256(normalize_uri(release_root).encode("utf-8")).hexdigest()[:16]
    return join(store, "lineage", f"{key}.json")


def private_outputs(cfg: Config) -> list[tuple[str, str]]:
    """(what, URI) of every private output the config names: the run output, the crop and
    reference sets, the fine-tune folder."""
    out = [("output.uri", cfg.output.uri), ("finetune.crops_uri", cfg.finetune.crops_uri),
           ("finetune.reference_uri", cfg.finetune.reference_uri), ("finetune.out", cfg.finetune.out)]
    return [(k, normalize_uri(v)) for k, v in out if v]


def _overlap(a: str, b: str) -> bool:
    return under_prefix(a, b) or under_prefix(b, a)


def check_separation(cfg: Config, release_root: str | None = None, extra: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse, in one sentence, a release root that overlaps a private output or the private store
    (publishing one would publish the other), and a run output inside the private store."""
    root = release_root or cfg.release.root
    outputs = private_outputs(cfg) + [(k, normalize_uri(v)) for k, v in extra if v]
    store = private_uri(cfg, next((v for k, v in outputs if k in ("output.uri", "run output")), None))
    try:
        if root:
            root = normalize_uri(root)
            for what, uri in outputs:
                if _overlap(root, uri):
                    raise ConfigError(f"the release root {root} and {what} {uri} overlap; publishing the release "
                                      "would publish private outputs (tracks, embeddings, the report, face crops), "
                                      "so keep them in separate folders or buckets.")
            if store and _overlap(root, store):
                raise ConfigError(f"the private store {store} (release.private_uri) and the release root {root} "
                                  "overlap; tombstones and lineage must never be published, so move one of them.")
        if store:
            for what, uri in outputs:
                if what in ("output.uri", "run output") and under_prefix(uri, store):
                    raise ConfigError(f"{what} {uri} lies inside the private store {store}; set "
                                      "release.private_uri to a folder of its own.")
    except PolicyError as e:
        raise ConfigError(str(e)) from None


# ---- reading and writing tombstones ---------------------------------------------------------------
def _empty() -> dict[str, Any]:
    return {"entries": []}


def read_tombstones(storage: Storage, uri: str | None) -> dict[str, Any]:
    if not uri:
        return _empty()
    try:
        data = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return _empty()
    except ValueError as e:
        raise TombstoneError(f"{uri} is not valid JSON ({e}); fix it before running, releasing or "
                             "taking down anything.") from None
    data.setdefault("entries", [])
    return data


def write_tombstones(storage: Storage, uri: str, tomb: dict[str, Any]) -> None:
    entries = sorted({(e["kind"], e["pseudonym"]): e for e in tomb.get("entries", [])}.values(),
                     key=lambda e: (e.get("at", ""), e["kind"], e["pseudonym"]))
    storage.write_text(uri, json.dumps({"entries": entries}, indent=2, sort_keys=True))


def add_tombstone(tomb: dict[str, Any], kind: str, pseudonym: str) -> bool:
    """Add one entry unless present; returns whether it was new."""
    if any(e.get("kind") == kind and e.get("pseudonym") == pseudonym for e in tomb["entries"]):
        return False
    tomb["entries"].append({"kind": kind, "pseudonym": pseudonym, "at": now_iso()})
    return True


def migrate_public_tombstones(storage: Storage, release_root: str, tombstones: str) -> int:
    """Merge a release root's public `tombstones.json` (written by versions before the private store)
    into the private one, then delete the public file. Returns the entries merged."""
    public = join(normalize_uri(release_root), LEGACY_PUBLIC_TOMBSTONES)
    try:
        old = json.loads(storage.read_text(public))
    except FileNotFoundError:
        return 0
    except ValueError as e:
        raise TombstoneError(f"{public} is not valid JSON ({e}); fix it so its tombstones can move to the "
                             "private store.") from None
    tomb = read_tombstones(storage, tombstones)
    n = sum(add_tombstone(tomb, e["kind"], e["pseudonym"]) for e in old.get("entries", [])
            if e.get("kind") in ("signer", "clip") and e.get("pseudonym"))
    write_tombstones(storage, tombstones, tomb)  # durable in the private store before the public copy goes
    storage.delete(public)
    log.info("moved %d tombstones from the public %s to the private %s", n, public, tombstones)
    return n


def withdrawn_sets(tombstones: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(release ids, signer pseudonyms) withdrawn so far."""
    clips = {e["pseudonym"] for e in tombstones["entries"] if e.get("kind") == "clip"}
    signers = {e["pseudonym"] for e in tombstones["entries"] if e.get("kind") == "signer"}
    return clips, signers


def row_keys(table: Any, secret: bytes) -> tuple[list[str], list[str]]:
    """Each manifest row's (release id, signer pseudonym)."""
    return ([release_id(secret, c) for c in table.column("clip_id").to_pylist()],
            [signer_pseudonym(secret, s) for s in table.column("signer_id").to_pylist()])


def load_tombstones(storage: Storage, cfg: Config, output: str | None = None) -> dict[str, Any]:
    """The tombstones a run, an extraction or a release honours: the private store's, plus those a
    release root still holds publicly from older versions (read only; a release or takedown moves
    them)."""
    tomb = read_tombstones(storage, tombstones_uri(cfg, output))
    if cfg.release.root:
        legacy = join(normalize_uri(cfg.release.root), LEGACY_PUBLIC_TOMBSTONES)
        try:
            old = read_tombstones(storage, legacy) if storage.exists(legacy) else _empty()
        except PolicyError:
            old = _empty()
        for e in old["entries"]:
            if e.get("kind") in ("signer", "clip") and e.get("pseudonym"):
                add_tombstone(tomb, e["kind"], e["pseudonym"])
    return tomb


def apply_tombstones(table: Any, tomb: dict[str, Any], secret: bytes | None, where: str) -> tuple[Any, int]:
    """Drop the manifest rows whose clip or signer was withdrawn, so no run recreates them. Returns
    (table, rows dropped). Needs the secret only when something was withdrawn."""
    clips, signers = withdrawn_sets(tomb)
    if not clips and not signers:
        return table, 0
    if secret is None:
        raise ConfigError(f"{where} withdraws clips; the run needs CORPUS_ANON_SECRET to recognise them.")
    import pyarrow as pa

    rids, sps = row_keys(table, secret)
    keep = [r not in clips and s not in signers for r, s in zip(rids, sps)]
    dropped = keep.count(False)
    return (table.filter(pa.array(keep)) if dropped else table), dropped


RUN_KEYS_NAME = "tombstone_keys.parquet"


def read_run_keys(storage: Storage, run_root: str) -> dict[str, tuple[str, str]]:
    """clip id → (release id, signer pseudonym) of every clip a run has recorded keys for."""
    import io

    import pyarrow.parquet as pq

    try:
        t = pq.read_table(io.BytesIO(storage.read_bytes(join(run_root, RUN_KEYS_NAME))))
    except FileNotFoundError:
        return {}
    return {c: (r, s) for c, r, s in zip(t.column("clip_id").to_pylist(), t.column("release_id").to_pylist(),
                                          t.column("signer_pseudonym").to_pylist())}


def write_run_keys(storage: Storage, run_root: str, keys: dict[str, tuple[str, str]]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(keys)
    buf = io.BytesIO()
    pq.write_table(pa.table({"clip_id": pa.array(ids, pa.string()),
                             "release_id": pa.array([keys[c][0] for c in ids], pa.string()),
                             "signer_pseudonym": pa.array([keys[c][1] for c in ids], pa.string())}), buf)
    storage.write_bytes(join(run_root, RUN_KEYS_NAME), buf.getvalue())


def save_run_keys(storage: Storage, run_root: str, clip_ids: list[str], keys: tuple[list[str], list[str]]) -> None:
    """Add this run's rows to the run's key file (rows of earlier manifests stay)."""
    known = read_run_keys(storage, run_root)
    new = {c: (r, s) for c, r, s in zip(clip_ids, *keys)}
    if any(known.get(c) != v for c, v in new.items()):
        write_run_keys(storage, run_root, {**known, **new})


# ---- the workers' last check ----------------------------------------------------------------------
_cache: dict[str, tuple[float, set[str], set[str]]] = {}
_cache_lock = threading.Lock()


def still_wanted(storage: Storage, tombstones: str | None, keys: dict[str, Any],
                 ttl_s: float = STILL_WANTED_TTL_S) -> bool:
    """Whether a row may still be published: False when its release id or signer pseudonym (the
    `TOMB_COLUMNS` the driver put into the row) was withdrawn. The tombstones are read at most once
    per `ttl_s` per process. A row without keys (a run without the secret) is always wanted; a
    tombstone file that cannot be read raises, so nothing is published unchecked."""
    rid, sp = keys.get(TOMB_COLUMNS[0]), keys.get(TOMB_COLUMNS[1])
    if not tombstones or not (rid or sp):
        return True
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(tombstones)
    if hit is None or now - hit[0] > ttl_s:
        clips, signers = withdrawn_sets(read_tombstones(storage, tombstones))
        hit = (now, clips, signers)
        with _cache_lock:
            _cache[tombstones] = hit
    return rid not in hit[1] and sp not in hit[2]


def withdrawn_rows(storage: Storage, tombstones: str | None, keys: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """The clip ids (of `keys`: clip id → (release id, signer pseudonym)) withdrawn now; read fresh."""
    if not tombstones or not keys:
        return []
    clips, signers = withdrawn_sets(read_tombstones(storage, tombstones))
    if not clips and not signers:
        return []
    return [c for c, (r, s) in keys.items() if (r and r in clips) or (s and s in signers)]


def check_private_access(storage: Storage, store: str | None, write: bool) -> None:
    """The private store under the storage policy (read for runs, write for releases and takedowns)."""
    if not store:
        return
    try:
        storage.check_write(store) if write else storage.check_read(store)
    except PolicyError as e:
        raise ConfigError(f"the private store {store} (release.private_uri): {e}") from None
