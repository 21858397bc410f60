"""Calibrate the per-prompt thresholds and judge each memorized prompt (pure computation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from nemo_surgery.verify.metrics import pairwise_ssim
from nemo_surgery.verify.result import PromptCheck

#: Sample-agreement threshold used when no hold-out prompts calibrate one.
FALLBACK_MAX_AGREEMENT = 0.5
#: Float noise allowed when comparing a sample agreement to its threshold.
AGREEMENT_TOL = 1e-4


def agreement(images: np.ndarray) -> float:
    """Mean pairwise SSIM across seeds (1.0 with a single seed)."""
    values = pairwise_ssim(images)
    return float(values.mean()) if values.size else 1.0


def agreement_threshold(explicit: float | None, holdout_agreement: list[float], seeds: int,
                        notes: list[str]) -> tuple[float, str]:
    """(max sample agreement, its source): the user's value, else hold-out mean + 1 std, else the fallback."""
    if explicit is not None:
        return explicit, "--max-sample-agreement"
    if holdout_agreement and seeds > 1:
        values = np.asarray(holdout_agreement)
        if values.mean() > 0.9:
            notes.append(f"hold-out samples already agree across seeds (mean SSIM {values.mean():.3f}): "
                         "on this model the sample-agreement check separates little")
        return (float(values.mean() + values.std(ddof=1)),
                "mean + 1 std of the pairwise sample SSIM across seeds of the hold-out prompts "
                "on the original model (self-calibrated, like tau)")
    return FALLBACK_MAX_AGREEMENT, f"fixed fallback {FALLBACK_MAX_AGREEMENT} (uncalibrated: no --holdout)"


def detection_json(det: Any, tau: float) -> dict[str, Any]:
    """A detection result as JSON, with scan's memorization rule applied."""
    return {"mean_pairwise": det.mean_pairwise, "max_seed_score": det.score,
            "kept_seeds": det.kept.tolist(), "memorized": bool(det.mean_pairwise > tau and det.kept.numel() > 0)}


def judge(check: PromptCheck, tau: float, max_agreement: float, max_train: float) -> None:
    """Fill ``check.reasons`` with every reason the prompt still counts as memorized."""
    after = check.detection_after
    if after["memorized"]:
        check.reasons.append(f"detection score after pruning {after['mean_pairwise']:.4f} exceeds tau {tau:.4f}")
    if check.agreement_after > max_agreement + AGREEMENT_TOL:
        check.reasons.append(f"samples still agree across seeds (mean SSIM {check.agreement_after:.4f} > "
                             f"{max_agreement:.4f})")
    if check.train_after is not None and max(check.train_after) >= max_train:
        check.reasons.append(f"a sample still resembles the training image (SSIM {max(check.train_after):.4f} >= "
                             f"{max_train})")
