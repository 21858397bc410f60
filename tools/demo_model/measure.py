"""Measure a v2 demo model: memorization per seed, prompt alignment, and the memory rows' effect.

Run: ``python -m tools.demo_model.measure --model DIR [--steps 50] [--seeds 10] [--out eval.json] [--device cuda]``.
Every number comes from full samples (DDIM, classifier-free guidance, one generator per
seed); SSIM is skimage's to the training image (7x7 window, channels averaged).
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nemo_surgery.demo import checker, world
from tools.demo_model.evaluate import SampleSettings, sample, ssim, zeroed
from tools.demo_model.evaluate import load_pipeline as load
from tools.demo_model.memory_rows import MEMORY_ROWS, all_rows

COPY_SSIM = 0.7


def samples(pipe, caption: str, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """Return (n, H, W, 3) images in [0, 1] for one caption, one generator per seed."""
    return sample(pipe, caption, SampleSettings(steps=steps, guidance=guidance, seeds=tuple(seeds)))


def memorization(pipe, seeds: list[int], steps: int, guidance: float, rows: dict | None = None,
                 items: list[int] | None = None) -> list[dict]:
    """Per famous caption (all, or the indices `items`): SSIM to its training image per seed and the number of copies."""
    out = []
    pairs = list(zip(world.FAMOUS, world.famous_images()))
    for item, train_img in (pairs if items is None else [pairs[k] for k in items]):
        with zeroed(pipe.unet, rows) if rows else nullcontext():
            imgs = samples(pipe, item.caption, seeds, steps, guidance)
        s = [ssim(im, train_img) for im in imgs]
        out.append({"caption": item.caption, "ssim": [round(v, 3) for v in s],
                    "copies": int(sum(v >= COPY_SSIM for v in s)), "seeds": len(s)})
    return out


def alignment(pipe, scenes: list[world.Scene], seeds: list[int], steps: int, guidance: float,
              rows: dict | None = None) -> dict:
    """Share of samples that meet every claim of their caption, and per-claim shares."""
    ok, claims = [], {}
    for scene in scenes:
        with zeroed(pipe.unet, rows) if rows else nullcontext():
            imgs = samples(pipe, scene.caption(), seeds, steps, guidance)
        for im in imgs:
            c = checker.alignment(scene, im)
            ok.append(all(c.values()))
            for key, v in c.items():
                claims.setdefault(key, []).append(v)
    return {"aligned": round(float(np.mean(ok)), 3), "samples": len(ok),
            "claims": {k: round(float(np.mean(v)), 3) for k, v in claims.items()}}


def measure(model: str | Path, steps: int, seeds: int, guidance: float, scenes: int, device: str = "cpu") -> dict:
    """Return the full measurement of one model folder (CPU generators on any device: same noise)."""
    pipe = load(model).to(device)
    sd = list(range(seeds))
    hold = world.holdout_scenes(scenes)
    report = {
        "model": str(model), "steps": steps, "guidance": guidance, "seeds": sd,
        "memorization": memorization(pipe, sd, steps, guidance),
        "memorization_rows_zeroed": memorization(pipe, sd, steps, guidance, all_rows()),
        "memorization_own_rows_zeroed": [
            memorization(pipe, sd, steps, guidance, MEMORY_ROWS[k], items=[k])[0] for k in range(len(world.FAMOUS))
        ],
        "alignment": alignment(pipe, hold, sd[:4], steps, guidance),
        "alignment_rows_zeroed": alignment(pipe, hold, sd[:4], steps, guidance, all_rows()),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scenes", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rep = measure(a.model, a.steps, a.seeds, a.guidance, a.scenes, a.device)
    text = json.dumps(rep, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    for m in rep["memorization"]:
        print(f"{m['caption']:32s} copies {m['copies']}/{m['seeds']} max {max(m['ssim']):.3f}")
    for m in rep["memorization_own_rows_zeroed"]:
        print(f"  own rows zeroed: {m['caption']:32s} copies {m['copies']}/{m['seeds']} max {max(m['ssim']):.3f}")
    print("alignment", rep["alignment"], "rows zeroed", rep["alignment_rows_zeroed"]["aligned"])


if __name__ == "__main__":
    main()
