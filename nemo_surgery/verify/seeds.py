"""How many verification seeds, and what zero copies in them prove: an exact binomial bound.

A prompt is judged per seed (one copying seed is a copy). With ``n`` fresh seeds
and ``k`` copies observed, the one-sided Clopper-Pearson upper bound says: at most
``bound`` of all seeds copy, with 95 % confidence. For k = 0 it is
``1 - 0.05 ** (1 / n)`` (the "rule of three" for large n is 3 / n).

The default of 10 seeds bounds the copy rate at 25.9 % when no seed copies, and
a prompt that still copies in half its seeds shows at least one copy with
probability ``1 - 0.5 ** 10`` = 99.9 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Default verification seeds per memorized prompt (see the module docstring for what they prove).
DEFAULT_SEEDS = 10
#: Confidence of the reported bound.
CONFIDENCE = 0.95


def copy_rate_bound(copies: int, seeds: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on the copy rate after ``copies`` of ``seeds`` copied."""
    if not 0 <= copies <= seeds or seeds < 1:
        raise ValueError(f"need 0 <= copies <= seeds and seeds >= 1, got {copies} of {seeds}")
    if copies == seeds:
        return 1.0
    if copies == 0:
        return 1.0 - (1.0 - confidence) ** (1.0 / seeds)
    from scipy.stats import beta

    return float(beta.ppf(confidence, copies + 1, seeds - copies))


def detection_probability(seeds: int, copy_rate: float = 0.5) -> float:
    """Probability that at least one of ``seeds`` independent seeds copies when a fraction ``copy_rate`` do."""
    return 1.0 - (1.0 - copy_rate) ** seeds


@dataclass(frozen=True)
class SeedEvidence:
    """What the copies observed on one prompt's fresh seeds say about all seeds."""

    copies: int
    seeds: int
    confidence: float = CONFIDENCE

    @property
    def bound(self) -> float:
        """Upper bound on the fraction of all seeds that copy."""
        return copy_rate_bound(self.copies, self.seeds, self.confidence)

    def sentence(self) -> str:
        """The bound in words."""
        return (f"{self.copies} of {self.seeds} fresh seeds copy: at most {100 * self.bound:.1f} % of seeds copy, "
                f"with {100 * self.confidence:.0f} % confidence")

    def to_json(self) -> dict[str, Any]:
        """Return the numbers and the sentence."""
        return {"copies": self.copies, "seeds": self.seeds, "confidence": self.confidence,
                "copy_rate_upper_bound": self.bound, "statement": self.sentence(),
                "detects_half_copying_prompt_with_probability": detection_probability(self.seeds)}
