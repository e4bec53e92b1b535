"""What stays on top of the reenacted face: the hands (the face module, METHOD.md §6.2).

Hands in front of the face (`hand_layer`): ``metrics.hand_mask`` finds moving skin outside the
enlarged face box and leaves the face alone, because the face moves too. Inside that box, and around
it, motion is measured relative to the face. How the face moved between neighbouring frames is
estimated from the grey levels (an affine map, started from no motion or the box motion and refined
robustly, so a hand over part of the face has no say in it): the detector's boxes alone are too
coarse, since on small faces they jump by whole pixels while the head glides, and aligning by them
made the whole textured face look like it moved. The neighbours are warped by that map and a pixel
moves when it differs from one by more than ``motion_thresh`` plus what a one-pixel misalignment of
the edges there could explain. So head translation, scaling and turning cancel: skin that moves with
the face is face. A moving-skin region inside the enlarged box counts as a hand when it reaches
outside the box (skin moving relative to the face there: the hand or arm arriving from outside), or
when it covers at least ``min_area_frac`` of the face box (a hand wholly inside). Brow, eye and mouth
motion is small and enclosed by the face, so it stays enhanced, except when it touches the hand's
moving region (a hand at the mouth): then it is taken as hand too, so the rule errs toward keeping
hands; comparing with both neighbours also keeps, for a frame, the face where a hand is about to be
or just was. A hand resting motionless on the face is not detected (no motion), as in ``hand_mask``.

With MediaPipe's hand landmarks (``hand_model_layer``), the hull of a hand's 21 points, dilated,
wherever it reaches the face, each frame's united with its neighbours' (a frame where the hand model
missed a hand between two where it found it keeps the hand); the moving-skin rule above runs only
where no hand model did.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from corpus_anon.models.hands import Hand
from corpus_anon.actor.masks import outside_distance, paste_window
from corpus_anon.actor.tube import check_boxes, resize_rgb, scaled_box, valid_rows

log = logging.getLogger(__name__)


def _box_motion(box_from: np.ndarray, box_to: np.ndarray) -> np.ndarray:
    """2 x 3 affine map (float64) of frame coordinates that takes ``box_from`` onto ``box_to``
    (the scale and translation of the face box)."""
    sx = (box_to[2] - box_to[0]) / (box_from[2] - box_from[0])
    sy = (box_to[3] - box_to[1]) / (box_from[3] - box_from[1])
    return np.array([[sx, 0.0, box_to[0] - sx * box_from[0]], [0.0, sy, box_to[1] - sy * box_from[1]]],
                    dtype=np.float64)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2 x 3 affine map x -> a(b(x))."""
    return np.hstack([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2:] + a[:, 2:])])


def _invert(m: np.ndarray) -> np.ndarray:
    """The inverse of the 2 x 3 affine map ``m``."""
    inv = np.linalg.inv(m[:, :2])
    return np.hstack([inv, -inv @ m[:, 2:]])


def _warp_region(gray: np.ndarray, mat: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """``region`` (x0, y0, x1, y1) of the frame ``gray`` moved by ``mat`` (frame coordinates, source ->
    destination): pixel (x, y) of the result is the source at mat^-1 (x0 + x, y0 + y), bilinear,
    edges replicated."""
    import cv2  # lazy: heavy import stays out of module import

    x0, y0, x1, y1 = region
    src = _compose(_invert(mat), np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))
    return cv2.warpAffine(gray, src, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _edge_strength(gray: np.ndarray) -> np.ndarray:
    """Grey-level change per pixel (central differences, L2 over x and y), the largest within one
    pixel: how much a misregistration of up to one pixel can change a pixel."""
    import cv2  # lazy: heavy import stays out of module import

    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REPLICATE)
    return cv2.dilate(0.5 * np.sqrt(gx * gx + gy * gy), np.ones((3, 3), np.uint8))


def _moved(here: np.ndarray, there: np.ndarray, motion_thresh: float, edge_tol_px: float) -> np.ndarray:
    """Pixels whose grey level differs between ``here`` and the aligned neighbour ``there`` by more
    than ``motion_thresh`` plus what a misalignment of ``edge_tol_px`` pixels could explain."""
    edges = np.minimum(_edge_strength(here), _edge_strength(there))
    return np.abs(here - there) > motion_thresh + edge_tol_px * edges


def _best_shift(src: np.ndarray, dst: np.ndarray, face: tuple[slice, slice], use: np.ndarray,
                allowed: np.ndarray, wm: np.ndarray, radius: int) -> np.ndarray | None:
    """The inverse warp ``wm`` moved by the whole-pixel shift within ``radius`` that scores best (as
    in ``_face_motion``, with ``allowed`` from the destination's edges alone: one warp per shift), or
    None when no shift beats ``wm`` itself."""
    import cv2  # lazy: heavy import stays out of module import

    size = (src.shape[1], src.shape[0])
    target, allowed = dst[use], allowed[use]

    def quick(m: np.ndarray) -> float:
        there = cv2.warpAffine(src, m.astype(np.float32), size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)
        return float(np.minimum(np.abs(there[face][use] - target) / allowed, 1.0).mean())

    best, top = None, quick(wm)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx or dy:
                cand = wm + np.array([[0.0, 0.0, dx], [0.0, 0.0, dy]])
                c = quick(cand)
                if c < top:
                    best, top = cand, c
    return best


def _face_motion(g_from: np.ndarray, g_to: np.ndarray, box_from: np.ndarray, box_to: np.ndarray,
                 motion_thresh: float = 15.0, edge_tol_px: float = 1.0, reg_px: int = 64,
                 search_px: int = 3, rounds: int = 2, iters: int = 10, tukey: float = 1.5,
                 previous: np.ndarray | None = None) -> np.ndarray:
    """2 x 3 affine map (frame coordinates, ``g_from`` -> ``g_to``) of how the face moved.

    The detector's boxes are too coarse for this: on small faces they jump by whole pixels (HOG
    cells) while the head moves a fraction of one, so the grey levels decide. The face box of
    ``g_to`` and half its size around it are resampled so the box's longer side is at most ``reg_px``;
    all scoring is over the face box. A map's score is the mean over pixels of |grey difference| /
    (``motion_thresh`` + ``edge_tol_px`` x the smaller ``_edge_strength`` of the two), capped at 1, so
    a hand costs the same wherever it is. The best scoring of no motion, the box motion and
    ``previous`` (the last pair's motion: the head keeps its speed) starts. In each of ``rounds`` rounds
    the pixels that differ under the current map (a hand over the face, mostly), grown by one pixel,
    are left out, unless that leaves under a quarter of the box (the start is far off); in the first
    round whole-pixel shifts up to ``search_px`` are tried (scored with ``g_to``'s edges alone, a
    cheaper pre-selection); then Gauss-Newton on the six affine parameters, with Tukey weights that
    give no say to pixels beyond ``tukey`` x what they may differ by, refines the map. A map replaces
    the current one only when it scores better on that round's pixels. So a hand in front of the face
    does not drag the estimate onto itself.
    """
    import cv2  # lazy: heavy import stays out of module import

    h, w = g_to.shape
    rx0, ry0, rx1, ry1 = scaled_box(box_to, 2.0, w, h)
    fx0, fy0, fx1, fy1 = scaled_box(box_to, 1.0, w, h)
    if fx1 - fx0 < 4 or fy1 - fy0 < 4:
        return _box_motion(box_from, box_to)
    k = min(1.0, reg_px / max(fx1 - fx0, fy1 - fy0))
    size = (max(int(round((rx1 - rx0) * k)), 8), max(int(round((ry1 - ry0) * k)), 8))
    kx, ky = size[0] / (rx1 - rx0), size[1] / (ry1 - ry0)
    # frame -> grid coordinates, as cv2.resize maps pixel centres
    to_grid = np.array([[kx, 0.0, kx * (0.5 - rx0) - 0.5], [0.0, ky, ky * (0.5 - ry0) - 0.5]])
    from_grid = _invert(to_grid)
    tmpl = resize_rgb(np.ascontiguousarray(g_to[ry0:ry1, rx0:rx1]), *size)
    inp = resize_rgb(np.ascontiguousarray(g_from[ry0:ry1, rx0:rx1]), *size)
    gy0, gy1 = max(int(np.floor(ky * (fy0 - ry0))), 0), int(np.ceil(ky * (fy1 - ry0)))
    gx0, gx1 = max(int(np.floor(kx * (fx0 - rx0))), 0), int(np.ceil(kx * (fx1 - rx0)))
    face = (slice(gy0, gy1), slice(gx0, gx1))
    t_face = tmpl[face]
    t_edges = _edge_strength(tmpl)[face]
    ys, xs = np.mgrid[gy0:gy1, gx0:gx1].astype(np.float64)
    cx, cy = xs.mean(), ys.mean()
    xs, ys = (xs - cx).ravel(), (ys - cy).ravel()

    # A warp here is the inverse map on the grid: destination (g_to) pixel -> source (g_from) pixel.
    def residual(wm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        there = cv2.warpAffine(inp, wm.astype(np.float32), size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REPLICATE)
        allowed = motion_thresh + edge_tol_px * np.minimum(t_edges, _edge_strength(there)[face])
        return there, there[face] - t_face, allowed

    def score(wm: np.ndarray, use: np.ndarray) -> float:
        _, r, allowed = residual(wm)
        return float(np.minimum(np.abs(r) / allowed, 1.0)[use].mean())

    def grid_warp(m: np.ndarray) -> np.ndarray:
        return _compose(to_grid, _compose(_invert(m), from_grid))

    every = np.ones(t_face.shape, dtype=bool)
    starts = [grid_warp(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])), grid_warp(_box_motion(box_from, box_to))]
    if previous is not None:
        starts.append(grid_warp(previous))
    cur = min(starts, key=lambda m: score(m, every))
    for rnd in range(rounds):
        _, r, allowed = residual(cur)
        use = cv2.dilate((np.abs(r) > allowed).astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
        if use.sum() < 0.25 * use.size:
            use = every
        best = score(cur, use)
        if rnd == 0:  # whole-pixel shifts: the start may be off by more than Gauss-Newton can see
            shifted = _best_shift(inp, t_face, face, use, motion_thresh + edge_tol_px * t_edges, cur, search_px)
            if shifted is not None and score(shifted, use) < best:
                cur, best = shifted, score(shifted, use)
        wm = cur.copy()
        wuse = use.ravel()
        for _ in range(iters):
            there, r, allowed = residual(wm)
            gx = cv2.Sobel(there, cv2.CV_32F, 1, 0, ksize=1, borderType=cv2.BORDER_REPLICATE)[face].ravel() * 0.5
            gy = cv2.Sobel(there, cv2.CV_32F, 0, 1, ksize=1, borderType=cv2.BORDER_REPLICATE)[face].ravel() * 0.5
            # d there / dx = grad I(W x) A, so the source's gradient is (gx, gy) A^-1
            ainv = np.linalg.inv(wm[:, :2])
            ix = gx * ainv[0, 0] + gy * ainv[1, 0]
            iy = gx * ainv[0, 1] + gy * ainv[1, 1]
            u = (r / allowed).ravel()
            wt = np.where(wuse & (np.abs(u) < tukey), (1.0 - (u / tukey) ** 2) ** 2, 0.0)
            if wt.sum() < 6:
                break
            jac = np.stack([ix * xs, ix * ys, ix, iy * xs, iy * ys, iy], axis=1)
            hess = jac.T @ (jac * wt[:, None])
            try:
                step = -np.linalg.solve(hess + 1e-6 * np.trace(hess) * np.eye(6), jac.T @ (wt * r.ravel()))
            except np.linalg.LinAlgError:
                break
            # the parameters are taken about the face centre c: W x = A (x - c) + (A c + b)
            a = wm[:, :2] + step[[0, 1, 3, 4]].reshape(2, 2)
            at_c = wm[:, :2] @ (cx, cy) + wm[:, 2] + step[[2, 5]]
            nxt = np.hstack([a, (at_c - a @ (cx, cy))[:, None]])
            if not np.isfinite(nxt).all() or abs(np.linalg.det(a)) < 1e-3:
                break
            wm = nxt
            if np.abs(step[[2, 5]]).max() < 0.01 and np.abs(step[[0, 1, 3, 4]]).max() < 1e-4:
                break
        if score(wm, use) < best:
            cur = wm
    return _compose(from_grid, _compose(_invert(cur), to_grid))


def hand_layer(frames: np.ndarray, boxes: np.ndarray, motion_thresh: int = 15, dilate_px: int = 5,
               face_margin: float = 0.2, min_area_frac: float = 0.25, reach: float = 2.0,
               edge_tol_px: float = 1.0) -> np.ndarray:
    """(T, H, W) bool: hand pixels that must stay on top of the reenacted face, on the ORIGINAL clip.

    The union of ``metrics.hand_mask`` (moving skin outside the face box scaled by 1 + ``face_margin``)
    and hands in front of the face. For those, the face's motion between each pair of neighbouring
    frames with a box is estimated once (``_face_motion``, seeded with the previous pair's motion).
    In frame t, over the box scaled by (1 + ``face_margin``) x ``reach``, each neighbour is warped by
    it onto frame t; a pixel moved when it differs from a warped neighbour by more than
    ``motion_thresh`` + ``edge_tol_px`` x the edge strength there (the smaller of both frames', so a
    face misaligned by up to ``edge_tol_px`` pixels has not moved, while a hand's edge over a flat cheek
    has). Moved pixels, closed by one pixel, that are skin (the metrics' YCrCb rule) form 8-connected
    regions. A region with pixels inside the scaled face box is a hand when it also has pixels outside
    it (skin there that moved relative to the face: a hand or arm reaching in), or when, dilated by
    ``dilate_px``, it covers at least ``min_area_frac`` of the (unscaled) face box on skin inside the
    scaled box; keeping regions apart before dilating keeps an eye blinking a
    few pixels from a hand out of it. The hand regions dilated by ``dilate_px`` (a uniform hand only
    changes near its outline), on skin, inside the scaled box, are added. Frames without a box (NaN),
    or without a neighbour that has one, get only the outside mask.
    """
    import cv2  # lazy: heavy import stays out of module import

    from corpus_anon.actor import metrics

    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[3] != 3:
        raise ValueError(f"frames must be uint8 RGB (T, H, W, 3), got {f.shape} {f.dtype}.")
    t_len, h, w = f.shape[:3]
    b = check_boxes(boxes, t_len)
    out = metrics.hand_mask(f, b, motion_thresh=motion_thresh, dilate_px=dilate_px, face_margin=face_margin)
    ok = valid_rows(b)
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in f]).astype(np.float32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    kernel_area = int(kernel.sum())
    # how the face moved from frame t to t + 1, once per pair of neighbouring frames with a face
    fwd: dict[int, np.ndarray] = {}
    for t in range(t_len - 1):
        if ok[t] and ok[t + 1]:
            fwd[t] = _face_motion(gray[t], gray[t + 1], b[t], b[t + 1], motion_thresh, edge_tol_px,
                                  previous=fwd.get(t - 1))
    n_face = 0
    for t in np.flatnonzero(ok):
        x0, y0, x1, y1 = scaled_box(b[t], 1 + face_margin, w, h)
        rx0, ry0, rx1, ry1 = region = scaled_box(b[t], (1 + face_margin) * reach, w, h)
        mats = ([fwd[t - 1]] if t - 1 in fwd else []) + ([_invert(fwd[t])] if t in fwd else [])
        if x1 <= x0 or y1 <= y0 or not mats:
            continue
        here = gray[t, ry0:ry1, rx0:rx1]
        moved = np.zeros(here.shape, dtype=np.uint8)
        for n, m in zip([t - 1] * (t - 1 in fwd) + [t + 1] * (t in fwd), mats):
            there = _warp_region(gray[n], m, region)
            moved |= _moved(here, there, motion_thresh, edge_tol_px).astype(np.uint8)
        ycc = cv2.cvtColor(np.ascontiguousarray(f[t, ry0:ry1, rx0:rx1]), cv2.COLOR_RGB2YCrCb)
        cr, cb = ycc[..., 1], ycc[..., 2]
        skin = ((cr >= metrics.SKIN_CR[0]) & (cr <= metrics.SKIN_CR[1])
                & (cb >= metrics.SKIN_CB[0]) & (cb <= metrics.SKIN_CB[1]))
        inner = np.zeros_like(skin)
        inner[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = True
        # regions are told apart on the moving skin itself (closed by one pixel), not on its
        # dilation, so a hand and a blinking eye a few pixels apart stay two regions
        core = (cv2.dilate(moved, np.ones((3, 3), np.uint8)) > 0) & skin
        if not (core & inner).any():
            continue
        n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
        inside_ids = set(np.unique(labels[core & inner]).tolist()) - {0}
        hand_ids = inside_ids & set(np.unique(labels[core & ~inner]).tolist())
        face_area = (b[t, 2] - b[t, 0]) * (b[t, 3] - b[t, 1])
        for i in sorted(inside_ids - hand_ids):  # wholly inside: a hand when its region is large
            if stats[i, cv2.CC_STAT_AREA] * kernel_area < min_area_frac * face_area:
                continue
            cx0, cy0 = max(stats[i, 0] - dilate_px, 0), max(stats[i, 1] - dilate_px, 0)
            cx1 = stats[i, 0] + stats[i, 2] + dilate_px
            cy1 = stats[i, 1] + stats[i, 3] + dilate_px
            grown = cv2.dilate((labels[cy0:cy1, cx0:cx1] == i).astype(np.uint8), kernel) > 0
            if (grown & skin[cy0:cy1, cx0:cx1] & inner[cy0:cy1, cx0:cx1]).sum() >= min_area_frac * face_area:
                hand_ids.add(i)
        if not hand_ids:
            continue
        found = (cv2.dilate(np.isin(labels, sorted(hand_ids)).astype(np.uint8), kernel) > 0) & skin & inner
        if found.any():
            out[t, ry0:ry1, rx0:rx1] |= found
            n_face += 1
    log.debug("hand_layer: hands in front of the face in %d of %d frames", n_face, t_len)
    return out


def keep_mask(hand: np.ndarray, dilate_px: int) -> np.ndarray:
    """Soft weight (H, W) in [0, 1] of keeping the diffusion output: exactly 1 on every hand pixel,
    1 within ``dilate_px`` of one, falling smoothly to 0 over about ``dilate_px`` more."""
    import cv2  # lazy: heavy import stays out of module import

    if not hand.any():
        return np.zeros(hand.shape, dtype=np.float32)
    r = max(int(dilate_px), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    grown = cv2.dilate(hand.astype(np.uint8), kernel).astype(np.float32)
    sigma = r / 2
    k = 2 * int(math.ceil(3 * sigma)) + 1
    soft = cv2.GaussianBlur(grown, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    keep = np.clip(2.0 * soft, 0.0, 1.0)
    keep[hand] = 1.0
    return keep


HAND_DILATE_FRAC = 0.1


FOREARM_FRAC = 0.5


def hand_region(hand: Hand, dilate_frac: float = HAND_DILATE_FRAC,
                forearm_frac: float = FOREARM_FRAC) -> tuple[np.ndarray, float]:
    """The polygon (k, 2), frame pixels, and the dilation radius (pixels) of one hand's keep region.

    The polygon is the convex hull of the 21 landmarks and one more point past the wrist (0), away from
    the middle finger's knuckle (9) by ``forearm_frac`` x their distance: the wrist joins the forearm,
    which the landmarks stop short of. The radius is ``dilate_frac`` x the hand's size (the diagonal
    of its points' box). Landmarks sit on the joints' centre line and near the fingertips, so the
    hull misses half a finger's width along each finger (about 0.05 of the hand's length, about 0.04
    of its size), the fingertips' ends and the heel of the palm outside the wrist-to-little-finger
    line; 0.1 of the size covers those and the landmarks' own error of a few percent of the hand."""
    import cv2  # lazy: heavy import stays out of module import

    p = np.asarray(hand.points, dtype=np.float64)[:, :2]
    if p.shape != (21, 2) or not np.isfinite(p).all():
        raise ValueError(f"a hand needs 21 finite landmarks, got shape {np.asarray(hand.points).shape}.")
    stub = p[0] + forearm_frac * (p[0] - p[9])
    hull = cv2.convexHull(np.vstack([p, stub[None]]).astype(np.float32)).reshape(-1, 2).astype(np.float64)
    return hull, dilate_frac * hand.size


def _raster_region(hull: np.ndarray, radius: float, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) = ``shape`` bool: pixels of a region whose top-left pixel is ``origin`` in the frame
    that lie inside the polygon ``hull`` (frame pixels, centres at integers) or within ``radius``
    pixels of it."""
    dist, at = outside_distance(hull, max(float(radius), 0.0))
    return paste_window(dist <= max(float(radius), 0.0), at, origin, shape)


def hand_model_layer(hands: list[list[Hand]], boxes: np.ndarray, region: tuple[int, int, int, int],
                     face_margin: float = 0.2, dilate_frac: float = HAND_DILATE_FRAC,
                     neighbours: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Hands on top from the hand model: (T, h, w) bool over ``region`` (x0, y0, x1, y1 of the frame)
    and (T,) bool, True where no hand overlaps the face.

    ``hands[t]`` are frame t's hands. A hand counts when its keep region (``hand_region``: the hull of
    its landmarks and the wrist's stub, dilated by ``dilate_frac`` x its size) overlaps frame t's face
    box scaled by 1 + ``face_margin``; the counted regions, inside ``region``, are frame t's own layer.
    Frames without a box (NaN) count no hand. Each frame's layer is then the union of its own and
    those of the ``neighbours`` frames on either side, and a frame is free only when they all are: a
    frame where the hand model missed a hand between two where it found it keeps the hand."""
    b = np.asarray(boxes, dtype=np.float64)
    if len(hands) != len(b):
        raise ValueError(f"hands must list one entry per frame ({len(b)}), got {len(hands)}.")
    rx0, ry0, rx1, ry1 = region
    layer = np.zeros((len(b), ry1 - ry0, rx1 - rx0), dtype=bool)
    free = np.ones(len(b), dtype=bool)
    ok = valid_rows(b)
    for t in np.flatnonzero(ok):
        if not hands[t]:
            continue
        cx, cy = (b[t, 0] + b[t, 2]) / 2, (b[t, 1] + b[t, 3]) / 2
        hw, hh = (b[t, 2] - b[t, 0]) * (1 + face_margin) / 2, (b[t, 3] - b[t, 1]) * (1 + face_margin) / 2
        fx0, fy0 = int(np.floor(cx - hw)), int(np.floor(cy - hh))
        fx1, fy1 = int(np.ceil(cx + hw)), int(np.ceil(cy + hh))
        for hand in hands[t]:
            hull, radius = hand_region(hand, dilate_frac)
            near = _raster_region(hull, radius, (fx0, fy0), (fy1 - fy0, fx1 - fx0))
            if not near.any():
                continue
            free[t] = False
            layer[t] |= _raster_region(hull, radius, (rx0, ry0), (ry1 - ry0, rx1 - rx0))
    k = max(int(neighbours), 0)
    if k and len(b):
        own, own_free = layer, free
        layer, free = own.copy(), free.copy()
        for d in range(1, k + 1):
            layer[d:] |= own[:-d]
            layer[:-d] |= own[d:]
            free[d:] &= own_free[:-d]
            free[:-d] &= own_free[d:]
    return layer, free


def free_of_skin(layer: np.ndarray, boxes: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """(T,) bool: no pixel of the skin rule's hand layer (T, H, W) inside the face box scaled by
    1 + ``margin`` (``best_source_frame``'s test); True where no box."""
    b = np.asarray(boxes, dtype=np.float64)
    free = np.ones(len(b), dtype=bool)
    h, w = layer.shape[1:]
    for t in np.flatnonzero(valid_rows(b)):
        x0, y0, x1, y1 = scaled_box(b[t], 1 + margin, w, h)
        free[t] = not layer[t, y0:y1, x0:x1].any()
    return free
