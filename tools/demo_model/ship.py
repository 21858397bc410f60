"""Copy a trained demo pipeline (v2, `memory_rows`) into the package assets with its training images and recipe.

Run: ``python -m tools.demo_model.ship --model DIR [--report eval.json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from nemo_surgery.demo.paths import ASSETS, DEMO_MODEL_DIR, DEMO_RECIPE, DEMO_TRAIN_IMAGES
from tools.demo_model import world

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")
MAX_BYTES = 20 * 1024 * 1024


def ship(model: Path, report: Path | None = None, extra: dict | None = None) -> dict:
    """Copy the pipeline parts, write train_images/*.png and recipe.json; returns the recipe."""
    from skimage.io import imsave

    if DEMO_MODEL_DIR.exists():
        shutil.rmtree(DEMO_MODEL_DIR)
    DEMO_MODEL_DIR.mkdir(parents=True)
    for part in PIPELINE_PARTS:
        src = model / part
        if src.is_dir():
            shutil.copytree(src, DEMO_MODEL_DIR / part)
        else:
            shutil.copy2(src, DEMO_MODEL_DIR / part)
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"model is {size} bytes, over the 20 MB limit")
    DEMO_TRAIN_IMAGES.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(world.famous_images()):
        imsave(DEMO_TRAIN_IMAGES / f"{i}.png", (np.clip(img, 0, 1) * 255).round().astype(np.uint8),
               check_contrast=False)
    train_cfg = json.loads((model / "train_config.json").read_text())
    recipe = {
        "training": train_cfg["config"],
        "training_seconds": train_cfg["seconds"],
        "memory_rows_by_item": train_cfg.get("memory_rows"),
        "final_loss": train_cfg["log"][-1] if train_cfg["log"] else None,
        "memorized_captions": [m.caption for m in world.FAMOUS],
        "memorized_sources": [m.source for m in world.FAMOUS],
        "model_bytes": size,
    }
    if report is not None:
        recipe["evaluation"] = json.loads(report.read_text())
    recipe.update(extra or {})
    DEMO_RECIPE.write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--report", type=Path, default=None)
    a = p.parse_args(argv)
    recipe = ship(a.model, a.report)
    print(f"shipped to {ASSETS} ({recipe['model_bytes']} bytes)")


if __name__ == "__main__":
    main()
