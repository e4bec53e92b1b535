"""Releases, takedown and tombstones end to end on `pixelate` runs (local store and S3): a release
refuses unchecked clips, keeps lineage private, and a takedown leaves no trace outside the private
tombstone store (a byte scan of every object under the output, release and crop roots)."""

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


def _corpus(tmp: Path, extra: dict[str, str] | None = None, broken: bool = True, big: bool = False) -> Path:
    vids = tmp / "videos"
    vids.mkdir(exist_ok=True)
    ids, uris, signers = [], [], []
    size = (320, 240) if big else (160, 120)  # big: faces the dlib detector finds
    for i, (cid, signer) in enumerate({**CLIPS, **(extra or {})}.items()):
        path = vids / f"{cid}.mp4"
        if not path.exists():
            make_video(str(path), 8, 8, size, frames=face_frames(8, size, (100 if big else 56) + 4 * i))
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
    from corpus_anon.run.pipeline import run

    tmp = tmp_path_factory.mktemp("rel")
    _corpus(tmp)
    res = run(_cfg(tmp))
    assert res.counts == {"ok": 5, "error": 1}
    return tmp, res


def test_a_takedown_landing_while_a_release_copies_publishes_nothing(finished_run, monkeypatch, tmp_path):
    """The tombstone is written while the clips are being copied: the release notices before it writes
    a version, deletes what it copied and publishes nothing."""
    from corpus_anon.release import publish as rl
    from corpus_anon.release import tombstones as tb
    from corpus_anon.config import config_from_dict
    from corpus_anon.io.storage import Storage, StorageSettings

    tmp, res = finished_run
    base = _cfg(tmp).model_dump(mode="json")
    base["storage"]["allowed_prefixes"]["write"].append(str(tmp_path / "rel2"))
    base["release"].update({"root": str(tmp_path / "rel2"), "private_uri": str(tmp_path / "priv")})
    base["storage"]["allowed_prefixes"]["write"].append(str(tmp_path / "priv"))
    base["storage"]["allowed_prefixes"]["read"].append(str(tmp_path))
    cfg = config_from_dict(base)
    storage = Storage(StorageSettings.from_config(cfg, None))
    secret = SECRET.encode()
    copy = rl._copy_verified

    def copy_then_takedown(*args, **kwargs):
        outcome = copy(*args, **kwargs)
        tomb = tb.read_tombstones(storage, tb.tombstones_uri(cfg))
        tb.add_tombstone(tomb, "signer", rl.signer_pseudonym(secret, "Maria"))
        tb.write_tombstones(storage, tb.tombstones_uri(cfg), tomb)
        return outcome

    monkeypatch.setattr(rl, "_copy_verified", copy_then_takedown)
    with pytest.raises(rl.ReleaseError, match="a takedown withdrew 2 of this release's clips"):
        rl.release(cfg, storage, str(tmp / "out"), secret=secret, allow_unchecked=True, threads=1)
    assert not (tmp_path / "rel2" / "releases").exists()
    assert not list((tmp_path / "rel2").rglob("*.mp4"))


def test_release_refuses_unchecked_clips_and_keeps_lineage_private(finished_run, monkeypatch):
    from corpus_anon.release import publish as rl
    from corpus_anon.config import ConfigError
    from corpus_anon.io.storage import Storage, StorageSettings

    tmp, res = finished_run
    cfg = _cfg(tmp)
    storage = Storage(StorageSettings.from_config(cfg, None))
    rel = tmp / "rel"
    # faces.backend: none: nothing was checked, so nothing is released without --allow-unchecked.
    refused = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode())
    assert refused.version is None and refused.released == 0
    assert refused.excluded["unchecked"] == 5 and refused.excluded["status"] == 1
    assert not (rel / "releases" / "LATEST").exists()

    out = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode(), allow_unchecked=True)
    assert out.new and out.version == "v0001" and out.released == 5 and out.excluded["status"] == 1
    assert (rel / "releases" / "LATEST").read_text() == "v0001"
    rows = _manifest(rel, "v0001")
    assert len(rows) == 5 and all(r["checked"] is False for r in rows)
    assert list(rows[0]) == [*rl.BASE_COLUMNS, *rl.METRIC_COLUMNS]
    assert len({r["signer_pseudonym"] for r in rows}) == 2
    for r in rows:  # every released clip is a verified copy of the run's output, never the original
        data = Path(r["clip_uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        assert "/rel/clips/" in r["clip_uri"]
    originals = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp / "videos").glob("*.mp4")}
    assert not originals & {r["sha256"] for r in rows}
    # No source clip id, signer id, original path, passthrough value or private URI in the release.
    blob = _all_bytes(rel) + b"".join(p.name.encode() for p in rel.rglob("*"))
    for needle in ("Cory", "Maria", "sess-", "videos/", str(tmp / "out"), "private"):
        assert needle.encode() not in blob, needle
    meta = json.loads((rel / "releases" / "v0001" / "release.json").read_text())
    assert "run" not in meta and meta["run_cfg_fp"] == res.layout.cfg_fp and meta["counts"]["released_unchecked"] == 5
    lineage = [json.loads(p.read_text()) for p in (tmp / "out" / "private" / "lineage").glob("*.json")]
    assert lineage[0]["versions"]["v0001"]["run"] == res.layout.root and lineage[0]["release_root"].endswith("/rel")
    card = (rel / "releases" / "v0001" / "README.md").read_text()
    assert "5 clips from 2 signers" in card and "1 failed or leaking" in card and "non-commercial" in card
    assert "CenterFace" in card and "MIT" in card and "OpenCV Haar" not in card and "signing style" in card
    assert "5 of the 5 clips in this release were never checked for identity leakage" in card
    assert "source audio was dropped" in card

    again = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode(), allow_unchecked=True)
    assert not again.new and again.latest == "v0001"
    assert sorted(p.name for p in (rel / "releases").iterdir()) == ["LATEST", "v0001"]

    # Exclusions and approvals make a new version; a passthrough column only when named.
    excl = tmp / "exclude.txt"
    excl.write_text("# withdrawn by the corpus team\nMaria_2015-3-3_sc2\n")
    cfg2 = _cfg(tmp, columns=["session"])
    v2 = rl.release(cfg2, storage, str(tmp / "out"), secret=SECRET.encode(), exclude=rl.read_list_file(str(excl)),
                    allow_unchecked=True)
    assert v2.version == "v0002" and v2.released == 4 and v2.excluded["excluded"] == 1
    assert _manifest(rel, "v0002")[0]["session"].startswith("sess-")
    approve = {rows[0]["release_id"]}
    v3 = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET.encode(), approve=approve, allow_unchecked=True)
    assert v3.version == "v0003" and [r["release_id"] for r in _manifest(rel, "v0003")] == [rows[0]["release_id"]]

    with pytest.raises(ConfigError, match="at least 32 bytes"):
        rl.release(cfg, storage, str(tmp / "out"), secret=b"short")
    with pytest.raises(Exception, match="release.columns may not name signer_id"):
        _cfg(tmp, columns=["signer_id"])
    with pytest.raises(rl.ReleaseError, match="only the manifest's passthrough columns \\(session\\), not n_frames"):
        rl.release(_cfg(tmp, columns=["n_frames"]), storage, str(tmp / "out"), secret=SECRET.encode())
    with pytest.raises(ConfigError, match="outside storage.allowed_prefixes.write"):
        rl.release(cfg, storage, str(tmp / "out"), str(tmp / "elsewhere"), secret=SECRET.encode())
    # A release root inside the run output would publish tracks, embeddings and the report.
    with pytest.raises(ConfigError, match=r"^the release root \S+/out/public and output.uri \S+/out overlap;"):
        rl.release(cfg, storage, str(tmp / "out"), str(tmp / "out" / "public"), secret=SECRET.encode())


MARIA = ["Maria_2015-3-3_sc1", "Maria_2015-3-3_sc2"]


def _crop_set(root: Path, clips: dict[str, str]) -> None:
    """A crop set as `faces extract` writes it (fragments, chunks, index) for these clips."""
    from corpus_anon.finetune.crops import CropLayout, fragment_bytes, index_table
    from corpus_anon.io.storage import Storage, StorageSettings

    storage = Storage(StorageSettings(unrestricted=True))
    layout = CropLayout(str(root))
    rows = []
    for cid, who in clips.items():
        row = {"clip_id": cid, "identity_id": who, "chunk_uri": layout.chunk_rel(cid, 0), "frames": 32,
               "box": [0, 0, 64, 64]}
        storage.write_bytes(layout.chunk(cid, 0), b"crop mp4")
        storage.write_bytes(layout.part(cid), fragment_bytes([row], {"clip_id": cid, "identity_id": who, "status": "ok"}))
        rows.append(row)
    buf = io.BytesIO()
    pq.write_table(index_table(rows), buf)
    storage.write_bytes(layout.index, buf.getvalue())


def _scan(roots: list[Path], needles: list[str], skip: Path) -> list[str]:
    """Every file and folder under `roots` (names and raw bytes, hidden temporary files included) that
    holds a needle."""
    found = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_relative_to(skip):
                continue
            data = (p.read_bytes() if p.is_file() else b"") + str(p.relative_to(root)).encode()
            found += [f"{p}: {n}" for n in needles if n.encode() in data]
    return found


def test_takedown_leaves_no_trace_of_the_signer_outside_the_private_tombstones(ray_cluster, tmp_path, monkeypatch):
    """Two runs with face analysis (one released, one not), a clip that left the manifest, two
    release versions, a crop set, a reference set, crashed writes' leftovers: after `takedown
    --signer Maria` no byte of any of them names Maria, her clips, her pseudonym or their release ids."""
    import os
    import tempfile

    from corpus_anon.release import publish as rl
    from corpus_anon.config import config_from_dict
    from corpus_anon.run.pipeline import run
    from corpus_anon.io.storage import Storage, StorageSettings
    from corpus_anon.release.takedown import takedown

    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    secret = SECRET.encode()
    _corpus(tmp_path, extra={"Maria_2016-1-1_sc7": "Maria"}, broken=False, big=True)
    base = {
        "manifest": {"uri": str(tmp_path / "manifest.parquet")}, "output": {"uri": str(tmp_path / "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "dlib"}, "video": {"short_side": 256},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / d) for d in
                                                                           ("out", "rel", "crops", "ref", "ft")]}},
        "resources": {"actors": 1, "batch_size": 4, "max_attempts": 1},
        "release": {"root": str(tmp_path / "rel")},
        "finetune": {"crops_uri": str(tmp_path / "crops"), "reference_uri": str(tmp_path / "ref"),
                     "out": str(tmp_path / "ft")},
    }
    cfg = config_from_dict(base)
    first = run(cfg)
    assert first.planned == 6
    # Maria_2016-1-1_sc7 leaves the manifest: its outputs stay in the run folder, no metrics row names it.
    _corpus(tmp_path, broken=False, big=True)
    assert run(cfg).ran == 0
    other = run(config_from_dict({**base, "video": {"short_side": 256, "crf": 23}}))  # never released
    assert other.layout.cfg_fp != first.layout.cfg_fp and other.ran == 5
    storage = Storage(StorageSettings.from_config(cfg, None))
    v1 = rl.release(cfg, storage, str(tmp_path / "out"), secret=secret, allow_unchecked=True)
    excl = tmp_path / "excl.txt"
    excl.write_text("Cory_2014-1-2_sc9\n")
    v2 = rl.release(cfg, storage, first.layout.root, secret=secret, allow_unchecked=True,
                    exclude=rl.read_list_file(str(excl)))
    assert (v1.version, v1.released, v2.version, v2.released) == ("v0001", 5, "v0002", 4)
    _crop_set(tmp_path / "crops", {**{c: "Maria" for c in MARIA}, "Cory_2013-6-27_sc115": "Cory"})
    # A reference set as `faces index` makes one: crop files and an index naming their identities.
    from corpus_anon.finetune.crops import index_table

    (tmp_path / "ref").mkdir()
    ref_rows = [{"clip_id": c, "identity_id": who, "chunk_uri": f"{c}.mp4", "frames": 32, "box": [0, 0, 64, 64]}
                for c, who in (("id10001#a#1#2", "Maria"), ("id10002#b#1#2", "id10002"))]
    for r in ref_rows:
        (tmp_path / "ref" / r["chunk_uri"]).write_bytes(b"reference crop")
    pq.write_table(index_table(ref_rows), tmp_path / "ref" / "index.parquet")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "tpsmm-finetuned.pth.tar").write_bytes(b"weights")
    # What crashed writes leave: a hidden temporary record, and a worker's downloaded source.
    run_a = tmp_path / "out" / first.layout.cfg_fp
    (run_a / "records" / f".{MARIA[0]}.json.tmp-999999999-7").write_text('{"clip_id": "%s"}' % MARIA[0])
    worker_tmp = Path(tempfile.mkdtemp(prefix="corpus-anon-"))
    (worker_tmp / f"{MARIA[1]}.src").write_bytes(b"source video of Maria")
    summary = json.loads((run_a / "summary.json").read_text())
    assert "Maria" in summary["reid"]["per_signer"]
    assert b"Maria" in (run_a / "report.html").read_bytes()

    maria_clips = [*MARIA, "Maria_2016-1-1_sc7"]
    needles = ["Maria", rl.signer_pseudonym(secret, "Maria"), *maria_clips,
               *(rl.release_id(secret, c) for c in maria_clips)]
    roots = [tmp_path / d for d in ("out", "rel", "crops", "ref", "ft")]
    private = tmp_path / "out" / "private"
    assert len(_scan(roots, needles, private)) > 20

    try:
        td = takedown(cfg, storage, secret=secret, signer="Maria")
        assert not (worker_tmp / f"{MARIA[1]}.src").exists()
    finally:
        import shutil

        shutil.rmtree(worker_tmp, ignore_errors=True)
    assert td.versions_amended == ["v0001", "v0002"] and td.rows_removed == 2 and td.latest == "v0002"
    assert td.run_clips_deleted == sorted(maria_clips) and len(td.runs_cleaned) == 2
    assert td.crop_clips_deleted == MARIA and td.reference_clips_deleted == ["id10001#a#1#2"]
    assert td.temp_files_deleted >= 2 and td.checkpoints == [f"file://{tmp_path}/ft/tpsmm-finetuned.pth.tar"]
    assert _scan(roots, needles, private) == []
    # Only the private store knows, and only by pseudonym.
    tomb = (private / "tombstones.json").read_text()
    assert rl.signer_pseudonym(secret, "Maria") in tomb and "Maria" not in tomb
    assert not (tmp_path / "rel" / "tombstones.json").exists()
    # Everything else stays: the other signer's clips, the rewritten report, the amended cards.
    assert len(_manifest(tmp_path / "rel", "v0001")) == 3 and len(_manifest(tmp_path / "rel", "v0002")) == 2
    card = (tmp_path / "rel" / "releases" / "v0001" / "README.md").read_text()
    assert "## Changed after publication" in card and "2 clip(s) withdrawn" in card and "rather than withdrawing" in card
    report = (run_a / "report.html").read_bytes()
    assert b"Cory_2013-6-27_sc115" in report and os.path.getsize(run_a / "report.html") > 1000
    assert "Cory" in json.loads((run_a / "summary.json").read_text())["reid"]["per_signer"]
    assert len(list((run_a / "clips").glob("Cory*"))) == 3 and len(list((tmp_path / "crops" / "chunks").iterdir())) == 1
    assert [p.name for p in (tmp_path / "ref").glob("*.mp4")] == ["id10002#b#1#2.mp4"]
    # Releasing and running again bring nothing back.
    assert rl.release(cfg, storage, first.layout.root, secret=secret, allow_unchecked=True).released == 3
    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    again = run(cfg)
    assert again.summary["withdrawn"] == 2 and again.ran == 0
    assert _scan(roots, needles, private) == []
    from corpus_anon.config import ConfigError

    monkeypatch.delenv("CORPUS_ANON_SECRET", raising=False)  # the run dropped it; make sure
    with pytest.raises(ConfigError, match="CORPUS_ANON_SECRET to recognise them"):
        run(cfg)


def test_release_and_takedown_on_s3_through_the_cli(ray_cluster, s3, tmp_path):
    """The commands as a maintainer runs them, against a local S3 server: a server-side copy into
    the release bucket, no new version for an unchanged run, and a takedown by clip id."""
    import os
    import subprocess
    import sys

    import yaml

    from corpus_anon.run.pipeline import run

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
    assert "3 clips were never checked for identity leakage and are left out" in p.stdout
    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path), "--allow-unchecked")
    assert p.returncode == 0, p.stderr
    assert "release v0001: 3 clips" in p.stdout and "3 released UNCHECKED" in p.stdout
    assert fs.cat("public/rel/releases/LATEST").decode() == "v0001"
    rows = pq.read_table(io.BytesIO(fs.cat("public/rel/releases/v0001/manifest.parquet"))).to_pylist()
    for r in rows:
        assert r["clip_uri"].startswith("s3://public/rel/clips/")
        assert hashlib.sha256(fs.cat(r["clip_uri"].removeprefix("s3://"))).hexdigest() == r["sha256"]
    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path), "--allow-unchecked")
    assert p.returncode == 0 and "nothing changed since v0001" in p.stdout
    assert "s3://corpus" not in fs.cat("public/rel/releases/v0001/release.json").decode()
    p = call("release", "s3://corpus/runs", "--out", "s3://public/rel", "--config", str(cfg_path), secret=False)
    assert p.returncode == 2 and "CORPUS_ANON_SECRET" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = call("takedown", "s3://public/rel", "--clip", "Ben_sc1")
    assert p.returncode == 2 and "takedown needs --config" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = call("takedown", "s3://public/rel", "--clip", "Ben_sc1", "--config", str(cfg_path))
    assert p.returncode == 0, p.stderr
    assert "1 clips left the latest release (v0001); versions amended: v0001" in p.stdout
    left = pq.read_table(io.BytesIO(fs.cat("public/rel/releases/v0001/manifest.parquet"))).to_pylist()
    assert len(left) == 2 and len(fs.ls("public/rel/clips")) == 2
    assert [k for k in fs.find("corpus/runs") if "Ben_sc1" in k] == []
    assert fs.exists("corpus/runs/private/tombstones.json") and not fs.exists("public/rel/tombstones.json")
    p = call("release", "s3://corpus/runs", "--out", "s3://elsewhere", "--config", str(cfg_path))
    assert p.returncode == 2 and "outside storage.allowed_prefixes.write" in p.stderr


def test_a_takedown_during_a_run_leaves_nothing_of_the_clip_in_that_run(ray_cluster, tmp_path, monkeypatch):
    """The tombstone lands after the run checked its manifest: the run's workers see it before they
    publish (`tombstones.still_wanted`), and the driver drops whatever got through before it writes
    the metrics table, the summary and the report."""
    from corpus_anon.run import pipeline
    from corpus_anon.release import publish as rl
    from corpus_anon.release import tombstones as tb
    from corpus_anon.config import config_from_dict
    from corpus_anon.io.storage import Storage, StorageSettings

    _corpus(tmp_path, broken=False)
    cfg = config_from_dict({**_cfg(tmp_path).model_dump(mode="json"), "output": {"uri": str(tmp_path / "out")}})
    storage = Storage(StorageSettings.from_config(cfg, None))
    secret = SECRET.encode()
    keys_for = pipeline._tombstone_keys

    def takedown_lands_now(table):
        keys = keys_for(table)
        tomb = tb.read_tombstones(storage, tb.tombstones_uri(cfg))
        tb.add_tombstone(tomb, "signer", rl.signer_pseudonym(secret, "Maria"))
        tb.write_tombstones(storage, tb.tombstones_uri(cfg), tomb)
        return keys

    monkeypatch.setattr(pipeline, "_tombstone_keys", takedown_lands_now)
    monkeypatch.setenv("CORPUS_ANON_SECRET", SECRET)
    res = pipeline.run(cfg)
    assert res.summary["withdrawn"] == 2 and res.counts == {"ok": 3}
    needles = ["Maria", rl.signer_pseudonym(secret, "Maria"), *MARIA, *(rl.release_id(secret, c) for c in MARIA)]
    assert _scan([tmp_path / "out"], needles, tmp_path / "out" / "private") == []
    assert len(pq.read_table(tmp_path / "out" / res.layout.cfg_fp / "metrics" / "metrics.parquet")) == 3
