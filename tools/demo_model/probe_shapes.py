"""Find where a demo model loses shapes: does the shape word steer the sample, and can the model keep a given shape?

Run: ``python -m tools.demo_model.probe_shapes --model DIR [--scenes 6] [--out probe.json] [--threads 1]``.

Two measurements on single-shape hold-out scenes (guidance 3, 25 DDIM steps):

- ``confusion``: each scene is drawn with every shape word (seeds 0 and 1) and the checker
  reads the shape back. A model that follows the word reads mostly the diagonal; a row that
  looks like every other row means the word is ignored.
- ``img2img``: the true scene image, noised to a strength and denoised with its caption
  (diffusers' img2img pipeline from the same components, seed 0); the share whose shape
  the checker still reads right. High shares at low strength and low ones at high strength
  mean the model can draw the shape once the layout holds it, and what is missing is the
  caption's say in the layout (the high-noise steps).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from nemo_surgery.demo import checker, world
from tools.demo_model.evaluate import SampleSettings, load_pipeline, sample

STRENGTHS = (0.3, 0.5, 0.7, 0.9)


def single_shape_scenes(n: int) -> list[world.Scene]:
    """The first n single-shape scenes of the hold-out list."""
    return [s for s in world.holdout_scenes(60) if s.count == 1][:n]


def confusion(
    pipe, scenes: list[world.Scene], seeds: tuple[int, ...] = (0, 1), steps: int = 25
) -> dict[str, dict[str, int]]:
    """Prompt shape -> counts of the shape the checker reads ("none" where it reads none)."""
    table = {a: {b: 0 for b in [*world.SHAPES, "none"]} for a in world.SHAPES}
    for scene in scenes:
        for shape in world.SHAPES:
            imgs = sample(pipe, replace(scene, shape=shape).caption(), SampleSettings(steps=steps, guidance=3.0, seeds=seeds))
            for img in imgs:
                table[shape][checker.read_scene(img).shape or "none"] += 1
    return table


@torch.no_grad()
def kept_after_img2img(
    pipe, scenes: list[world.Scene], strengths: tuple[float, ...] = STRENGTHS, steps: int = 25
) -> dict[str, float]:
    """Per strength, the share of (scene, shape) images whose shape survives noising and denoising."""
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    out: dict[str, float] = {}
    for strength in strengths:
        kept = []
        for scene in scenes:
            for shape in world.SHAPES:
                s = replace(scene, shape=shape)
                image = torch.from_numpy(s.render().transpose(2, 0, 1).copy())[None]
                got = i2i(s.caption(), image=image, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0), output_type="np").images[0]
                kept.append(checker.read_scene(np.asarray(got, dtype=np.float32)).shape == shape)
        out[f"{strength:g}"] = round(float(np.mean(kept)), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    """Print and optionally save both measurements."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    scenes = single_shape_scenes(a.scenes)
    result = {"model": a.model, "scenes": len(scenes), "confusion": confusion(pipe, scenes)}
    for shape, row in result["confusion"].items():
        print(f"{shape:>9}: " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    result["img2img_kept"] = kept_after_img2img(pipe, scenes)
    print("img2img, shape kept:", result["img2img_kept"], flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
