"""verify's --attack phase: pick targets and control prompts, read the training images, run the probe."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nemo_surgery.engine.model import LoadedModel
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.verify.attack import AttackSettings
from nemo_surgery.verify.attack_probe import ProbeResult, run_probe
from nemo_surgery.verify.metrics import load_image
from nemo_surgery.verify.sampling import SampleSettings

#: Control prompt when no hold-out prompts are given.
EMPTY_PROMPT = ""


def attack_phase(
    original: LoadedModel,
    pruned: LoadedModel,
    prompts: Sequence[Prompt],
    holdout: Sequence[Prompt],
    train: Mapping[int, Path],
    settings: AttackSettings,
    sampling: SampleSettings,
    threshold: float,
    threshold_source: str,
    *,
    required: bool = False,
    image_size: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ProbeResult | None:
    """Run the robustness probe for every memorized prompt that has a training image (None when none has one).

    The control of the k-th attacked prompt is hold-out prompt k (cycling; the
    empty prompt without --holdout). Images are resized to ``image_size`` (H, W),
    by default the size of the pipeline's samples.
    """
    attacked = [p for p in prompts if p.index in train]
    if not attacked:
        return None
    h, w = image_size or _sample_size(original)
    images = np.stack([load_image(train[p.index], h, w) for p in attacked])
    controls = [holdout[k % len(holdout)].text if holdout else EMPTY_PROMPT for k in range(len(attacked))]
    memorized_cond = pruned.encode([p.text for p in attacked])
    control_cond = pruned.encode(controls)
    triples = [(p.index, p.text, c) for p, c in zip(attacked, controls)]
    result = run_probe(original, pruned, memorized_cond, control_cond, triples, images, settings, sampling,
                       threshold, threshold_source, required=required, progress=progress)
    skipped = [p.index for p in prompts if p.index not in train]
    if skipped:
        result.notes.append(f"not attacked (no training image): prompt(s) {', '.join(map(str, skipped))}")
    if not holdout:
        result.notes.append("no --holdout prompts: the control attack starts from the empty prompt")
    return result


def _sample_size(model: LoadedModel) -> tuple[int, int]:
    """(H, W) in pixels of the pipeline's samples."""
    _, h, w = model.latent_shape
    scale = int(getattr(model.pipe, "vae_scale_factor", 8) or 1)
    return h * scale, w * scale


def verify_attack(result: Any, original: LoadedModel, pruned: LoadedModel, inputs: Any, options: Any,
                  progress: Callable[[str], None] | None = None) -> ProbeResult | None:
    """verify's one call for --attack: run the probe with the run's copy threshold and record it in ``result``.

    ``result`` is the VerifyResult being built, ``inputs`` the resolved
    VerifyInputs, ``options`` the VerifyOptions (attack_steps, attack_lr,
    attack_batch, require_robust, batch_size, sampling).
    """
    threshold, source = _copy_threshold(result)
    settings = AttackSettings(steps=options.attack_steps, lr=options.attack_lr, batch=options.attack_batch,
                              chunk=options.batch_size)
    probe = attack_phase(original, pruned, inputs.prompts, inputs.holdout, inputs.train, settings, options.sampling,
                         threshold, source, required=options.require_robust, progress=progress)
    if probe is None:
        result.notes.append("ADAPTIVE ATTACK NOT RUN: --attack needs --train-images (the attack's target)")
        return None
    record_probe(result, probe)
    return probe


def record_probe(result: Any, probe: ProbeResult) -> None:
    """Put the probe into a VerifyResult: report.json section, HTML images, and its findings.

    A shallow prompt fails its check (exit 3) under --require-robust; otherwise
    the finding is a warning note and the verdict is unchanged.
    """
    result.sections["attack"] = probe.to_json()
    result.images.update(probe.images())
    checks = {c.index: c for c in result.checks}
    for index, finding in probe.findings():
        if probe.required and index in checks:
            checks[index].reasons.append(finding)
        else:
            result.notes.append(f"WARNING: prompt {index}: {finding}; the verdict does not depend on it "
                                "(--require-robust makes it fail)")


def _copy_threshold(result: Any) -> tuple[float, str]:
    """The run's copy threshold and its source (the calibrated one when verify has it)."""
    calibrated = getattr(result, "copy_threshold", None)
    if calibrated is not None:
        return float(calibrated.value), str(calibrated.source)
    return float(result.max_train_similarity), "--max-train-similarity (verify's SSIM-to-training-image limit)"
