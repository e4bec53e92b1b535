"""The DiffSLVA translator on the tiny profile (same diffusers classes, random weights), CPU."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from corpus_anon.config import config_from_dict
from corpus_anon.models import registry
from corpus_anon.models.diffusion import (
    TranslatorSettings, VideoTranslator, cross_frame_layers, exclusive_steps, expected_nfe, inclusive_steps,
)
from corpus_anon.storage import Storage, StorageSettings
from tests.media import gradient_frame


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    registry.make_tiny(root / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~2x faster than two on 2 cores
    yield SimpleNamespace(store=str(root / "tiny"), cache=str(root / "cache"),
                          models=registry.load_models(registry.stage(
                              "tiny", str(root / "tiny"), str(root / "cache"),
                              Storage(StorageSettings(unrestricted=True))), "tiny"))
    torch.set_num_threads(threads)


def _frames(n, size=64):
    return np.stack([gradient_frame(i, size, size) for i in range(n)])


def _translator(tiny, **kw):
    return VideoTranslator(tiny.models, TranslatorSettings(**kw), "cpu", torch.float32)


def test_period_indices_match_the_method():
    assert inclusive_steps((0.0, 0.1), 20) == {0, 1, 2}
    assert exclusive_steps((0.5, 0.8), 20) == set(range(11, 16))
    assert inclusive_steps((0.8, 1.0), 20) == set(range(16, 20))


def test_loose_mode_skips_the_1280_channel_decoder_block():
    names = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn{k}.processor"
             for b in (1, 2, 3) for a in range(3) for k in (1, 2)]
    fake = SimpleNamespace(attn_processors={n: None for n in names},
                           config=SimpleNamespace(block_out_channels=(320, 640, 1280, 1280)))
    strict = cross_frame_layers(fake, loose=False)
    loose = cross_frame_layers(fake, loose=True)
    assert len(strict) == 9 and all(n.endswith("attn1.processor") for n in strict)
    assert len(loose) == 6 and not any(n.startswith("up_blocks.1.") for n in loose)


def test_same_seed_same_output_and_shapes(tiny):
    frames = _frames(11)
    tr = _translator(tiny, steps=2)
    a = tr.translate(frames, [0, 5, 10], "a person", seed=3)
    b = tr.translate(frames, [0, 5, 10], "a person", seed=3)
    c = tr.translate(frames, [0, 5, 10], "a person", seed=4)
    assert sorted(a) == [0, 5, 10]
    for k in a:
        assert a[k].shape == (64, 64, 3) and a[k].dtype == np.uint8
        assert np.array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    tr.close()


def test_cross_frame_attention_acts_and_reads_what_was_written(tiny):
    frames = _frames(11)
    # The fusions pull later key frames towards the anchor; switch them off to see attention alone.
    iso = dict(steps=3, shape_fusion=False, pixel_fusion=False, adain=False)
    on = _translator(tiny, **iso)
    out_on = on.translate(frames, [0, 5, 10], "a person", seed=1)
    assert on.cf_layers, "the tiny UNet must have decoder self-attention layers"
    written, reads = on.last_cache_written, on.last_cache_reads
    assert written == {(i, n) for i in range(3) for n in on.cf_layers}
    # Each later key frame reads every (step, layer) entry in both passes, and only those.
    assert set(reads) == written and len(reads) == 2 * 2 * len(written)
    off = _translator(tiny, cross_frame_attention=False, **iso)
    out_off = off.translate(frames, [0, 5, 10], "a person", seed=1)
    assert np.array_equal(out_on[0], out_off[0])  # the anchor attends to itself either way
    assert not np.array_equal(out_on[5], out_off[5])
    on.close()
    off.close()


def test_full_strength_ignores_the_source_colours(tiny):
    frames = _frames(6)
    recolored = frames.copy()
    recolored[..., 0] = 255 - recolored[..., 0]

    def first_latent(settings_kw, fr):
        tr = _translator(tiny, steps=2, **settings_kw)
        seen = []
        h = tiny.models.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["sample"]).clone()), with_kwargs=True)
        tr.translate(fr, [0, 5], "a person", seed=7)
        h.remove()
        tr.close()
        return seen[0]

    assert torch.equal(first_latent({}, frames), first_latent({}, recolored))
    # Below 1.0 (SDEdit) the source latent is in there: the same check must then see a difference.
    assert not torch.equal(first_latent({"strength": 0.5}, frames), first_latent({"strength": 0.5}, recolored))


@pytest.mark.parametrize("mode,expected", [("faithful", (40 + 60 * 80) / 301), ("fast", 4 * 61 / 301)])
def test_nfe_per_frame_on_a_301_frame_clip(tiny, mode, expected):
    from corpus_anon.anonymize import DiffSLVAAnonymizer

    cfg = config_from_dict({"anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": mode},
                            "models": {"profile": "tiny", "store": tiny.store, "cache_dir": tiny.cache}})
    anon = DiffSLVAAnonymizer(cfg, "cpu", Storage(StorageSettings(unrestricted=True)))
    frames = _frames(301)
    res = anon.anonymize(frames, {"fps": 30.0, "seed": 11, "prompt": "a person"}, lambda: None)
    assert res.frames.shape == frames.shape and res.frames.dtype == np.uint8
    assert res.metrics["key_interval"] == 5 and res.metrics["n_key_frames"] == 61
    assert res.metrics["nfe_per_frame"] == round(expected, 4)
    assert expected_nfe(61, anon.translator.s) / 301 == pytest.approx(expected)
    if mode == "fast":
        assert res.metrics["nfe_per_frame"] <= 1.0
    anon.translator.close()


def test_fast_mode_uses_the_staged_lcm_lora(tiny, tmp_path):
    from corpus_anon.anonymize import DiffSLVAAnonymizer

    def run(store, cache):
        cfg = config_from_dict({"anonymizer": {"kind": "diffslva"}, "diffusion": {"mode": "fast"},
                                "models": {"profile": "tiny", "store": store, "cache_dir": cache}})
        anon = DiffSLVAAnonymizer(cfg, "cpu", Storage(StorageSettings(unrestricted=True)))
        res = anon.anonymize(_frames(11), {"fps": 30.0, "seed": 5, "prompt": "a person"}, lambda: None)
        anon.translator.close()
        return anon, res

    with_lora, a = run(tiny.store, str(tmp_path / "c1"))
    assert with_lora.sampler == "lcm" and a.metrics["sampler"] == "lcm"
    assert type(with_lora.translator.scheduler).__name__ == "LCMScheduler"
    plain = tmp_path / "plain"
    registry.make_tiny(plain, lcm_lora=False)
    without, b = run(str(plain), str(tmp_path / "c2"))
    assert without.sampler == "ddim" and b.metrics["sampler"] == "ddim"
    assert a.metrics["nfe_per_frame"] == b.metrics["nfe_per_frame"] == round(3 * 4 / 11, 4)
    assert not np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_clips_batched_together_match_clips_run_alone(tiny, mode):
    from corpus_anon.models.diffusion import TranslateJob

    rng = np.random.default_rng(0)
    clips = [TranslateJob(_frames(11), [0, 5, 10], "a person", 1),
             TranslateJob(np.ascontiguousarray(_frames(6)[:, ::-1]), [0, 5], "a woman in CG style", 2),
             TranslateJob(rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8), [0, 5, 10, 15], "a man", 3)]
    tr = _translator(tiny, mode=mode, steps=3)
    together = tr.translate_many(clips)
    nfe_together = list(tr.last_nfe)
    before = tr.nfe.count
    alone = [tr.translate(c.frames, c.keys, c.prompt, c.seed) for c in clips]
    assert sum(nfe_together) == tr.nfe.count - before  # per-clip attribution adds up to the hook's count
    per = tr.s.n_steps * (2 if mode == "faithful" else 1)
    passes = 2 if mode == "faithful" else 1
    assert nfe_together == [per + (len(c.keys) - 1) * passes * per for c in clips]
    for got, want in zip(together, alone):
        assert sorted(got) == sorted(want)
        for k in want:
            diff = np.abs(got[k].astype(int) - want[k].astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.05, (k, diff.max(), diff.mean())
    with pytest.raises(ValueError, match="frame size"):
        tr.translate_many([clips[0], TranslateJob(_frames(6, 128), [0, 5], "x", 1)])
    tr.close()


def test_translator_modules_import_without_config_cv2_ray_or_av():
    """The GPU check imports these on a machine with torch (+ a carried diffusers) only."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('cv2', 'pydantic', 'corpus_anon.config', 'ray', 'av', 'pyarrow', 'yaml'): sys.modules[m] = None\n"
        "import corpus_anon.models.diffusion, corpus_anon.models.propagate, corpus_anon.models.hed, corpus_anon.flow\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
