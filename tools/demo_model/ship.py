"""Copy a trained demo pipeline (v2, `memory_rows`) into the package assets with its training images and recipe.

Run: ``python -m tools.demo_model.ship --model DIR [--report eval.json] [--fp32]``.

The weights are stored in fp16 unless --fp32 is given: the v2 pipeline is 20.9 MB in fp32,
over the 20 MB the package allows. The tool loads them as fp32 on the CPU (its default
--dtype), so only the stored rounding differs; measure the shipped copy, not the snapshot.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from nemo_surgery.demo import world
from nemo_surgery.demo.paths import ASSETS, DEMO_MODEL_DIR, DEMO_RECIPE, DEMO_TRAIN_IMAGES

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")
MAX_BYTES = 20 * 1024 * 1024


def to_fp16(folder: Path) -> None:
    """Rewrite every safetensors file under `folder` with its floating-point tensors in fp16 (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        tmp = path.with_suffix(".tmp")
        save_file(half, tmp, metadata=meta)
        tmp.replace(path)


def ship(model: Path, report: Path | None = None, extra: dict | None = None, fp16: bool = True) -> dict:
    """Copy the pipeline parts (fp16 unless told), write train_images/*.png and recipe.json; returns the recipe."""
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
    if fp16:
        to_fp16(DEMO_MODEL_DIR)
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
        "weights_dtype": "fp16" if fp16 else "fp32",
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
    p.add_argument("--fp32", action="store_true", help="store the weights as trained (fp32) instead of fp16")
    a = p.parse_args(argv)
    recipe = ship(a.model, a.report, fp16=not a.fp32)
    print(f"shipped to {ASSETS} ({recipe['model_bytes']} bytes)")


if __name__ == "__main__":
    main()
