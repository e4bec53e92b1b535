"""`corpus-anon plan`: frame counts after segmenting, skip decisions, cost arithmetic, no writes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_anon.config import ConfigError, config_from_dict
from tests.media import make_video


def _setup(tmp_path):
    make_video(str(tmp_path / "long.mp4"), 48, 24, (64, 48))   # 2 s at 24 fps
    make_video(str(tmp_path / "short.mp4"), 30, 30, (64, 48))  # 1 s at 30 fps
    pq.write_table(pa.table({
        "clip_id": ["a", "b", "c"], "video_uri": [str(tmp_path / n) for n in ("long.mp4", "long.mp4", "short.mp4")],
        "signer_id": ["s1", "s1", "s2"], "start_s": pa.array([0.0, 1.0, None], pa.float64()),
        "end_s": pa.array([1.0, 2.0, None], pa.float64())}), tmp_path / "m.parquet")
    return config_from_dict({
        "manifest": {"uri": str(tmp_path / "m.parquet")}, "output": {"uri": str(tmp_path / "out")},
        "anonymizer": {"kind": "pixelate"}, "faces": {"backend": "none"},
        "storage": {"allowed_prefixes": {"read": [str(tmp_path)], "write": [str(tmp_path / "out")]}},
        "plan": {"gpu": "a100"},
    })


def test_plan_counts_frames_skips_and_cost(tmp_path, capsys):
    from corpus_anon.cli import main
    from corpus_anon.run.plan import make_plan
    from corpus_anon.io.records import RunLayout, make_record, write_record
    from corpus_anon.io.storage import Storage, StorageSettings

    cfg = _setup(tmp_path)
    plan = make_plan(cfg)
    assert plan.frames_total == 24 + 24 + 30 and plan.to_run == 3 and plan.to_skip == 0
    rate = cfg.plan.calibration["a100"].frames_per_s["pixelate"]
    assert plan.gpu_hours == pytest.approx(78 / rate / 3600)
    assert plan.cost_usd == pytest.approx(plan.gpu_hours * cfg.plan.calibration["a100"].usd_per_hour)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    # A clip already settled under this fingerprint is what a rerun or refresh would skip.
    from corpus_anon.run.pipeline import SettleStage

    settings = StorageSettings.from_config(cfg, None)
    layout = RunLayout(f"file://{tmp_path}/out", plan.cfg_fp)
    row = {"clip_id": "a", "video_uri": str(tmp_path / "long.mp4"), "start_s": 0.0, "end_s": 1.0}
    fp = SettleStage(settings, layout, 3).one(row)["row_fp"]
    write_record(Storage(settings), layout, make_record(clip_id="a", status="ok", row_fp=fp, cfg_fp=plan.cfg_fp,
                                                        attempts=1))
    again = make_plan(cfg)
    assert (again.to_run, again.to_skip, again.frames_to_run) == (2, 1, 54)

    fast = make_plan(cfg, probe=False)  # 30 fps assumed; the row without end_s lasts assume_clip_s
    assert fast.frames_total == 30 + 30 + int(cfg.plan.assume_clip_s * 30)
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["plan", str(cfg_path), "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "would run / skip           2 / 1" in out and "h100" in out and "assumptions:" in out
    assert main(["plan", str(cfg_path), "--gpu", "tpu"]) == 2
    with pytest.raises(ConfigError, match="not in plan.calibration"):
        cfg.plan.gpu = "tpu"
        make_plan(cfg)
