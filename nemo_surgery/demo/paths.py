"""Locations of the shipped demo model and its companion files inside the package."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: The trained demo StableDiffusionPipeline folder (the embedded default model).
DEMO_MODEL_DIR = ASSETS / "model"
#: Training images of the memorized captions; file name = line index in prompts/demo_memorized.txt.
DEMO_TRAIN_IMAGES = ASSETS / "train_images"
#: Hold-out statistics of the demo model: the default --stats of `scan` with no --model.
DEMO_STATS = ASSETS / "stats.json"
#: How the shipped model was produced and what was measured on it.
DEMO_RECIPE = ASSETS / "recipe.json"

#: Copies of the top-level prompts/ lists the demo uses, shipped in the wheel (tests keep them identical).
DEMO_PROMPTS_DIR = ASSETS / "prompts"
