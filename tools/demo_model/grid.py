"""Draw the README's pictures: a memorized caption before and after pruning, and hold-out scenes.

Run: ``python -m tools.demo_model.grid --original DIR --pruned DIR --out docs/img/demo_grid.png``.
Row 1: the training image, then the original model's samples (seeds 0..n-1); row 2: the
pruned model's samples for the same seeds. With ``--scenes N`` (and no ``--pruned``): the
first N hold-out scenes, each as its rendered image and the model's samples, captioned with
the world checker's verdict per seed ("ok" or the claims it missed). Samples use the tool's
default full-sampling settings unless told otherwise (DDIM 50 steps, guidance 7.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nemo_surgery.demo import checker, world
from tools.demo_model.measure import load, samples, ssim

SCALE = 3
PAD = 4
LABEL = 14
#: Narrowest scenes picture: room for a caption line and the checker's verdicts beside 2 or 3 tiles.
MIN_WIDTH = 380


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


def scenes(model: Path, count: int, seeds: int, steps: int, guidance: float):
    """Return the hold-out scenes grid as a PIL image and the share of samples the checker reads as aligned."""
    from PIL import Image, ImageDraw

    pipe = load(model)
    side = world.SIZE * SCALE
    width = PAD + (seeds + 1) * (side + PAD)
    chosen = world.holdout_scenes(count)
    canvas = Image.new("RGB", (max(width, MIN_WIDTH), PAD + count * (side + PAD + 2 * LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    ok = []
    for r, scene in enumerate(chosen):
        imgs = samples(pipe, scene.caption(), list(range(seeds)), steps, guidance)
        marks = []
        for im in imgs:
            missed = [k for k, v in checker.alignment(scene, im).items() if not v]
            ok.append(not missed)
            marks.append("ok" if not missed else "no " + "+".join(missed))
        top = PAD + r * (side + PAD + 2 * LABEL)
        draw.text((PAD, top), f'"{scene.caption()}"', fill="black")
        draw.text((PAD, top + LABEL - 2), "scene / seeds: " + ", ".join(marks), fill="gray")
        for c, img in enumerate([scene.render(), *imgs]):
            canvas.paste(Image.fromarray(_tile(img)), (PAD + c * (side + PAD), top + 2 * LABEL - 2))
    return canvas, float(np.mean(ok))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", required=True, type=Path)
    p.add_argument("--pruned", type=Path, help="the pruned model (the memorized-caption picture)")
    p.add_argument("--scenes", type=int, default=0, metavar="N",
                   help="draw the first N hold-out scenes of --original instead (the alignment picture)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--index", type=int, default=0, help="line of prompts/demo_memorized.txt")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    a = p.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.scenes > 0:
        img, aligned = scenes(a.original, a.scenes, a.seeds, a.steps, a.guidance)
        img.save(a.out, optimize=True)
        print(f"{a.out}: {a.scenes} hold-out scenes x {a.seeds} seeds, {100 * aligned:.1f} % aligned by the checker")
        return
    if a.pruned is None:
        p.error("--pruned is needed unless --scenes N is given")
    img, (before, after) = grid(a.original, a.pruned, a.index, a.seeds, a.steps, a.guidance)
    img.save(a.out, optimize=True)
    print(f"{a.out}: SSIM to the training image before {np.round(before, 3).tolist()}, "
          f"after {np.round(after, 3).tolist()}")


if __name__ == "__main__":
    main()
