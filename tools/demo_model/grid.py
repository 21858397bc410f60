"""Draw the README's picture: training image, original samples and pruned samples for one caption.

Run: ``python -m tools.demo_model.grid --original DIR --pruned DIR --out docs/img/demo_grid.png``.
Row 1: the training image, then the original model's samples (seeds 0..n-1); row 2: the
pruned model's samples for the same seeds. Samples use the tool's default full-sampling
settings unless told otherwise (DDIM 50 steps, guidance 7.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tools.demo_model import world
from tools.demo_model.measure import load, samples, ssim

SCALE = 3
PAD = 4
LABEL = 14


def _tile(img: np.ndarray) -> np.ndarray:
    """Return an (H*SCALE, W*SCALE, 3) uint8 tile (nearest-neighbour upscaling)."""
    big = np.kron(np.clip(img, 0, 1), np.ones((SCALE, SCALE, 1)))
    return (big * 255).round().astype(np.uint8)


def grid(original: Path, pruned: Path, index: int, seeds: int, steps: int, guidance: float):
    """Return the grid as a PIL image and the per-seed SSIM to the training image (before, after)."""
    from PIL import Image, ImageDraw

    item = world.FAMOUS[index]
    train = world.famous_images()[index]
    before = samples(load(original), item.caption, list(range(seeds)), steps, guidance)
    after = samples(load(pruned), item.caption, list(range(seeds)), steps, guidance)
    side = world.SIZE * SCALE
    width = PAD + (seeds + 1) * (side + PAD)
    height = LABEL + 2 * (side + PAD + LABEL) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 2), f'"{item.caption}"', fill="black")
    rows = [("training image / original model", [train, *before]), ("pruned model", [None, *after])]
    for r, (label, imgs) in enumerate(rows):
        top = LABEL + r * (side + PAD + LABEL)
        draw.text((PAD, top), label, fill="black")
        for c, img in enumerate(imgs):
            if img is not None:
                canvas.paste(Image.fromarray(_tile(img)), (PAD + c * (side + PAD), top + LABEL - 2))
    scores = ([ssim(b, train) for b in before], [ssim(a, train) for a in after])
    return canvas, scores


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", required=True, type=Path)
    p.add_argument("--pruned", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--index", type=int, default=0, help="line of prompts/demo_memorized.txt")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    a = p.parse_args(argv)
    img, (before, after) = grid(a.original, a.pruned, a.index, a.seeds, a.steps, a.guidance)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(a.out, optimize=True)
    print(f"{a.out}: SSIM to the training image before {np.round(before, 3).tolist()}, "
          f"after {np.round(after, 3).tolist()}")


if __name__ == "__main__":
    main()
