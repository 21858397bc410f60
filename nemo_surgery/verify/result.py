"""What verification measured (dataclasses) and the verdict rule that turns it into an exit code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_surgery.errors import EXIT_FAILURE, EXIT_OK, EXIT_VERDICT
from nemo_surgery.neuron_set import NeuronSet
from nemo_surgery.provenance import envelope, library_versions
from nemo_surgery.verify.drift import DriftResult
from nemo_surgery.verify.equivalence import EquivalenceResult

FORMAT = "nemo-surgery.verify-report"
VERSION = 1

VERDICT_RULE = (
    "exit 0 ('verified') when the pruned checkpoint is equivalent to the hooked original AND every memorized "
    "prompt is mitigated AND (when hold-out prompts are given) drift <= max_drift. A prompt is mitigated when "
    "(a) after pruning its mean pairwise first-step MS-SSIM over seeds is <= tau (scan's detection rule), "
    "(b) the mean pairwise SSIM of its full samples across seeds is <= max_sample_agreement, and "
    "(c) where a training image is given, every sample's SSIM to it is < max_train_similarity. "
    "Not equivalent: exit 1. Otherwise exit 3."
)


@dataclass
class PromptCheck:
    """Before/after evidence for one memorized prompt."""

    index: int
    prompt: str
    detection_before: dict[str, Any]
    detection_after: dict[str, Any]
    first_step_similarity: float | None  # max over kept seeds of MS-SSIM(before delta, after delta)
    agreement_before: float
    agreement_after: float
    before_vs_after: list[float]
    train_image: str | None = None
    train_before: list[float] | None = None
    train_after: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def mitigated(self) -> bool:
        """True when no check flagged the prompt."""
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        """Return the numbers as JSON."""
        return {
            "index": self.index, "prompt": self.prompt, "mitigated": self.mitigated, "reasons": self.reasons,
            "detection": {"before": self.detection_before, "after": self.detection_after},
            "first_step_similarity_before_after": self.first_step_similarity,
            "sample_agreement": {"before": self.agreement_before, "after": self.agreement_after},
            "before_vs_after_ssim": self.before_vs_after,
            "train_image": self.train_image,
            "train_similarity": None if self.train_image is None else
            {"before": self.train_before, "after": self.train_after, "max_after": max(self.train_after or [0.0])},
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class VerifyResult:
    """Everything verification measured, and its verdict."""

    original: str
    pruned: str
    neurons: str
    report_dir: Path
    tau: float
    max_sample_agreement: float
    agreement_source: str
    max_train_similarity: float
    max_drift: float
    checks: list[PromptCheck]
    equivalence: EquivalenceResult
    drift: DriftResult | None
    neuron_set: NeuronSet
    settings: dict[str, Any]
    inputs: dict[str, Any]
    holdout_agreement: list[float] = field(default_factory=list)
    optional: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # for the HTML report
    outputs: dict[str, str] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra report.json sections by name

    @property
    def drift_ok(self) -> bool | None:
        """None when drift was not measured (no hold-out prompts)."""
        return None if self.drift is None else self.drift.drift <= self.max_drift

    @property
    def reasons(self) -> list[str]:
        """Why the verdict failed (empty when it passed)."""
        out = []
        if not self.equivalence.ok:
            out.append(f"not equivalent: pruned checkpoint differs from the hooked original "
                       f"(max abs diff {self.equivalence.max_abs_diff:.3g} > {self.equivalence.tolerance:.3g}"
                       f"{'' if self.equivalence.rows_zero else '; pruned rows are not zero'})")
        for c in self.checks:
            for r in c.reasons:
                out.append(f"prompt {c.index}: {r}")
        if self.drift_ok is False:
            out.append(f"hold-out drift {self.drift.drift:.4f} exceeds --max-drift {self.max_drift}")
        return out

    @property
    def passed(self) -> bool:
        """True when the verdict is 'verified'."""
        return not self.reasons

    @property
    def exit_code(self) -> int:
        """0 verified, 1 not equivalent (a failure of the surgery), 3 memorization/drift verdict failed."""
        if not self.equivalence.ok:
            return EXIT_FAILURE
        return EXIT_OK if self.passed else EXIT_VERDICT

    @property
    def verdict(self) -> str:
        """The verdict word used by the CLI, HTML, JSON and model card alike."""
        return "verified" if self.passed else ("not equivalent" if not self.equivalence.ok else "failed")

    def summary(self) -> dict[str, Any]:
        """Short machine summary (--json)."""
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "tau": self.tau,
            "prompts": [{"index": c.index, "mitigated": c.mitigated,
                         "detection_after": c.detection_after["mean_pairwise"],
                         "agreement_after": c.agreement_after} for c in self.checks],
            "equivalence_max_abs_diff": self.equivalence.max_abs_diff,
            "drift": None if self.drift is None else self.drift.drift,
            "drift_measured": self.drift is not None,
            "report": dict(self.outputs),
        }

    def to_json(self) -> dict[str, Any]:
        """The full versioned report document."""
        import torch

        return {
            **envelope(FORMAT, VERSION),
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "original": self.original,
            "pruned": self.pruned,
            "neuron_set": {"path": self.neurons, "total": self.neuron_set.total,
                           "layers": {ln.id: ln.neurons for ln in self.neuron_set.nonempty()},
                           "tool_version": self.neuron_set.tool_version},
            "settings": self.settings,
            "thresholds": {
                "tau": self.tau,
                "max_sample_agreement": self.max_sample_agreement,
                "max_sample_agreement_source": self.agreement_source,
                "max_train_similarity": self.max_train_similarity,
                "max_train_similarity_note": "default 0.3 is the issue-5 target for SSIM to the training image",
                "max_drift": self.max_drift,
            },
            "verdict_rule": VERDICT_RULE,
            "memorized_prompts": [c.to_json() for c in self.checks],
            "holdout_sample_agreement": self.holdout_agreement,
            "equivalence": self.equivalence.to_json(),
            "drift": None if self.drift is None else {**self.drift.to_json(), "ok": self.drift_ok},
            "drift_measured": self.drift is not None,
            "optional_metrics": self.optional,
            **self.sections,
            "notes": self.notes,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "environment": {**library_versions(), "cuda": torch.version.cuda or "none"},
            "seconds": self.seconds,
        }
