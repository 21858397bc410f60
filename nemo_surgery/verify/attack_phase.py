"""verify's --attack phase: pick targets and control prompts, read the training images, run the probe."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
