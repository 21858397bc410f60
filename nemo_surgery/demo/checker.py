"""Read a generated demo image back into a scene: the deterministic prompt-alignment checker.

`read_scene` classifies background colour, shape colour, count, position, size and shape
from pixels alone (palette distances, connected components, IoU against drawn shapes);
`alignment` says which of the caption's claims the image meets. The share of fully aligned
samples is the demo's prompt-alignment score: verify reports it on its hold-out samples
(`nemo_surgery.verify.scenes`), and the demo's training tools and docs use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nemo_surgery.demo import world

PALETTE = np.array(list(world.COLOURS.values()), dtype=np.float32)
NAMES = list(world.COLOURS)
#: A pixel belongs to a palette colour when it is closer than this (RGB Euclidean, [0, 1]).
COLOUR_TOLERANCE = 0.35
#: Components smaller than this many pixels are specks, not shapes.
MIN_AREA = 6
#: A scene image is flat colour: at least this share of pixels must be near a palette colour.
MIN_CLEAN = 0.8
#: A shape is recognised only when the drawn shape covers its pixels at least this well (IoU).
MIN_IOU = 0.4


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image (None where it cannot tell)."""

    bg: str | None
    fg: str | None
    count: int
    pos: str | None
    size: str | None
    shape: str | None
    clean: float = 1.0  # share of pixels near a palette colour


def _nearest(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-pixel (index of the nearest palette colour, its distance)."""
    d = np.linalg.norm(img[..., None, :] - PALETTE, axis=-1)
    return d.argmin(-1), d.min(-1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


#: Where `_best_shape` looks: centre offsets (pixels) around the part's bounding-box centre, and radius
#: factors covering the world's scale jitter.
SHIFTS_PX = (-0.5, 0.0, 0.5)
SCALES = tuple(1 + world.SCALE * k / 2 for k in (-2, -1, 0, 1, 2))


def _bbox_centre(mask: np.ndarray) -> tuple[float, float]:
    """Return the (x, y) centre of the mask's bounding box in [0, 1]: every world shape is centred in its box."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2 / size, (ys.min() + ys.max() + 1) / 2 / size


def _best_shape(mask: np.ndarray, radii: list[float]) -> tuple[str, float, float]:
    """Return (shape, nominal radius, IoU) of the drawn shape that best covers `mask`.

    Every world shape is centred in its bounding box, so the fit is tried at the
    mask's bounding-box centre (within half a pixel) and at radii within the
    world's scale jitter: a shifted or scaled render is read like a plain one.
    """
    size = mask.shape[0]
    cx, cy = _bbox_centre(mask)
    best = ("", 0.0, -1.0)
    for shape in world.SHAPES:
        for r in radii:
            for f in SCALES:
                for oy in SHIFTS_PX:
                    for ox in SHIFTS_PX:
                        score = _iou(mask, world.shape_mask(shape, size, cx + ox / size, cy + oy / size, r * f))
                        if score > best[2]:
                            best = (shape, r, score)
    return best


def read_scene(img: np.ndarray) -> Reading:
    """Classify one (H, W, 3) image in [0, 1]."""
    from scipy import ndimage

    idx, dist = _nearest(np.clip(img, 0.0, 1.0))
    border = np.concatenate([idx[:2].ravel(), idx[-2:].ravel(), idx[:, :2].ravel(), idx[:, -2:].ravel()])
    bg_i = int(np.bincount(border, minlength=len(NAMES)).argmax())
    clean = dist < COLOUR_TOLERANCE
    share = float(clean.mean())
    fg_pixels = idx[clean & (idx != bg_i)]
    if fg_pixels.size < MIN_AREA:
        return Reading(NAMES[bg_i], None, 0, None, None, None, share)
    fg_i = int(np.bincount(fg_pixels, minlength=len(NAMES)).argmax())
    mask = clean & (idx == fg_i)
    labels, n = ndimage.label(mask)
    parts = [labels == k for k in range(1, n + 1) if (labels == k).sum() >= MIN_AREA]
    count = len(parts)
    if count == 0:
        return Reading(NAMES[bg_i], NAMES[fg_i], 0, None, None, None, share)
    cx, cy = _bbox_centre(mask)
    if count == 1:
        pos = min(world.POSITIONS, key=lambda p: np.hypot(world.POSITIONS[p][0] - cx, world.POSITIONS[p][1] - cy))
        shape, r, iou = _best_shape(mask, list(world.SIZES.values()))
        size_name = min(world.SIZES, key=lambda s: abs(world.SIZES[s] - r))
        return Reading(NAMES[bg_i], NAMES[fg_i], 1, pos, size_name, shape if iou >= MIN_IOU else None, share)
    layout = world.COUNT_LAYOUT.get(count)
    if layout is None:
        return Reading(NAMES[bg_i], NAMES[fg_i], count, None, None, None, share)
    votes: dict[str | None, int] = {}
    for part in parts:
        shape, _, iou = _best_shape(part, [world.COUNT_RADIUS])
        key = shape if iou >= MIN_IOU else None
        votes[key] = votes.get(key, 0) + 1
    shape = max(votes, key=lambda k: votes[k])
    return Reading(NAMES[bg_i], NAMES[fg_i], count, None, None, shape if votes[shape] == count else None, share)


def alignment(scene: world.Scene, img: np.ndarray) -> dict[str, bool]:
    """Return, per claim of the scene's caption, whether the image meets it."""
    r = read_scene(img)
    claims = {"background": r.bg == scene.bg, "colour": r.fg == scene.fg, "count": r.count == scene.count,
              "shape": r.shape == scene.shape, "plain": r.clean >= MIN_CLEAN}
    if scene.count == 1:
        claims["position"] = r.pos == scene.pos
        claims["size"] = r.size == scene.size
    return claims


def aligned(scene: world.Scene, img: np.ndarray) -> bool:
    """Return True when the image meets every claim of the caption."""
    return all(alignment(scene, img).values())
