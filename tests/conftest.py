"""Shared fixtures. Ray and the S3 server start once per session, only for tests that use them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# Tests run Ray without token auth (see STACK.md); real clusters keep it on.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Any credentials work against moto; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
# A distinctive secret key, so tests can check that credentials never reach an output or a log.
AWS_TEST_SECRET_KEY = "moto-secret-key-that-must-never-be-written-7f3a"
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", AWS_TEST_SECRET_KEY)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a real HTTP server, as s3fs's own tests use)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3(s3_endpoint):
    """A clean S3 server for one test, with an s3fs filesystem pointed at it."""
    import s3fs

    urllib.request.urlopen(urllib.request.Request(s3_endpoint + "/moto-api/reset", method="POST"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    return s3_endpoint, fs


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on loopback; in-process runs join it through RAY_ADDRESS, jobs through
    its dashboard. Stopped at the end of the session."""
    port, dash = free_port(), free_port()
    temp = str(tmp_path_factory.mktemp("ray"))
    ray_bin = os.path.join(BIN, "ray")
    # Jobs run `python ...` from the cluster's PATH: make it this environment's Python, as an
    # activated venv or a cluster image would.
    os.environ["PATH"] = BIN + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ)
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 60)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            os.environ.pop("RAY_ADDRESS", None)
            _stop_own_cluster(temp, ray_bin, env, address)
            shutil.rmtree(temp, ignore_errors=True)


def _stop_own_cluster(temp: str, ray_bin: str, env: dict, address: str) -> None:
    """Stop only this session's Ray (the processes started with its --temp-dir or pointed at its
    GCS address, e.g. the Ray client server, and their descendants): `ray stop --force` would
    stop every Ray on the machine, other runs included."""
    import signal

    if not os.path.isdir("/proc"):
        subprocess.run([ray_bin, "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        return
    parents: dict[int, int] = {}
    own: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if temp.encode() in cmdline or f"--address={address}\0".encode() in cmdline:
                own.add(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    grew = True
    while grew:  # add every descendant (workers are started by the raylet)
        grew = False
        for pid, ppid in parents.items():
            if ppid in own and pid not in own:
                own.add(pid)
                grew = True
    own.discard(os.getpid())
    for pid in own:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.5)
