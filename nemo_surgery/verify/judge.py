"""Judge each memorized prompt from its measurements (pure computation): failing and missing evidence."""

from __future__ import annotations

from typing import Any

import numpy as np

from nemo_surgery.verify.metrics import pairwise_ssim
from nemo_surgery.verify.result import PromptCheck


def agreement(images: np.ndarray) -> float:
    """Mean pairwise SSIM across seeds (1.0 with a single seed)."""
    values = pairwise_ssim(images)
    return float(values.mean()) if values.size else 1.0


def scan_record(neuron_set_prompts: list[dict[str, Any]], index: int, text: str) -> dict[str, Any] | None:
    """The neuron set's record of a prompt (matched by text, else by index), or None."""
    by_text = [p for p in neuron_set_prompts if p.get("prompt") == text]
    if by_text:
        return by_text[0]
    by_index = [p for p in neuron_set_prompts if p.get("index") == index and "prompt" not in p]
    return by_index[0] if by_index else None


def judge(check: PromptCheck, calibrated: bool = True) -> None:
    """Fill ``check.reasons`` (the prompt still counts as memorized) and ``check.missing`` (cannot tell).

    With an uncalibrated copy threshold the per-seed copies are reported but
    judge nothing: they can neither pass nor fail the prompt.
    """
    rec = check.scan_record
    if rec is not None and rec.get("memorized") and rec.get("mitigated") is False:
        check.reasons.append("scan recorded it as NOT mitigated by this set (\"mitigated\": false in the neuron set)")
    c = check.copy
    if not calibrated:
        check.missing.append(f"per-seed copies not judged: the copy threshold {c.threshold:.4f} is not calibrated on "
                             "this model")
    elif c.copies_after:
        seeds = [i for i, s in enumerate(c.after) if s >= c.threshold]
        check.reasons.append(f"{c.copies_after} of {len(c.after)} fresh seeds still copy the {c.reference} "
                             f"(SSIM up to {max(c.after):.4f} >= copy threshold {c.threshold:.4f}; seeds {seeds})")
    if calibrated and c.copies_before == 0:
        check.missing.append(f"the original's own samples do not copy the {c.reference} at the copy threshold "
                             f"{c.threshold:.4f} (highest SSIM {max(c.before):.4f} over {c.seeds_before} seeds): the "
                             "copy check could not fail here, so it proves nothing")
