import os

import pytest

from corpus_anon.storage import PolicyError, Storage, StorageSettings, normalize_uri, under_prefix


def test_normalize_uri(tmp_path):
    assert normalize_uri("s3://b/k//x/./y/") == "s3://b/k/x/y"
    assert normalize_uri(str(tmp_path / "a")) == f"file://{tmp_path}/a"
    assert normalize_uri(f"file://{tmp_path}/a/../b") == f"file://{tmp_path}/b"
    for bad in ("http://x/y", "gs://b/k", "ftp://h/f", "s3:///nobucket", ""):
        with pytest.raises(PolicyError):
            normalize_uri(bad)
    with pytest.raises(PolicyError, match=r"'\.\.'"):
        normalize_uri("s3://b/a/../../other")


def test_prefix_boundaries():
    assert under_prefix("s3://b/data/x.mp4", "s3://b/data")
    assert under_prefix("s3://b/data/x.mp4", "s3://b/data/")
    assert not under_prefix("s3://b/data2/x.mp4", "s3://b/data")
    assert not under_prefix("file:///etc/passwd", "file:///data")


def test_policy_read_write(tmp_path):
    st = Storage(StorageSettings(allowed_read=(str(tmp_path / "in"),), allowed_write=(str(tmp_path / "out"),)))
    st.check_read(str(tmp_path / "in" / "a.mp4"))
    st.check_read(str(tmp_path / "out" / "x"))  # outputs are readable (verification)
    with pytest.raises(PolicyError, match="allowed_prefixes.write"):
        st.check_write(str(tmp_path / "in" / "a.mp4"))
    with pytest.raises(PolicyError, match="allowed_prefixes.read"):
        st.read_bytes("/etc/passwd")
    empty = Storage()
    with pytest.raises(PolicyError, match="none configured"):
        empty.check_read(str(tmp_path))


def test_local_write_is_atomic_and_verified(tmp_path):
    st = Storage(StorageSettings(allowed_write=(str(tmp_path),)))
    uri = str(tmp_path / "d" / "f.bin")
    st.write_bytes(uri, b"hello")
    assert open(uri, "rb").read() == b"hello"
    assert [f for f in os.listdir(tmp_path / "d")] == ["f.bin"]
    import hashlib

    st.verify(uri, 5, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(OSError, match="verification"):
        st.verify(uri, 5, "0" * 64)
    assert st.list(str(tmp_path)) == [f"file://{tmp_path}/d/f.bin"]


def test_retry_transient_only():
    st = Storage(StorageSettings(retries=3), backoff_s=0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert st.retry("flaky", flaky) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        st.retry("missing", missing)
    assert len(calls) == 1

    def always():
        raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        st.retry("always", always)
