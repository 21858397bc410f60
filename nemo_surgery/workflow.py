"""apply then verify, as one library call: the neuron set and the verify inputs are parsed once.

``surgery`` never imports torch or ``verify``; this module is where the two meet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import load_neuron_set
from nemo_surgery.surgery.apply import ApplyResult, run_apply
from nemo_surgery.verify.loadable import loadable
from nemo_surgery.verify.options import VerifyOptions


@dataclass
class WorkflowResult:
    """What apply did, what verify found (None when it did not run), and why it did not run."""

    applied: ApplyResult
    verified: object | None = None  # nemo_surgery.verify.result.VerifyResult (imported lazily: torch)
    skipped: str | None = None

    @property
    def exit_code(self) -> int:
        """Verify's verdict when it ran, else 0 (apply itself raises on failure)."""
        return 0 if self.verified is None else self.verified.exit_code


def apply_and_verify(
    ckpt: str | Path,
    neurons: str | Path,
    out: str | Path | None = None,
    in_place: bool = False,
    dry_run: bool = False,
    force: bool = False,
    verify: VerifyOptions | None = VerifyOptions(),
    stage: Callable[[str], None] | None = None,
    applied: Callable[[ApplyResult], None] | None = None,
    input_sha256: bool = False,
) -> WorkflowResult:
    """Zero the set's rows in CKPT, then verify the output against CKPT when CKPT is a loadable pipeline.

    Loadable: a pipeline folder, or a single .safetensors file holding UNet, VAE
    and text encoder (loaded with ``verify.config`` or the cached default
    config). ``verify=None`` skips verification. Verification inputs are
    checked, and a single-file CKPT is loaded, before anything is written
    (InputError: e.g. no --config and no cached config). ``applied(result)``
    is called between the two steps (e.g. to print the patch table);
    ``stage(text)`` reports verify's phases; ``input_sha256`` is run_apply's.
    """
    neurons_path = Path(neurons)
    neuron_set = load_neuron_set(neurons_path)
    wanted = verify is not None and loadable(ckpt)  # headers only: no torch for what cannot be sampled
    run_it = wanted and not (dry_run or in_place)
    inputs = None
    if run_it:  # verify's inputs import torch (~200 MB, seconds): apply alone does without
        from nemo_surgery.verify.inputs import check_config, precheck_inputs

        inputs = precheck_inputs(neurons_path, verify, neuron_set=neuron_set)
        check_config(verify.config, ckpt)
    original = None
    if run_it and Path(ckpt).is_file():  # a single file may lack its config: refuse before writing anything
        from nemo_surgery.verify.run import check_original, load_for_verify

        # the cheap checks (plan, fingerprint, output path) first, then the model load
        run_apply(ckpt, neurons_path, neuron_set=neuron_set, out=out, dry_run=True, force=force)
        try:
            original = load_for_verify(ckpt, verify)
        except InputError as exc:
            raise InputError(f"{exc}; or pass --no-verify to apply without verification") from None
        check_original(inputs, original)  # the set and statistics are from this model
    result = run_apply(ckpt, neurons_path, neuron_set=neuron_set, out=out, in_place=in_place, dry_run=dry_run,
                       force=force, input_sha256=input_sha256)
    if applied is not None:
        applied(result)
    if not run_it:
        skipped = None
        if wanted and in_place:
            skipped = "--in-place leaves no original to compare with; run `nemo-surgery verify` on a copy"
        elif wanted and dry_run:
            skipped = "--dry-run writes nothing to verify"
        elif verify is not None and verify.config is not None:
            skipped = (f"{ckpt} is not a pipeline folder or a single file holding UNet, VAE and text encoder; "
                       "nothing to sample (--config unused)")
        return WorkflowResult(result, None, skipped)
    from nemo_surgery.verify.run import run_verify

    checked = run_verify(result.ckpt, result.output, neurons_path, verify, stage=stage, inputs=inputs,
                         original_model=original)
    return WorkflowResult(result, checked)
