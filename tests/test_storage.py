import os

import pytest

from corpus_anon.io.storage import PolicyError, Storage, StorageSettings, normalize_uri, under_prefix


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


def test_a_symlink_cannot_walk_out_of_an_allowed_prefix(tmp_path):
    (tmp_path / "in").mkdir()
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    (secret_dir / "x.mp4").write_bytes(b"not yours")
    os.symlink(secret_dir, tmp_path / "in" / "link")
    st = Storage(StorageSettings(allowed_read=(str(tmp_path / "in"),)))
    with pytest.raises(PolicyError, match="private/x.mp4 is outside storage.allowed_prefixes.read"):
        st.read_bytes(str(tmp_path / "in" / "link" / "x.mp4"))


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


def test_transient_classification_of_client_errors():
    import errno

    from corpus_anon.io.storage import _is_transient

    transient = [
        OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs: 503 SlowDown
        OSError(errno.EBUSY, "Service Unavailable"),  # s3fs: 503 on HEAD (no body)
        OSError("When uploading part for key 'k' in bucket 'b': AWS Error SLOW_DOWN during UploadPart "
                "operation: Please reduce your request rate."),  # pyarrow
        OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation: "),  # pyarrow
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 18, Transferred a "
                "partial file"),  # pyarrow, connection dropped mid-body
        ConnectionResetError("reset by peer"),
        TimeoutError("timed out"),
    ]
    from aiohttp import ClientPayloadError
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    transient += [ClientPayloadError("Response payload is not completed"),
                  ConnectionClosedError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x")]
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = OSError(errno.EBUSY, "Please reduce your request rate.")
    transient.append(wrapped)
    for e in transient:
        assert _is_transient(e), repr(e)
    for e in [PermissionError("Access Denied"), FileNotFoundError("k"), ValueError("bad value"),
              OSError(errno.EINVAL, "The specified bucket is not valid."),
              OSError("AWS Error ACCESS_DENIED during GetObject operation: ")]:
        assert not _is_transient(e), repr(e)


def test_s3_client_faults_through_the_proxy_are_classified(s3):
    """The exceptions s3fs/botocore/aiohttp and pyarrow's S3 filesystem really raise for 503
    SlowDown and dropped connections are transient; 403 is not. Client-side retries are turned off
    here so that each fault surfaces."""
    import s3fs
    from pyarrow import fs as pafs

    from corpus_anon.io.storage import _is_transient
    from tests.faultproxy import FaultProxy, Rule

    endpoint, fs = s3
    fs.mkdir("flt")
    fs.pipe("flt/k/a.bin", b"x" * 20000)
    with FaultProxy(endpoint) as px:
        sfs = s3fs.S3FileSystem(endpoint_url=px.url, skip_instance_cache=True,
                                config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
        sfs.retries = 1
        afs = pafs.S3FileSystem(endpoint_override=px.url.removeprefix("http://"), scheme="http",
                                region="us-east-1", retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        ops = {
            "s3fs GET": lambda: sfs.cat_file("flt/k/a.bin"), "s3fs HEAD": lambda: sfs.info("flt/k/a.bin"),
            "s3fs PUT": lambda: sfs.pipe_file("flt/k/b.bin", b"y"),
            "arrow GET": lambda: afs.open_input_file("flt/k/a.bin").read(),
            "arrow HEAD": lambda: afs.get_file_info("flt/k/a.bin").size,
        }
        methods = {"GET": ("GET",), "HEAD": ("HEAD",), "PUT": ("PUT",)}
        for kind, want in (("slowdown", True), ("drop", True), ("drop_mid_body", True), ("deny", False)):
            for name, op in ops.items():
                verb = name.split()[1]
                if kind == "drop_mid_body" and verb != "GET":
                    continue
                px.set_rules([Rule(kind, bucket="flt", methods=methods[verb])])
                with pytest.raises(Exception) as ei:
                    op()
                assert _is_transient(ei.value) is want, (kind, name, repr(ei.value))
        assert set(px.counts) == {"slowdown", "drop", "drop_mid_body", "deny"}


def test_storage_retries_through_faults(s3):
    from corpus_anon.io.storage import StorageSettings
    from tests.faultproxy import FaultProxy, Rule

    endpoint, fs = s3
    fs.mkdir("flt")
    rules = [Rule("slowdown", bucket="flt", methods=("PUT",), limit=2),
             Rule("drop_mid_body", bucket="flt", methods=("GET",), limit=2),
             Rule("drop", bucket="flt", methods=("HEAD",), limit=2)]
    with FaultProxy(endpoint, rules) as px:
        st = Storage(StorageSettings(endpoint_url=px.url, allowed_write=("s3://flt",)), backoff_s=0.01)
        st.write_bytes("s3://flt/a/b.bin", b"q" * 5000)
        assert st.read_bytes("s3://flt/a/b.bin") == b"q" * 5000
        assert st.exists("s3://flt/a/b.bin")
        assert px.counts == {"slowdown": 2, "drop_mid_body": 2, "drop": 2}


def test_probe_write_leaves_nothing(tmp_path, s3):
    from corpus_anon.io.storage import StorageSettings
    from tests.faultproxy import FaultProxy, Rule

    st = Storage(StorageSettings(allowed_write=(str(tmp_path),)))
    st.probe_write(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(PolicyError):
        st.probe_write("/elsewhere")
    endpoint, fs = s3
    fs.mkdir("prb")
    with FaultProxy(endpoint) as px:
        s3st = Storage(StorageSettings(endpoint_url=px.url, allowed_write=("s3://prb",)))
        s3st.probe_write("s3://prb/runs")
        fs.invalidate_cache()
        assert fs.find("prb") == []
        px.set_rules([Rule("deny", bucket="prb", methods=("PUT",))])
        with pytest.raises(PermissionError):
            s3st.probe_write("s3://prb/runs")


def test_local_write_killed_midway_leaves_no_visible_object(tmp_path, monkeypatch):
    import builtins

    st = Storage(StorageSettings(allowed_write=(str(tmp_path),)))
    clips = tmp_path / "clips"
    st.write_bytes(str(clips / "a.mp4"), b"whole")
    # What a writer killed between open() and rename leaves behind: a hidden temporary name.
    (clips / f".b.mp4.tmp-{os.getpid()}-123").write_bytes(b"part")
    assert st.list(str(tmp_path)) == [f"file://{clips}/a.mp4"]
    assert st.list(str(tmp_path), (".mp4",)) == [f"file://{clips}/a.mp4"]

    # A write that fails (rather than being killed) removes its temporary file.
    class Boom(Exception):
        pass

    real_open = builtins.open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and ".tmp-" in str(path):
            f.close()
            raise Boom()
        return f

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(Boom):
        st.write_bytes(str(clips / "c.mp4"), b"x")
    monkeypatch.undo()
    assert sorted(os.listdir(clips)) == [f".b.mp4.tmp-{os.getpid()}-123", "a.mp4"]


def test_hash_question_mark_and_semicolon_are_part_of_names(tmp_path):
    from corpus_anon.io.storage import normalize_uri

    assert normalize_uri("s3://b/vox/id10001#abc#01.mp4") == "s3://b/vox/id10001#abc#01.mp4"
    assert normalize_uri("s3://b/a?b;c") == "s3://b/a?b;c"
    p = tmp_path / "id10001#abc?x;y.mp4"
    assert normalize_uri(str(p)) == "file://" + str(p)
    assert normalize_uri("file://" + str(p)) == "file://" + str(p)


def test_a_scheme_without_slashes_is_refused_not_taken_as_a_local_path():
    for typo in ("s3:/bucket/key", "file:/etc/passwd", "S3:bucket/key"):
        with pytest.raises(PolicyError, match="scheme without '//'"):
            normalize_uri(typo)


# ---- video.max_bytes: the download cap -------------------------------------------------------------
class _ListedAs(Storage):
    """The real Storage whose `info` reports what a listing said before the object changed: a
    server whose size lies, or an object replaced by a larger one between listing and download.
    `replace` (uri -> bytes) then really writes the larger object before the download starts."""

    listed: int = 0
    replace: tuple[str, bytes] | None = None

    def info(self, uri):
        real = super().info(uri)
        if self.replace is not None:
            target, data = self.replace
            fs, p = self.filesystem(target)
            fs.pipe_file(p, data)
            fs.invalidate_cache()
        return dict(real, size=self.listed)


def test_download_cap_refuses_an_object_listed_as_larger_before_fetching_it(tmp_path):
    from corpus_anon.io.storage import TooLargeError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.mp4").write_bytes(b"x" * 1001)
    (tmp_path / "in" / "ok.mp4").write_bytes(b"y" * 1000)
    st = Storage(StorageSettings(allowed_read=(str(tmp_path / "in"),)))
    with pytest.raises(TooLargeError) as e:
        st.download(str(tmp_path / "in" / "big.mp4"), str(tmp_path / "big.local"), max_bytes=1000)
    assert (e.value.size, e.value.limit, e.value.during) == (1001, 1000, False)
    assert str(e.value).endswith("is 1001 bytes, more than the 1000 allowed; it was not downloaded.")
    assert not (tmp_path / "big.local").exists()
    st.download(str(tmp_path / "in" / "ok.mp4"), str(tmp_path / "ok.local"), max_bytes=1000)  # exactly the cap
    assert (tmp_path / "ok.local").read_bytes() == b"y" * 1000


def test_download_cap_cuts_off_a_local_file_larger_than_listed(tmp_path):
    from corpus_anon.io.storage import TooLargeError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"z" * 50_000)
    st = _ListedAs(StorageSettings(allowed_read=(str(tmp_path / "in"),)))
    st.listed = 100
    with pytest.raises(TooLargeError) as e:
        st.download(str(tmp_path / "in" / "a.mp4"), str(tmp_path / "a.local"), max_bytes=1000)
    assert (e.value.size, e.value.during) == (100, True)
    assert str(e.value).endswith("sent more than 1000 bytes (listed as 100); the download was cut off.")
    assert not (tmp_path / "a.local").exists(), "the partial file must be removed"


def test_download_cap_on_s3_before_and_while_downloading(s3):
    from corpus_anon.io.storage import TooLargeError
    from tests.faultproxy import FaultProxy, Rule

    endpoint, fs = s3
    fs.mkdir("cap")
    fs.pipe("cap/big.mp4", b"b" * 5000)
    fs.pipe("cap/small.mp4", b"s" * 500)
    # A delay of 0 s is a probe: its events list every GET the storage sends.
    with FaultProxy(endpoint, [Rule("delay", bucket="cap", methods=("GET",))]) as px:
        st = Storage(StorageSettings(endpoint_url=px.url, allowed_read=("s3://cap",)), backoff_s=0.01)
        with pytest.raises(TooLargeError) as e:
            st.download("s3://cap/big.mp4", "/nonexistent-dir/never-written", max_bytes=1000)
        assert (e.value.size, e.value.during) == (5000, False)
        assert [ev for ev in px.events if ev[3] == "big.mp4"] == [], "no byte of it may be fetched"

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "s.local")
            st.download("s3://cap/small.mp4", local, max_bytes=1000)
            assert open(local, "rb").read() == b"s" * 500
            # Listed as 500 bytes, replaced by 200,000 bytes before the GET: cut off, nothing left.
            lying = _ListedAs(StorageSettings(endpoint_url=px.url, allowed_read=("s3://cap",)), backoff_s=0.01)
            lying.listed, lying.replace = 500, ("s3://cap/small.mp4", b"L" * 200_000)
            with pytest.raises(TooLargeError) as e:
                lying.download("s3://cap/small.mp4", os.path.join(tmp, "l.local"), max_bytes=1000)
            assert (e.value.size, e.value.during) == (500, True)
            assert os.listdir(tmp) == ["s.local"]


def test_a_too_large_object_is_never_retried():
    from corpus_anon.io.storage import TooLargeError, _is_transient

    # "503" in a size must not read as a 503 status: the cap is final.
    assert not _is_transient(TooLargeError("s3://b/k", 500, 503, during=True))
    assert not _is_transient(TooLargeError("s3://b/k", 500, 503, during=False))


def test_a_local_upload_is_streamed_and_renamed_into_place(tmp_path):
    """A local upload never holds the file in memory (SD 1.5's UNet is 3.4 GB): Python's own allocations
    stay far below the file's size while it is copied, and the result is the same bytes, with no
    temporary name left beside it."""
    import tracemalloc

    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(block)
    st = Storage(StorageSettings(unrestricted=True))
    (tmp_path / "small.bin").write_bytes(b"x")
    st.upload(str(tmp_path / "small.bin"), f"file://{tmp_path}/warm/small.bin")  # imports, caches: not counted
    tracemalloc.start()
    try:
        st.upload(str(src), f"file://{tmp_path}/store/big.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while uploading a 48 MiB file"
    out = tmp_path / "store" / "big.bin"
    assert out.stat().st_size == 48 << 20 and out.read_bytes()[:1 << 20] == block
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.bin"]
