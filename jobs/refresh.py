"""Entrypoint for scheduled refreshes: `ray job submit --working-dir . -- python jobs/refresh.py CONFIG
[--allow-unchecked]`.

Runs the current manifest incrementally (new and changed clips, retries, everything after a
config or model change; withdrawn clips never) and releases the next version to `release.root`
only if it changed. Clips never checked for identity leakage are left out of the release unless
`--allow-unchecked` (the card then says so). Needs CORPUS_ANON_SECRET (at least 32 bytes) in the
job's environment; the tombstones are read from the private store (`release.private_uri`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus_anon.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["refresh", *sys.argv[1:]])
