"""The GPU benchmark script must keep working: run it at tiny size on CPU."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_translate_runs_tiny_on_cpu():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "gpu_translate.py"), "--tiny", "--frames", "6",
         "--no-compile", "--stock-frames", "1", "--batch-clips", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and "nfe" not in line}
    assert float(rows["stock img2img per frame (20 steps, CFG)"]) == 40.0  # the stock pipeline, by hooks
    assert float(rows["corpus-anon faithful"]) == round((40 + 58) / 6, 2)  # keys 0 and 5 of 6 frames (pass 2 from step 11)
    assert float(rows["corpus-anon fast"]) == round(2 * 4 / 6, 2)
    # two clips sharing UNet calls: the same latents per output frame, in fewer (batched) calls
    assert rows["corpus-anon faithful, batch_clips 2"] == rows["corpus-anon faithful"]
    assert rows["corpus-anon fast, batch_clips 2"] == rows["corpus-anon fast"]


# ---- benchmarks/nfe.py: denoiser calls per output frame, by the UNet forward hook ----------------
def _nfe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_nfe", os.path.join(REPO, "benchmarks", "nfe.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_nfe_counts_match_the_closed_form(tmp_path):
    """31 frames at 30 fps: K = round(30 / key_rate); keys 0, K, 2K, ... plus the last frame.
    faithful: the anchor is one 20-step pass, every later key a 20-step pass and the pixel-fusion
    pass from step 11 (9 steps), x 2 (CFG) each;
    fast: one 4-step pass per key, no CFG; stock: 20 steps x 2 per frame."""
    import torch

    from corpus_anon.models.diffusion import TranslatorSettings, expected_nfe

    nfe = _nfe_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = nfe.make_store(tmp_path)
        frames = nfe.synthetic_frames(31, 64)
        stock = nfe.count_stock(store, frames[:1])
        rows = {(r.mode, r.K): r for r in (nfe.count_mode(store, frames, 30.0, "faithful", 6.0),
                                          nfe.count_mode(store, frames, 30.0, "faithful", 3.0),
                                          nfe.count_mode(store, frames, 30.0, "fast", None))}
    finally:
        torch.set_num_threads(threads)
    assert stock.hook_count == 20 * 2 and stock.per_frame == 40.0
    # Written out here, independently of the product's helpers: 7 keys at K=5, 4 at K=10.
    assert rows[("faithful", 5)].n_keys == 7 and rows[("faithful", 5)].hook_count == 40 + 6 * (40 + 18) == 388
    assert rows[("faithful", 10)].n_keys == 4 and rows[("faithful", 10)].hook_count == 40 + 3 * (40 + 18) == 214
    assert rows[("fast", 5)].n_keys == 7 and rows[("fast", 5)].hook_count == 7 * 4 == 28
    for (mode, _), r in rows.items():
        assert r.hook_count == r.closed_form == expected_nfe(r.n_keys, TranslatorSettings(mode=mode))
        assert r.product_metric == round(r.hook_count / 31, 4)  # the anonymizer's own metric agrees


def test_video_io_exits_2_with_the_install_hint_without_ffmpeg(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # an empty folder: no ffmpeg on PATH
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "video_io.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "apt-get install -y --no-install-recommends ffmpeg" in proc.stderr
