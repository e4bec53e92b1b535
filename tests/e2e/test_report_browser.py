"""report.html in headless Chromium: it loads without console errors, fetches nothing but itself,
and every embedded image decodes.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
separated by NUL bytes, written to the browser's fd 3 and read from its fd 4), so the test needs
only the standard library and the `chromium` binary (`make test` installs Debian's package when it
runs as root; set CHROMIUM to use another build). It skips when no Chromium is found.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

from corpus_anon.run.report import write_report
from tests.test_report import EVIL_CLIP, make_run

pytestmark = pytest.mark.e2e

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


SHIM = "import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); " \
       "os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])"


class Browser:
    """A minimal DevTools client over --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: str) -> None:
        to_r, self._to_w = os.pipe()  # the browser reads commands on fd 3
        self._from_r, from_w = os.pipe()  # and writes replies and events on fd 4
        # The browser's ends, moved to fds >= 10 so that a small Python shim (a fresh process, no
        # preexec_fn: this one may have threads) can put them at 3 and 4 and exec the browser.
        a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r)
        os.close(from_w)
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "about:blank"]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SHIM, str(a), str(b), *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(a, b))
        finally:
            os.close(a)
            os.close(b)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_r], [], [], left)
            if ready:
                chunk = os.read(self._from_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                    raise RuntimeError(f"Chromium closed the DevTools pipe. {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next += 1
        msg: dict = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - killed below
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_w)
        os.close(self._from_r)


CHECK_IMAGES = """(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return JSON.stringify({
    n: imgs.length,
    bad: imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt),
    heights: Array.from(new Set(imgs.map(i => i.naturalHeight))),
    svgs: document.querySelectorAll('svg').length,
    cards: Array.from(document.querySelectorAll('.card h4')).map(h => h.textContent),
    title: document.title,
  });
})()"""


def test_report_renders_in_headless_chromium(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome, or CHROMIUM=path); "
                    "`make test` installs Debian's chromium when it runs as root")
    storage, layout, root = make_run(tmp_path / "run", unenhanced=True)
    write_report(storage, layout, max_embedded=2)
    url = "file://" + str(root / "report.html")

    b = Browser(binary, str(tmp_path / "profile"))
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=session)
        b.send("Page.navigate", {"url": url}, session=session)
        b.wait_event("Page.loadEventFired")
        result = b.send("Runtime.evaluate", {"expression": CHECK_IMAGES, "awaitPromise": True,
                                             "returnByValue": True}, session=session)
        assert "exceptionDetails" not in result, result
        state = json.loads(result["result"]["value"])
        b.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
        events = list(b.events)
    finally:
        b.close()

    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events
               if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert")]
    errors += [e["params"]["entry"] for e in events
               if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"]
    assert errors == [], errors
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(u == url or u.startswith("data:") for u in requested), requested
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    assert failed == [], failed

    # 4 clips in the sheet (2 worst + 2 random); the one whose files are gone shows placeholders,
    # the others 3 frames of original | anonymized (| no enhancement for s1_b), all decoded.
    assert state["title"].startswith("corpus-anon run") and state["svgs"] == 4
    assert state["cards"][0].endswith("s1_b") and any(c.endswith(EVIL_CLIP) for c in state["cards"])
    assert state["n"] == 3 * 2 * 3 + 3 and state["bad"] == [] and state["heights"] == [160]
