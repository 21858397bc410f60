"""Orchestrate verification of a pruned pipeline against its original: phases in order, then the report.

Phases: load and match models; equivalence; first-step scores on fresh seeds
(found set and controls); full samples on fresh seeds (original, pruned, each
control); hold-out samples (drift, copy-threshold calibration); denoising loss;
per-prompt judgement; specificity and harm against the controls; report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from nemo_surgery.engine.detection import decide, rule_text
from nemo_surgery.engine.hooks import ValueMask, blocked_masks
from nemo_surgery.engine.model import LoadedModel, load_model
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.stats import check_stats_match
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import NeuronSet
from nemo_surgery.provenance import sha256_file
from nemo_surgery.verify.attack_phase import verify_attack
from nemo_surgery.verify.controls import DRIFT_MARGIN, LOSS_MARGIN, Specificity, draw_controls, no_worse_than_controls
from nemo_surgery.verify.copies import calibrate_copy_threshold, check_copies, copy_quantile, prompt_reference
from nemo_surgery.verify.drift import DriftResult, sample_drift, value_output_change
from nemo_surgery.verify.equivalence import check_equivalence
from nemo_surgery.verify.harm import denoising_loss, prepare_loss_probe
from nemo_surgery.verify.inputs import (
    VerifyInputs,
    check_models,
    default_report_dir,
    digest_model,
    ema_notes,
    model_config,
    precheck_inputs,
)
from nemo_surgery.verify.judge import agreement, judge, scan_record
from nemo_surgery.verify.metrics import load_image
from nemo_surgery.verify.optional import optional_metrics
from nemo_surgery.verify.options import VerifyOptions
from nemo_surgery.verify.report import write_reports
from nemo_surgery.verify.result import Harm, PromptCheck, UndetectedCheck, VerifyResult
from nemo_surgery.verify.sampling import SampleSettings, sample_images, sample_sets
from nemo_surgery.verify.scenes import scene_alignment

MEMORIZATION_METRIC = "mean over prompts of the highest after-pruning SSIM to the reference"


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


def check_original(got: VerifyInputs, orig: LoadedModel) -> None:
    """The statistics and the neuron set must both come from ORIGINAL (model fingerprint, layers, shapes)."""
    check_stats_match(got.stats, orig, got.stats_path)
    check_set_matches(got.neuron_set, orig, got.neurons_path)


def load_for_verify(path: str | Path, options: VerifyOptions) -> LoadedModel:
    """Load a pipeline folder or a single file (with ``options.config``) for sampling: with its VAE, offline."""
    return load_model(path, device=options.device, dtype=options.dtype, with_vae=True,
                      config=model_config(path, options.config))


def _drift_of(before: np.ndarray, after: np.ndarray) -> float:
    """1 - mean SSIM of paired samples [P, N, ...] (the drift metric)."""
    return DriftResult(sample_drift(list(range(len(before))), [""] * len(before), before, after)).drift


def run_verify(
    original: str | Path,
    pruned: str | Path,
    neurons: str | Path,
    options: VerifyOptions = VerifyOptions(),
    stage: Callable[[str], None] | None = None,
    inputs: VerifyInputs | None = None,
    original_model: LoadedModel | None = None,
) -> VerifyResult:
    """Verify PRUNED against ORIGINAL for a neuron set; write report.json/html and MODEL_CARD.md.

    ``stage(text)`` is called when a phase starts (progress reporting).
    ``inputs`` are the already-resolved inputs (``precheck_inputs``), resolved
    here when None; ``original_model`` is ORIGINAL already loaded by
    ``load_for_verify`` (apply loads a single file before writing, so that a
    missing config is refused first). ORIGINAL and PRUNED are pipeline folders
    or single-file checkpoints (``options.config``). The pruned pipeline is
    loaded fresh, without hooks; the controls are blocked by hook on the
    original (equivalence shows the two agree). Raises InputError for bad
    input; the verdict is in the result.
    """
    started = time.perf_counter()
    say = stage or (lambda _text: None)
    original, pruned = Path(original), Path(pruned)
    got = inputs if inputs is not None else precheck_inputs(neurons, options)
    check_models(original, pruned, options.config)
    report_dir = options.report or default_report_dir(pruned)
    sampling = options.sampling

    say("loading models")
    orig = original_model if original_model is not None else load_for_verify(original, options)
    check_original(got, orig)
    pmodel = load_for_verify(pruned, options)
    check_set_matches(got.neuron_set, pmodel, got.neurons_path, check_fingerprint=False)
    tau = got.stats.tau
    notes: list[str] = ema_notes(pruned)
    prompts, holdout, train = got.prompts, got.holdout, got.train
    controls = draw_controls(got.blocked, {layer.id: layer.rows for layer in orig.layers}, options.controls,
                             options.control_seed)

    say("equivalence check")
    fresh = replace(got.stats.settings, seed=options.seed)
    scorer_o = Scorer(orig, orig.layers, fresh, options.score_batch_size)
    scorer_p = Scorer(pmodel, pmodel.layers, fresh, options.score_batch_size)
    eq_prompts = [p.text for p in prompts[:2]] + [p.text for p in holdout[:2]]
    equivalence = check_equivalence(orig, pmodel, got.blocked, eq_prompts,
                                    scorer_o.latents[: max(1, options.equivalence_seeds)], scorer_o.timestep)

    say(f"first-step scores on fresh seeds: original, pruned, {len(controls)} control(s)")
    texts = [p.text for p in prompts]
    cond_o, cond_p = orig.encode(texts), pmodel.encode(texts)
    calibration = got.stats.calibration  # THE detection rule (engine/detection.py), scan's thresholds

    def detect(scorer: Scorer, cond) -> list:
        return [decide(scorer.pairwise(d), calibration) for d in scorer.noise_differences(cond)]

    dets_o, dets_p = detect(scorer_o, cond_o), detect(scorer_p, cond_p)
    dets_c = []
    for control in controls:
        with ValueMask(orig.layers, blocked_masks(orig.layers, control, device=orig.device)):
            dets_c.append(detect(scorer_o, cond_o))

    say(f"sampling {len(prompts)} memorized prompt(s) x {sampling.seeds} fresh seeds: original, pruned, "
        f"{len(controls)} control(s)")
    orig_sets = sample_sets(orig, cond_o, sampling, [{}, *controls]).numpy()
    mem_before, mem_controls = orig_sets[0], orig_sets[1:]
    mem_after = sample_images(pmodel, cond_p, sampling).numpy()

    harm = Harm(drift=None, max_drift=options.max_drift, max_loss_increase=options.max_loss_increase,
                margins={"drift": DRIFT_MARGIN, "loss": LOSS_MARGIN})
    hold_before = hold_after = calibration_samples = None
    if holdout:
        hs = replace(sampling, seeds=options.holdout_seeds, seed=options.seed + 1)  # independent of the judged seeds
        ds = replace(hs, seeds=min(options.drift_seeds, options.holdout_seeds), seed=options.seed + 2)
        say(f"sampling {len(holdout)} hold-out prompt(s): {hs.seeds} own seeds each on the original (copy threshold), "
            f"{ds.seeds} on the original, the pruned model and {len(controls)} control(s) (drift)")
        htexts = [p.text for p in holdout]
        cond_ho, cond_hp = orig.encode(htexts), pmodel.encode(htexts)
        calibration_samples = sample_images(orig, cond_ho, hs, seeds_per_prompt=True).numpy()
        hold_sets = sample_sets(orig, cond_ho, ds, [{}, *controls], seeds_per_prompt=True).numpy()
        hold_before = hold_sets[0]
        hold_after = sample_images(pmodel, cond_hp, ds, seeds_per_prompt=True).numpy()
        harm.drift = DriftResult(sample_drift([p.index for p in holdout], htexts, hold_before, hold_after),
                                 value_output_change(orig.layers, pmodel.layers, cond_ho.hidden, cond_hp.hidden))
        harm.drift_controls = [_drift_of(hold_before, c) for c in hold_sets[1:]]
        harm.scene_alignment = scene_alignment(htexts, hold_before, hold_after, list(hold_sets[1:]))
        _, harm.drift_limit_controls = no_worse_than_controls(harm.drift.drift, harm.drift_controls, DRIFT_MARGIN)
    if got.holdout_images:
        say(f"denoising loss on {len(got.holdout_images)} hold-out image-caption pair(s)")
        probe = prepare_loss_probe(orig, got.holdout_images)
        captions = [p.caption for p in got.holdout_images]
        cap_o = orig.encode(captions)
        harm.loss_pairs = len(captions)
        harm.loss_before = denoising_loss(orig, probe, cap_o)
        harm.loss_after = denoising_loss(pmodel, probe, pmodel.encode(captions))
        harm.loss_controls = [denoising_loss(orig, probe, cap_o, c) for c in controls]
        _, harm.loss_limit_controls = no_worse_than_controls(harm.loss_increase, harm.loss_increase_controls(),
                                                             LOSS_MARGIN)

    say("judging every seed against its reference")
    h, w = mem_before.shape[2], mem_before.shape[3]
    refs = [prompt_reference(mem_before[k], load_image(train[p.index], h, w) if p.index in train else None)
            for k, p in enumerate(prompts)]
    threshold = calibrate_copy_threshold(calibration_samples, [r[0] for r in refs], options.copy_threshold,
                                         copy_quantile(options.seeds))
    checks = []
    for k, p in enumerate(prompts):
        ref, name, ref_seed = refs[k]
        check = PromptCheck(
            index=p.index, prompt=p.text,
            detection_before=dets_o[k].to_json(), detection_after=dets_p[k].to_json(),
            copy=check_copies(mem_before[k], mem_after[k], [c[k] for c in mem_controls], ref, name, ref_seed,
                              threshold.value),
            agreement_before=agreement(mem_before[k]), agreement_after=agreement(mem_after[k]),
            detection_controls=[d[k].mean_pairwise for d in dets_c],
            agreement_controls=[agreement(c[k]) for c in mem_controls],
            scan_record=scan_record(got.neuron_set.prompts, p.index, p.text),
            train_image=str(train[p.index]) if p.index in train else None,
        )
        judge(check, threshold.calibrated)
        checks.append(check)
    undetected, undetected_images = _judge_undetected(got, orig, pmodel, sampling, threshold.value, (h, w), say)
    specificity = Specificity(
        MEMORIZATION_METRIC, float(np.mean([max(c.copy.after) for c in checks])),
        [float(np.mean([max(c.copy.controls[r]) for c in checks])) for r in range(len(controls))])
    checked_texts = {c.prompt for c in checks}
    scan_unmitigated = [p for p in got.neuron_set.prompts if p.get("memorized") and p.get("mitigated") is False
                        and p.get("prompt") not in checked_texts]
    missing = _missing(options, holdout, threshold.calibrated, controls)

    optional = optional_metrics(options.sscd, options.clip, orig.device, prompts, train, mem_before, mem_after,
                                holdout, hold_before, hold_after)
    result = VerifyResult(
        original=str(original), pruned=str(pruned), neurons=str(got.neurons_path), report_dir=report_dir, tau=tau,
        copy_threshold=threshold, checks=checks, equivalence=equivalence, harm=harm, specificity=specificity,
        neuron_set=got.neuron_set, settings=_settings(options, got, orig, scorer_o, eq_prompts),
        inputs=_input_record(got, options, original, pruned, orig, pmodel), controls=controls,
        scan_unmitigated=scan_unmitigated, undetected=undetected, missing=missing, optional=optional, notes=notes,
    )
    result.images = {"memorized_before": mem_before, "memorized_after": mem_after, "references": [r[0] for r in refs],
                     **undetected_images}
    if hold_before is not None:
        result.images.update(holdout_before=hold_before, holdout_after=hold_after)
    if options.attack:
        verify_attack(result, orig, pmodel, got, options, progress=say)
    result.seconds = round(time.perf_counter() - started, 3)
    say("writing report")
    write_reports(result, report_dir)
    return result


def _judge_undetected(got: VerifyInputs, orig: LoadedModel, pmodel: LoadedModel, sampling: SampleSettings,
                      threshold: float, size: tuple[int, int], say: Callable[[str], None],
                      ) -> tuple[list[UndetectedCheck], dict[str, Any]]:
    """Scanned prompts that detection passed, with a training image: do the pruned model's samples copy it?

    Same fresh seeds and sampling as the memorized prompts, the same copy
    threshold; no controls (the set does not claim these prompts). Returns
    the checks and their images for the HTML report.
    """
    if not got.undetected:
        return [], {}
    say(f"sampling {len(got.undetected)} scanned prompt(s) that detection did not flag but have a training image: "
        f"original and pruned, {sampling.seeds} fresh seeds")
    texts = [p.text for p in got.undetected]
    before = sample_images(orig, orig.encode(texts), sampling).numpy()
    after = sample_images(pmodel, pmodel.encode(texts), sampling).numpy()
    out, refs = [], []
    for k, p in enumerate(got.undetected):
        image = got.train[p.index]
        refs.append(load_image(image, *size))
        copy = check_copies(before[k], after[k], [], refs[-1], "training image", None, threshold)
        out.append(UndetectedCheck(p.index, p.text, copy, str(image), scan_record(got.neuron_set.prompts, p.index, p.text)))
    return out, {"undetected_before": before, "undetected_after": after, "undetected_references": refs}


def _missing(options: VerifyOptions, holdout: list, calibrated: bool, controls: list) -> list[str]:
    """Run-level evidence that is missing, each with the flags that would supply it."""
    out = []
    if not holdout:
        out.append("no harm measurement and no calibrated copy threshold: pass --holdout PROMPTS (non-memorized "
                   "prompts; at least 2) and optionally --holdout-images PAIRS (denoising loss)")
    elif not calibrated:
        out.append("the copy threshold is not calibrated: pass --holdout PROMPTS or --copy-threshold")
    if not controls:
        out.append("specificity not measured (--controls 0): pass --controls R with R >= 1")
    return out


def _settings(options: VerifyOptions, got: VerifyInputs, orig: LoadedModel, scorer: Scorer,
              eq_prompts: list[str]) -> dict[str, Any]:
    """The settings record of the report, scan's detection seeds beside verification's fresh ones."""
    score = got.stats.settings
    return {
        "sampling": {**options.sampling.to_json(), "holdout_seeds": options.holdout_seeds,
                     "drift_seeds": min(options.drift_seeds, options.holdout_seeds), "scheduler": "DDIM (eta 0)",
                     "generator": "one CPU generator, seeded once", "decode": "pipeline VAE"},
        "seeds": {"scan_detection": {"seed": score.seed, "count": score.seeds,
                                     "note": "the latents scan optimised the set on (in-sample)"},
                  "verification": {"seed": options.seed, "count": options.seeds,
                                   "note": "fresh: drawn from another generator seed than scan's; used for the "
                                           "first-step scores and the full samples"}},
        "controls": {"count": options.controls, "seed": options.control_seed,
                     "draw": "per layer, as many neurons as the found set, uniformly from the layer's other rows"},
        "score": {**score.to_json(), "seed": options.seed},
        "detection_rule": rule_text(got.stats.calibration),
        "ssim": "scikit-image structural_similarity, channel_axis=-1, data_range=1, win_size=min(7, image side, odd)",
        "device": str(orig.device), "dtype": options.dtype,
        "equivalence": {"prompts": len(eq_prompts), "seeds": max(1, options.equivalence_seeds),
                        "timestep": int(scorer.timestep), "guidance": 0.0},
    }


def _input_record(got: VerifyInputs, options: VerifyOptions, original: Path, pruned: Path,
                  orig: LoadedModel, pmodel: LoadedModel) -> dict[str, Any]:
    """Paths and SHA-256 of every input, for the report."""
    inputs: dict[str, Any] = {
        "original": {"path": str(original), "fingerprint": orig.fingerprint, "sha256": digest_model(original)},
        "pruned": {"path": str(pruned), "fingerprint": pmodel.fingerprint, "sha256": digest_model(pruned)},
        "neuron_set": {"path": str(got.neurons_path), "sha256": sha256_file(got.neurons_path)},
        "stats": {"path": str(got.stats_path), "sha256": sha256_file(got.stats_path)},
    }
    if options.config is not None:
        inputs["config"] = {"path": str(options.config), "note": "diffusers config folder of the single file(s)"}
    for key, value in (("prompts", options.prompts), ("holdout", options.holdout)):
        if value is not None:
            inputs[key] = {"path": str(value), "sha256": sha256_file(value)}
    if got.holdout_images:
        inputs["holdout_images"] = [{"path": str(p.image), "caption": p.caption, "sha256": sha256_file(p.image)}
                                    for p in got.holdout_images]
    if got.train:
        inputs["train_images"] = {str(i): {"path": str(f), "sha256": sha256_file(f)} for i, f in sorted(got.train.items())}
    return inputs
