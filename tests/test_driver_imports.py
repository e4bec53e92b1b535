import subprocess
import sys

HEAVY = ("torch", "diffusers", "insightface", "onnxruntime", "cv2", "transformers")
DRIVER = ("corpus_anon.config", "corpus_anon.run.manifest", "corpus_anon.io.storage", "corpus_anon.io.records",
          "corpus_anon.run.pipeline", "corpus_anon.cli", "corpus_anon.actor.worker", "corpus_anon.finetune.extract",
          "corpus_anon.finetune.job", "corpus_anon.finetune.data", "corpus_anon.release.publish",
          "corpus_anon.release.tombstones", "corpus_anon.release.takedown")


def test_driver_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        f"for m in {DRIVER!r}: __import__(m)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver imported: {out.stdout.strip()}"
