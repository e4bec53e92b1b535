import subprocess
import sys

HEAVY = ("torch", "diffusers", "insightface", "onnxruntime", "cv2", "transformers")
DRIVER = ("corpus_anon.config", "corpus_anon.manifest", "corpus_anon.storage", "corpus_anon.records",
          "corpus_anon.pipeline", "corpus_anon.cli", "corpus_anon.worker", "corpus_anon.extract",
          "corpus_anon.finetune.job", "corpus_anon.finetune.data", "corpus_anon.release",
          "corpus_anon.tombstones", "corpus_anon.takedown")


def test_driver_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        f"for m in {DRIVER!r}: __import__(m)\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"driver imported: {out.stdout.strip()}"
