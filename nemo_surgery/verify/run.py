"""Orchestrate verification of a pruned pipeline against its original: phases in order, then the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nemo_surgery.engine.model import LoadedModel, load_model
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.ssim import ms_ssim
from nemo_surgery.engine.stats import check_stats_match
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import NeuronSet
from nemo_surgery.provenance import sha256_file
from nemo_surgery.verify.attack_phase import verify_attack
from nemo_surgery.verify.drift import DriftResult, sample_drift, value_output_change
from nemo_surgery.verify.equivalence import check_equivalence
from nemo_surgery.verify.inputs import VerifyInputs, check_pipelines, default_report_dir, digest_model, precheck_inputs
from nemo_surgery.verify.judge import agreement, agreement_threshold, detection_json, judge
from nemo_surgery.verify.metrics import load_image, paired_ssim, pairwise_ssim, to_reference
from nemo_surgery.verify.optional import optional_metrics
from nemo_surgery.verify.options import VerifyOptions
from nemo_surgery.verify.report import write_reports
from nemo_surgery.verify.result import PromptCheck, VerifyResult
from nemo_surgery.verify.sampling import sample_images


def check_set_matches(neuron_set: NeuronSet, model: LoadedModel, path: Path, check_fingerprint: bool = True) -> None:
    """The set must come from this model (fingerprint) and name its value layers with their shapes."""
    if check_fingerprint and neuron_set.fingerprint and neuron_set.fingerprint != model.fingerprint:
        raise InputError(f"{path}: the neuron set was found on another model (fingerprint {neuron_set.fingerprint[:12]}, "
                         f"ORIGINAL is {model.fingerprint[:12]}); pass the checkpoint it was scanned on")
    by_id = {layer.id: layer for layer in model.layers}
    for ln in neuron_set.nonempty():
        layer = by_id.get(ln.id)
        if layer is None:
            raise InputError(f"{path}: layer {ln.id} is not a value layer of {model.source}")
        if (layer.rows, layer.cols) != (ln.rows, ln.cols):
            raise InputError(f"{path}: layer {ln.id} is {ln.rows}x{ln.cols} in the set but {layer.rows}x{layer.cols} "
                             f"in {model.source}")


def run_verify(
    original: str | Path,
    pruned: str | Path,
    neurons: str | Path,
    options: VerifyOptions = VerifyOptions(),
    stage: Callable[[str], None] | None = None,
    inputs: VerifyInputs | None = None,
) -> VerifyResult:
    """Verify PRUNED against ORIGINAL for a neuron set; write report.json/html and MODEL_CARD.md.

    ``stage(text)`` is called when a phase starts (progress reporting).
    ``inputs`` are the already-resolved inputs (``precheck_inputs``), resolved
    here when None. The pruned pipeline is loaded fresh, without hooks. Raises
    InputError for bad input; the verdict itself is in the result (``exit_code``).
    """
    started = time.perf_counter()
    say = stage or (lambda _text: None)
    original, pruned = Path(original), Path(pruned)
    got = inputs if inputs is not None else precheck_inputs(neurons, options)
    check_pipelines(original, pruned)
    report_dir = options.report or default_report_dir(pruned)
    sampling = options.sampling

    say("loading models")
    orig_model = load_model(original, device=options.device, dtype=options.dtype, with_vae=True)
    check_stats_match(got.stats, orig_model, got.stats_path)
    check_set_matches(got.neuron_set, orig_model, got.neurons_path)
    pruned_model = load_model(pruned, device=options.device, dtype=options.dtype, with_vae=True)
    check_set_matches(got.neuron_set, pruned_model, got.neurons_path, check_fingerprint=False)
    tau = got.stats.tau
    notes: list[str] = []
    prompts, holdout, train = got.prompts, got.holdout, got.train

    say("equivalence check")
    scorer_o = Scorer(orig_model, orig_model.layers, got.stats.settings, options.score_batch_size)
    scorer_p = Scorer(pruned_model, pruned_model.layers, got.stats.settings, options.score_batch_size)
    eq_prompts = [p.text for p in prompts[:2]] + [p.text for p in holdout[:2]]
    equivalence = check_equivalence(orig_model, pruned_model, got.blocked, eq_prompts,
                                    scorer_o.latents[: max(1, options.equivalence_seeds)], scorer_o.timestep)

    say("detection scores before/after")
    texts = [p.text for p in prompts]
    cond_o, cond_p = orig_model.encode(texts), pruned_model.encode(texts)
    deltas_o = scorer_o.noise_differences(cond_o)
    deltas_p = scorer_p.noise_differences(cond_p)
    dets_o = [scorer_o.detect(d, tau) for d in deltas_o]
    dets_p = [scorer_p.detect(d, tau) for d in deltas_p]

    say(f"sampling {len(prompts)} memorized prompt(s) x {sampling.seeds} seeds, before and after")
    mem_before = sample_images(orig_model, cond_o, sampling).numpy()
    mem_after = sample_images(pruned_model, cond_p, sampling).numpy()

    drift = None
    hold_before = hold_after = None
    holdout_agreement: list[float] = []
    if holdout:
        say(f"sampling {len(holdout)} hold-out prompt(s) x {sampling.seeds} seeds, before and after")
        htexts = [p.text for p in holdout]
        cond_ho, cond_hp = orig_model.encode(htexts), pruned_model.encode(htexts)
        hold_before = sample_images(orig_model, cond_ho, sampling).numpy()
        hold_after = sample_images(pruned_model, cond_hp, sampling).numpy()
        drift = DriftResult(sample_drift([p.index for p in holdout], htexts, hold_before, hold_after),
                            value_output_change(orig_model.layers, pruned_model.layers, cond_ho.hidden, cond_hp.hidden))
        holdout_agreement = [float(v) for imgs in hold_before for v in pairwise_ssim(imgs)]
    else:
        notes.append("DRIFT NOT MEASURED: no --holdout prompts were given; the verdict does not cover harm to "
                     "non-memorized prompts")
    max_agreement, agreement_source = agreement_threshold(options.max_sample_agreement, holdout_agreement,
                                                          sampling.seeds, notes)

    say("comparing samples")
    checks = []
    h, w = mem_before.shape[2], mem_before.shape[3]
    for k, p in enumerate(prompts):
        det_b, det_a = dets_o[k], dets_p[k]
        kept = det_b.kept
        first = (float(ms_ssim(deltas_o[k][kept], deltas_p[k][kept], got.stats.settings.ssim).max())
                 if kept.numel() else None)
        check = PromptCheck(
            index=p.index, prompt=p.text,
            detection_before=detection_json(det_b, tau), detection_after=detection_json(det_a, tau),
            first_step_similarity=first,
            agreement_before=agreement(mem_before[k]), agreement_after=agreement(mem_after[k]),
            before_vs_after=[float(v) for v in paired_ssim(mem_before[k], mem_after[k])],
        )
        if p.index in train:
            ref = load_image(train[p.index], h, w)
            check.train_image = str(train[p.index])
            check.train_before = to_reference(mem_before[k], ref).tolist()
            check.train_after = to_reference(mem_after[k], ref).tolist()
        judge(check, tau, max_agreement, options.max_train_similarity)
        checks.append(check)

    optional = optional_metrics(options.sscd, options.clip, orig_model.device, prompts, train, mem_before, mem_after,
                                holdout, hold_before, hold_after)
    settings = {
        "sampling": {**sampling.to_json(), "scheduler": "DDIM (eta 0)", "generator": "one CPU generator, seeded once",
                     "decode": "pipeline VAE"},
        "score": got.stats.settings.to_json(),
        "ssim": "scikit-image structural_similarity, channel_axis=-1, data_range=1, win_size=min(7, image side, odd)",
        "device": str(orig_model.device), "dtype": options.dtype,
        "equivalence": {"prompts": len(eq_prompts), "seeds": max(1, options.equivalence_seeds),
                        "timestep": int(scorer_o.timestep), "guidance": 0.0},
    }
    result = VerifyResult(
        original=str(original), pruned=str(pruned), neurons=str(got.neurons_path), report_dir=report_dir, tau=tau,
        max_sample_agreement=max_agreement, agreement_source=agreement_source,
        max_train_similarity=options.max_train_similarity, max_drift=options.max_drift, checks=checks,
        equivalence=equivalence, drift=drift, neuron_set=got.neuron_set, settings=settings,
        inputs=_input_record(got, options, original, pruned, orig_model, pruned_model),
        holdout_agreement=holdout_agreement, optional=optional, notes=notes,
    )
    result.images = {"memorized_before": mem_before, "memorized_after": mem_after}
    if hold_before is not None:
        result.images.update(holdout_before=hold_before, holdout_after=hold_after)
    if options.attack:
        verify_attack(result, orig_model, pruned_model, got, options, progress=say)
    result.seconds = round(time.perf_counter() - started, 3)
    say("writing report")
    write_reports(result, report_dir)
    return result


def _input_record(got: VerifyInputs, options: VerifyOptions, original: Path, pruned: Path,
                  orig_model: LoadedModel, pruned_model: LoadedModel) -> dict[str, Any]:
    """Paths and SHA-256 of every input, for the report."""
    inputs: dict[str, Any] = {
        "original": {"path": str(original), "fingerprint": orig_model.fingerprint, "sha256": digest_model(original)},
        "pruned": {"path": str(pruned), "fingerprint": pruned_model.fingerprint, "sha256": digest_model(pruned)},
        "neuron_set": {"path": str(got.neurons_path), "sha256": sha256_file(got.neurons_path)},
        "stats": {"path": str(got.stats_path), "sha256": sha256_file(got.stats_path)},
    }
    for key, value in (("prompts", options.prompts), ("holdout", options.holdout)):
        if value is not None:
            inputs[key] = {"path": str(value), "sha256": sha256_file(value)}
    if got.train:
        inputs["train_images"] = {str(i): {"path": str(f), "sha256": sha256_file(f)} for i, f in sorted(got.train.items())}
    return inputs
