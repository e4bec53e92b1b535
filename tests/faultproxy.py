"""A small fault-injecting HTTP proxy for S3 tests (stdlib only).

It runs in-process on 127.0.0.1 in front of an S3 server (moto) and forwards every request, except
those a rule picks:

    slowdown       answer `503 SlowDown` with S3's XML error body (nothing reaches the server)
    deny           answer `403 AccessDenied` with S3's XML error body (nothing reaches the server)
    drop           close the connection without any response (nothing reaches the server)
    drop_after     forward, then close the connection without a response (the request took effect,
                   its answer is lost)
    drop_mid_body  forward, send the status line, headers and half the body, then close
    delay          wait `delay_s` before forwarding (then later rules still apply); `stop()` ends
                   every wait at once

A rule matches by HTTP method, bucket, key prefix and key substring, and fires for a share `rate` of the requests
it matches, at most `limit` times. Whether it fires is decided by a seeded hash of (seed, rule,
method, path with query, how many times this rule has seen that request before), not by a shared
random stream: the same requests get the same faults whatever the threads' interleaving, and a
retried request gets a fresh draw. `counts` (per kind), `events` and `requests` tell a test what was
really injected.

    with FaultProxy(upstream, [Rule("slowdown", rate=0.2)], seed=7) as proxy:
        ... endpoint_url=proxy.url ...
        assert proxy.counts["slowdown"] > 0
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import unquote, urlsplit

KINDS = ("slowdown", "deny", "drop", "drop_after", "drop_mid_body", "delay")
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "expect", "content-length"}
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "deny": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass(frozen=True)
class Rule:
    kind: str
    rate: float = 1.0
    bucket: str | None = None
    prefix: str | None = None  # key prefix inside `bucket` (or any bucket when bucket is None)
    contains: str | None = None  # a substring of the key, e.g. "/clips/"
    methods: tuple[str, ...] | None = None  # e.g. ("GET",); None = every method
    delay_s: float = 0.0
    limit: int | None = None  # fire at most this many times

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")

    def matches(self, method: str, bucket: str | None, key: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.bucket is not None and bucket != self.bucket:
            return False
        if self.prefix is not None and not key.startswith(self.prefix):
            return False
        if self.contains is not None and self.contains not in key:
            return False
        return True


def split_bucket_key(path: str, host: str | None = None) -> tuple[str | None, str]:
    """(bucket, key) of an S3 request path (path-style, or virtual-hosted from the Host header)."""
    parts = urlsplit(path)
    p = unquote(parts.path)
    hostname = (host or "").rsplit(":", 1)[0]
    if hostname and hostname.count(".") >= 1 and not hostname.replace(".", "").isdigit() \
            and not hostname.startswith("localhost"):
        return hostname.split(".", 1)[0], p.lstrip("/")  # virtual-hosted style
    p = p.lstrip("/")
    if not p:
        return None, ""
    bucket, _, key = p.partition("/")
    return bucket, key


class FaultProxy:
    """The proxy server. `start()` (or `with`) binds a free port on 127.0.0.1; `url` is its endpoint."""

    def __init__(self, upstream: str, rules: Iterable[Rule] = (), seed: int = 0,
                 upstream_timeout: float = 60.0) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (u.hostname, u.port or 80)
        self.seed = seed
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rules: list[Rule] = list(rules)
        self._seen: Counter = Counter()
        self._fired: Counter = Counter()
        self.counts: Counter = Counter()
        self.events: list[tuple[str, str, str | None, str]] = []
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Replace the rules (counters are kept; `reset()` clears them)."""
        with self._lock:
            self._rules = list(rules)
            self._fired.clear()

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()
            self._fired.clear()
            self.counts.clear()
            self.events.clear()
            self.requests = 0

    @property
    def injected(self) -> int:
        """Faults injected so far (delays included)."""
        with self._lock:
            return sum(self.counts.values())

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.request_queue_size = 128
        self._server = server
        self._stop.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release every delayed request at once."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- decisions ------------------------------------------------------------------------------
    def decide(self, method: str, path: str, host: str | None) -> tuple[float, str | None]:
        """(delay seconds, terminal fault kind or None) for one request; updates the counters."""
        bucket, key = split_bucket_key(path, host)
        delay, action = 0.0, None
        with self._lock:
            self.requests += 1
            for i, rule in enumerate(self._rules):
                if not rule.matches(method, bucket, key):
                    continue
                n = self._seen[(i, method, path)]
                self._seen[(i, method, path)] += 1
                if rule.limit is not None and self._fired[i] >= rule.limit:
                    continue
                h = hashlib.sha256(f"{self.seed}|{i}|{method}|{path}|{n}".encode()).digest()
                if int.from_bytes(h[:8], "big") / 2**64 >= rule.rate:
                    continue
                self._fired[i] += 1
                self.counts[rule.kind] += 1
                self.events.append((rule.kind, method, bucket, key))
                if rule.kind == "delay":
                    delay += rule.delay_s
                    continue
                action = rule.kind
                break
        return delay, action


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that reset or time out mid-request are expected here; do not print them


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` is answered for us

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                f"</Message><RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>").encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "faultproxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.owner.upstream
        conn = http.client.HTTPConnection(host, port, timeout=self.owner.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP:
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _proxy(self) -> None:
        owner = self.owner
        try:
            body = self._read_body()
            delay, action = owner.decide(self.command, self.path, self.headers.get("Host"))
            if delay and owner._stop.wait(delay):
                return self._drop()  # the proxy is stopping
            if action == "drop":
                return self._drop()
            if action in _ERRORS:
                return self._error(action)
            status, reason, headers, data = self._forward(body)
            if action == "drop_after" or (action == "drop_mid_body" and (len(data) < 2 or self.command == "HEAD")):
                return self._drop()
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in _HOP or (k.lower() == "content-length" and self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD" and status >= 200 and status not in (204, 304):
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if action == "drop_mid_body":
                self.wfile.write(data[: len(data) // 2])
                return self._drop()
            self.wfile.write(data)
        except (OSError, http.client.HTTPException):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy
