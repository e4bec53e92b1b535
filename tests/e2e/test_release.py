"""Releases, takedown and tombstones end to end on `pixelate` runs (local store and S3)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.media import face_frames, make_video

pytestmark = pytest.mark.e2e

SECRET = "release-test-secret-0123456789abcdef0123"
# Source ids that carry names, as real corpora's do: none of these may appear in a release.
CLIPS = {"Cory_2013-6-27_sc115": "Cory", "Cory_2013-6-27_sc116": "Cory", "Cory_2014-1-2_sc9": "Cory",
         "Maria_2015-3-3_sc1": "Maria", "Maria_2015-3-3_sc2": "Maria"}


def _corpus(tmp: Path, extra: dict[str, str] | None = None, broken: bool = True) -> Path:
    vids = tmp / "videos"
    vids.mkdir(exist_ok=True)
    ids, uris, signers = [], [], []
    for i, (cid, signer) in enumerate({**CLIPS, **(extra or {})}.items()):
        path = vids / f"{cid}.mp4"
        if not path.exists():
            make_video(str(path), 8, 8, (160, 120), frames=face_frames(8, (160, 120), 56 + 4 * i))
        ids.append(cid), uris.append(str(path)), signers.append(signer)
    if broken:
        ids.append("Cory_broken"), uris.append(str(vids / "missing.mp4")), signers.append("Cory")
    table = pa.table({"clip_id": ids, "video_uri": uris, "signer_id": signers,
                      "session": [f"sess-{c}" for c in ids]})
    pq.write_table(table, tmp / "manifest.parquet")
    return tmp / "manifest.parquet"


def _cfg(tmp: Path, **release):
    from corpus_anon.config import config_from_dict

    return config_from_dict({
        "manifest": {"uri": str(tmp / "manifest.parquet")}, "output": {"uri": str(tmp / "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "none"}, "video": {"short_side": 128},
        "storage": {"allowed_prefixes": {"read": [str(tmp)], "write": [str(tmp / "out"), str(tmp / "rel")]}},
        "resources": {"actors": 1, "batch_size": 4, "max_attempts": 1},
        "release": {"root": str(tmp / "rel"), **release},
    })


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".mp4")


def _manifest(rel: Path, version: str) -> list[dict]:
    return pq.read_table(rel / "releases" / version / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    from corpus_anon.pipeline import run

    tmp = tmp_path_factory.mktemp("rel")
    _corpus(tmp)
    res = run(_cfg(tmp))
    assert res.counts == {"ok": 5, "error": 1}
    return tmp, res


def test_release_publishes_only_pseudonymous_allow_listed_columns(finished_run, monkeypatch):
    from corpus_anon import release as rl
    from corpus_anon.storage import Storage, StorageSettings

    tmp, res = finished_run
    cfg = _cfg(tmp)
    storage = Storage(StorageSettings.from_config(cfg, None))
    out = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode())
    assert out.new and out.version == "v0001" and out.released == 5 and out.excluded["status"] == 1
    rel = tmp / "rel"
    assert (rel / "releases" / "LATEST").read_text() == "v0001"
    rows = _manifest(rel, "v0001")
    assert len(rows) == 5
    assert list(rows[0]) == [*rl.BASE_COLUMNS, *rl.METRIC_COLUMNS]
    assert len({r["signer_pseudonym"] for r in rows}) == 2
    for r in rows:  # every released clip is a verified copy of the run's output, never the original
        data = Path(r["clip_uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        assert "/rel/clips/" in r["clip_uri"]
    originals = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp / "videos").glob("*.mp4")}
    assert not originals & {r["sha256"] for r in rows}
    # No source clip id, signer id, original path or passthrough value anywhere in the release.
    blob = _all_bytes(rel) + b"".join(p.name.encode() for p in rel.rglob("*"))
    for needle in ("Cory", "Maria", "sess-", "videos/"):
        assert needle.encode() not in blob, needle
    card = (rel / "releases" / "v0001" / "README.md").read_text()
    assert "5 clips from 2 signers" in card and "1 status" in card and "non-commercial" in card
    assert "OpenCV Haar" in card and "signing style" in card

    again = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode())
    assert not again.new and again.latest == "v0001"
    assert sorted(p.name for p in (rel / "releases").iterdir()) == ["LATEST", "v0001"]

    # Exclusions and approvals make a new version; a passthrough column only when named.
    excl = tmp / "exclude.txt"
    excl.write_text("# withdrawn by the corpus team\nMaria_2015-3-3_sc2\n")
    cfg2 = _cfg(tmp, columns=["session"])
    v2 = rl.release(cfg2, storage, str(tmp / "out"), secret=SECRET.encode(), exclude=rl.read_list_file(str(excl)))
    assert v2.version == "v0002" and v2.released == 4 and v2.excluded["excluded"] == 1
    assert _manifest(rel, "v0002")[0]["session"].startswith("sess-")
    approve = {rows[0]["release_id"]}
    v3 = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode(), approve=approve)
    assert v3.version == "v0003" and [r["release_id"] for r in _manifest(rel, "v0003")] == [rows[0]["release_id"]]

    from corpus_anon.config import ConfigError

    with pytest.raises(ConfigError, match="at least 32 bytes"):
        rl.release(cfg, storage, str(tmp / "out"), secret=b"short")
    with pytest.raises(Exception, match="release.columns may not name signer_id"):
        _cfg(tmp, columns=["signer_id"])
    with pytest.raises(ConfigError, match="outside storage.allowed_prefixes.write"):
        rl.release(cfg, storage, str(tmp / "out"), str(tmp / "elsewhere"), secret=SECRET.encode())


def test_takedown_withdraws_a_signer_everywhere_and_runs_honour_it(finished_run, monkeypatch):
    from corpus_anon import release as rl
    from corpus_anon.pipeline import run
    from corpus_anon.storage import Storage, StorageSettings

    tmp, res = finished_run
    cfg = _cfg(tmp)
    storage = Storage(StorageSettings.from_config(cfg, None))
    secret = SECRET.encode()
    base = rl.release(cfg, storage, str(tmp / "out"), secret=secret)  # back to all five clips
    rel = tmp / "rel"
    before = _manifest(rel, base.latest)
    maria = rl.signer_pseudonym(secret, "Maria")
    maria_files = [Path(r["clip_uri"].removeprefix("file://")) for r in before if r["signer_pseudonym"] == maria]
    assert len(maria_files) == 2 and all(p.exists() for p in maria_files)

    td = rl.takedown(storage, str(rel), secret=secret, signer="Maria")
    assert td.rows_removed == 2 and td.version is not None
    after = _manifest(rel, td.version)
    assert len(after) == 3 and maria not in {r["signer_pseudonym"] for r in after}
    assert not any(p.exists() for p in maria_files)
    run_root = tmp / "out" / res.layout.cfg_fp
    assert sorted(td.run_clips_deleted) == ["Maria_2015-3-3_sc1", "Maria_2015-3-3_sc2"]
    assert not list((run_root / "clips").glob("Maria*")) and not list((run_root / "records").glob("Maria*"))
    metrics = pq.read_table(run_root / "metrics" / "metrics.parquet").column("clip_id").to_pylist()
    assert not [c for c in metrics if c.startswith("Maria")] and len(metrics) == 4
    tomb = json.loads((rel / "tombstones.json").read_text())
    assert tomb["entries"][0] == {**tomb["entries"][0], "kind": "signer", "pseudonym": maria}
    card = (rel / "releases" / td.version / "README.md").read_text()
    assert "## Superseded versions" in card and base.latest in card

    # A clip taken down by its release id; releasing the run again cannot bring anything back.
    cory = next(r for r in after if r["sha256"])
    td2 = rl.takedown(storage, str(rel), secret=secret, clip=cory["release_id"])
    assert td2.rows_removed == 1
    again = rl.release(cfg, storage, str(tmp / "out"), secret=secret)
    assert again.released == 2 and again.excluded["withdrawn"] == 0  # the scrubbed run no longer lists them

    # A rerun of the same manifest (with release.root) skips withdrawn clips; without the secret it refuses.
    from corpus_anon.config import ConfigError

    monkeypatch.delenv("CORPUS_ANON_SECRET", raising=False)
    with pytest.raises(ConfigError, match="CORPUS_ANON_SECRET"):
        run(cfg)
    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    r2 = run(cfg)
    assert r2.counts == {"ok": 2, "error": 1} and r2.summary["withdrawn"] == 3
    assert not list((run_root / "clips").glob("Maria*"))


def test_release_and_takedown_on_s3_through_the_cli(ray_cluster, s3, tmp_path):
    """The commands as a maintainer runs them, against a local S3 server: a server-side copy into
    the release bucket, no new version for an unchanged run, and a takedown by clip id."""
    import os
    import subprocess
    import sys

    import yaml

    from corpus_anon.pipeline import run

    endpoint, fs = s3
    fs.mkdir("corpus")
    fs.mkdir("public")
    for i, cid in enumerate(("Ana_sc1", "Ana_sc2", "Ben_sc1")):
        path = make_video(str(tmp_path / f"{cid}.mp4"), 8, 8, (160, 120), frames=face_frames(8, (160, 120), 60 + 4 * i))
        fs.pipe(f"corpus/v/{cid}.mp4", Path(path).read_bytes())
    buf = io.BytesIO()
    pq.write_table(pa.table({"clip_id": ["Ana_sc1", "Ana_sc2", "Ben_sc1"],
                             "video_uri": [f"s3://corpus/v/{c}.mp4" for c in ("Ana_sc1", "Ana_sc2", "Ben_sc1")],
                             "signer_id": ["Ana", "Ana", "Ben"]}), buf)
    fs.pipe("corpus/manifest.parquet", buf.getvalue())
    cfg = {
        "manifest": {"uri": "s3://corpus/manifest.parquet"}, "output": {"uri": "s3://corpus/runs"},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "none"}, "video": {"short_side": 128},
        "storage": {"endpoint_url": endpoint,
                    "allowed_prefixes": {"read": ["s3://corpus"], "write": ["s3://corpus/runs", "s3://public/rel"]}},
        "resources": {"actors": 1, "batch_size": 4},
        "release": {"root": "s3://public/rel"},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    from corpus_anon.config import load_config

    assert run(load_config(str(cfg_path))).counts == {"ok": 3}
    env = {**os.environ, "CORPUS_ANON_SECRET": SECRET}
    cli = [sys.executable, "-m", "corpus_anon.cli"]

    def call(*args, secret=True):
        return subprocess.run([*cli, *args], env=env if secret else {k: v for k, v in env.items()
                                                                        if k != "CORPUS_ANON_SECRET"},
                              capture_output=True, text=True, timeout=120)

    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path))
    assert p.returncode == 0, p.stderr
    assert "release v0001: 3 clips" in p.stdout
    assert fs.cat("public/rel/releases/LATEST").decode() == "v0001"
    rows = pq.read_table(io.BytesIO(fs.cat("public/rel/releases/v0001/manifest.parquet"))).to_pylist()
    for r in rows:
        assert r["clip_uri"].startswith("s3://public/rel/clips/")
        assert hashlib.sha256(fs.cat(r["clip_uri"].removeprefix("s3://"))).hexdigest() == r["sha256"]
    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path))
    assert p.returncode == 0 and "nothing changed since v0001" in p.stdout
    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path), secret=False)
    assert p.returncode == 2 and "CORPUS_ANON_SECRET" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = call("takedown", "s3://public/rel", "--clip", "Ben_sc1", "--config", str(cfg_path))
    assert p.returncode == 0, p.stderr
    assert "1 clips left the release (new version v0002)" in p.stdout
    left = pq.read_table(io.BytesIO(fs.cat("public/rel/releases/v0002/manifest.parquet"))).to_pylist()
    assert len(left) == 2 and len(fs.ls("public/rel/clips")) == 2
    assert not [k for k in fs.find("corpus/runs") if "Ben_sc1" in k]
    p = call("release", "s3://corpus/runs", "--out", "s3://elsewhere", "--config", str(cfg_path))
    assert p.returncode == 2 and "outside storage.allowed_prefixes.write" in p.stderr
