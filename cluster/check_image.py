"""Build-time check of the worker image (run by cluster/Dockerfile; no GPU needed).

Fails the build when what was installed drifts from what the project pins:
- every exact pin (`name==version`) in pyproject.toml's dependencies matches the installed
  distribution (a local label such as torch's `+cu128` is ignored, as pip does);
- every other specifier (ranges) is satisfied;
- insightface is the Makefile's `--no-deps` pin;
- torch is a CUDA build of the expected variant (`--torch-cuda cu128`), not the CPU wheel;
- the listed modules import (a wheel's missing system library shows up here, not on a GPU node).

    python check_image.py --pyproject pyproject.toml --insightface 2.1 --torch-cuda cu128 \
        --import torch ray diffusers cv2 av dlib onnxruntime insightface corpus_anon
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def pinned_requirements(pyproject: Path) -> list[Requirement]:
    data = tomllib.loads(Path(pyproject).read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def problems(requirements: list[Requirement], insightface: str | None = None,
             installed: Callable[[str], str | None] = _installed) -> list[str]:
    """One sentence per mismatch between the requirements and what `installed` reports."""
    out = []
    wanted = list(requirements)
    if insightface:
        wanted.append(Requirement(f"insightface=={insightface}"))
    for req in wanted:
        have = installed(req.name)
        if have is None:
            out.append(f"{req.name} is not installed (wanted {req.specifier}).")
            continue
        public = Version(Version(have).public)
        if not req.specifier.contains(public, prereleases=True):
            out.append(f"{req.name} {have} does not satisfy {req.specifier}.")
    return out


def torch_cuda_problem(expected: str) -> str | None:
    """None when torch is the CUDA build `expected` (e.g. 'cu128'), else one sentence."""
    import torch

    cuda = torch.version.cuda
    if not cuda:
        return f"torch {torch.__version__} is a CPU build; the worker image needs {expected}."
    got = "cu" + cuda.replace(".", "")
    if got != expected:
        return f"torch {torch.__version__} is built for CUDA {cuda} ({got}), not {expected}."
    return None


def import_problems(modules: list[str]) -> list[str]:
    """Import each module (shared libraries the wheels need are missing otherwise)."""
    import importlib

    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            out.append(f"import {name} failed: {type(e).__name__}: {e}".splitlines()[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", default="pyproject.toml")
    ap.add_argument("--insightface", default=None, help="the Makefile's insightface pin")
    ap.add_argument("--torch-cuda", default=None, help="expected torch CUDA variant, e.g. cu128")
    ap.add_argument("--import", dest="imports", nargs="*", default=[], help="modules that must import")
    args = ap.parse_args(argv)
    found = problems(pinned_requirements(Path(args.pyproject)), args.insightface)
    found += import_problems(args.imports)
    if args.torch_cuda:
        p = torch_cuda_problem(args.torch_cuda)
        if p:
            found.append(p)
    for p in found:
        print(f"check_image: {p}", file=sys.stderr)
    if not found:
        print("check_image: every pin matches.")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
