"""Every byte the project reads or writes goes through here: fsspec (s3fs, local) and pyarrow
filesystems made in one place, retries with backoff on transient faults, and the URI policy.

URIs are `s3://bucket/key`, `file:///abs/path` or a plain local path. Plain paths are made
absolute and treated as `file://`. Only these schemes are installed and tested.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
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


def normalize_uri(uri: str) -> str:
    """Canonical form: `s3://bucket/key` or `file:///abs/path` (no trailing slash, no `..`)."""
    if not isinstance(uri, str) or not uri.strip():
        raise PolicyError("an empty URI was given.")
    uri = uri.strip()
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise PolicyError(f"file URI {uri!r} names a host; only local file:// paths are supported.")
        path = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
        return "file://" + path
    if scheme == "s3":
        if not parsed.netloc:
            raise PolicyError(f"S3 URI {uri!r} has no bucket.")
        key = parsed.path.lstrip("/")
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PolicyError(f"S3 URI {uri!r} contains '..'.")
        return f"s3://{parsed.netloc}/{'/'.join(parts)}".rstrip("/")
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


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("slowdown", "503", "500 ", "internal error", "throttl", "timeout", "timed out",
               "connection", "reset by peer", "serviceunavailable", "requesttimeout", "broken pipe",
               "incomplete read", "server disconnected", "eof")
    return any(m in text for m in markers)


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

    def download(self, uri: str, local_path: str) -> None:
        self.check_read(uri)
        fs, p = self.filesystem(uri)
        self.retry(f"download {uri}", lambda: fs.get_file(p, local_path))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object. On local disk it is written to a temporary name and renamed, so a
        reader never sees a partial file; S3 PUTs are atomic already."""
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if uri_scheme(uri) == "file":
            def _local() -> None:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                tmp = f"{p}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, p)
            self.retry(f"write {uri}", _local)
        else:
            self.retry(f"write {uri}", lambda: fs.pipe_file(p, data))

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def upload(self, local_path: str, uri: str) -> None:
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if uri_scheme(uri) == "file":
            with open(local_path, "rb") as f:
                self.write_bytes(uri, f.read())
        else:
            self.retry(f"upload {uri}", lambda: fs.put_file(local_path, p))

    def delete(self, uri: str) -> None:
        self.check_write(uri)
        fs, p = self.filesystem(uri)
        if self.retry(f"exists {uri}", lambda: fs.exists(p)):
            self.retry(f"delete {uri}", lambda: fs.rm_file(p))

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
