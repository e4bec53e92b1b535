"""A release loads with Hugging Face `datasets` (video-folder builder, no video decoder): every row's
video path exists with the manifest's bytes, each version loads only its own clips, a withdrawn clip
loads from no version, and the card's YAML header is what the Hub and `datasets` read.

The release is made by the real `release()` and `takedown()` from a run folder written here with
real MP4s (a finished pixelate run's layout: plan, config, metrics table, clips), so no Ray is needed;
on a local folder, and on S3 (moto's server) where `datasets` streams it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from corpus_anon.release import hf
from corpus_anon.release import publish as rl
from corpus_anon.config import config_from_dict, config_to_yaml
from corpus_anon.io.storage import Storage, StorageSettings
from tests.media import make_video

SECRET = b"datasets-test-secret-0123456789abcdef"
CLIPS = {"Cory_sc1": "Cory", "Cory_sc2": "Cory", "Maria_sc1": "Maria"}
FP = "runfp0001"


def _cfg(base: str) -> "object":
    return config_from_dict({
        "output": {"uri": f"{base}/out"}, "anonymizer": {"kind": "pixelate"},
        "faces": {"backend": "dlib"}, "release": {"root": f"{base}/rel"}})


def _add_clips(storage: Storage, base: str, tmp: Path, clips: dict[str, str]) -> None:
    """Append finished, checked clips to the run folder `{base}/out/{FP}` (what a pixelate run with the
    gate writes: plan, config, metrics table, clips), on a local folder or S3."""
    import io

    run = f"{base}/out/{FP}"
    storage.write_text(f"{run}/plan.json", "{}")
    storage.write_text(f"{run}/config.yaml", config_to_yaml(_cfg(base)))
    storage.write_text(f"{base}/out/LATEST_RUN", FP)
    metrics = f"{run}/metrics/metrics.parquet"
    rows = pq.read_table(io.BytesIO(storage.read_bytes(metrics))).to_pylist() if storage.exists(metrics) else []
    for i, (cid, signer) in enumerate(clips.items(), start=len(rows)):
        local = tmp / f"{cid}.mp4"
        make_video(str(local), 6 + i, 8, (64, 48))
        data = local.read_bytes()
        uri = f"{run}/clips/{cid}-{i:04d}.mp4"
        storage.write_bytes(uri, data)
        rows.append({"clip_id": cid, "signer_id": signer, "status": "ok", "output_uri": uri,
                     "video_uri": f"{base}/videos/{cid}.mp4", "sha256": hashlib.sha256(data).hexdigest(),
                     "bytes": len(data), "n_frames": 6 + i, "fps": 8.0, "width": 64, "height": 48,
                     "duration_s": (6 + i) / 8, "cfg_fp": FP, "exposure_covered": True, "frames_checked": 6 + i,
                     "face_frac_orig": 0.5, "id_orig_anon": 0.9 + 0.01 * i})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(metrics, buf.getvalue())


def _storage() -> Storage:
    return Storage(StorageSettings(unrestricted=True))


def _load(rel: Path, tmp: Path, version: str | None = None) -> list[dict]:
    return list(hf.load_release(str(rel), version, cache_dir=str(tmp / "hf-cache")))


def _check_rows(rel: Path, got: list[dict], version: str) -> None:
    """Every loaded row is the manifest's, its video path exists under the root and holds its bytes."""
    manifest = pq.read_table(rel / "releases" / version / "manifest.parquet").to_pylist()
    assert sorted(r["release_id"] for r in got) == sorted(r["release_id"] for r in manifest)
    by_id = {r["release_id"]: r for r in manifest}
    for r in got:
        path = Path(r["video"]["path"])
        assert path.is_file() and path.parent == rel / "clips", path
        assert r["video"]["bytes"] is None
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"] == by_id[r["release_id"]]["sha256"]
        assert f"file://{path}" == by_id[r["release_id"]]["clip_uri"]


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """A tmp_path with `datasets`' cache in it (HF_DATASETS_CACHE, read when `datasets` is first imported;
    every load also passes cache_dir)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def test_each_version_loads_its_own_clips_and_a_withdrawn_clip_loads_from_none(hf_env):
    from datasets import load_dataset

    from corpus_anon.release.takedown import takedown

    tmp = hf_env
    rel, storage, cfg = tmp / "rel", _storage(), _cfg(f"file://{tmp}")
    _add_clips(storage, f"file://{tmp}", tmp, CLIPS)
    first = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET, threads=1)
    assert first.version == "v0001" and first.released == 3
    got = _load(rel, tmp)
    assert len(got) == 3
    _check_rows(rel, got, "v0001")
    # the folder itself, through the card's configs (default = the latest)
    assert len(load_dataset(str(rel), split="train", cache_dir=str(tmp / "hf-cache"))) == 3

    gone = rl.release_id(SECRET, "Cory_sc2")
    gone_file = next(Path(r["video"]["path"]) for r in got if r["release_id"] == gone)
    # metadata files as a release that raced the takedown could leave them: still naming the clip
    stale = {p: p.read_bytes() for p in rel.glob("metadata*.parquet")}
    td = takedown(cfg, storage, str(rel), secret=SECRET, clip="Cory_sc2")
    assert td.versions_amended == ["v0001"] and not gone_file.exists()
    for p, data in stale.items():
        assert gone.encode() not in p.read_bytes(), p
        p.write_bytes(data)
    takedown(cfg, storage, str(rel), secret=SECRET, clip="Cory_sc2")  # a later takedown scrubs them all
    for p in stale:
        assert gone.encode() not in p.read_bytes(), p
    after = _load(rel, tmp)  # the root's copies follow the version they were made from
    assert len(after) == 2 and gone not in {r["release_id"] for r in after}
    _check_rows(rel, after, "v0001")
    _add_clips(storage, f"file://{tmp}", tmp, {"Maria_sc2": "Maria"})  # the next run adds a clip: a second version
    second = rl.release(cfg, storage, str(tmp / "out"), secret=SECRET, threads=1)
    assert second.version == "v0002" and second.released == 3

    latest, v2, v1 = _load(rel, tmp), _load(rel, tmp, "v0002"), _load(rel, tmp, "v0001")
    _check_rows(rel, v2, "v0002")
    _check_rows(rel, v1, "v0001")
    assert sorted(r["release_id"] for r in latest) == sorted(r["release_id"] for r in v2)
    new = rl.release_id(SECRET, "Maria_sc2")
    assert new in {r["release_id"] for r in v2} and new not in {r["release_id"] for r in v1}  # only its own clips
    assert len(v1) == 2 and len(v2) == 3
    for rows in (latest, v2, v1):
        assert gone not in {r["release_id"] for r in rows}
    # no metadata file or card at the root still names the withdrawn clip
    for p in [*rel.glob("metadata*.parquet"), rel / "README.md"]:
        assert gone.encode() not in p.read_bytes(), p
    # the Hub's view of the folder: a config per version beside the default
    by_name = {c: len(load_dataset(str(rel), c, split="train", cache_dir=str(tmp / "hf-cache")))
               for c in ("default", "v0001", "v0002")}
    assert by_name == {"default": 3, "v0001": 2, "v0002": 3}


def test_the_card_header_is_what_the_hub_and_datasets_read(hf_env):
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    tmp = hf_env
    rel, storage, cfg = tmp / "rel", _storage(), _cfg(f"file://{tmp}")
    _add_clips(storage, f"file://{tmp}", tmp, CLIPS)
    rl.release(cfg, storage, str(tmp / "out"), secret=SECRET, threads=1)
    text = (rel / "README.md").read_text()
    assert text.startswith("---\n")
    head = yaml.safe_load(text.split("---\n")[1])
    assert head["license"] == "other" and head["license_name"] == "source-corpus-terms"
    assert head["size_categories"] == ["n<1K"] and head["task_categories"] == ["video-classification"]
    assert {"sign-language", "anonymized"} <= set(head["tags"])
    assert [c["config_name"] for c in head["configs"]] == ["default", "v0001"]
    assert head["configs"][0]["default"] is True
    card = DatasetCard(text)  # validates the YAML block the way the Hub client does
    assert card.data.license == "other" and card.data.size_categories == ["n<1K"]
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert configs.get_default_config_name() == "default"
    assert configs["v0001"]["metadata_filenames"] == ["metadata-v0001.parquet"]
    for files in (configs["default"]["data_files"][0]["path"], configs["v0001"]["data_files"][0]["path"]):
        assert all(list(rel.glob(p)) for p in files), files  # every path resolves from the root
    assert "# Anonymized sign-language corpus — release v0001" in card.text  # the card's body follows
    own_card = DatasetCard((rel / "releases" / "v0001" / "README.md").read_text())  # render_card's own header
    assert own_card.data.license == "other" and [c["config_name"] for c in own_card.data.configs] == ["v0001"]
    # a version's own card: its one config, licence fields from release.json when it names them
    meta = {**json.loads((rel / "releases" / "v0001" / "release.json").read_text()),
            "license": "cc-by-nc-4.0", "language": "ase"}
    own = yaml.safe_load(hf.card_front_matter("v0001", [{}] * 1500, meta).split("---\n")[1])
    assert own["license"] == "cc-by-nc-4.0" and "license_name" not in own and own["language"] == ["ase"]
    assert own["size_categories"] == ["1K<n<10K"]
    assert own["configs"] == [{"config_name": "v0001", "default": True, "data_files": [
        {"split": "train", "path": ["metadata-v0001.parquet", "clips/*.mp4"]}],
        "metadata_filenames": ["metadata-v0001.parquet"]}]


@pytest.mark.parametrize("n,bucket", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (99_999, "10K<n<100K"),
                                      (10**6, "1M<n<10M"), (10**12, "n>1T")])
def test_size_category_follows_the_hubs_buckets(n, bucket):
    assert hf.size_category(n) == bucket


def test_file_names_stay_inside_the_release_root():
    assert hf.file_name("file:///r/rel", "file:///r/rel/clips/ab-cd.mp4") == "clips/ab-cd.mp4"
    assert hf.file_name("s3://b/rel/", "s3://b/rel/clips/ab-cd.mp4") == "clips/ab-cd.mp4"
    for bad in ("file:///r/other/clips/ab.mp4", "file:///r/rel/clips/x/ab.mp4", "file:///r/relx/clips/ab.mp4"):
        with pytest.raises(ValueError, match="a released clip lies in file:///r/rel/clips/"):
            hf.file_name("file:///r/rel", bad)


@pytest.mark.e2e
def test_a_release_on_s3_streams_with_paths_that_resolve_and_a_takedown_reaches_it(s3, hf_env):
    """On S3, `datasets` streams the metadata file and joins each `file_name` to its folder, so the
    video paths are the released objects' URIs; a takedown removes the clip from what it streams."""
    from corpus_anon.release.takedown import takedown

    endpoint, fs = s3
    fs.mkdir("bkt")
    tmp, base = hf_env, "s3://bkt"
    storage = Storage(StorageSettings(unrestricted=True, endpoint_url=endpoint))
    cfg = _cfg(base)
    _add_clips(storage, base, tmp, CLIPS)
    assert rl.release(cfg, storage, f"{base}/out", secret=SECRET, threads=1).version == "v0001"
    options = {"client_kwargs": {"endpoint_url": endpoint}}

    def streamed(version: str | None = None, streaming: bool = True) -> dict[str, dict]:
        ds = hf.load_release(f"{base}/rel", version, streaming=streaming, storage_options=options,
                             cache_dir=str(tmp / "hf-cache"))
        return {r["release_id"]: r for r in ds}

    got = streamed()
    # not streamed: through the version's manifest.parquet, whose clip_uri are the objects' URIs
    assert {k: v["video"] for k, v in streamed(streaming=False).items()} == {k: v["video"] for k, v in got.items()}
    manifest = {r["release_id"]: r for r in pq.read_table(
        fs.open("bkt/rel/releases/v0001/manifest.parquet", "rb")).to_pylist()}
    assert set(got) == set(manifest) and len(got) == 3
    for rid, r in got.items():
        assert r["video"]["path"] == manifest[rid]["clip_uri"]
        with fs.open(r["video"]["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == manifest[rid]["sha256"] == r["sha256"]
    gone = rl.release_id(SECRET, "Maria_sc1")
    td = takedown(cfg, storage, f"{base}/rel", secret=SECRET, clip="Maria_sc1")
    for version in (None, "v0001"):
        assert set(streamed(version)) == set(streamed(version, streaming=False)) == set(manifest) - {gone}
    assert not fs.exists(manifest[gone]["clip_uri"])


def test_a_version_with_no_clips_says_so(hf_env):
    tmp_path = hf_env
    storage = _storage()
    root = tmp_path / "rel"
    storage.write_text(f"{root}/releases/v0001/release.json", "{}")
    hf.write_hf_files(storage, str(root), "v0001", [], {"columns": ["release_id", "clip_uri"]}, "# card\n", latest=True)
    assert pq.read_table(root / "metadata-v0001.parquet").num_rows == 0
    with pytest.raises(ValueError, match="lists no clips"):
        hf.load_release(str(root), "v0001", cache_dir=str(tmp_path / "hf-cache"))


def test_a_takedown_between_the_manifest_and_the_metadata_is_not_undone(hf_env, monkeypatch):
    """A takedown that amends a version's manifest while the release is writing that version's metadata
    files: the release re-reads the manifest and writes the files again from what it holds now."""
    import io

    from corpus_anon.release import publish

    tmp = hf_env
    rel, storage, cfg = tmp / "rel", _storage(), _cfg(f"file://{tmp}")
    _add_clips(storage, f"file://{tmp}", tmp, CLIPS)
    gone = rl.release_id(SECRET, "Cory_sc2")
    real = publish.write_hf_files
    calls = []

    def racing(storage_, root_uri, version, rows, meta, card, *, latest):
        real(storage_, root_uri, version, rows, meta, card, latest=latest)
        calls.append(len(rows))
        if len(calls) == 1:  # "the takedown": the manifest loses a row right after the files were written
            uri = f"{root_uri}/releases/{version}/manifest.parquet"
            table = pq.read_table(io.BytesIO(storage_.read_bytes(uri)))
            keep = [i for i, r in enumerate(table.to_pylist()) if r["release_id"] != gone]
            buf = io.BytesIO()
            pq.write_table(table.take(keep), buf)
            storage_.write_bytes(uri, buf.getvalue())

    monkeypatch.setattr(publish, "write_hf_files", racing)
    rl.release(cfg, storage, str(tmp / "out"), secret=SECRET, threads=1)
    assert calls == [3, 2]
    for p in rel.glob("metadata*.parquet"):
        assert gone.encode() not in p.read_bytes(), p
