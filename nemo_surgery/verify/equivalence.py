"""Equivalence: the pruned checkpoint without hooks predicts what the hooked original predicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nemo_surgery.engine.hooks import ValueMask, blocked_masks
from nemo_surgery.engine.model import Conditioning, LoadedModel

#: Absolute tolerance per unit of prediction magnitude, by dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class EquivalenceResult:
    """Outcome of the equivalence check."""

    max_abs_diff: float
    tolerance: float
    prompts: int
    seeds: int
    rows_zero: bool
    max_abs_pruned_row: float

    @property
    def ok(self) -> bool:
        """True when predictions agree within tolerance and every pruned row is zero."""
        return self.rows_zero and self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        """Return the numbers as JSON."""
        return {**asdict(self), "ok": self.ok}


@torch.no_grad()
def pruned_rows_max(model: LoadedModel, blocked: Mapping[str, Sequence[int]]) -> float:
    """Largest |weight| over the rows that the set says are zero in ``model``'s value layers."""
    by_id = {layer.id: layer for layer in model.layers}
    worst = 0.0
    for lid, rows in blocked.items():
        if rows:
            w = by_id[lid].module.weight[torch.as_tensor(list(rows), device=model.device)]
            worst = max(worst, float(w.abs().max()))
    return worst


@torch.no_grad()
def check_equivalence(
    original: LoadedModel,
    pruned: LoadedModel,
    blocked: Mapping[str, Sequence[int]],
    prompts: list[str],
    latents: torch.Tensor,
    timestep: torch.Tensor,
) -> EquivalenceResult:
    """Compare UNet predictions: pruned (no hooks) vs original with ``blocked`` zeroed by hook.

    Every prompt is evaluated on every latent [N, C, H, W] at ``timestep``,
    text-conditional only. The tolerance scales with the prediction magnitude.
    """
    n = latents.shape[0]
    cond_o = original.encode(prompts)
    cond_p = pruned.encode(prompts)
    idx = torch.arange(len(prompts)).repeat_interleave(n)
    x = latents.repeat(len(prompts), 1, 1, 1)

    def predict(model: LoadedModel, cond: Conditioning, masks: dict) -> torch.Tensor:
        with ValueMask(model.layers, masks):
            sel = cond.select(idx.to(cond.hidden.device))
            return model.unet(x.to(model.device, model.dtype), timestep, **sel.unet_kwargs()).sample.float().cpu()

    expected = predict(original, cond_o, blocked_masks(original.layers, blocked, device=original.device))
    got = predict(pruned, cond_p, {})
    scale = max(1.0, float(expected.abs().max()))
    row_max = pruned_rows_max(pruned, blocked)
    return EquivalenceResult(
        max_abs_diff=float((got - expected).abs().max()),
        tolerance=TOLERANCE.get(original.dtype, 1e-2) * scale,
        prompts=len(prompts),
        seeds=n,
        rows_zero=row_max == 0.0,
        max_abs_pruned_row=row_max,
    )
