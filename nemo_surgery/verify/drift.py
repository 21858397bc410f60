"""Hold-out drift: how much pruning changed samples and value-layer outputs of non-memorized prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_surgery.engine.layers import ValueLayer
from nemo_surgery.verify.metrics import paired_ssim


@dataclass
class PromptDrift:
    """Before/after similarity of one hold-out prompt's samples (same seeds)."""

    index: int
    prompt: str
    ssim: list[float]

    @property
    def mean(self) -> float:
        """Mean SSIM over seeds."""
        return float(np.mean(self.ssim))


@dataclass
class DriftResult:
    """Summary of hold-out drift."""

    prompts: list[PromptDrift]
    value_change: dict[str, float] = field(default_factory=dict)  # layer id -> mean relative change
    worst_count: int = 5

    @property
    def per_prompt(self) -> np.ndarray:
        """Mean SSIM per prompt."""
        return np.array([p.mean for p in self.prompts], dtype=np.float64)

    @property
    def mean_ssim(self) -> float:
        """Mean over prompts of the before/after SSIM."""
        return float(self.per_prompt.mean())

    @property
    def drift(self) -> float:
        """The --max-drift metric: 1 - mean hold-out SSIM (before vs after, same seeds)."""
        return 1.0 - self.mean_ssim

    def worst(self) -> list[PromptDrift]:
        """The prompts whose samples changed most."""
        return sorted(self.prompts, key=lambda p: p.mean)[: self.worst_count]

    def to_json(self) -> dict[str, Any]:
        """Return the numbers as JSON."""
        v = self.per_prompt
        return {
            "prompts": len(self.prompts),
            "metric": "1 - mean over hold-out prompts of the mean SSIM (before vs after, same seeds)",
            "drift": self.drift,
            "ssim": {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                     "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())},
            "worst": [{"index": p.index, "prompt": p.prompt, "ssim": p.mean} for p in self.worst()],
            "value_change": self.value_change,
            "per_prompt": [{"index": p.index, "prompt": p.prompt, "ssim": p.ssim} for p in self.prompts],
        }


def sample_drift(indices: list[int], prompts: list[str], before: np.ndarray, after: np.ndarray) -> list[PromptDrift]:
    """Per-prompt SSIM of after- to before-samples; arrays are [P, N, H, W, 3]."""
    return [
        PromptDrift(i, text, paired_ssim(b, a).tolist()) for i, text, b, a in zip(indices, prompts, before, after)
    ]


@torch.no_grad()
def value_output_change(
    before_layers: list[ValueLayer],
    after_layers: list[ValueLayer],
    hidden_before: torch.Tensor,
    hidden_after: torch.Tensor,
) -> dict[str, float]:
    """Per layer, the mean over prompts of ||v_after - v_before|| / ||v_before|| (value-layer outputs).

    ``hidden_*`` are the text embeddings [P, T, D] each model's own encoder produced.
    """
    after_by_id = {layer.id: layer for layer in after_layers}
    out = {}
    for layer in before_layers:
        other = after_by_id.get(layer.id)
        if other is None:
            continue
        vb = layer.module(hidden_before).float().flatten(1)
        va = other.module(hidden_after.to(hidden_before.device)).float().flatten(1)
        rel = (va - vb).norm(dim=1) / vb.norm(dim=1).clamp_min(1e-12)
        out[layer.id] = float(rel.mean())
    return out
