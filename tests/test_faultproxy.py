"""The fault-injecting proxy (tests/faultproxy.py) against a tiny in-process upstream."""

from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faultproxy import FaultProxy, Rule, split_bucket_key


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with JSON describing it (method, path, body, selected headers)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"method": self.command, "path": self.path, "body": body.decode(),
                          "host": self.headers.get("Host"), "x": self.headers.get("X-Test"),
                          "te": self.headers.get("Transfer-Encoding")}).encode()
        if self.path.endswith("/big"):
            out = b"z" * 10000
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@pytest.fixture
def upstream():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _req(proxy, method, path, body=None, headers=None, timeout=10):
    host, port = proxy.url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = headers or {}
        c.request(method, path, body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_forwards_methods_bodies_and_headers(upstream):
    with FaultProxy(upstream) as px:
        st, hd, data = _req(px, "PUT", "/bkt/a/b.txt?x-id=PutObject", b"hello", {"X-Test": "1", "Host": "h:1"})
        got = json.loads(data)
        assert st == 200 and got == {"method": "PUT", "path": "/bkt/a/b.txt?x-id=PutObject", "body": "hello",
                                     "host": "h:1", "x": "1", "te": None}
        assert hd["ETag"] == '"abc"'
        st, hd, data = _req(px, "HEAD", "/bkt/a/b.txt")
        assert st == 200 and data == b"" and int(hd["Content-Length"]) > 0
        # A chunked request body reaches the server whole, with a Content-Length.
        st, _, data = _req(px, "PUT", "/bkt/c", iter([b"ab", b"cd"]), {"Transfer-Encoding": "chunked"})
        assert json.loads(data)["body"] == "abcd"
        assert px.requests == 3 and px.injected == 0


def test_slowdown_and_access_denied_answer_s3_errors(upstream):
    rules = [Rule("deny", bucket="bkt", prefix="private/"), Rule("slowdown", methods=("GET",))]
    with FaultProxy(upstream, rules) as px:
        st, hd, data = _req(px, "PUT", "/bkt/private/k")
        assert st == 403 and b"<Code>AccessDenied</Code>" in data and hd["Content-Type"] == "application/xml"
        st, _, data = _req(px, "PUT", "/bkt/public/k")
        assert st == 200
        st, _, data = _req(px, "GET", "/bkt/public/k")
        assert st == 503 and b"<Code>SlowDown</Code>" in data and b"reduce your request rate" in data
        st, _, data = _req(px, "HEAD", "/other/x")
        assert st == 200
        assert px.counts == {"deny": 1, "slowdown": 1} and px.injected == 2
        assert px.events == [("deny", "PUT", "bkt", "private/k"), ("slowdown", "GET", "bkt", "public/k")]


def test_dropped_connections(upstream):
    with FaultProxy(upstream, [Rule("drop", prefix="gone"), Rule("drop_mid_body", prefix="big"),
                               Rule("drop_after", methods=("PUT",))]) as px:
        with pytest.raises(http.client.RemoteDisconnected):
            _req(px, "GET", "/bkt/gone")
        with pytest.raises(http.client.IncompleteRead) as ei:
            _req(px, "GET", "/bkt/big")
        assert len(ei.value.partial) == 5000  # half the body, then the connection is closed
        with pytest.raises(http.client.RemoteDisconnected):
            _req(px, "PUT", "/bkt/k", b"x")
        assert px.counts == {"drop": 1, "drop_mid_body": 1, "drop_after": 1}


def test_rates_are_seeded_and_limits_hold(upstream):
    def decisions(seed):
        px = FaultProxy(upstream, [Rule("slowdown", rate=0.2)], seed=seed)
        return [px.decide("GET", f"/bkt/k{i % 50}", None)[1] for i in range(1000)]

    a, b, c = decisions(1), decisions(1), decisions(2)
    assert a == b and a != c  # repeatable, and the seed matters
    assert 150 < a.count("slowdown") < 250
    # A retried request (same method and path) gets a fresh draw, so it eventually passes.
    px = FaultProxy(upstream, [Rule("slowdown", rate=0.5)], seed=3)
    assert None in [px.decide("GET", "/bkt/same", None)[1] for _ in range(20)]
    px = FaultProxy(upstream, [Rule("deny", limit=2)])
    assert [px.decide("GET", "/bkt/k", None)[1] for _ in range(4)] == ["deny", "deny", None, None]
    assert px.counts == {"deny": 2} and px.requests == 4


def test_delay_and_stop_releases_waiters(upstream):
    px = FaultProxy(upstream, [Rule("delay", prefix="slow", delay_s=0.3), Rule("delay", prefix="hang", delay_s=60)])
    px.start()
    try:
        t0 = time.time()
        assert _req(px, "GET", "/bkt/slow")[0] == 200
        assert 0.3 <= time.time() - t0 < 5
        assert _req(px, "GET", "/bkt/fast")[0] == 200
        errors = []

        def hang():
            try:
                _req(px, "GET", "/bkt/hang", timeout=30)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=hang)
        t.start()
        time.sleep(0.3)
        t0 = time.time()
    finally:
        px.stop()
    t.join(10)
    assert not t.is_alive() and time.time() - t0 < 5
    assert len(errors) == 1  # the hung request was closed, not answered
    assert px.counts == {"delay": 2}


def test_split_bucket_key():
    assert split_bucket_key("/bkt/a/b%20c.mp4?x=1", "127.0.0.1:9000") == ("bkt", "a/b c.mp4")
    assert split_bucket_key("/bkt", "localhost:9000") == ("bkt", "")
    assert split_bucket_key("/", "127.0.0.1:1") == (None, "")
    assert split_bucket_key("/a/b.mp4", "bkt.s3.example.com") == ("bkt", "a/b.mp4")
    with pytest.raises(ValueError):
        Rule("explode")
