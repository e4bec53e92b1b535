"""A small Hugging Face Hub stand-in on 127.0.0.1 for `models fetch` tests (stdlib only).

It answers the requests `huggingface_hub`'s `hf_hub_download` makes, as the hub does:

    HEAD/GET {hub}/{org}/{name}/resolve/{revision}/{path}
        a file kept in git:  200, ETag = its git blob id, X-Repo-Commit, Content-Length (GET: the bytes)
        an LFS file:         302 to {cdn}/{sha256} with X-Repo-Commit, X-Linked-Etag = its sha256 and
                             X-Linked-Size (the CDN is another origin, so the client reads the metadata
                             from the redirect and downloads from the CDN)
        404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound otherwise
    GET/HEAD {cdn}/{sha256} and {cdn}/{any path it serves}: the bytes, with Range support (206)

`revision` is the repository's commit or "main". Faults per file (by repo and path, or URL path):
`get500` answers GET with HTTP 500 and `corrupt` sends the bytes with the last one changed (both while
set); `drop_mid_body` sends the headers and half the body once, then closes the connection. `requests` records (server, method, path, range) of every request.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".tar", ".onnx", ".dat", ".ckpt")


def _corrupt(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class HubServer:
    """`files[(repo, path)] = bytes`, `commits[repo] = commit`, `urls[path] = bytes` (plain files on the CDN)."""

    files: dict[tuple[str, str], bytes]
    commits: dict[str, str]
    urls: dict[str, bytes] = field(default_factory=dict)
    faults: dict[object, str] = field(default_factory=dict)  # (repo, path) or url path -> fault
    requests: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    any_revision: bool = False  # answer every revision with the repository's one commit (a stale mirror)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs = {hashlib.sha256(b).hexdigest(): b for b in self.files.values()}
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def __enter__(self) -> "HubServer":
        for srv in (self._hub, self._cdn):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._lock:
            return sum(1 for _, m, p, _ in self.requests if (method is None or m == method) and contains in p)

    def _take_fault(self, key: object) -> str | None:
        with self._lock:
            fault = self.faults.get(key)
            if fault == "drop_mid_body":
                del self.faults[key]  # once
            return fault

    def _handler(self, which: str) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                with server._lock:
                    server.requests.append((which, self.command, self.path, self.headers.get("Range")))
                if which == "hub":
                    self._hub(head)
                else:
                    self._cdn(head)

            def _error(self, status: int, code: str | None = None, commit: str | None = None) -> None:
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _hub(self, head: bool) -> None:
                parts = self.path.split("?", 1)[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, revision, path = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
                commit = server.commits.get(repo)
                if commit is None:
                    return self._error(404, "RepoNotFound")
                if revision not in (commit, "main") and not server.any_revision:
                    return self._error(404, "RevisionNotFound")
                data = server.files.get((repo, path))
                if data is None:
                    return self._error(404, "EntryNotFound", commit)
                if path.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    self.send_response(302)
                    self.send_header("Location", f"{server.cdn_url}/{sha}")
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("ETag", f'"{git_blob_id(sha.encode())}"')  # the pointer's id, as the hub
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fault = None if head else server._take_fault((repo, path))
                if fault == "get500":
                    return self._error(500)
                self._body(_corrupt(data) if fault == "corrupt" else data, head,
                           {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": commit}, (repo, path))

            def _cdn(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                data = server._blobs.get(path.lstrip("/"))
                key: object = path
                if data is not None:
                    key = next(k for k, v in server.files.items() if v is data)
                else:
                    data = server.urls.get(path)
                if data is None:
                    return self._error(404)
                fault = None if head else server._take_fault(key)
                if fault == "get500":
                    return self._error(500)
                self._body(_corrupt(data) if fault == "corrupt" else data, head, {}, key,
                           drop=fault == "drop_mid_body")

            def _body(self, data: bytes, head: bool, headers: dict[str, str], key: object, drop: bool = False) -> None:
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not head:
                    start = int(rng[len("bytes="):].split("-", 1)[0] or 0)
                body = data[start:]
                self.send_response(206 if start else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                if drop:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler
