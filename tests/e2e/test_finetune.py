"""`faces finetune` end to end: generated 128 px crop sets (a corpus set of 3 signers, a reference
set of 2 identities), the tiny model store, and a 2-worker CPU Ray Train run on a local Ray that
checkpoints, resumes, publishes a model that the anonymizer's loader takes, and registers it.
The checks that fail before any training run without Ray."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from corpus_anon.config import ConfigError, config_from_dict

pytestmark = pytest.mark.e2e

SIDE = 128
FRAMES = 8
# identity -> number of chunks; the corpus signers have different numbers of chunks.
CORPUS = {"signer1": 2, "signer2": 1, "signer3": 1}
REFERENCE = {"vox1": 1, "vox2": 1}


def _blob_frames(seed: int) -> np.ndarray:
    """A moving, blinking face-like blob on a coloured background (enough texture to train on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    bg = rng.uniform(40, 200, 3)
    skin = rng.uniform(120, 230, 3)
    out = np.empty((FRAMES, SIDE, SIDE, 3), np.uint8)
    for t in range(FRAMES):
        cx, cy = 64 + 10 * math.sin(t / 2 + seed), 64 + 6 * math.cos(t / 3 + seed)
        face = np.exp(-(((xx - cx) / 28) ** 2 + ((yy - cy) / 36) ** 2))
        eyes = sum(np.exp(-(((xx - cx - dx) / 5) ** 2 + ((yy - cy + 10) / (1 + 3 * (t % 3))) ** 2)) for dx in (-11, 11))
        img = bg[None, None] * (1 - face[..., None]) + skin[None, None] * face[..., None]
        img = img * (1 - 0.8 * eyes[..., None])
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _crop_set(root: Path, identities: dict[str, int], seed: int) -> Path:
    """A crop set in `faces extract`'s layout: chunks/{clip}/{k}.mp4 and index.parquet (relative URIs)."""
    from corpus_anon.finetune.crops import index_table
    from corpus_anon.io.video import encode_mp4

    rows = []
    for i, (ident, n) in enumerate(sorted(identities.items())):
        for k in range(n):
            clip = f"{ident}_clip{k}"
            rel = f"chunks/{clip}/0.mp4"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            encode_mp4(_blob_frames(seed + 10 * i + k), np.arange(FRAMES) / 25.0, Fraction(25), (SIDE, SIDE),
                       str(root / rel), crf=18, threads=1)
            rows.append({"clip_id": clip, "identity_id": ident, "chunk_uri": rel, "frames": FRAMES,
                         "box": [0, 0, 200, 200], "chunk": 0, "fps": 25.0, "crop_size": SIDE})
    pq.write_table(index_table(rows), root / "index.parquet")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The crop sets and the tiny model store (shared by every test here; tests copy what they change)."""
    from corpus_anon.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("finetune")
    corpus = _crop_set(root / "crops", CORPUS, seed=0)
    reference = _crop_set(root / "vox", REFERENCE, seed=100)
    store = make_tiny(root / "store", lcm_lora=False, faces=False)
    return {"root": root, "corpus": corpus, "reference": reference, "store": store}


def _cfg(world, out: Path | str, allow: tuple[Path, ...] = (), **finetune) -> dict:
    roots = [str(p) for p in (world["root"], *allow)]
    ft = {"crops_uri": str(world["corpus"]), "reference_uri": str(world["reference"]), "reference_ratio": 0.5,
          "out": str(out), "workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "pairs_per_epoch": 4,
          "batch_size": 1, "crop_size": SIDE, "milestones": [1], "bg_start_epoch": 1, "dropout_epochs": 2,
          "checkpoint_every": 1, "seed": 3, **finetune}
    return {"device": "cpu",
            "storage": {"allowed_prefixes": {"read": roots, "write": roots}},
            "models": {"profile": "tiny", "store": str(world["store"]), "cache_dir": str(world["root"] / "cache")},
            "finetune": ft}


def _entries_equal(a, b) -> bool:
    import torch

    return all(torch.equal(v, b.entries()[n].state_dict()[k]) for n, m in a.entries().items()
               if n in b.entries() for k, v in m.state_dict().items())


def test_finetune_two_workers_checkpoints_resumes_and_registers(world, ray_cluster, capsys):
    import torch

    from corpus_anon.finetune.job import JSON_NAME, MODEL_NAME, find_checkpoints, finetune
    from corpus_anon.models.reenact import Reenactor
    from corpus_anon.models.tpsmm import load_tpsmm
    from corpus_anon.models.registry import staged_paths, tpsmm_checkpoint, verify_staged
    from corpus_anon.models.add import add_tpsmm
    from corpus_anon.io.storage import Storage, StorageSettings

    out = world["root"] / "out"
    cfg = config_from_dict(_cfg(world, out))
    s1 = finetune(cfg, epochs=1)
    assert (s1["epochs"], s1["epochs_run"], s1["resumed_from"], s1["workers"]) == (1, 1, 0, 2)
    assert s1["steps"] == 2  # 4 pairs per epoch over 2 workers x batch 1
    assert s1["data"] == {"corpus_chunks": 4, "corpus_identities": 3, "reference_chunks": 2,
                          "reference_identities": 2, "reference_ratio": 0.5}
    assert len(s1["losses"]) == 1 and all(math.isfinite(v) for v in s1["losses"][0].values())
    assert s1["losses"][0]["bg"] == 0.0 and s1["losses"][0]["total"] > 0
    assert s1["steps_per_s"] > 0 and s1["pairs_per_s"] == pytest.approx(2 * s1["steps_per_s"], rel=1e-3)
    model = load_tpsmm(out / MODEL_NAME)  # strict: every entry, the background predictor included
    assert set(model.entries()) == {"kp_detector", "dense_motion_network", "inpainting_network", "bg_predictor"}
    init = load_tpsmm(world["store"] / "tpsmm" / "vox.pth.tar")
    assert not _entries_equal(init, model), "training did not move the weights"
    first = json.loads((out / JSON_NAME).read_text())
    assert first["init"] == "vox.pth.tar" and first["config"]["crops_uri"] == str(world["corpus"])
    storage = Storage(StorageSettings.from_config(cfg, None))
    ckpts = find_checkpoints(str(out), storage)
    assert len(ckpts) == 1 and ckpts[0][0].endswith("/epoch-000001")

    # Resume: a second run to 2 epochs trains only epoch 2, and the step count carries on.
    s2 = finetune(cfg, epochs=2)
    assert (s2["epochs"], s2["epochs_run"], s2["resumed_from"], s2["steps"]) == (2, 1, 1, 4)
    assert s2["losses"][0] == s1["losses"][0]
    assert s2["losses"][1]["bg"] > 0  # bg_start_epoch 1
    assert s2["lr"] == pytest.approx([2e-4, 2e-5])  # the scheduler carried on past its milestone
    ckpts = find_checkpoints(str(out), storage)
    assert [c[1]["epochs"] for c in ckpts] == [1, 2] and ckpts[0][1]["run"] != ckpts[1][1]["run"]
    state = torch.load(Path(ckpts[1][0].removeprefix("file://")) / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 4)
    assert len(state["optimizer"]["state"]) > 0
    # A rerun at the same epochs (the CLI this time) trains nothing and publishes the same model again.
    import yaml

    from corpus_anon.cli import main

    cfg_path = world["root"] / "finetune.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["faces", "finetune", str(cfg_path), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "faces finetune: 2 epochs (0 now, resumed from 2), 4 steps on 2 worker(s)" in printed
    assert f"models add-tpsmm {out / MODEL_NAME}" in printed.replace("file://", "")
    s3 = json.loads((out / JSON_NAME).read_text())
    assert (s3["steps"], s3["sha256"]) == (4, s2["sha256"])
    # A changed training setting is refused rather than continued.
    with pytest.raises(ConfigError, match="lr is 0.0002 there and 0.001 here"):
        finetune(config_from_dict(_cfg(world, out, lr=1e-3)), epochs=3)
    # A crop set that changed under the same URI (a takedown removed a signer) is not resumed from.
    index = world["corpus"] / "index.parquet"
    saved = index.read_bytes()
    try:
        table = pq.read_table(index)
        pq.write_table(table.filter(pc.not_equal(table.column("identity_id"), "signer2")), index)
        with pytest.raises(ConfigError, match="the crop sets changed since the checkpoint"):
            finetune(cfg, epochs=3)
    finally:
        index.write_bytes(saved)

    # The published model registers in the store and loads where the anonymizer loads it.
    store = world["root"] / "store-registered"
    shutil.copytree(world["store"], store)
    rel = add_tpsmm(str(store), "tiny", str(out / MODEL_NAME), "signers.pth.tar", storage)
    assert rel == "tpsmm/signers.pth.tar"
    card = json.loads((store / "tpsmm" / "signers.json").read_text())
    assert card["epochs"] == 2 and card["data"]["corpus_identities"] == 3 and card["init"] == "vox.pth.tar"
    from corpus_anon.models.registry import stage

    staged = stage("tiny", str(store), world["root"] / "cache", storage)
    path = tpsmm_checkpoint(staged, "tiny", "signers.pth.tar", verify_staged(staged, "tiny"))
    reenactor = Reenactor.from_checkpoint(path)
    frames = torch.rand(3, 3, SIDE, SIDE)
    assert reenactor.animate(frames[:1], frames).shape == (3, 3, SIDE, SIDE)
    assert staged_paths(staged, "tiny").vgg19 is not None


def test_finetune_refuses_before_training(world, tmp_path):
    """Each failure is one sentence, before Ray or any worker starts (no Ray fixture here)."""
    from corpus_anon.finetune.job import finetune
    from corpus_anon.models.registry import write_local_lock

    def refuse(match: str, **over) -> None:
        data = _cfg(world, tmp_path / "out", allow=(tmp_path,))
        models = over.pop("models", None)
        data["finetune"].update(over)
        if models:
            data["models"].update(models)
        with pytest.raises(ConfigError, match=match):
            finetune(config_from_dict(data))

    refuse("finetune.crops_uri is not set", crops_uri=None)
    refuse("finetune.out is not set", out=None)
    refuse("reference_ratio is 1 .* finetune.reference_uri is not set", reference_uri=None, reference_ratio=1.0)
    refuse("finetune.crops_uri: .*index.parquet does not exist", crops_uri=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    from corpus_anon.finetune.crops import index_table

    pq.write_table(index_table([]), empty / "index.parquet")
    refuse("finetune.crops_uri: the crop set .* has no chunks", crops_uri=str(empty))
    refuse("finetune.init: the model store's lock has no TPSMM checkpoint 'missing.pth.tar'", init="missing.pth.tar")
    refuse("finetune.init .*gone.pth.tar does not exist", init=str(tmp_path / "gone.pth.tar"))
    refuse("finetune.out: .* is outside storage.allowed_prefixes.write", out="/elsewhere/out")
    # A store without the VGG-19 (its lock recorded again without it).
    bare = tmp_path / "store-novgg"
    shutil.copytree(world["store"], bare)
    shutil.rmtree(bare / "vgg19")
    write_local_lock(bare, "tiny")
    refuse("has no VGG-19 weights for the perceptual loss: put torchvision's vgg19-dcbb9e9d.pth",
           models={"store": str(bare), "cache_dir": str(tmp_path / "cache")})
    refuse("models.store is not set", models={"store": None})
    # A reference set in use must be readable too.
    unused = _cfg(world, tmp_path / "out", allow=(tmp_path,))
    unused["finetune"].update(reference_uri=str(tmp_path / "nowhere"), reference_ratio=0.5)
    with pytest.raises(ConfigError, match="finetune.reference_uri: .*does not exist"):
        finetune(config_from_dict(unused))


def test_resume_lookup_skips_incomplete_checkpoints(world, tmp_path):
    from corpus_anon.finetune.job import CKPT_JSON, CKPT_MODEL, CKPT_STATE, latest_checkpoint
    from corpus_anon.io.storage import Storage, StorageSettings

    out = tmp_path / "out"
    storage = Storage(StorageSettings(allowed_read=(str(tmp_path),)))
    for run, epoch, complete in (("run-a", 1, True), ("run-b", 2, True), ("run-b", 3, False)):
        d = out / "runs" / run / f"epoch-{epoch:06d}"
        d.mkdir(parents=True)
        (d / CKPT_MODEL).write_bytes(b"m" * 10)
        (d / CKPT_STATE).write_bytes(b"s" * (20 if complete else 7))  # a copy cut short
        files = {CKPT_MODEL: {"bytes": 10, "sha256": "0" * 64}, CKPT_STATE: {"bytes": 20, "sha256": "0" * 64}}
        (d / CKPT_JSON).write_text(json.dumps({"epochs": epoch, "files": files, "finished_at": "x"}))
    (out / "runs" / "run-c" / "epoch-000009").mkdir(parents=True)
    (out / "runs" / "run-c" / "epoch-000009" / CKPT_JSON).write_text("{not json")
    folder, info = latest_checkpoint(str(out), storage)
    assert folder.endswith("run-b/epoch-000002") and info["epochs"] == 2
    assert latest_checkpoint(str(tmp_path / "none"), storage) is None


def test_finetune_checkpoints_and_publishes_on_s3(world, ray_cluster, s3):
    """`finetune.out` on S3 (a real local S3 server): Ray Train writes the checkpoint there through
    the configured endpoint, and the driver finds it again and publishes from it."""
    from corpus_anon.finetune.job import JSON_NAME, MODEL_NAME, find_checkpoints, finetune
    from corpus_anon.models.tpsmm import load_tpsmm
    from corpus_anon.io.storage import Storage, StorageSettings

    endpoint, fs = s3
    fs.mkdir("ft-bucket")
    data = _cfg(world, "s3://ft-bucket/finetune", reference_ratio=0.0, pairs_per_epoch=2, workers=1)
    data["storage"]["endpoint_url"] = endpoint
    for kind in ("read", "write"):
        data["storage"]["allowed_prefixes"][kind].append("s3://ft-bucket")
    cfg = config_from_dict(data)
    s = finetune(cfg, epochs=1)
    assert (s["epochs"], s["steps"], s["workers"]) == (1, 2, 1)
    assert s["data"]["reference_chunks"] == 0 and s["data"]["reference_ratio"] == 0.0
    assert s["model_uri"] == f"s3://ft-bucket/finetune/{MODEL_NAME}"
    storage = Storage(StorageSettings.from_config(cfg, endpoint))
    (folder, info), = find_checkpoints("s3://ft-bucket/finetune", storage)
    assert folder.startswith("s3://ft-bucket/finetune/runs/run-") and folder.endswith("/epoch-000001")
    assert fs.exists(f"ft-bucket/finetune/{JSON_NAME}")
    local = world["root"] / "from-s3.pth.tar"
    fs.get_file(f"ft-bucket/finetune/{MODEL_NAME}", str(local))
    assert "bg_predictor" in load_tpsmm(local).entries()
    again = finetune(cfg, epochs=1)
    assert (again["epochs_run"], again["sha256"]) == (0, s["sha256"])


def test_a_worker_failure_is_one_sentence(world, ray_cluster, tmp_path):
    """Chunks that exist but do not decode pass the driver's checks; the workers leave them out one
    by one and give up when nothing loadable is left, and the driver says so in one sentence."""
    from corpus_anon.finetune.job import finetune
    from corpus_anon.run.pipeline import RunError

    broken = tmp_path / "broken"
    shutil.copytree(world["corpus"], broken)
    for mp4 in broken.glob("chunks/*/*.mp4"):
        mp4.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)  # an MP4 header, nothing after it
    data = _cfg(world, tmp_path / "out", allow=(tmp_path,), crops_uri=str(broken), reference_ratio=0.0,
                workers=1, pairs_per_epoch=1)
    with pytest.raises(RunError, match=r"^fine-tuning failed \(RuntimeError: no loadable crop chunk was drawn in "
                                       r"1000 tries\); rerun to continue from the latest checkpoint\.$"):
        finetune(config_from_dict(data))
