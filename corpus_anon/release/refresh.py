"""`corpus-anon refresh`: one scheduled step that runs the pipeline on the clips a corpus gained since
the last run and publishes the next release version from it (the CronJob's entrypoint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corpus_anon.config import Config, ConfigError
from corpus_anon.release.publish import ReleaseResult, release, release_stores, storage_for


@dataclass
class RefreshResult:
    run: Any  # pipeline.RunResult
    release: ReleaseResult


def refresh(cfg: Config, *, limit: int | None = None, allow_unchecked: bool = False) -> RefreshResult:
    """The scheduled refresh: run the current manifest (new and changed clips, retries, every clip
    when the config or models changed; withdrawn clips never), then release the next version to
    `release.root` only if what it would hold changed."""
    from corpus_anon.run.pipeline import run
    from corpus_anon.secret import read_secret

    if not cfg.release.root:
        raise ConfigError("refresh releases to release.root; set it in the config.")
    secret = read_secret("refresh")  # before the run: the driver drops it from its environment
    storage = storage_for(cfg)
    if cfg.output.uri:  # pre-flight, before any work (without an output, run() says so)
        release_stores(cfg, storage, cfg.release.root, cfg.output.uri)
    result = run(cfg, limit=limit, refresh=True)
    rel = release(cfg, storage, result.layout.root, cfg.release.root, secret=secret,
                  allow_unchecked=allow_unchecked)
    return RefreshResult(result, rel)


