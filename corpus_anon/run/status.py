"""`corpus-anon status RUN_URI`: how far a run is, from its plan and its per-clip records.

Works while the run is going (records appear as clips finish) and after it. Reads only
`plan.json`, `summary.json` (when present) and `records/*.json`; never a video.
"""

from __future__ import annotations

import datetime as _dt
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from corpus_anon.io.records import resolve_run
from corpus_anon.io.storage import Storage


@dataclass
class RunStatus:
    root: str
    planned: int
    started_at: str | None
    counts: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    clips_per_s: float | None = None
    eta_s: float | None = None
    last_finished_at: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing yet"
        out = [f"run {self.root}",
               f"  {self.done}/{self.planned} clips with a record ({counts}); "
               f"{'finished' if self.finished else 'in progress or stopped'}"]
        if self.clips_per_s:
            out.append(f"  {self.clips_per_s:.3f} clips/s since {self.started_at}")
        if self.eta_s is not None and not self.finished:
            out.append(f"  ETA {_fmt_duration(self.eta_s)} for the {max(self.planned - self.done, 0)} left "
                       f"(last record {self.last_finished_at})")
        for cid, err in self.errors[:5]:
            out.append(f"  error {cid}: {err}")
        if len(self.errors) > 5:
            out.append(f"  ... and {len(self.errors) - 5} more errors (see the metrics table)")
        return out


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _parse(ts: str | None) -> _dt.datetime | None:
    if not ts:
        return None
    try:
        return _dt.datetime.fromisoformat(ts)
    except ValueError:
        return None


def run_status(storage: Storage, run_uri: str, threads: int = 16) -> RunStatus:
    layout = resolve_run(storage, run_uri)
    try:
        plan = json.loads(storage.read_text(layout.plan))
    except FileNotFoundError:
        raise FileNotFoundError(f"{layout.root} has no plan.json: no run has started there.") from None
    try:
        summary = json.loads(storage.read_text(layout.summary))
    except FileNotFoundError:
        summary = None
    uris = storage.list(layout.records_prefix, suffixes=(".json",))

    def load(uri: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(uri))
        except (FileNotFoundError, ValueError):
            return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        records = [r for r in pool.map(load, uris) if r]
    started = _parse(plan.get("started_at"))
    # Records of earlier runs of the same folder count as done; only this run's records give the rate.
    recent = [t for t in (_parse(r.get("finished_at")) for r in records) if t and started and t >= started]
    st = RunStatus(layout.root, int(plan.get("planned_clips", 0)), plan.get("started_at"))
    for r in records:
        st.counts[r.get("status", "?")] = st.counts.get(r.get("status", "?"), 0) + 1
        if r.get("status") == "error":
            st.errors.append((r.get("clip_id", "?"), r.get("error") or ""))
    st.finished = bool(summary and _parse(summary.get("finished_at")) and started
                       and _parse(summary["finished_at"]) >= started)
    if recent and started:
        last = max(recent)
        st.last_finished_at = last.isoformat(timespec="seconds")
        elapsed = (last - started).total_seconds()
        if elapsed > 0:
            st.clips_per_s = len(recent) / elapsed
            st.eta_s = max(st.planned - st.done, 0) / st.clips_per_s
    return st
