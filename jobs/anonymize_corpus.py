"""Entrypoint for `ray job submit --working-dir . -- python jobs/anonymize_corpus.py CONFIG [...]`.

Inside a Ray job RAY_ADDRESS is set, so the run joins the job's cluster. Arguments are those of
`corpus-anon run`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus_anon.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["run", *sys.argv[1:]])
