"""What verification measured (dataclasses) and the verdict rule that turns it into an exit code.

Verdict words (the same in the CLI, report.json, report.html and MODEL_CARD.md):
``verified`` (exit 0), ``NOT verified`` (exit 3: evidence says the set fails),
``unverified`` (exit 3: evidence is missing; the report says which flags supply
it), ``not equivalent`` (exit 1: the pruned checkpoint is not the hooked original).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import EXIT_FAILURE, EXIT_OK, EXIT_VERDICT
from nemo_surgery.neuron_set import NeuronSet
from nemo_surgery.provenance import envelope, library_versions
from nemo_surgery.verify.controls import Specificity
from nemo_surgery.verify.copies import CopyCheck, CopyThreshold
from nemo_surgery.verify.drift import DriftResult
from nemo_surgery.verify.equivalence import EquivalenceResult
from nemo_surgery.verify.scenes import SceneAlignment
from nemo_surgery.verify.seeds import SeedEvidence

FORMAT = "nemo-surgery.verify-report"
VERSION = 2

VERIFIED, NOT_VERIFIED, UNVERIFIED, NOT_EQUIVALENT = "verified", "NOT verified", "unverified", "not equivalent"

VERDICT_RULE = (
    "exit 0 ('verified') only when ALL hold: the pruned checkpoint equals the original with the set blocked "
    "(else exit 1, 'not equivalent'); scan did not record any memorized prompt as not mitigated; for every "
    "memorized prompt, on fresh seeds disjoint from scan's detection seeds, NO pruned sample copies the prompt's "
    "reference (its training image, else the medoid of the original's samples), a copy being SSIM >= the copy "
    "threshold calibrated on hold-out prompts, and the original copies it (so the check can fail); no pruned "
    "sample of a scanned prompt that detection did not flag copies the training image given for it (--train-images, "
    "without --prompts); the set "
    "lowers the memorization metric (mean over prompts of the highest after-pruning SSIM to the reference) below "
    "every random control set of the same shape; harm was measured on hold-out data and is no worse than the "
    "median control plus the stated margin and within the user's limits. Failing evidence gives exit 3 "
    "'NOT verified'; missing evidence gives exit 3 'unverified'. The first-step detection scores on fresh seeds "
    "are reported, not judged (their thresholds are calibrated on scan's seeds)."
)


@dataclass
class PromptCheck:
    """Before/after evidence for one memorized prompt, for the found set and the controls."""

    index: int
    prompt: str
    detection_before: dict[str, Any]
    detection_after: dict[str, Any]
    copy: CopyCheck
    agreement_before: float
    agreement_after: float
    detection_controls: list[float] = field(default_factory=list)
    agreement_controls: list[float] = field(default_factory=list)
    scan_record: dict[str, Any] | None = None
    train_image: str | None = None
    reasons: list[str] = field(default_factory=list)  # failing evidence
    missing: list[str] = field(default_factory=list)  # missing evidence

    @property
    def seeds(self) -> SeedEvidence:
        """The copy-rate bound from the after-pruning copies on the fresh seeds."""
        return SeedEvidence(self.copy.copies_after, len(self.copy.after))

    @property
    def mitigated(self) -> bool:
        """True when the evidence shows the prompt mitigated (nothing failing, nothing missing)."""
        return not self.reasons and not self.missing

    @property
    def status(self) -> str:
        """'mitigated', 'STILL MEMORIZED' or 'unverified'."""
        return "STILL MEMORIZED" if self.reasons else ("unverified" if self.missing else "mitigated")

    def to_json(self) -> dict[str, Any]:
        """Return the numbers as JSON."""
        return {
            "index": self.index, "prompt": self.prompt, "status": self.status, "mitigated": self.mitigated,
            "reasons": self.reasons, "missing": self.missing,
            "scan_record_in_sample": self.scan_record,
            "detection_fresh_seeds": {"before": self.detection_before, "after": self.detection_after,
                                      "controls_after_mean_pairwise": self.detection_controls},
            "copies": self.copy.to_json(),
            "seed_bound": self.seeds.to_json(),
            "sample_agreement": {"before": self.agreement_before, "after": self.agreement_after,
                                 "controls_after": self.agreement_controls,
                                 "note": "reported, not judged: mean agreement can fall while single seeds copy"},
            "train_image": self.train_image,
        }


@dataclass
class UndetectedCheck:
    """A scanned prompt that detection did not flag, judged against the training image the user gave for it."""

    index: int
    prompt: str
    copy: CopyCheck
    train_image: str
    scan_record: dict[str, Any] | None = None

    @property
    def copies(self) -> bool:
        """True when some pruned sample copies the training image (a copy in one seed is a copy)."""
        return self.copy.copies_after > 0

    @property
    def status(self) -> str:
        """'STILL MEMORIZED' when a pruned sample copies, else 'no copy'."""
        return "STILL MEMORIZED" if self.copies else "no copy"

    @property
    def reason(self) -> str:
        """The failing evidence in one line ('' when no pruned sample copies)."""
        if not self.copies:
            return ""
        c = self.copy
        return (f"scan did not flag it as memorized, yet {c.copies_after} of {len(c.after)} fresh pruned seeds copy "
                f"the training image you gave (max SSIM {max(c.after):.3f} >= {c.threshold:.4f}; the original: "
                f"{c.copies_before} of {c.seeds_before}); NeMo's first-step detection missed it, so the set does "
                "not touch it")

    def to_json(self) -> dict[str, Any]:
        """Return the numbers as JSON."""
        return {"index": self.index, "prompt": self.prompt, "status": self.status,
                "reason": self.reason, "scan_record_in_sample": self.scan_record, "copies": self.copy.to_json(),
                "train_image": self.train_image}


@dataclass
class Harm:
    """Harm on hold-out data for the found set and the controls, and the limits applied."""

    drift: DriftResult | None
    drift_controls: list[float] = field(default_factory=list)
    drift_limit_controls: float | None = None
    max_drift: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    loss_controls: list[float] = field(default_factory=list)
    loss_limit_controls: float | None = None
    max_loss_increase: float | None = None
    loss_pairs: int = 0
    margins: dict[str, float] = field(default_factory=dict)
    # the demo world's prompt-alignment score on the drift samples (hold-out prompts that are its scene captions)
    scene_alignment: SceneAlignment | None = None

    @property
    def measured(self) -> bool:
        """True when at least one harm measure ran."""
        return self.drift is not None or self.loss_before is not None

    @property
    def loss_increase(self) -> float | None:
        """Relative change of the denoising loss (after - before) / before."""
        if self.loss_before is None or self.loss_after is None:
            return None
        return (self.loss_after - self.loss_before) / self.loss_before

    def loss_increase_controls(self) -> list[float]:
        """The controls' relative loss changes."""
        return [(c - self.loss_before) / self.loss_before for c in self.loss_controls] if self.loss_before else []

    def failures(self) -> list[str]:
        """Every harm limit the found set exceeds, with its numbers."""
        out = []
        d = None if self.drift is None else self.drift.drift
        if d is not None and self.drift_limit_controls is not None and d > self.drift_limit_controls:
            out.append(f"hold-out drift {d:.4f} exceeds the controls' median + {self.margins.get('drift')} "
                       f"= {self.drift_limit_controls:.4f} (worse than random sets of the same shape)")
        if d is not None and self.max_drift is not None and d > self.max_drift:
            out.append(f"hold-out drift {d:.4f} exceeds --max-drift {self.max_drift}")
        li = self.loss_increase
        if li is not None and self.loss_limit_controls is not None and li > self.loss_limit_controls:
            out.append(f"denoising loss increase {li:+.4f} exceeds the controls' median + {self.margins.get('loss')} "
                       f"= {self.loss_limit_controls:+.4f}")
        if li is not None and self.max_loss_increase is not None and li > self.max_loss_increase:
            out.append(f"denoising loss increase {li:+.4f} exceeds --max-loss-increase {self.max_loss_increase}")
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the harm numbers, the limits and their sources."""
        return {
            "measured": self.measured,
            "drift": None if self.drift is None else {
                **self.drift.to_json(), "controls": self.drift_controls,
                "limit_from_controls": self.drift_limit_controls, "user_limit": self.max_drift},
            "denoising_loss": None if self.loss_before is None else {
                "pairs": self.loss_pairs, "before": self.loss_before, "after": self.loss_after,
                "relative_increase": self.loss_increase, "controls": self.loss_controls,
                "controls_relative_increase": self.loss_increase_controls(),
                "limit_from_controls": self.loss_limit_controls, "user_limit": self.max_loss_increase},
            "scene_alignment": None if self.scene_alignment is None else self.scene_alignment.to_json(),
            "margins": self.margins,
            "failures": self.failures(),
        }


@dataclass
class VerifyResult:
    """Everything verification measured, and its verdict."""

    original: str
    pruned: str
    neurons: str
    report_dir: Path
    tau: float
    copy_threshold: CopyThreshold
    checks: list[PromptCheck]
    equivalence: EquivalenceResult
    harm: Harm
    specificity: Specificity
    neuron_set: NeuronSet
    settings: dict[str, Any]
    inputs: dict[str, Any]
    controls: list[dict[str, list[int]]] = field(default_factory=list)
    scan_unmitigated: list[dict[str, Any]] = field(default_factory=list)
    undetected: list[UndetectedCheck] = field(default_factory=list)  # scanned, not flagged, training image given
    missing: list[str] = field(default_factory=list)  # run-level missing evidence, with the flags that supply it
    optional: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # for the HTML report
    outputs: dict[str, str] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra report.json sections by name

    @property
    def drift(self) -> DriftResult | None:
        """Hold-out drift of the found set (None when not measured)."""
        return self.harm.drift

    @property
    def reasons(self) -> list[str]:
        """Failing evidence, each with its numbers (empty when nothing failed)."""
        out = []
        if not self.equivalence.ok:
            out.append(f"not equivalent: pruned checkpoint differs from the hooked original "
                       f"(max abs diff {self.equivalence.max_abs_diff:.3g} > {self.equivalence.tolerance:.3g}"
                       f"{'' if self.equivalence.rows_zero else '; pruned rows are not zero'})")
        for p in self.scan_unmitigated:
            out.append(f"prompt {p.get('index')}: scan recorded it as NOT mitigated by this set "
                       f"(\"mitigated\": false in the neuron set)")
        for c in self.checks:
            out.extend(f"prompt {c.index}: {r}" for r in c.reasons)
        out.extend(f"prompt {u.index}: {u.reason}" for u in self.undetected if u.copies)
        if self.specificity.measured and not self.specificity.specific:
            s = self.specificity
            out.append(f"not specific: the set's {s.metric} {s.found:.4f} beats only {s.beaten} of "
                       f"{len(s.controls)} random control sets ({', '.join(f'{v:.4f}' for v in s.controls)})")
        out.extend(self.harm.failures())
        return out

    @property
    def all_missing(self) -> list[str]:
        """Missing evidence, run-level and per prompt."""
        return self.missing + [f"prompt {c.index}: {m}" for c in self.checks for m in c.missing]

    @property
    def passed(self) -> bool:
        """True when the verdict is 'verified'."""
        return not self.reasons and not self.all_missing

    @property
    def verdict(self) -> str:
        """The verdict word used by the CLI, HTML, JSON and model card alike."""
        if not self.equivalence.ok:
            return NOT_EQUIVALENT
        if self.reasons:
            return NOT_VERIFIED
        return UNVERIFIED if self.all_missing else VERIFIED

    @property
    def exit_code(self) -> int:
        """0 verified, 1 not equivalent (a failure of the surgery), 3 not verified or unverified."""
        if not self.equivalence.ok:
            return EXIT_FAILURE
        return EXIT_OK if self.passed else EXIT_VERDICT

    def summary(self) -> dict[str, Any]:
        """Short machine summary (--json)."""
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "missing": self.all_missing,
            "copy_threshold": self.copy_threshold.to_json(),
            "prompts": [{"index": c.index, "status": c.status, "mitigated": c.mitigated,
                         "copies_after": c.copy.copies_after, "seeds": len(c.copy.after),
                         "copy_rate_upper_bound": c.seeds.bound, "max_similarity_after": max(c.copy.after),
                         "detection_after": c.detection_after["mean_pairwise"]} for c in self.checks],
            "undetected_prompts": [{"index": u.index, "copies_after": u.copy.copies_after, "seeds": len(u.copy.after),
                                    "max_similarity_after": max(u.copy.after)} for u in self.undetected],
            "specificity": self.specificity.to_json(),
            "equivalence_max_abs_diff": self.equivalence.max_abs_diff,
            "drift": None if self.drift is None else self.drift.drift,
            "loss_increase": self.harm.loss_increase,
            "harm_measured": self.harm.measured,
            "report": dict(self.outputs),
        }

    def to_json(self) -> dict[str, Any]:
        """The full versioned report document (schema: docs/verify-report.md)."""
        import torch

        return {
            **envelope(FORMAT, VERSION),
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "missing": self.all_missing,
            "verdict_rule": VERDICT_RULE,
            "original": self.original,
            "pruned": self.pruned,
            "neuron_set": {"path": self.neurons, "total": self.neuron_set.total,
                           "layers": {ln.id: ln.neurons for ln in self.neuron_set.nonempty()},
                           "tool_version": self.neuron_set.tool_version,
                           "scan_unmitigated": self.scan_unmitigated},
            "settings": self.settings,
            "thresholds": {
                "copy": self.copy_threshold.to_json(),
                "tau": {"value": self.tau, "source": "statistics file (calibrated by `nemo-surgery stats` on "
                                                      "hold-out prompts of this model)"},
                "harm": {"margins": self.harm.margins,
                         "margins_source": "documented defaults (verify/controls.py): the found set may be worse "
                                           "than the median random control by at most this much",
                         "max_drift": self.harm.max_drift, "max_loss_increase": self.harm.max_loss_increase,
                         "user_limits_source": "given by the user (--max-drift, --max-loss-increase); null: not set"},
            },
            "memorized_prompts": [c.to_json() for c in self.checks],
            "undetected_prompts": [u.to_json() for u in self.undetected],
            "controls": {"sets": self.controls, "specificity": self.specificity.to_json()},
            "harm": self.harm.to_json(),
            "equivalence": self.equivalence.to_json(),
            "optional_metrics": self.optional,
            **self.sections,
            "notes": self.notes,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "environment": {**library_versions(), "cuda": torch.version.cuda or "none"},
            "seconds": self.seconds,
        }
