"""Entrypoint for `ray job submit --working-dir . -- python jobs/extract_faces.py CONFIG --out URI [--limit N]`.

Inside a Ray job RAY_ADDRESS is set, so the extraction joins the job's cluster. Arguments are those
of `corpus-anon faces extract`; a rerun skips every clip already extracted with the same settings.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus_anon.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["faces", "extract", *sys.argv[1:]])
