"""Random-neuron controls: sets matched to the found set layer by layer, drawn from a recorded seed.

A verdict is evidence only when compared with what chance does: every
behavioural metric is measured for the found set and for R random sets with
the same number of neurons in each layer (drawn from the layer's other rows),
on the same seeds. The set is *specific* when it lowers the memorization
metric below every control (rank test: with R controls, the chance that a
random set beats all of them is 1 / (R + 1)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Default seed of the control draw.
DEFAULT_CONTROL_SEED = 0
#: Harm margins: the found set may exceed the median control by this much and still count as "no worse than chance".
DRIFT_MARGIN = 0.05
LOSS_MARGIN = 0.02


def draw_controls(found: Mapping[str, Sequence[int]], layer_rows: Mapping[str, int], count: int,
                  seed: int) -> list[dict[str, list[int]]]:
    """``count`` random sets with as many neurons per layer as ``found``, avoiding the found neurons."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        control = {}
        for lid, rows in found.items():
            if not rows:
                continue
            pool = np.setdiff1d(np.arange(layer_rows[lid]), np.asarray(list(rows), dtype=np.int64))
            take = min(len(rows), pool.size)
            control[lid] = sorted(int(r) for r in rng.choice(pool, size=take, replace=False))
        out.append(control)
    return out


@dataclass
class Specificity:
    """The found set's memorization metric against the controls' (lower is better)."""

    metric: str
    found: float
    controls: list[float]

    @property
    def measured(self) -> bool:
        """False without controls."""
        return bool(self.controls)

    @property
    def beaten(self) -> int:
        """Controls the found set beats (strictly lower metric)."""
        return sum(1 for c in self.controls if self.found < c)

    @property
    def specific(self) -> bool:
        """True when the found set beats every control."""
        return self.measured and self.beaten == len(self.controls)

    @property
    def p_value(self) -> float | None:
        """Rank p-value: (controls at least as good as the found set + 1) / (R + 1)."""
        if not self.controls:
            return None
        return (len(self.controls) - self.beaten + 1) / (len(self.controls) + 1)

    def to_json(self) -> dict[str, Any]:
        """Return the comparison and the test used."""
        return {"metric": self.metric, "found": self.found, "controls": self.controls, "beaten": self.beaten,
                "specific": self.specific, "rank_p_value": self.p_value,
                "test": "specific when the found set's metric is below every control's "
                        "(rank p-value = (controls not beaten + 1) / (R + 1))"}


def no_worse_than_controls(found: float, controls: list[float], margin: float) -> tuple[bool | None, float | None]:
    """(found <= median(controls) + margin, the limit); (None, None) without controls."""
    if not controls:
        return None, None
    limit = float(np.median(controls)) + margin
    return found <= limit, limit
