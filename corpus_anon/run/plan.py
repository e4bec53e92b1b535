"""`corpus-anon plan CONFIG`: a dry run. Validates the config and the manifest, counts clips and
frames after segmenting, shows what a (re)run or refresh would skip, and estimates GPU-hours and
cost from the calibration table in `plan` — printing every assumption. Writes nothing.

Frame counts come from the segments (`end_s - start_s`) at each source's frame rate, read from
the container header (one small ranged read per source video, not a decode); `--no-probe`
assumes `plan.assume_fps` and, for rows without `end_s`, `plan.assume_clip_s`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from corpus_anon.config import Config, ConfigError, output_fingerprint, resolve_endpoint
from corpus_anon.io.records import RunLayout
from corpus_anon.io.storage import Storage, StorageSettings


@dataclass
class SourceInfo:
    fps: float | None
    duration_s: float | None
    error: str | None = None


def probe_source(storage: Storage, uri: str) -> SourceInfo:
    """Frame rate and duration from a video's container header (no decoding)."""
    from corpus_anon.io.video import open_source

    fs, path = storage.filesystem(uri)
    try:
        storage.check_read(uri)
        with fs.open(path, "rb") as f, open_source(f, uri) as c:  # the run's allow-list of containers
            if not c.streams.video:
                return SourceInfo(None, None, "no video stream")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            dur = (float(vs.duration * vs.time_base) if vs.duration is not None and vs.time_base is not None
                   else (c.duration / 1_000_000 if c.duration is not None else None))
            return SourceInfo(float(rate) if rate else None, dur)
    except Exception as e:  # noqa: BLE001 - reported per source, the plan goes on
        return SourceInfo(None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")


@dataclass
class Plan:
    clips: int
    withdrawn: int
    to_run: int
    to_skip: int
    frames_total: int
    frames_to_run: int
    unreadable: list[tuple[str, str]]
    cfg_fp: str
    gpu: str
    mode: str
    frames_per_s: float
    usd_per_hour: float
    actors: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return self.frames_to_run / self.frames_per_s / 3600.0

    @property
    def cost_usd(self) -> float:
        return self.gpu_hours * self.usd_per_hour

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / max(self.actors, 1)

    def lines(self) -> list[str]:
        out = [f"plan for output fingerprint {self.cfg_fp} (nothing was written)",
               f"  clips in the manifest      {self.clips + self.withdrawn}"
               + (f" ({self.withdrawn} withdrawn by takedowns, not run)" if self.withdrawn else ""),
               f"  would run / skip           {self.to_run} / {self.to_skip} (skipped: settled in an earlier run)",
               f"  frames, all / to run       {self.frames_total:,} / {self.frames_to_run:,}",
               f"  anonymizer                 {self.mode}",
               f"  estimate ({self.gpu})          {self.gpu_hours:,.1f} GPU-hours, ${self.cost_usd:,.2f}; "
               f"about {_hours(self.wall_hours)} on {self.actors} actor(s)"]
        if self.unreadable:
            out.append(f"  {len(self.unreadable)} source(s) could not be probed; they count 0 frames "
                       f"(first: {self.unreadable[0][0]}: {self.unreadable[0][1]})")
        out.append("  assumptions:")
        out += [f"    - {a}" for a in self.assumptions]
        return out


def _hours(h: float) -> str:
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:,.0f} min"


def _mode(cfg: Config) -> str:
    return cfg.anonymizer.kind if cfg.anonymizer.kind == "pixelate" else cfg.diffusion.mode


def make_plan(cfg: Config, *, probe: bool | None = None, threads: int = 16) -> Plan:
    from corpus_anon.run.pipeline import SettleStage, _uses_store, checked_manifest, model_lock_digest

    settings = StorageSettings.from_config(cfg, resolve_endpoint(cfg))
    storage = Storage(settings)
    out, table, withdrawn = checked_manifest(cfg, storage)
    extra: dict[str, Any] = {}
    if cfg.models.store and _uses_store(cfg):
        extra["models"] = model_lock_digest(cfg, storage)
    if cfg.anonymizer.kind == "diffslva" and ("seed" not in table.column_names
                                               or table.column("seed").null_count):
        import os

        from corpus_anon import secret as sec

        if os.environ.get(sec.SECRET_ENV):
            extra["key_id"] = sec.key_id(sec.read_secret("diffslva"))
    layout = RunLayout(out, output_fingerprint(cfg, extra))

    p = cfg.plan
    probe = p.probe if probe is None else probe
    rows = table.to_pylist()
    assumptions: list[str] = []
    sources: dict[str, SourceInfo] = {}
    if probe:
        uris = sorted({r["video_uri"] for r in rows})
        with ThreadPoolExecutor(max(1, threads)) as pool:
            sources = dict(zip(uris, pool.map(lambda u: probe_source(storage, u), uris)))
        assumptions.append(f"frame rates and durations read from {len(uris)} source headers")
    else:
        assumptions.append(f"every source at {p.assume_fps:g} fps; rows without end_s last {p.assume_clip_s:g} s "
                           "(--no-probe)")

    def frames(r: dict[str, Any]) -> int:
        src = sources.get(r["video_uri"]) if probe else SourceInfo(p.assume_fps, None)
        if src is None or src.fps is None:
            return 0
        start = r.get("start_s") or 0.0
        end = r.get("end_s")
        if end is None or (isinstance(end, float) and math.isnan(end)):
            end = src.duration_s if src.duration_s is not None else start + p.assume_clip_s
        fps = min(src.fps, cfg.video.max_fps)  # a run never holds more frames than max_fps allows
        return max(0, int(round((min(end, start + cfg.video.max_clip_s) - start) * fps)))

    counts = {r["clip_id"]: frames(r) for r in rows}
    # What a run would skip: the same decision the run's settle stage makes, without Ray.
    settle = SettleStage(settings, layout, cfg.resources.max_attempts)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        decisions = list(pool.map(settle.one, rows))
    run_ids = {r["clip_id"] for r, d in zip(rows, decisions) if d["action"] == "run"}

    mode = _mode(cfg)
    gpu = p.gpu
    cal = p.calibration.get(gpu)
    if cal is None:
        raise ConfigError(f"plan.gpu {gpu!r} is not in plan.calibration ({', '.join(sorted(p.calibration))}).")
    fps = cal.frames_per_s.get(mode)
    if not fps:
        raise ConfigError(f"plan.calibration.{gpu}.frames_per_s has no rate for {mode!r}.")
    assumptions.append(f"{gpu}: {fps:g} output frames/s per GPU for {mode!r}, ${cal.usd_per_hour:g}/GPU-hour "
                       f"(plan.calibration; {cal.source or 'no source given'})")
    if mode != "pixelate":
        assumptions.append(f"diffusion at {cfg.diffusion.steps if mode == 'faithful' else cfg.diffusion.fast_steps} "
                           f"steps, key frames at {cfg.diffusion.key_rate:g}/s: rescale frames_per_s if you change them")
    assumptions.append("face analysis, decoding and upload overlap the GPU work (not added); queueing and "
                       "cluster start-up are not included")
    unreadable = [(u, s.error or "no frame rate") for u, s in sources.items() if s.fps is None]
    return Plan(
        clips=len(rows), withdrawn=withdrawn, to_run=len(run_ids), to_skip=len(rows) - len(run_ids),
        frames_total=sum(counts.values()), frames_to_run=sum(counts[c] for c in run_ids),
        unreadable=unreadable, cfg_fp=layout.cfg_fp, gpu=gpu, mode=mode, frames_per_s=float(fps),
        usd_per_hour=float(cal.usd_per_hour), actors=cfg.resources.actors, assumptions=assumptions,
    )
