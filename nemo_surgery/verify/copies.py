"""Per-seed copy judgement: the reference image, the calibrated copy threshold, copies before/after.

Pure computation on image stacks [N, H, W, 3] in [0, 1] (SSIM from verify.metrics).
A sample *copies* when its SSIM to the prompt's reference reaches the copy
threshold. The reference is the training image when given, else the medoid of
the original model's own samples of the prompt (its memorized output). The
threshold is calibrated: a high quantile of the SSIM that hold-out prompts'
samples of the original reach to the same (unrelated) references.

Which quantile: a prompt is judged on N seeds and fails on one copy, so a
per-sample false-copy rate r fails a fully mitigated prompt with probability
about N * r. The quantile is ``1 - FAMILY_ALPHA / N`` (Bonferroni: at most 5 %
per prompt; 0.995 for N = 10), never below 0.99. An empirical quantile that
high needs about N / FAMILY_ALPHA calibration samples (200 for N = 10); with
fewer it approaches the largest one, and a sample exchangeable with the
hold-out samples then exceeds it with probability about 1 / (n + 1) per seed
(the report states n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nemo_surgery.verify.metrics import to_reference

#: Family-wise false-copy rate per prompt that fixes the quantile (see the module docstring).
FAMILY_ALPHA = 0.05
#: Lowest quantile used.
MIN_COPY_QUANTILE = 0.99
#: Used for reporting only when no hold-out samples calibrate a threshold (the verdict is then never 0).
UNCALIBRATED_COPY_THRESHOLD = 0.5


@dataclass(frozen=True)
class CopyThreshold:
    """The SSIM at or above which a sample counts as a copy, with where it came from."""

    value: float
    source: str
    calibrated: bool
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the threshold and its source."""
        return {"value": self.value, "source": self.source, "calibrated": self.calibrated,
                "calibration_samples": self.samples}


def medoid(images: np.ndarray) -> int:
    """Index of the image with the highest mean SSIM to the others of a stack [N, H, W, 3]."""
    n = images.shape[0]
    if n < 2:
        return 0
    sims = np.array([to_reference(images, images[i]) for i in range(n)])
    np.fill_diagonal(sims, np.nan)
    return int(np.nanargmax(np.nanmean(sims, axis=1)))


def copy_quantile(seeds: int) -> float:
    """The calibration quantile for ``seeds`` judged seeds per prompt: max(0.99, 1 - 0.05 / seeds)."""
    return max(MIN_COPY_QUANTILE, 1.0 - FAMILY_ALPHA / max(1, seeds))


def calibrate_copy_threshold(holdout: np.ndarray | None, references: list[np.ndarray], explicit: float | None,
                             quantile: float = MIN_COPY_QUANTILE) -> CopyThreshold:
    """The user's threshold, else the ``quantile`` of SSIM(hold-out sample, reference) over all pairs.

    ``holdout`` is [P, N, H, W, 3] samples of the original for non-memorized prompts.
    """
    if explicit is not None:
        return CopyThreshold(float(explicit), "given by the user (--copy-threshold)", calibrated=True)
    if holdout is None or not references:
        return CopyThreshold(UNCALIBRATED_COPY_THRESHOLD,
                             f"documented default {UNCALIBRATED_COPY_THRESHOLD} (NOT calibrated: no --holdout prompts; "
                             "the verdict cannot be 'verified')", calibrated=False)
    flat = holdout.reshape(-1, *holdout.shape[2:])
    values = np.concatenate([to_reference(flat, ref) for ref in references])
    enough = values.size >= 1.0 / (1.0 - quantile) - 1
    return CopyThreshold(float(np.quantile(values, quantile)),
                         f"calibrated on this model: {100 * quantile:.1f} % quantile of the SSIM of {flat.shape[0]} "
                         f"hold-out samples of the original (own seeds per prompt) to the {len(references)} memorized "
                         "prompts' references"
                         + ("" if enough else f"; only {values.size} values: the quantile is near their maximum, "
                                              f"so a non-copying sample exceeds it with probability ~1/{values.size + 1}"),
                         calibrated=True, samples=int(values.size))


@dataclass
class CopyCheck:
    """One prompt's per-seed similarities to its reference, before and after, for the set and each control."""

    reference: str  # "training image" or "medoid of the original's samples (seed k)"
    reference_seed: int | None  # medoid seed, excluded from the 'before' copy count
    before: list[float]
    after: list[float]
    controls: list[list[float]] = field(default_factory=list)
    threshold: float = 0.0

    def copies(self, sims: list[float], exclude: int | None = None) -> int:
        """How many seeds reach the threshold (``exclude``: the medoid, which is its own reference)."""
        return sum(1 for i, s in enumerate(sims) if i != exclude and s >= self.threshold)

    @property
    def copies_before(self) -> int:
        """Seeds of the original that copy the reference (the medoid itself not counted)."""
        return self.copies(self.before, self.reference_seed)

    @property
    def copies_after(self) -> int:
        """Seeds of the pruned model that copy the reference."""
        return self.copies(self.after)

    @property
    def seeds_before(self) -> int:
        """Seeds that could show a copy before (the medoid excluded)."""
        return len(self.before) - (self.reference_seed is not None)

    def to_json(self) -> dict[str, Any]:
        """Return the similarities and counts."""
        return {"reference": self.reference, "reference_seed": self.reference_seed, "threshold": self.threshold,
                "similarity_before": self.before, "similarity_after": self.after,
                "copies_before": self.copies_before, "seeds_before": self.seeds_before,
                "copies_after": self.copies_after, "max_after": max(self.after),
                "controls": [{"similarity_after": c, "copies_after": self.copies(c), "max_after": max(c)}
                             for c in self.controls]}


def prompt_reference(before: np.ndarray, train_image: np.ndarray | None) -> tuple[np.ndarray, str, int | None]:
    """(reference image, its name, the medoid seed or None): the training image, else the original's medoid."""
    if train_image is not None:
        return train_image, "training image", None
    k = medoid(before)
    return before[k], f"medoid of the original's samples (seed {k})", k


def check_copies(before: np.ndarray, after: np.ndarray, controls: list[np.ndarray], reference: np.ndarray,
                 name: str, reference_seed: int | None, threshold: float) -> CopyCheck:
    """Per-seed SSIM of one prompt's samples [N, H, W, 3] to its reference, before, after and per control."""
    return CopyCheck(reference=name, reference_seed=reference_seed, before=to_reference(before, reference).tolist(),
                     after=to_reference(after, reference).tolist(),
                     controls=[to_reference(c, reference).tolist() for c in controls], threshold=threshold)
