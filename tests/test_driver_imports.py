"""The Ray driver never loads torch, diffusers, insightface, onnxruntime or cv2 (docs/CODEMAP.md):
every module in the driver folders (io/, run/, release/), the entry points and config, and the
actor-side modules the driver must import to hand work to Ray, are imported in a fresh interpreter
and none of the heavy libraries may appear in sys.modules."""

import pathlib
import subprocess
import sys

HEAVY = ("torch", "diffusers", "insightface", "onnxruntime", "cv2", "transformers")
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "corpus_anon"
DRIVER_FOLDERS = ("io", "run", "release")
# Outside the driver folders, imported by the driver: the entry points, the config, the actor class
# Ray ships (its heavy imports happen in the actor), the crop-set and fine-tuning drivers, and the
# model registry (file lists, staging, the lock) with the commands that fill a store.
DRIVER_EXTRA = ("corpus_anon.config", "corpus_anon.secret", "corpus_anon.errors", "corpus_anon.cli",
                "corpus_anon.actor.worker", "corpus_anon.finetune.extract", "corpus_anon.finetune.crops",
                "corpus_anon.finetune.job", "corpus_anon.finetune.data", "corpus_anon.models.registry",
                "corpus_anon.models.add", "corpus_anon.models.fetch", "corpus_anon.demo")


def driver_modules() -> list[str]:
    found = [f"corpus_anon.{folder}.{p.stem}" for folder in DRIVER_FOLDERS
             for p in sorted((PACKAGE / folder).glob("*.py")) if p.stem != "__init__"]
    return found + list(DRIVER_EXTRA)


def test_the_driver_folders_hold_the_run_and_the_release():
    mods = driver_modules()
    for m in ("corpus_anon.run.pipeline", "corpus_anon.run.report", "corpus_anon.release.publish",
              "corpus_anon.release.takedown", "corpus_anon.io.storage"):
        assert m in mods


def test_driver_modules_import_nothing_heavy():
    mods = driver_modules()
    code = (
        "import sys\n"
        f"for m in {mods!r}: __import__(m)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver imported: {out.stdout.strip()}"
