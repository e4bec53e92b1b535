"""Model profiles, the tiny store, staging against the lock, and offline loading."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from corpus_anon.models import registry as reg
from corpus_anon.models.add import add_centerface, add_raft, add_tpsmm
from corpus_anon.models.tiny import TINY_HED_CHANNELS
from corpus_anon.models.registry import LOCK_NAME, ModelIntegrityError, ModelStoreError, stage
from corpus_anon.models.tiny import make_tiny
from corpus_anon.models.load import load_models
from corpus_anon.io.storage import Storage, StorageSettings, sha256_file

PIPELINE_DIRS = ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")


class CountingStorage(Storage):
    """The real Storage, counting downloads (thread-safe), to see what staging copies."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.downloads: list[str] = []
        self._mu = threading.Lock()

    def download(self, uri: str, local_path: str) -> None:
        with self._mu:
            self.downloads.append(uri)
        super().download(uri, local_path)


def _storage() -> CountingStorage:
    return CountingStorage(StorageSettings(unrestricted=True))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "store", seed=0)


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    """A private copy of the tiny store that a test may damage."""
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


def _lock(root: Path) -> dict:
    return json.loads((root / LOCK_NAME).read_text())


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- make_tiny ------------------------------------------------------------------------------------
def test_make_tiny_writes_the_diffusers_layout_hed_and_lock(tiny_store):
    assert (tiny_store / "model_index.json").is_file()
    for d in PIPELINE_DIRS:
        assert (tiny_store / d).is_dir(), d
    assert (tiny_store / "hed" / "ControlNetHED.pth").is_file()
    index = json.loads((tiny_store / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]
    lock = _lock(tiny_store)
    assert lock["profile"] == "tiny"
    assert "hed/ControlNetHED.pth" in lock["files"] and "unet/diffusion_pytorch_model.safetensors" in lock["files"]
    for rel, ent in lock["files"].items():  # the lock tells the truth about every file
        p = tiny_store / rel
        assert p.stat().st_size == ent["bytes"] and sha256_file(str(p)) == ent["sha256"], rel
    vae = json.loads((tiny_store / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # SD's VAE scale factor
    unet = json.loads((tiny_store / "unet" / "config.json").read_text())
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "UpBlock2D"]
    sched = json.loads((tiny_store / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["beta_schedule"], sched["beta_start"], sched["beta_end"],
            sched["steps_offset"], sched["clip_sample"], sched["set_alpha_to_one"]) == (
        "DDIMScheduler", "scaled_linear", 0.00085, 0.012, 1, False, False)


def test_make_tiny_is_deterministic_for_a_seed(tiny_store, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    assert _lock(again) == _lock(tiny_store)
    other = _lock(make_tiny(tmp_path / "other", seed=1))["files"]
    base = _lock(tiny_store)["files"]
    assert other["unet/diffusion_pytorch_model.safetensors"] != base["unet/diffusion_pytorch_model.safetensors"]
    assert other["hed/ControlNetHED.pth"] != base["hed/ControlNetHED.pth"]


# ---- staging and loading --------------------------------------------------------------------------
def test_stage_then_load_offline_runs_unet_with_controlnet(store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert staged == reg.staged_dir_for("tiny", str(store), tmp_path / "cache")
    assert staged.name.startswith("tiny-")
    m = load_models(staged, "tiny")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert m.profile == "tiny" and m.lcm_lora_path is not None and m.lcm_lora_path.name == "pytorch_lora_weights.safetensors"
    assert m.file_sha256 == {r: e["sha256"] for r, e in _lock(store)["files"].items()}
    assert type(m.unet).__name__ == "UNet2DConditionModel" and type(m.controlnet).__name__ == "ControlNetModel"
    assert type(m.scheduler).__name__ == "DDIMScheduler" and m.scheduler.config.steps_offset == 1
    assert m.hed.channels == TINY_HED_CHANNELS
    assert not m.unet.training and not m.text_encoder.training
    # The cross-frame processor targets self-attention in the UNet's up blocks.
    assert any(n.startswith("up_blocks.") and n.endswith("attn1.processor") for n in m.unet.attn_processors)

    ids = m.tokenizer(["a signer, photo, studio light", "Zürich 42 ünïcödé"], padding="max_length",
                      max_length=m.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    with torch.no_grad():
        emb = m.text_encoder(ids)[0][:1]
        assert emb.shape == (1, 77, 32)
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])

        def eps(cond: torch.Tensor) -> torch.Tensor:
            down, mid = m.controlnet(latent, t, encoder_hidden_states=emb, controlnet_cond=cond,
                                     return_dict=False)
            return m.unet(latent, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample

        a, b = eps(torch.zeros(1, 3, 64, 64)), eps(torch.ones(1, 3, 64, 64))
        assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
        assert not torch.allclose(a, b)  # the control image reaches the UNet
        z = m.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        assert z.shape == (1, 4, 8, 8)
        assert m.vae.decode(z).sample.shape == (1, 3, 64, 64)


def test_staging_twice_copies_nothing_the_second_time(store, tmp_path):
    st = _storage()
    staged = stage("tiny", str(store), tmp_path / "cache", st)
    n = len(_lock(store)["files"])
    assert len(st.downloads) == n
    mtimes = {p: p.stat().st_mtime_ns for p in staged.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    st.downloads.clear()
    assert stage("tiny", str(store), tmp_path / "cache", st) == staged
    assert st.downloads == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_an_updated_store_restages_only_the_changed_files(store, tmp_path):
    st = _storage()
    staged = stage("tiny", str(store), tmp_path / "cache", st)
    before = _lock(store)["files"]
    make_tiny(store, seed=1)  # new weights, same configs
    after = _lock(store)["files"]
    changed = sorted(r for r in after if after[r] != before.get(r))
    assert changed and len(changed) < len(after)
    st.downloads.clear()
    stage("tiny", str(store), tmp_path / "cache", st)
    assert sorted(u.split(str(store) + "/", 1)[1] for u in st.downloads) == changed
    assert reg.verify_staged(staged, "tiny") == after


def test_concurrent_stagers_on_one_node_stage_once(store, tmp_path):
    st = _storage()
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(stage("tiny", str(store), tmp_path / "cache", st))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(results)) == 1 and len(results) == 3
    assert len(st.downloads) == len(_lock(store)["files"])


def test_tampered_store_file_is_refused(store, tmp_path):
    _flip_byte(store / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelIntegrityError, match=r"unet/diffusion_pytorch_model\.safetensors .*does not match"):
        stage("tiny", str(store), tmp_path / "cache", _storage())
    staged = reg.staged_dir_for("tiny", str(store), tmp_path / "cache")
    assert not (staged / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(staged.rglob("*.part-*"))
    assert not (staged / LOCK_NAME).exists()  # an incomplete folder is never marked staged


def test_tampered_staged_file_is_refused_by_load_models_and_restaged(store, tmp_path):
    st = _storage()
    staged = stage("tiny", str(store), tmp_path / "cache", st)
    _flip_byte(staged / "text_encoder" / "model.safetensors")
    with pytest.raises(ModelIntegrityError, match=r"text_encoder/model\.safetensors does not match the lock"):
        load_models(staged, "tiny")
    st.downloads.clear()
    stage("tiny", str(store), tmp_path / "cache", st)  # staging repairs exactly that file
    assert [u.rsplit("/", 2)[-2:] for u in st.downloads] == [["text_encoder", "model.safetensors"]]
    reg.verify_staged(staged, "tiny")


def test_missing_staged_file_and_unstaged_folder_are_refused(store, tmp_path):
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    (staged / "hed" / "ControlNetHED.pth").unlink()
    with pytest.raises(ModelIntegrityError, match=r"ControlNetHED\.pth is missing"):
        load_models(staged, "tiny")
    with pytest.raises(ModelStoreError, match="was not staged"):
        load_models(store / "unet", "tiny")


def test_store_without_lock_is_refused_unless_recording(store, tiny_store, tmp_path):
    (store / LOCK_NAME).unlink()
    with pytest.raises(ModelStoreError, match=r"corpus-anon models stage --record"):
        stage("tiny", str(store), tmp_path / "cache", _storage())
    staged = stage("tiny", str(store), tmp_path / "cache", _storage(), record=True)
    assert _lock(store) == _lock(tiny_store)  # the recorded lock hashes the same files
    assert _lock(staged) == _lock(tiny_store)
    reg.verify_staged(staged, "tiny")


def test_record_refuses_a_store_missing_a_required_file(store, tmp_path):
    (store / LOCK_NAME).unlink()
    (store / "hed" / "ControlNetHED.pth").unlink()
    with pytest.raises(ModelStoreError, match=r"lacks hed/ControlNetHED\.pth, required hed model"):
        stage("tiny", str(store), tmp_path / "cache", _storage(), record=True)
    assert not (store / LOCK_NAME).exists()


def test_store_missing_a_locked_file_is_refused_naming_it(store, tmp_path):
    (store / "vae" / "config.json").unlink()
    with pytest.raises(ModelStoreError, match=r"lacks vae/config\.json"):
        stage("tiny", str(store), tmp_path / "cache", _storage())


def test_lock_for_another_profile_or_unknown_profile_is_refused(store, tmp_path):
    lock = _lock(store)
    lock["profile"] = "sd15-hed"
    (store / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(ModelStoreError, match=r"is for profile 'sd15-hed', not 'tiny'"):
        stage("tiny", str(store), tmp_path / "cache", _storage())
    with pytest.raises(ValueError, match="unknown model profile"):
        stage("sd14", str(store), tmp_path / "cache", _storage())


def test_storage_policy_applies_to_model_store_reads(store, tmp_path):
    st = Storage(StorageSettings(allowed_read=(str(tmp_path / "elsewhere"),)))
    with pytest.raises(PermissionError, match="allowed_prefixes"):
        stage("tiny", str(store), tmp_path / "cache", st)


def test_cache_folder_is_keyed_by_profile_and_normalized_store(tmp_path):
    a = reg.staged_dir_for("tiny", str(tmp_path / "s"), tmp_path)
    assert a == reg.staged_dir_for("tiny", "file://" + str(tmp_path / "s") + "/", tmp_path)
    assert a != reg.staged_dir_for("tiny", str(tmp_path / "t"), tmp_path)
    assert reg.staged_dir_for("tiny", "s3://bucket/models", None).parent == reg.default_cache_dir()


# ---- the real profile's file list, without real weights --------------------------------------------
def _fake_real_store(root: Path, with_vae: bool) -> None:
    for src in reg.sources("sd15-hed"):
        if not src.required and not (with_vae and src.role == "vae"):
            continue
        for f in src.files:
            p = root / src.relpath(f)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"placeholder {src.relpath(f)}".encode())


def test_real_profile_lists_hub_layout_with_licences():
    srcs = {s.role: s for s in reg.sources("sd15-hed")}
    assert set(srcs) == {"pipeline", "controlnet", "hed", "vae", "lcm_lora", "tpsmm", "insightface", "dlib", "vgg19",
                         "centerface", "mediapipe", "raft"}
    assert srcs["centerface"].relpath("centerface.onnx") == reg.CENTERFACE_RELPATH == "centerface/centerface.onnx"
    assert srcs["centerface"].licence.startswith("MIT") and not srcs["centerface"].required
    for profile in reg.PROFILES:  # the real detector file is pinned in every profile
        assert reg.PINNED_SHA256[profile][reg.CENTERFACE_RELPATH] == reg.CENTERFACE_SHA256
    assert reg.tpsmm_relpath("sd15-hed", "vox.pth.tar") == "yoyo-nb/Thin-Plate-Spline-Motion-Model/vox.pth.tar"
    assert srcs["vgg19"].relpath(reg.VGG19_FILE) == "torchvision/vgg19/vgg19-dcbb9e9d.pth"  # torchvision's name
    pin = reg.PINNED_SHA256["sd15-hed"]["torchvision/vgg19/vgg19-dcbb9e9d.pth"]
    assert len(pin) == 64 and pin.startswith("dcbb9e9d")  # the full sha256, its name's prefix
    assert [r for r, s in srcs.items() if s.required] == ["pipeline", "controlnet", "hed"]
    assert srcs["pipeline"].licence == "CreativeML OpenRAIL-M"
    assert srcs["vae"].licence == "MIT" and srcs["lcm_lora"].licence == "OpenRAIL++"
    assert srcs["hed"].relpath("ControlNetHED.pth") == "lllyasviel/Annotators/ControlNetHED.pth"
    assert "unet/diffusion_pytorch_model.safetensors" in srcs["pipeline"].files
    assert not any("safety_checker" in f for f in srcs["pipeline"].files)
    pin = reg.PINNED_SHA256["sd15-hed"]["lllyasviel/Annotators/ControlNetHED.pth"]
    assert pin.startswith("5ca93762")


def test_real_profile_refuses_an_annotator_that_is_not_the_published_one(tmp_path):
    _fake_real_store(tmp_path / "store", with_vae=False)
    with pytest.raises(ModelIntegrityError, match=r"ControlNetHED\.pth has sha256 .* not the published 5ca93762"):
        stage("sd15-hed", str(tmp_path / "store"), tmp_path / "cache", _storage(), record=True)


def test_real_profile_records_stages_and_maps_paths(tmp_path, monkeypatch):
    store = tmp_path / "store"
    _fake_real_store(store, with_vae=True)
    hed = store / "lllyasviel" / "Annotators" / "ControlNetHED.pth"
    monkeypatch.setitem(reg.PINNED_SHA256, "sd15-hed",
                        {"lllyasviel/Annotators/ControlNetHED.pth": sha256_file(str(hed))[:8]})
    (store / "unused.bin").write_bytes(b"not part of the profile")
    staged = stage("sd15-hed", str(store), tmp_path / "cache", _storage(), record=True)
    files = _lock(store)["files"]
    assert "unused.bin" not in files and "stabilityai/sd-vae-ft-mse/config.json" in files
    assert not any(f.startswith("latent-consistency/") for f in files)
    p = reg.staged_paths(staged, "sd15-hed")
    assert p.pipeline == staged / "stable-diffusion-v1-5" / "stable-diffusion-v1-5"
    assert p.controlnet == staged / "lllyasviel" / "sd-controlnet-hed"
    assert p.hed == staged / "lllyasviel" / "Annotators" / "ControlNetHED.pth"
    assert p.vae == staged / "stabilityai" / "sd-vae-ft-mse" and p.lcm_lora is None


def test_registry_imports_no_heavy_modules():
    code = ("import sys, corpus_anon.models.registry; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'corpus_anon.config', 'cv2') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- face model files -----------------------------------------------------------------------------
def test_tiny_store_stages_the_real_dlib_files_pinned(store, tmp_path):
    lock = _lock(store)["files"]
    for name, sha in reg.DLIB_SHA256.items():
        assert lock[f"dlib/{name}"]["sha256"] == sha
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    paths = reg.staged_paths(staged, "tiny")
    assert paths.dlib == staged / "dlib" and (paths.dlib / "dlib_face_recognition_resnet_model_v1.dat").is_file()
    assert paths.insightface is None  # not in the tiny store


def test_tiny_store_stages_the_real_centerface_file_pinned(store, tmp_path):
    lock = _lock(store)["files"]
    assert lock[reg.CENTERFACE_RELPATH] == {"sha256": reg.CENTERFACE_SHA256, "bytes": 7_304_518}
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.staged_paths(staged, "tiny").centerface == staged / "centerface" / "centerface.onnx"
    assert reg.sha256_file(str(staged / "centerface" / "centerface.onnx")) == reg.CENTERFACE_SHA256


def test_a_centerface_file_with_other_bytes_is_refused(store, tmp_path):
    _flip_byte(store / "centerface" / "centerface.onnx")
    with pytest.raises(ModelIntegrityError, match="not the published"):
        reg.write_local_lock(store, "tiny")
    (store / LOCK_NAME).unlink(missing_ok=True)
    with pytest.raises(ModelIntegrityError, match="not the published"):
        stage("tiny", str(store), tmp_path / "cache", _storage(), record=True)


def test_add_centerface_puts_the_file_into_a_store_and_its_lock(store, tmp_path):
    lock = _lock(store)
    del lock["files"][reg.CENTERFACE_RELPATH]
    (store / LOCK_NAME).write_text(json.dumps(lock))
    (store / "centerface" / "centerface.onnx").unlink()
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.staged_paths(staged, "tiny").centerface is None
    assert add_centerface(str(store), _storage()).endswith(f"{store}/centerface/centerface.onnx")
    assert _lock(store)["files"][reg.CENTERFACE_RELPATH]["sha256"] == reg.CENTERFACE_SHA256
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.staged_paths(staged, "tiny").centerface.is_file()
    # a store without a lock takes the file; the lock recorded later lists it
    bare = tmp_path / "bare"
    bare.mkdir()
    add_centerface(str(bare), _storage())
    assert (bare / "centerface" / "centerface.onnx").stat().st_size == 7_304_518
    assert not (bare / LOCK_NAME).exists()


def test_dlib_files_with_other_bytes_are_refused(store, tmp_path):
    _flip_byte(store / "dlib" / "shape_predictor_5_face_landmarks.dat")
    with pytest.raises(ModelIntegrityError, match="not the published"):
        reg.write_local_lock(store, "tiny")
    (store / LOCK_NAME).unlink(missing_ok=True)
    with pytest.raises(ModelIntegrityError, match="not the published"):
        stage("tiny", str(store), tmp_path / "cache", _storage(), record=True)


def test_face_model_root_comes_from_the_store_or_fails_in_one_sentence(store, tmp_path):
    from corpus_anon.config import config_from_dict
    from corpus_anon.models.faces import face_model_root

    models = {"profile": "tiny", "store": str(store), "cache_dir": str(tmp_path / "cache")}
    cfg = config_from_dict({"faces": {"backend": "dlib"}, "models": models})
    root = Path(face_model_root(cfg, _storage()))
    assert root.parent == reg.staged_dir_for("tiny", str(store), tmp_path / "cache") and root.name == "dlib"
    cfg = config_from_dict({"faces": {"backend": "insightface"}, "models": models})
    with pytest.raises(ModelStoreError, match="insightface/models/buffalo_l/"):
        face_model_root(cfg, _storage())
    with pytest.raises(ValueError, match="needs models.store"):
        face_model_root(config_from_dict({"faces": {"backend": "insightface"}}))
    # No store: dlib's files from the installed package, checked against their pins.
    assert Path(face_model_root(config_from_dict({"faces": {"backend": "dlib"}}))).name == "models"


def test_run_preflight_refuses_a_store_without_the_face_files(store, tmp_path):
    from corpus_anon.config import config_from_dict
    from corpus_anon.config import ConfigError
    from corpus_anon.run.pipeline import model_lock_digest

    lock = _lock(store)
    lock["files"] = {k: v for k, v in lock["files"].items() if not k.startswith("dlib/")}
    (store / LOCK_NAME).write_text(json.dumps(lock))
    cfg = config_from_dict({"faces": {"backend": "dlib"}, "anonymizer": {"kind": "pixelate"},
                            "models": {"profile": "tiny", "store": str(store)}})
    with pytest.raises(ConfigError, match="needs dlib/ in the model store's lock"):
        model_lock_digest(cfg, _storage())
    cfg = config_from_dict({"faces": {"backend": "none"}, "anonymizer": {"kind": "pixelate"},
                            "models": {"profile": "tiny", "store": str(store)}})
    assert len(model_lock_digest(cfg, _storage())) == 12


def test_a_file_changed_after_staging_is_hashed_again(store, tmp_path):
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    reg.verify_staged(staged, "tiny")  # hashed once in this process
    _flip_byte(staged / "hed" / "ControlNetHED.pth")
    with pytest.raises(ModelIntegrityError):
        reg.verify_staged(staged, "tiny")


# ---- TPSMM checkpoints: the public one and fine-tunes ------------------------------------------------
def test_fine_tuned_tpsmm_checkpoints_are_registered_beside_the_public_one(store, tmp_path):
    import torch

    from corpus_anon.models.tpsmm import TPSMM, save_checkpoint

    assert "tpsmm/vox.pth.tar" in _lock(store)["files"]
    torch.manual_seed(5)
    ft = save_checkpoint(TPSMM.build(0.125), tmp_path / "ft.pth.tar", epoch=3)
    (tmp_path / "ft.json").write_text(json.dumps({"init": "vox.pth.tar", "epochs": 3}))
    rel = add_tpsmm(str(store), "tiny", str(ft), "asl-ft.pth.tar", _storage())
    assert rel == "tpsmm/asl-ft.pth.tar"
    files = _lock(store)["files"]
    assert files[rel]["sha256"] == sha256_file(str(ft)) and "tpsmm/asl-ft.json" not in files
    assert json.loads((store / "tpsmm" / "asl-ft.json").read_text())["epochs"] == 3
    # the lock still validates (record finds the same set) and staging brings the fine-tune along
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    path = reg.tpsmm_checkpoint(staged, "tiny", "asl-ft.pth.tar", files)
    assert path.is_file() and sha256_file(str(path)) == sha256_file(str(ft))
    with pytest.raises(ModelStoreError, match=r"no TPSMM checkpoint 'other.pth.tar' \(it has asl-ft.pth.tar, "
                                              r"vox.pth.tar\)"):
        reg.tpsmm_checkpoint(staged, "tiny", "other.pth.tar", files)
    # a different file under a taken name is refused unless replaced; a broken file never lands
    torch.manual_seed(6)
    ft2 = save_checkpoint(TPSMM.build(0.125), tmp_path / "ft2.pth.tar")
    with pytest.raises(ModelStoreError, match="already has a different tpsmm/asl-ft.pth.tar"):
        add_tpsmm(str(store), "tiny", str(ft2), "asl-ft.pth.tar", _storage())
    (tmp_path / "bad.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelStoreError, match="not a loadable TPSMM checkpoint"):
        add_tpsmm(str(store), "tiny", str(tmp_path / "bad.pth.tar"), "bad.pth.tar", _storage())
    assert not (store / "tpsmm" / "bad.pth.tar").exists()
    for name in ("../x.pth.tar", "x.pt", ".hidden.pth.tar"):
        with pytest.raises(ValueError, match="plain file name ending in .pth.tar"):
            reg.tpsmm_relpath("tiny", name)


def test_run_preflight_and_fingerprint_follow_faces_tpsmm(store, tmp_path):
    import torch

    from corpus_anon.config import ConfigError, config_from_dict, output_fingerprint
    from corpus_anon.models.tpsmm import TPSMM, save_checkpoint
    from corpus_anon.run.pipeline import model_lock_digest

    def cfg(name: str):
        return config_from_dict({"anonymizer": {"kind": "diffslva"}, "faces": {"backend": "dlib", "tpsmm": name},
                                 "models": {"profile": "tiny", "store": str(store)}})

    with pytest.raises(ConfigError, match=r"needs the TPSMM checkpoint tpsmm/asl.pth.tar \(faces.tpsmm\)"):
        model_lock_digest(cfg("asl.pth.tar"), _storage())
    torch.manual_seed(1)
    add_tpsmm(str(store), "tiny", str(save_checkpoint(TPSMM.build(0.125), tmp_path / "a.pth.tar")),
              "asl.pth.tar", _storage())
    assert len(model_lock_digest(cfg("asl.pth.tar"), _storage())) == 12
    assert output_fingerprint(cfg("asl.pth.tar")) != output_fingerprint(cfg("vox.pth.tar"))


def test_tiny_store_holds_a_vgg19_that_loads_strictly(store, tmp_path):
    from corpus_anon.models.vgg import load_vgg19

    assert f"vgg19/{reg.VGG19_FILE}" in _lock(store)["files"]
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    vgg = load_vgg19(reg.staged_paths(staged, "tiny").vgg19)
    assert vgg.features[0].out_channels == 8  # an eighth of torchvision's 64


def test_registering_a_fine_tune_or_vgg_changes_no_other_runs_fingerprint(store, tmp_path):
    import hashlib

    import torch

    from corpus_anon.config import config_from_dict
    from corpus_anon.models.tpsmm import TPSMM, save_checkpoint
    from corpus_anon.run.pipeline import model_lock_digest

    def digest(kind: str, tpsmm: str = "vox.pth.tar") -> str:
        return model_lock_digest(config_from_dict({
            "anonymizer": {"kind": kind}, "faces": {"backend": "dlib", "tpsmm": tpsmm},
            "models": {"profile": "tiny", "store": str(store)}}), _storage())

    # A store as earlier versions wrote it (no VGG-19, no RAFT): the digest is that of the lock file's bytes.
    lock = _lock(store)
    lock["files"] = {k: v for k, v in lock["files"].items() if not k.startswith(("vgg19/", "raft/"))}
    (store / LOCK_NAME).write_text(reg.lock_json("tiny", lock["files"]))
    old = hashlib.sha256((store / LOCK_NAME).read_bytes()).hexdigest()[:12]
    assert digest("diffslva") == digest("pixelate") == old
    add_raft(str(store), _storage())  # RAFT's pinned checkpoints: in the lock, in no digest
    assert "raft/raft-sintel.pth" in _lock(store)["files"]
    assert digest("diffslva") == digest("pixelate") == old
    reg.write_local_lock(store, "tiny")  # VGG-19 back in the lock
    torch.manual_seed(2)
    add_tpsmm(str(store), "tiny", str(save_checkpoint(TPSMM.build(0.125), tmp_path / "f.pth.tar")),
              "asl.pth.tar", _storage())
    assert digest("diffslva") == digest("pixelate") == old
    assert digest("diffslva", "asl.pth.tar") != old  # the run that uses the fine-tune does change
    (store / "tpsmm" / "vox.pth.tar").write_bytes(b"x")  # the public checkpoint's bytes always count
    reg.write_local_lock(store, "tiny")
    assert digest("pixelate") != old


# ---- RAFT's checkpoints (diffusion.flow: raft-*) ------------------------------------------------
def test_tiny_store_stages_the_real_raft_files_pinned(store, tmp_path):
    from corpus_anon.models.raft import RAFT_FILES, installed_raft_file

    lock = _lock(store)["files"]
    for variant, name in RAFT_FILES.items():
        rel = reg.raft_relpath(name)
        assert lock[rel]["sha256"] == reg.RAFT_SHA256[name] == reg.PINNED_SHA256["tiny"][rel] \
            == reg.PINNED_SHA256["sd15-hed"][rel]
        assert lock[rel]["bytes"] == installed_raft_file(variant).stat().st_size
    src = next(s for s in reg.sources("sd15-hed") if s.role == "raft")
    assert src.licence.startswith("BSD-3-Clause") and "princeton-vl" in src.licence and not src.required
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.staged_paths(staged, "tiny").raft == staged / "raft"
    files = reg.verify_staged(staged, "tiny")
    assert reg.raft_checkpoint(staged, "raft-small.pth", files) == staged / "raft" / "raft-small.pth"
    with pytest.raises(ValueError, match="not one of the RAFT checkpoint files"):
        reg.raft_relpath("raft-things.pth")


def test_a_raft_file_with_other_bytes_is_refused(store, tmp_path):
    _flip_byte(store / "raft" / "raft-small.pth")
    with pytest.raises(ModelIntegrityError):  # against the lock
        stage("tiny", str(store), tmp_path / "cache", _storage())
    (store / LOCK_NAME).unlink()
    with pytest.raises(ModelIntegrityError, match="not the published"):  # against the pin
        reg.write_local_lock(store, "tiny")


def test_models_add_raft_puts_the_files_into_a_store_and_its_lock(store, tmp_path, capsys):
    from corpus_anon.cli import main

    lock = _lock(store)
    for name in reg.RAFT_SHA256:
        del lock["files"][reg.raft_relpath(name)]
    (store / LOCK_NAME).write_text(json.dumps(lock))
    shutil.rmtree(store / "raft")
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.staged_paths(staged, "tiny").raft is None
    with pytest.raises(ModelStoreError, match=r"lock has no raft/raft-sintel\.pth; .*models add-raft"):
        reg.raft_checkpoint(staged, "raft-sintel.pth", reg.verify_staged(staged, "tiny"))
    assert main(["models", "add-raft", str(store)]) == 0
    assert "sha256 checked" in capsys.readouterr().out
    files = _lock(store)["files"]
    assert {n: files[reg.raft_relpath(n)]["sha256"] for n in reg.RAFT_SHA256} == reg.RAFT_SHA256
    staged = stage("tiny", str(store), tmp_path / "cache", _storage())
    assert reg.raft_checkpoint(staged, "raft-sintel.pth", reg.verify_staged(staged, "tiny")).is_file()
    # a store without a lock takes the files; the lock recorded later lists them
    bare = tmp_path / "bare"
    bare.mkdir()
    add_raft(str(bare), _storage())
    assert sorted(p.name for p in (bare / "raft").iterdir()) == sorted([*reg.RAFT_SHA256, "LICENSE"])
    assert "Copyright (c) 2020, princeton-vl" in (bare / "raft" / "LICENSE").read_text()
    assert not (bare / LOCK_NAME).exists()
    assert main(["models", "add-raft", "s3://bucket/models"]) != 0
    assert "object-store STORE needs --config" in capsys.readouterr().err


def test_run_preflight_refuses_a_store_without_the_landmark_or_raft_files(store):
    """Before any work: a run that measures landmarks needs the mediapipe files in the lock, and a run
    that names a RAFT flow needs that checkpoint; each refusal names the command that adds them."""
    from corpus_anon.config import ConfigError, config_from_dict
    from corpus_anon.run.pipeline import model_lock_digest

    lock = _lock(store)
    lock["files"] = {k: v for k, v in lock["files"].items()
                     if k != "mediapipe/palm_detection_full.tflite" and not k.startswith("raft/")}
    (store / LOCK_NAME).write_text(json.dumps(lock))
    base = {"anonymizer": {"kind": "pixelate"}, "models": {"profile": "tiny", "store": str(store)}}
    with pytest.raises(ConfigError, match=r"needs mediapipe/palm_detection_full.tflite .* models add-mediapipe"):
        model_lock_digest(config_from_dict(base), _storage())
    # without the hand model the face mesh file is enough
    assert len(model_lock_digest(config_from_dict({**base, "landmarks": {"hands": False}}), _storage())) == 12
    diff = {"anonymizer": {"kind": "diffslva"}, "models": {"profile": "tiny", "store": str(store)},
            "landmarks": {"hands": False}}
    with pytest.raises(ConfigError, match=r"diffusion.flow 'raft-small' needs raft/raft-small.pth .* models add-raft"):
        model_lock_digest(config_from_dict({**diff, "diffusion": {"flow": "raft-small"}}), _storage())
    assert len(model_lock_digest(config_from_dict({**diff, "diffusion": {"flow": "dis"}}), _storage())) == 12


def test_the_run_digest_counts_bytes_not_where_a_file_came_from(store):
    """`models fetch` records each file's hub revision in the lock; the digest in `cfg_fp` must be the
    same for the same bytes however they reached the store, and change when a byte changes."""
    files = _lock(store)["files"]
    plain = reg.loaded_lock_digest("tiny", files, None)
    sourced = {r: {**e, "source": {"repo": "x/y", "revision": "0" * 40, "path": r}} for r, e in files.items()}
    assert reg.loaded_lock_digest("tiny", sourced, None) == plain
    assert plain == hashlib.sha256(reg.lock_json("tiny", {r: e for r, e in files.items()
                                                          if not r.startswith(("tpsmm/", "vgg19/", "raft/"))
                                                          or r == "tpsmm/vox.pth.tar"}).encode()).hexdigest()[:12]
    rel = "unet/diffusion_pytorch_model.safetensors"
    other = {**files, rel: {**files[rel], "sha256": "f" * 64}}
    assert reg.loaded_lock_digest("tiny", other, None) != plain


def test_a_store_holding_vgg19_under_its_old_name_keeps_its_run_digest(store):
    """Tiny stores written before VGG-19's file name was corrected list vgg19/vgg19-dcbe5e8e.pth; runs
    never load it, so their fingerprints stay what they were."""
    files = _lock(store)["files"]
    old = {r.replace(reg.VGG19_FILE, "vgg19-dcbe5e8e.pth"): e for r, e in files.items()}
    assert "vgg19/vgg19-dcbe5e8e.pth" in old
    assert reg.loaded_lock_digest("tiny", old, None) == reg.loaded_lock_digest("tiny", files, None)
