"""A tiny pipeline whose memorization is spread over many value neurons (issue 15's failure pattern).

Built on the planted model (``tests.models.plant``) with 16 planted rows that
all push the same fixed pattern: four strong rows carry most of it, twelve weak
rows the rest. Blocking the four strong rows (a small set) weakens the
injection so much that NeMo's first-step score (unguided) falls below tau, yet
full samples with classifier-free guidance amplify what the weak rows leave and
still copy the memorized image in every seed. A verifier that trusts the
first-step score, or the mean agreement across seeds, certifies a model that
still copies; the per-seed copy check must not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.models.plant import TRIGGER_PROMPT, Plant, PlantSpec, build_planted_pipeline


@dataclass(frozen=True)
class SpreadSpec:
    """Knobs of the spread model (measured: blocking ``strong_rows`` leaves first-step 0.09-0.15 vs tau 0.16)."""

    strong_rows: tuple[int, ...] = (0, 1, 2, 3)
    weak_rows: tuple[int, ...] = tuple(range(4, 16))
    strong: float = 7.0
    weak: float = 0.2
    seed: int = 0


@torch.no_grad()
def build_spread_pipeline(spec: SpreadSpec = SpreadSpec(), trigger: str = TRIGGER_PROMPT):
    """Return (pipeline, Plant): the trigger's pattern is carried by all rows; ``Plant.rows`` are the strong ones."""
    rows = spec.strong_rows + spec.weak_rows
    pipe, plant = build_planted_pipeline(PlantSpec(rows=rows, strength=1.0, seed=spec.seed), trigger)
    transformer = pipe.unet.get_submodule(plant.layer_id.rsplit(".transformer_blocks", 1)[0])
    proj = transformer.proj_out.weight
    inner = transformer.transformer_blocks[0].attn2.to_out[0].weight.shape[1]
    shared = proj[4:8, 0].clone()
    value = pipe.unet.get_submodule(plant.layer_id).weight
    for k, row in enumerate(rows):
        proj[4:8, k % inner] = shared  # every row pushes the same pattern: blocking some only weakens it
        value[row] *= spec.strong if row in spec.strong_rows else spec.weak
    return pipe, Plant(prompt=plant.prompt, layer_id=plant.layer_id, rows=spec.strong_rows)
