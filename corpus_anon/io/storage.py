"""Every byte the project reads or writes goes through here: fsspec (s3fs, local) and pyarrow
filesystems made in one place, retries with backoff on transient faults, and the URI policy.

URIs are `s3://bucket/key`, `file:///abs/path` or a plain local path. Plain paths are made
absolute and treated as `file://`. Only these schemes are installed and tested.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)

T = TypeVar("T")

SUPPORTED_SCHEMES = ("s3", "file")


class PolicyError(PermissionError):
    """A URI outside `storage.allowed_prefixes`, or of a scheme the project does not support."""


class StorageError(OSError):
    """An I/O failure that persisted through the retries."""


class TooLargeError(ValueError):
    """An object larger than the download's byte limit: by its listed size (`during` False, nothing
    was fetched) or by the bytes that arrived (`during` True, the download was cut off)."""

    def __init__(self, uri: str, limit: int, size: int | None, during: bool) -> None:
        self.uri, self.limit, self.size, self.during = uri, limit, size, during
        if during:
            super().__init__(f"{uri} sent more than {limit} bytes (listed as {size}); the download was cut off.")
        else:
            super().__init__(f"{uri} is {size} bytes, more than the {limit} allowed; it was not downloaded.")


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TYPO_RE = re.compile(r"^(s3|s3a|s3n|file|gs|gcs|http|https|az|abfs):(?!//)", re.IGNORECASE)  # s3:/b/k, file:/x


def normalize_uri(uri: str) -> str:
    """Canonical form: `s3://bucket/key` or `file:///abs/path` (no trailing slash, no `..`)."""
    if not isinstance(uri, str) or not uri.strip():
        raise PolicyError("an empty URI was given.")
    uri = uri.strip()
    # Split by hand, not with urlparse: '#', '?' and ';' are ordinary characters in file names and
    # object keys (VoxCeleb's crops are named id10001#<video>#<start>#<end>.mp4).
    m = _SCHEME_RE.match(uri)
    scheme, rest = (m.group(1).lower(), uri[m.end():]) if m else ("", uri)
    if not m and _TYPO_RE.match(uri):
        raise PolicyError(f"URI {uri!r} has a scheme without '//'; write s3://bucket/key or file:///path.")
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = uri
        if scheme == "file":
            netloc, _, tail = rest.partition("/")
            if netloc not in ("", "localhost"):
                raise PolicyError(f"file URI {uri!r} names a host; only local file:// paths are supported.")
            path = "/" + tail
        # realpath: a symlink inside an allowed folder that points elsewhere is judged by where it
        # points, so the URI policy cannot be walked around with a link.
        path = os.path.realpath(os.path.expanduser(path))
        return "file://" + path
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise PolicyError(f"S3 URI {uri!r} has no bucket.")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PolicyError(f"S3 URI {uri!r} contains '..'.")
        return f"s3://{bucket}/{'/'.join(parts)}".rstrip("/")
    raise PolicyError(
        f"URI scheme '{scheme}://' in {uri!r} is not supported; use s3://, file:// or a local path."
    )


def uri_scheme(uri: str) -> str:
    return normalize_uri(uri).split("://", 1)[0]


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def under_prefix(uri: str, prefix: str) -> bool:
    u, p = normalize_uri(uri), normalize_uri(prefix)
    return u == p or u.startswith(p.rstrip("/") + "/")


# Error types of the S3 client stacks (botocore, aiohttp, urllib3, s3fs) that mean the request
# did not complete: matched by name so this module imports none of them.
_TRANSIENT_TYPES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "ClientPayloadError", "ServerDisconnectedError",
    "ClientConnectionError", "ClientOSError", "IncompleteRead", "ProtocolError", "FSTimeoutError",
})
# errnos that s3fs and the OS use for "try again": s3fs maps 503/SlowDown to EBUSY.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                               errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE})
# Message markers, compared with everything but letters and digits removed, so that botocore's
# "SlowDown", pyarrow's "SLOW_DOWN" and a plain "slow down" all match.
_TRANSIENT_MARKERS = ("slowdown", "reduceyourrequestrate", "serviceunavailable", "throttl",
                      "requesttimeout", "timeout", "timedout", "internalerror", "internalfailure",
                      "badgateway", "connection", "resetbypeer", "brokenpipe", "incompleteread",
                      "serverdisconnected", "payloadisnotcompleted", "notenoughdata", "partialfile")
_TRANSIENT_STATUS = re.compile(r"\b50[0234]\b|\beof\b")


def _is_transient(exc: BaseException) -> bool:
    """Whether a failed storage call is worth retrying: throttling (503 SlowDown), 5xx, timeouts
    and connections dropped before or during a response, as s3fs/botocore/aiohttp and pyarrow's
    S3 filesystem report them. Missing objects and denied access are never transient."""
    seen = 0
    while exc is not None and seen < 4:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                            TooLargeError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(t.__name__ in _TRANSIENT_TYPES for t in type(exc).__mro__):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        text = f"{type(exc).__name__} {exc}".lower()
        compact = re.sub(r"[^a-z0-9]", "", text)
        if any(m in compact for m in _TRANSIENT_MARKERS) or _TRANSIENT_STATUS.search(text):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


_LOCAL_TMP = re.compile(r"^\..+\.tmp-\d+-\d+$")
_CHUNK = 8 << 20  # bytes per read of a capped local download


def _byte_cap(uri: str, limit: int, listed: int | None) -> Any:
    """An fsspec download callback that stops a download past `limit` bytes (see `download`): it
    raises once the response's announced length, or the bytes received so far, pass the limit."""
    from fsspec.callbacks import Callback

    class ByteCap(Callback):
        def call(self, hook_name: str | None = None, **kwargs: Any) -> None:
            if (self.size is not None and self.size > limit) or self.value > limit:
                raise TooLargeError(uri, limit, listed, during=True)

    return ByteCap()


@dataclass(frozen=True)
class StorageSettings:
    """What a worker needs to build its own Storage: plain values, resolved on the driver."""

    endpoint_url: str | None = None
    allowed_read: tuple[str, ...] = ()
    allowed_write: tuple[str, ...] = ()
    retries: int = 5
    unrestricted: bool = False  # local commands on paths the user named (validate, manifest build)

    @classmethod
    def from_config(cls, cfg: Any, endpoint_url: str | None) -> "StorageSettings":
        ap = cfg.storage.allowed_prefixes
        return cls(
            endpoint_url=endpoint_url,
            allowed_read=tuple(ap.read),
            allowed_write=tuple(ap.write),
            retries=cfg.storage.retries,
        )

# Local uploads are copied in chunks of this size, never read whole.
UPLOAD_CHUNK_BYTES = 1 << 20


def _replace_local(path: str, fill: Callable[[Any], Any]) -> None:
    """Write a local file through `fill(open file)` under a hidden temporary name beside it
    (`.NAME.tmp-PID-N`) and rename it into place, so a reader never sees a partial file."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{random.randrange(1 << 30)}")
    try:
        with open(tmp, "wb") as f:
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise



@dataclass
class Storage:
    settings: StorageSettings = field(default_factory=StorageSettings)
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        self._fs: dict[str, Any] = {}

    # ---- policy -------------------------------------------------------------------------------
    def check_read(self, uri: str) -> str:
        return self._check(uri, self.settings.allowed_read + self.settings.allowed_write, "read")

    def check_write(self, uri: str) -> str:
        return self._check(uri, self.settings.allowed_write, "write")

    def _check(self, uri: str, prefixes: Iterable[str], what: str) -> str:
        norm = normalize_uri(uri)
        if self.settings.unrestricted:
            return norm
        prefixes = list(prefixes)
        if not any(under_prefix(norm, p) for p in prefixes):
            shown = ", ".join(prefixes) if prefixes else "none configured"
            raise PolicyError(
                f"{norm} is outside storage.allowed_prefixes.{what} ({shown})."
            )
        return norm

    # ---- filesystems --------------------------------------------------------------------------
    def filesystem(self, uri: str) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it) for a URI."""
        norm = normalize_uri(uri)
        scheme, rest = norm.split("://", 1)
        fs = self._fs.get(scheme)
        if fs is None:
            import fsspec

            if scheme == "s3":
                kwargs: dict[str, Any] = {"skip_instance_cache": True}
                if self.settings.endpoint_url:
                    kwargs["endpoint_url"] = self.settings.endpoint_url
                fs = fsspec.filesystem("s3", **kwargs)
            else:
                fs = fsspec.filesystem("file")
            self._fs[scheme] = fs
        return fs, rest

    def arrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it), for Parquet reads and writes."""
        from pyarrow import fs as pafs

        norm = normalize_uri(uri)
        scheme, rest = norm.split("://", 1)
        if scheme == "s3":
            kwargs: dict[str, Any] = {}
            ep = self.settings.endpoint_url
            if ep:
                p = urlparse(ep)
                kwargs["endpoint_override"] = p.netloc or ep
                kwargs["scheme"] = p.scheme or "https"
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            if region:
                kwargs["region"] = region
            return pafs.S3FileSystem(**kwargs), rest
        return pafs.LocalFileSystem(), rest

    # ---- retries ------------------------------------------------------------------------------
    def retry(self, what: str, fn: Callable[[], T]) -> T:
        attempts = self.settings.retries + 1
        for i in range(attempts):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not _is_transient(e) or i == attempts - 1:
                    raise
                delay = self.backoff_s * (2**i) * (0.5 + random.random())
                log.warning("transient error on %s (%s); retry %d/%d in %.1fs",
                            what, type(e).__name__, i + 1, attempts - 1, delay)
                for fs in self._fs.values():
                    if hasattr(fs, "invalidate_cache"):
                        fs.invalidate_cache()
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ---- operations ---------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        self.check_read(uri)
        fs, p = self.filesystem(uri)
        return self.retry(f"exists {uri}", lambda: fs.exists(p))

    def info(self, uri: str) -> dict[str, Any]:
        self.check_read(uri)
        fs, p = self.filesystem(uri)
        return self.retry(f"info {uri}", lambda: fs.info(p))

    def identity(self, uri: str) -> str:
        """What identifies an object's content version: its ETag, else size + mtime."""
        info = self.info(uri)
        etag = info.get("ETag") or info.get("etag")
        if etag:
            return f"etag:{str(etag).strip(chr(34))}"
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return f"size:{info.get('size')}:mtime:{mtime}"

    def read_bytes(self, uri: str) -> bytes:
        self.check_read(uri)
        fs, p = self.filesystem(uri)
        return self.retry(f"read {uri}", lambda: fs.cat_file(p))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def download(self, uri: str, local_path: str, max_bytes: int | None = None) -> None:
        """Copy an object to a local file. With `max_bytes`, an object listed as larger is refused
        before any byte is fetched, and a download that delivers more than that (a size that lied,
        or an object replaced meanwhile) is cut off as it passes the limit; either raises
        TooLargeError and leaves no partial file."""
        self.check_read(uri)
        fs, p = self.filesystem(uri)
        if max_bytes is None:
            self.retry(f"download {uri}", lambda: fs.get_file(p, local_path))
            return
        listed = self.info(uri).get("size")
        if listed is not None and int(listed) > max_bytes:
            raise TooLargeError(uri, max_bytes, int(listed), during=False)
        listed = None if listed is None else int(listed)

        def _capped() -> None:
            if uri_scheme(uri) == "s3":
                # s3fs streams the body in chunks and reports each to the callback, which raises
                # (ending the download) once the response's length or the bytes received pass the cap.
                fs.get_file(p, local_path, callback=_byte_cap(uri, max_bytes, listed))
                return
            got = 0
            with fs.open(p, "rb") as src, open(local_path, "wb") as dst:
                while chunk := src.read(min(_CHUNK, max_bytes + 1 - got)):
                    got += len(chunk)
                    if got > max_bytes:
                        raise TooLargeError(uri, max_bytes, listed, during=True)
                    dst.write(chunk)

        try:
            self.retry(f"download {uri}", _capped)
        except TooLargeError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local_path)
            raise

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object. On local disk it is written to a hidden temporary name beside it
        (`.NAME.tmp-PID-N`) and renamed, so a reader never sees a partial file; a process killed
        mid-write can leave only such a hidden file, which `list` never returns. On S3 an object
        appears whole or not at all: s3fs sends objects under 100 MiB in one PUT, and a larger
        (multipart) upload becomes visible only when completed; one killed mid-way leaves invisible
        parts, which a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes."""
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if uri_scheme(uri) == "file":
            self.retry(f"write {uri}", lambda: _replace_local(p, lambda f: f.write(data)))
        else:
            self.retry(f"write {uri}", lambda: fs.pipe_file(p, data))

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def upload(self, local_path: str, uri: str) -> None:
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if uri_scheme(uri) == "file":  # streamed (a model file can be gigabytes), renamed into place whole

            def copy(dst: Any) -> None:
                with open(local_path, "rb") as src:
                    shutil.copyfileobj(src, dst, UPLOAD_CHUNK_BYTES)

            self.retry(f"upload {uri}", lambda: _replace_local(p, copy))
        else:
            self.retry(f"upload {uri}", lambda: fs.put_file(local_path, p))

    def delete(self, uri: str) -> None:
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if self.retry(f"exists {uri}", lambda: fs.exists(p)):
            self.retry(f"delete {uri}", lambda: fs.rm_file(p))

    def probe_write(self, prefix: str) -> None:
        """Write and delete a small object directly under `prefix`, so that a run whose output
        is not writable (access denied, no such bucket) is refused before any work starts.
        Raises what the write raised; a probe that cannot be deleted is left, with a warning."""
        import uuid

        uri = join(normalize_uri(prefix), f".corpus-anon-write-probe-{uuid.uuid4().hex[:12]}")
        self.write_bytes(uri, b"corpus-anon write probe\n")
        try:
            self.delete(uri)
        except Exception as e:  # noqa: BLE001 - writing works, which is what was asked
            log.warning("could not delete the write probe %s (%s)", uri, type(e).__name__)

    def list(self, prefix: str, suffixes: tuple[str, ...] = ()) -> list[str]:
        """Every object under a prefix (recursively), as full URIs, sorted."""
        self.check_read(prefix)
        norm = normalize_uri(prefix)
        scheme = norm.split("://", 1)[0]
        fs, p = self.filesystem(norm)
        if not self.retry(f"exists {prefix}", lambda: fs.exists(p)):
            return []
        found = self.retry(f"list {prefix}", lambda: fs.find(p))
        out = []
        for f in found:
            if suffixes and not f.lower().endswith(suffixes):
                continue
            if scheme == "file" and _LOCAL_TMP.match(os.path.basename(f)):
                continue  # a write that never finished (see write_bytes)
            out.append(f"{scheme}://{f}" if scheme == "s3" else "file://" + f)
        return sorted(out)

    def verify(self, uri: str, size: int, sha256: str) -> None:
        """Read an object back and check its size and sha256; raise StorageError if they differ."""
        data = self.read_bytes(uri)
        got = hashlib.sha256(data).hexdigest()
        if len(data) != size or got != sha256:
            raise StorageError(
                f"verification of {uri} failed: {len(data)} bytes sha256 {got[:12]}, "
                f"expected {size} bytes sha256 {sha256[:12]}."
            )


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(storage: Storage, uri: str) -> Any:
    """The JSON document at `uri`, or None when there is no object there."""
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
