"""`corpus-anon models fetch` against a hub stand-in on 127.0.0.1 (tests/hubserver.py): the real CLI in a
subprocess, the real huggingface_hub client over real HTTP through HF_ENDPOINT, small random files under
the real repository ids and paths of the sd15-hed plan."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_anon.models import registry as reg
from corpus_anon.models.fetch import REVISIONS, git_blob_sha1
from corpus_anon.io.storage import Storage, StorageSettings
from tests.hubserver import HubServer, _corrupt, git_blob_id

SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CN = "lllyasviel/sd-controlnet-hed"
AN = "lllyasviel/Annotators"
LCM = "latent-consistency/lcm-lora-sdv1-5"
VGG_URL_PATH = "/models/vgg19-dcbb9e9d.pth"

# (role, repo, path in the repo, path in a tiny-profile store, size in bytes; 0 = a small JSON file)
TINY_PLAN = [
    ("pipeline", SD, "model_index.json", "model_index.json", 0),
    ("pipeline", SD, "scheduler/scheduler_config.json", "scheduler/scheduler_config.json", 0),
    ("pipeline", SD, "text_encoder/config.json", "text_encoder/config.json", 0),
    ("pipeline", SD, "text_encoder/model.safetensors", "text_encoder/model.safetensors", 60_000),
    ("pipeline", SD, "tokenizer/tokenizer.json", "tokenizer/tokenizer.json", 0),
    ("pipeline", SD, "tokenizer/tokenizer_config.json", "tokenizer/tokenizer_config.json", 0),
    ("pipeline", SD, "unet/config.json", "unet/config.json", 0),
    ("pipeline", SD, "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", 300_000),
    ("pipeline", SD, "vae/config.json", "vae/config.json", 0),
    # over the hub client's 10 MiB read size, so a download that breaks half-way has something to resume from
    ("pipeline", SD, "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", 22_000_000),
    ("controlnet", CN, "config.json", "controlnet/config.json", 0),
    ("controlnet", CN, "diffusion_pytorch_model.safetensors", "controlnet/diffusion_pytorch_model.safetensors", 200_000),
    ("hed", AN, "ControlNetHED.pth", "hed/ControlNetHED.pth", 40_000),
    ("lcm_lora", LCM, "pytorch_lora_weights.safetensors", "lcm_lora/pytorch_lora_weights.safetensors", 30_000),
]
ONLY = "pipeline,controlnet,hed,lcm_lora,vgg19,centerface,mediapipe,raft,insightface"


def _bytes(seed: str, size: int) -> bytes:
    if size == 0:
        return (json.dumps({"_class_name": seed, "seed": hashlib.sha256(seed.encode()).hexdigest()}) + "\n").encode()
    out, block = bytearray(), hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


@pytest.fixture
def hub():
    files = {(repo, path): _bytes(f"{repo}/{path}", size) for _, repo, path, _, size in TINY_PLAN}
    vgg = _bytes("vgg19", 50_000)
    with HubServer(files=files, commits=dict(REVISIONS), urls={VGG_URL_PATH: vgg}) as server:
        yield server


def _plan(hub: HubServer, path: Path) -> Path:
    files = [{"role": role, "store": store, "repo": repo, "revision": REVISIONS[repo], "path": p}
             for role, repo, p, store, _ in TINY_PLAN]
    # in the real repository, but absent here: an optional file is skipped without a failure
    files.append({"role": "pipeline", "store": "tokenizer/merges.txt", "repo": SD, "revision": REVISIONS[SD],
                  "path": "tokenizer/merges.txt", "optional": True})
    vgg = hub.urls[VGG_URL_PATH]
    files.append({"role": "vgg19", "store": f"vgg19/{reg.VGG19_FILE}", "url": hub.cdn_url + VGG_URL_PATH,
                  "sha256": hashlib.sha256(vgg).hexdigest()})
    path.write_text(json.dumps({"profile": "tiny", "files": files}))
    return path


def _fetch(hub: HubServer, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "corpus_anon.cli", "models", "fetch", *args],
                          capture_output=True, text=True, env=env, cwd=str(tmp), timeout=300)


def _failed(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip().startswith("FAILED:")]


def _storage() -> Storage:
    return Storage(StorageSettings(unrestricted=True))


def test_fetch_writes_a_lock_that_stage_accepts_and_a_rerun_requests_nothing(hub, tmp_path):
    plan, store = _plan(hub, tmp_path / "plan.json"), tmp_path / "store"
    hub.faults[(SD, "vae/diffusion_pytorch_model.safetensors")] = "drop_mid_body"  # the client resumes it
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c1"),
               "--only", ONLY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "corpus-anon.lock.json written." in r.stdout
    lock = json.loads((store / reg.LOCK_NAME).read_text())
    assert lock["profile"] == "tiny"
    for _, repo, path, rel, _ in TINY_PLAN:
        ent = lock["files"][rel]
        assert ent["sha256"] == hashlib.sha256(hub.files[(repo, path)]).hexdigest(), rel
        assert ent["source"] == {"repo": repo, "revision": REVISIONS[repo], "path": path}
        assert (store / rel).read_bytes() == hub.files[(repo, path)]
    # the face files come from the installed wheels, each checked against its pin
    assert lock["files"][reg.CENTERFACE_RELPATH]["sha256"] == reg.CENTERFACE_SHA256
    for name, sha in {**reg.MEDIAPIPE_SHA256, **reg.RAFT_SHA256}.items():
        rel = reg.mediapipe_relpath(name) if name in reg.MEDIAPIPE_SHA256 else reg.raft_relpath(name)
        assert lock["files"][rel]["sha256"] == sha and hashlib.sha256((store / rel).read_bytes()).hexdigest() == sha
    assert (store / "raft/LICENSE").is_file() and "raft/LICENSE" not in lock["files"]
    assert lock["files"][f"vgg19/{reg.VGG19_FILE}"]["source"] == {"url": hub.cdn_url + VGG_URL_PATH}
    assert "tokenizer/merges.txt" not in lock["files"] and not _failed(r.stdout)
    # what is left of the fetch's record: the optional file the hub does not have, so no rerun asks again
    assert json.loads((store / "corpus-anon.fetch.json").read_text()) == {
        "profile": "tiny", "files": {}, "absent": [f"{SD}@{REVISIONS[SD]}:tokenizer/merges.txt"]}
    # the dropped download was resumed from the client's last full read (10 MiB), not started again
    vae = hashlib.sha256(hub.files[(SD, "vae/diffusion_pytorch_model.safetensors")]).hexdigest()
    assert [rng for _, m, p, rng in hub.requests if m == "GET" and vae in p] == [None, "bytes=10485760-"]
    assert "unet/diffusion_pytorch_model.safetensors" in r.stderr and "100%" in r.stderr  # the progress bar
    staged = reg.stage("tiny", str(store), tmp_path / "staged", _storage())
    files = reg.verify_staged(staged, "tiny")
    assert files == lock["files"]

    hub.clear()  # a rerun, even with an empty download cache, asks the hub for nothing
    r2 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c2"),
                "--only", ONLY)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert hub.requests == [] and "0 files fetched" in r2.stdout and "lock.json already up to date" in r2.stdout
    assert json.loads((store / reg.LOCK_NAME).read_text()) == lock

    # a second store filled from the first download cache: the cache's files, checked against the ids the
    # hub gave them, and no download (only the optional file the hub lacks is asked about again)
    r3 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(tmp_path / "store2"), "--cache-dir",
                str(tmp_path / "c1"), "--only", ONLY)
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert [(m, p.rsplit("/", 2)[-2:]) for _, m, p, _ in hub.requests] == [("HEAD", ["tokenizer", "merges.txt"])]
    assert json.loads((tmp_path / "store2" / reg.LOCK_NAME).read_text()) == lock


def test_a_file_that_differs_from_its_pin_is_refused_and_the_others_staged(hub, tmp_path):
    store = tmp_path / "store"
    # the built-in sd15-hed plan at its real revisions: ControlNetHED.pth is pinned (5ca93762...), the
    # small stand-in is not it; sd-controlnet-hed has no published sha256 and is checked against the hub's
    r = _fetch(hub, tmp_path, "--profile", "sd15-hed", "--store", str(store), "--cache-dir", str(tmp_path / "c"),
               "--only", "hed,controlnet")
    assert r.returncode == 1, r.stdout + r.stderr
    failed = _failed(r.stdout)
    tiny_sha = hashlib.sha256(hub.files[(AN, "ControlNetHED.pth")]).hexdigest()
    pin = reg.PINNED_SHA256["sd15-hed"]["lllyasviel/Annotators/ControlNetHED.pth"]
    hed = [s for s in failed if "lllyasviel/Annotators/ControlNetHED.pth was refused" in s]
    assert len(hed) == 1 and tiny_sha in hed[0] and pin in hed[0], failed
    assert hub.count("GET", tiny_sha) == 0  # refused on the hub's announced sha256, before any byte came
    assert not (store / "lllyasviel/Annotators/ControlNetHED.pth").exists()
    for path in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (store / CN / path).read_bytes() == hub.files[(CN, path)]
    # no lock without the required models; what was staged is recorded for the rerun
    assert not (store / reg.LOCK_NAME).exists()
    assert any("corpus-anon.lock.json was not written" in s for s in failed)
    record = json.loads((store / "corpus-anon.fetch.json").read_text())
    assert set(record["files"]) == {f"{CN}/config.json", f"{CN}/diffusion_pytorch_model.safetensors"}
    assert record["files"][f"{CN}/config.json"]["source"]["revision"] == REVISIONS[CN]


def test_a_server_error_is_one_sentence_and_a_rerun_completes(hub, tmp_path):
    plan, store = _plan(hub, tmp_path / "plan.json"), tmp_path / "store"
    only = "pipeline,controlnet,hed,lcm_lora"
    hub.faults[(SD, "unet/diffusion_pytorch_model.safetensors")] = "get500"
    hub.faults[(SD, "unet/config.json")] = "get500"
    hub.faults[(LCM, "pytorch_lora_weights.safetensors")] = "corrupt"  # bytes other than the hub announced
    hub.faults[(CN, "config.json")] = "corrupt"  # a git file: checked against its git blob id
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
               "--only", only)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = _failed(r.stdout)
    unet = [s for s in failed if "could not get" in s]
    assert len(unet) == 2 and all("unet/" in s and "HTTP 500" in s for s in unet), failed
    lcm = hashlib.sha256(hub.files[(LCM, "pytorch_lora_weights.safetensors")]).hexdigest()
    cn = git_blob_id(hub.files[(CN, "config.json")])
    assert [s.strip() for s in failed if "could not get" not in s] == [
        f"FAILED: controlnet/config.json was refused: the download has git blob id "
        f"{git_blob_id(_corrupt(hub.files[(CN, 'config.json')]))}, not the {cn} the hub announced.",
        f"FAILED: lcm_lora/pytorch_lora_weights.safetensors was refused: the download has sha256 "
        f"{hashlib.sha256(_corrupt(hub.files[(LCM, 'pytorch_lora_weights.safetensors')])).hexdigest()}, "
        f"not the {lcm} the hub announced.",
        "FAILED: corpus-anon.lock.json was not written: the store still lacks unet/config.json (required pipeline "
        "model), controlnet/config.json (required controlnet model)."], failed
    assert (store / "vae/diffusion_pytorch_model.safetensors").is_file() and not (store / "unet").exists()
    assert not (store / "lcm_lora").exists() and not (store / "controlnet/config.json").exists()
    assert not (store / reg.LOCK_NAME).exists()

    hub.faults.clear()
    hub.clear()
    r2 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
                "--only", only)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    # only the files that failed are asked for again (the damaged ones were dropped from the cache too)
    blobs = {hashlib.sha256(hub.files[k]).hexdigest() for k in
             [(SD, "unet/diffusion_pytorch_model.safetensors"), (LCM, "pytorch_lora_weights.safetensors")]}
    asked = {p for _, _, p, _ in hub.requests}
    assert asked and all(p.endswith(("/unet/config.json", "/unet/diffusion_pytorch_model.safetensors",
                                     "/pytorch_lora_weights.safetensors", f"{CN}/resolve/{REVISIONS[CN]}/config.json"))
                         or p.lstrip("/") in blobs for p in asked), asked
    reg.verify_staged(reg.stage("tiny", str(store), tmp_path / "staged", _storage()), "tiny")
    assert json.loads((store / "corpus-anon.fetch.json").read_text())["files"] == {}  # all in the lock now


def test_insightface_only_with_accept_noncommercial(hub, tmp_path):
    plan, store = _plan(hub, tmp_path / "plan.json"), tmp_path / "store"
    pack = store / "insightface/models/buffalo_l"  # put there by hand, as the instructions say
    pack.mkdir(parents=True)
    onnx = {name: _bytes(name, 5_000) for name in ("det_10g.onnx", "w600k_r50.onnx")}
    for name, data in onnx.items():
        (pack / name).write_bytes(data)
    only = "pipeline,controlnet,hed,insightface"
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
               "--only", only)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left out insightface's buffalo_l, which is licensed for non-commercial research only" in r.stdout
    lock = json.loads((store / reg.LOCK_NAME).read_text())
    assert not any(k.startswith("insightface/") for k in lock["files"])
    assert reg.staged_paths(reg.stage("tiny", str(store), tmp_path / "s1", _storage()), "tiny").insightface is None

    hub.clear()
    r2 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
                "--only", only, "--accept-noncommercial")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert hub.requests == []
    lock = json.loads((store / reg.LOCK_NAME).read_text())
    for name, data in onnx.items():
        assert lock["files"][f"insightface/models/buffalo_l/{name}"]["sha256"] == hashlib.sha256(data).hexdigest()
    staged = reg.stage("tiny", str(store), tmp_path / "s2", _storage())
    assert reg.staged_paths(staged, "tiny").insightface == staged / "insightface"

    # an empty pack with the flag: one sentence on where insightface distributes it
    r3 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(tmp_path / "other"), "--cache-dir",
                str(tmp_path / "c"), "--only", "insightface", "--accept-noncommercial")
    assert "github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip" in r3.stdout


def test_a_branch_is_resolved_once_and_another_commit_is_refused(hub, tmp_path):
    store = tmp_path / "store"
    lora = {"role": "lcm_lora", "store": "lcm_lora/pytorch_lora_weights.safetensors", "repo": LCM, "revision": "main",
            "path": "pytorch_lora_weights.safetensors"}
    wrong = "0" * 40
    cfg = {"role": "controlnet", "store": "controlnet/config.json", "repo": CN, "revision": wrong, "path": "config.json"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"profile": "tiny", "files": [lora, cfg]}))
    hub.any_revision = True
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
               "--only", "lcm_lora,controlnet")
    assert r.returncode == 1
    record = json.loads((store / "corpus-anon.fetch.json").read_text())["files"]
    # the branch, resolved by the hub, is what the record (and so the lock) keeps
    assert record["lcm_lora/pytorch_lora_weights.safetensors"]["source"]["revision"] == REVISIONS[LCM]
    assert (f"FAILED: controlnet/config.json was refused: the hub answered for commit {REVISIONS[CN]}, not the "
            f"pinned {wrong}.") in [s.strip() for s in _failed(r.stdout)]
    assert not (store / "controlnet").exists()


def test_fetch_into_an_s3_store(hub, tmp_path, s3):
    endpoint, fs = s3
    fs.mkdir("fetchstore")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  endpoint_url: {endpoint}\n  allowed_prefixes: {{read: ['s3://fetchstore/'], "
                   f"write: ['s3://fetchstore/']}}\nmodels: {{profile: tiny, store: s3://fetchstore/m}}\n")
    plan = _plan(hub, tmp_path / "plan.json")
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--config", str(cfg), "--cache-dir", str(tmp_path / "c"),
               "--only", "pipeline,controlnet,hed")
    assert r.returncode == 0, r.stdout + r.stderr
    lock = json.loads(fs.cat_file("fetchstore/m/" + reg.LOCK_NAME))
    assert lock["files"]["hed/ControlNetHED.pth"]["sha256"] == hashlib.sha256(hub.files[(AN, "ControlNetHED.pth")]).hexdigest()
    hub.clear()
    r2 = _fetch(hub, tmp_path, "--plan", str(plan), "--config", str(cfg), "--cache-dir", str(tmp_path / "c2"),
                "--only", "pipeline,controlnet,hed")
    assert r2.returncode == 0 and hub.requests == [] and "0 files fetched" in r2.stdout, r2.stdout + r2.stderr
    st = Storage(StorageSettings(endpoint_url=endpoint, allowed_read=("s3://fetchstore/",)))
    assert reg.verify_staged(reg.stage("tiny", "s3://fetchstore/m", tmp_path / "staged", st), "tiny") == lock["files"]


def test_git_blob_sha1_is_the_hub_etag_of_a_git_file(tmp_path):
    data = b'{"a": 1}\n'
    (tmp_path / "f.json").write_bytes(data)
    assert git_blob_sha1(tmp_path / "f.json") == git_blob_id(data)
    # git's own id for this content (`git hash-object`)
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_a_store_recorded_by_hand_is_adopted_without_downloading_it_again(hub, tmp_path):
    """A store whose lock `models stage --record` wrote (no `source` per file): a fetch asks the hub for
    each file's id at the pinned commit (HEAD), compares it with the store's bytes, downloads nothing that
    matches and leaves the run digest (cfg_fp) as it was; a store file with other bytes is fetched again."""
    plan, store = _plan(hub, tmp_path / "plan.json"), tmp_path / "store"
    r = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c1"),
               "--only", ONLY)
    assert r.returncode == 0, r.stdout + r.stderr
    lock = json.loads((store / reg.LOCK_NAME).read_text())
    by_hand = {rel: {"sha256": e["sha256"], "bytes": e["bytes"]} for rel, e in lock["files"].items()}
    (store / reg.LOCK_NAME).write_text(reg.lock_json("tiny", by_hand))
    (store / "corpus-anon.fetch.json").unlink()
    digest = reg.loaded_lock_digest("tiny", by_hand, None)
    # one store file changed behind the lock's back, same size: it must not be adopted
    bad = store / "unet/config.json"
    bad.write_bytes(_corrupt(bad.read_bytes()))
    hub.clear()
    r2 = _fetch(hub, tmp_path, "--plan", str(plan), "--store", str(store), "--cache-dir", str(tmp_path / "c2"),
                "--only", ONLY)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    gets = [p for _, m, p, _ in hub.requests if m == "GET"]
    assert len(gets) == 1 and gets[0].endswith("unet/config.json"), gets  # only the changed file
    assert {p.rsplit("/", 1)[-1] for _, m, p, _ in hub.requests if m == "HEAD"} >= {"model_index.json",
                                                                                    "ControlNetHED.pth"}
    after = json.loads((store / reg.LOCK_NAME).read_text())["files"]
    vgg = f"vgg19/{reg.VGG19_FILE}"  # pinned by its sha256: present as it is, its entry unchanged
    assert after == {**lock["files"], vgg: by_hand[vgg]}  # the same bytes, hub files now with their sources
    assert reg.loaded_lock_digest("tiny", after, None) == digest


@pytest.mark.parametrize("entry, says", [
    ({"url": "https://example.org/w.pth"}, "without a full sha256"),
    ({"url": "https://example.org/w.pth", "sha256": "dcbb9e9d"}, "without a full sha256"),
    ({"url": "http://example.org/w.pth", "sha256": "a" * 64}, "plain http"),
    ({"repo": SD, "revision": REVISIONS[SD], "path": "../main/unet/config.json"}, "unsafe path"),
    ({"repo": SD, "revision": REVISIONS[SD], "path": "unet/config.json", "optional": "false"}, "true or false"),
])
def test_a_plan_that_could_let_unchecked_bytes_in_is_refused(tmp_path, entry, says):
    from corpus_anon.models.fetch import load_plan

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"profile": "tiny", "files": [{"role": "pipeline", "store": "unet/config.json",
                                                              **entry}]}))
    with pytest.raises(ValueError, match=says):
        load_plan(plan)
    for store in ("corpus-anon.lock.json", "corpus-anon.fetch.json", "unet/", "./x", "a/../b"):
        plan.write_text(json.dumps({"profile": "tiny", "files": [{"role": "pipeline", "store": store, "repo": SD,
                                                                  "revision": REVISIONS[SD], "path": "x.json"}]}))
        with pytest.raises(ValueError, match="unsafe path"):
            load_plan(plan)
