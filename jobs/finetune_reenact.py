"""Entrypoint for `ray job submit --working-dir . -- python jobs/finetune_reenact.py CONFIG [--epochs N]`.

Inside a Ray job RAY_ADDRESS is set, so the Ray Train run joins the job's cluster. Arguments are
those of `corpus-anon faces finetune`; a rerun continues from the latest checkpoint under
finetune.out, and one whose checkpoints already reach the epochs only publishes the model again.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus_anon.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["faces", "finetune", *sys.argv[1:]])
