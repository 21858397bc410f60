"""Prompt alignment on the demo world: the scene checker's verdict on hold-out samples, paired before and after.

When hold-out prompts are captions of the demo model's caption world
(:mod:`nemo_surgery.demo.world`), every hold-out sample can be read back by the
deterministic checker (:mod:`nemo_surgery.demo.checker`): it either shows what its
caption says or it does not. That is the demo's prompt-alignment score. Verify
scores the samples it already draws for drift: the original, the pruned model and
each random control, all from the same seeds, so every pruned sample has its own
original to compare with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nemo_surgery.demo import checker, world
from nemo_surgery.engine.detection import binomial_cdf


@dataclass
class SceneAlignment:
    """Share of hold-out samples that show what their scene caption says, on each model."""

    prompts: int  # hold-out prompts that are demo-world scene captions
    samples: int  # paired samples: those prompts x the drift seeds
    before: float  # the original
    after: float  # the pruned model
    controls: list[float]  # each random control set, in control order
    lost: int  # aligned on the original and not after pruning (same prompt and seed)
    gained: int  # the other way round
    p_value: float  # exact two-sided sign test on the lost and gained samples

    @property
    def changed(self) -> bool:
        """True when pruning changed the alignment beyond chance (p < 0.05)."""
        return self.p_value < 0.05

    def summary(self) -> str:
        """One line for the CLI and the HTML report."""
        controls = ", ".join(f"{v:.1%}" for v in self.controls) or "-"
        return (f"demo-world scene alignment on {self.samples} hold-out samples ({self.prompts} scene captions): "
                f"{self.before:.1%} -> {self.after:.1%} (controls {controls}); {self.lost} lost, {self.gained} gained "
                f"on the same seeds, sign test p {self.p_value:.3f}"
                f"{': CHANGED beyond chance' if self.changed else ': no change beyond chance'}")

    def to_json(self) -> dict[str, Any]:
        """Return the numbers, with the checker they came from."""
        return {**asdict(self), "changed": self.changed, "checker": "nemo_surgery.demo.checker (demo world)"}


def sign_test_p(lost: int, gained: int) -> float:
    """Exact two-sided sign test: how likely a split at least this uneven is when either way is equally likely."""
    n = lost + gained
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf(min(lost, gained), n, 0.5))


def _aligned(scenes: list[world.Scene], images: np.ndarray) -> np.ndarray:
    """[prompts, seeds] booleans: does each sample (of `images` [P, S, H, W, 3]) meet its caption?"""
    return np.array([[checker.aligned(scene, img) for img in images[k]] for k, scene in enumerate(scenes)])


def scene_alignment(texts: list[str], before: np.ndarray, after: np.ndarray,
                    controls: list[np.ndarray]) -> SceneAlignment | None:
    """Score the hold-out samples whose prompt is a demo-world scene caption; None when there are none.

    `before`, `after` and each control are [P, S, H, W, 3] images in [0, 1] from the same
    seeds, P = len(texts). Images of another size than the world's are not read (None).
    """
    picked = [(k, s) for k, s in ((k, world.scene_of(t)) for k, t in enumerate(texts)) if s is not None]
    if not picked or before.shape[2:4] != (world.SIZE, world.SIZE):
        return None
    rows = [k for k, _ in picked]
    scenes = [s for _, s in picked]
    b, a = _aligned(scenes, before[rows]), _aligned(scenes, after[rows])
    lost, gained = int((b & ~a).sum()), int((~b & a).sum())
    return SceneAlignment(
        prompts=len(rows), samples=int(b.size), before=float(b.mean()), after=float(a.mean()),
        controls=[float(_aligned(scenes, c[rows]).mean()) for c in controls],
        lost=lost, gained=gained, p_value=sign_test_p(lost, gained),
    )
