"""Orchestrate verification of a pruned pipeline against its original: numbers, verdict, report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_surgery.engine.model import LoadedModel, load_model
from nemo_surgery.engine.prompts import Prompt, read_prompts
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.ssim import ms_ssim
from nemo_surgery.engine.stats import Stats, check_stats_match, load_stats
from nemo_surgery.errors import EXIT_FAILURE, EXIT_OK, EXIT_VERDICT, InputError
from nemo_surgery.neuron_set import NeuronSet, load_neuron_set
from nemo_surgery.provenance import envelope, library_versions, sha256_file
from nemo_surgery.verify.drift import DriftResult, sample_drift, value_output_change
from nemo_surgery.verify.equivalence import EquivalenceResult, check_equivalence
from nemo_surgery.verify.metrics import load_clip, load_image, load_sscd, pairwise_ssim, to_reference
from nemo_surgery.verify.sampling import SampleSettings, sample_images

FORMAT = "nemo-surgery.verify-report"
VERSION = 1
REPORT_DIR_NAME = "nemo_report"
#: Default --max-train-similarity: the issue-5 target for SSIM of samples to their training image.
DEFAULT_MAX_TRAIN_SIMILARITY = 0.3
#: Default --max-drift: 1 - mean hold-out SSIM, i.e. mean SSIM >= 0.9 (issue-5 target).
DEFAULT_MAX_DRIFT = 0.1
#: Sample-agreement threshold used when no hold-out prompts calibrate one.
FALLBACK_MAX_AGREEMENT = 0.5
#: Float noise allowed when comparing a sample agreement to its threshold.
AGREEMENT_TOL = 1e-4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class VerifyOptions:
    """Inputs and knobs of one verification run (CLI defaults)."""

    stats: Path | None = None
    prompts: Path | None = None
    holdout: Path | None = None
    train_images: Path | None = None
    report: Path | None = None
    column: str = "prompt"
    sampling: SampleSettings = field(default_factory=SampleSettings)
    max_drift: float = DEFAULT_MAX_DRIFT
    max_train_similarity: float = DEFAULT_MAX_TRAIN_SIMILARITY
    max_sample_agreement: float | None = None  # None: calibrate on hold-out samples of the original
    equivalence_seeds: int = 2
    sscd: Path | None = None
    clip: Path | None = None
    device: str = "auto"
    dtype: str = "fp32"
    score_batch_size: int = 32


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

    def summary(self) -> dict[str, Any]:
        """Short machine summary (--json)."""
        return {
            "verdict": "verified" if self.passed else ("not equivalent" if not self.equivalence.ok else "failed"),
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "tau": self.tau,
            "prompts": [{"index": c.index, "mitigated": c.mitigated,
                         "detection_after": c.detection_after["mean_pairwise"],
                         "agreement_after": c.agreement_after} for c in self.checks],
            "equivalence_max_abs_diff": self.equivalence.max_abs_diff,
            "drift": None if self.drift is None else self.drift.drift,
            "drift_measured": self.drift is not None,
            "report": {k: v for k, v in self.outputs.items()},
        }

    def to_json(self) -> dict[str, Any]:
        """The full versioned report document."""
        return {
            **envelope(FORMAT, VERSION),
            "verdict": self.summary()["verdict"],
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
            "notes": self.notes,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "environment": {**library_versions(), "cuda": torch.version.cuda or "none"},
            "seconds": self.seconds,
        }


VERDICT_RULE = (
    "exit 0 ('verified') when the pruned checkpoint is equivalent to the hooked original AND every memorized "
    "prompt is mitigated AND (when hold-out prompts are given) drift <= max_drift. A prompt is mitigated when "
    "(a) after pruning its mean pairwise first-step MS-SSIM over seeds is <= tau (scan's detection rule), "
    "(b) the mean pairwise SSIM of its full samples across seeds is <= max_sample_agreement, and "
    "(c) where a training image is given, every sample's SSIM to it is < max_train_similarity. "
    "Not equivalent: exit 1. Otherwise exit 3."
)


# -- input resolution ------------------------------------------------------------------------


def resolve_stats_path(explicit: Path | None, neuron_set: NeuronSet, neurons_path: Path) -> Path:
    """--stats, else the statistics path recorded in the neuron set (as given, or beside the set)."""
    if explicit is not None:
        return explicit
    recorded = ((neuron_set.settings or {}).get("stats") or {}).get("path")
    if recorded:
        for candidate in (Path(recorded), neurons_path.parent / recorded):
            if candidate.is_file():
                return candidate
        raise InputError(f"{neurons_path}: the statistics it was made with ({recorded}) are not found; pass --stats STATS")
    raise InputError(f"{neurons_path}: records no statistics file; pass --stats STATS (from `nemo-surgery stats`)")


def memorized_prompts(options: VerifyOptions, neuron_set: NeuronSet, neurons_path: Path) -> list[Prompt]:
    """--prompts, else the prompts the neuron set records as memorized."""
    if options.prompts is not None:
        return read_prompts(options.prompts, options.column)
    found = [Prompt(index=int(p["index"]), text=str(p["prompt"]), line=0)
             for p in neuron_set.prompts if p.get("memorized") and "prompt" in p and "index" in p]
    if not found:
        raise InputError(f"{neurons_path}: lists no memorized prompt to verify on; pass --prompts PROMPTS")
    return found


def train_image_map(path: Path | None, prompts: list[Prompt]) -> dict[int, Path]:
    """Map prompt index -> training image: ``DIR/<index>.<ext>``, or a JSON mapping file.

    The mapping file (``DIR/mapping.json`` or a ``.json`` path given directly)
    maps a prompt index or the prompt text to an image path, relative to the file.
    """
    if path is None:
        return {}
    if not path.exists():
        raise InputError(f"{path}: --train-images not found; pass a folder of <prompt index>.png or a mapping .json")
    mapping_file = path if path.is_file() else path / "mapping.json"
    found: dict[int, Path] = {}
    if mapping_file.is_file():
        try:
            doc = json.loads(mapping_file.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{mapping_file}: not a JSON mapping of prompt index or text to image path ({exc})") from None
        for p in prompts:
            target = doc.get(str(p.index), doc.get(p.text))
            if target is not None:
                found[p.index] = mapping_file.parent / str(target)
    elif path.is_dir():
        for p in prompts:
            for suffix in IMAGE_SUFFIXES:
                if (path / f"{p.index}{suffix}").is_file():
                    found[p.index] = path / f"{p.index}{suffix}"
                    break
    else:
        raise InputError(f"{path}: --train-images takes a folder or a .json mapping file")
    missing = [str(v) for v in found.values() if not v.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: training image listed in the mapping is not found")
    return found


def default_report_dir(pruned: Path) -> Path:
    """Report folder: ``<PRUNED>/nemo_report`` (travels with the pruned pipeline)."""
    return pruned / REPORT_DIR_NAME


def _digest_model(folder: Path) -> dict[str, str]:
    """SHA-256 of the UNet weight files and model_index.json of a pipeline folder."""
    out = {}
    for f in sorted([folder / "model_index.json", *(folder / "unet").glob("*.safetensors"),
                     *(folder / "unet").glob("*.safetensors.index.json")]):
        if f.is_file():
            out[str(f.relative_to(folder))] = sha256_file(f)
    return out


def loadable_pipeline(path: str | Path) -> bool:
    """True for a diffusers pipeline folder verification can load (model_index.json + parts)."""
    path = Path(path)
    return (path / "model_index.json").is_file() and all(
        (path / part).is_dir() for part in ("unet", "text_encoder", "tokenizer", "vae")
    )


@dataclass
class VerifyInputs:
    """Inputs resolved and validated before any model is loaded."""

    neuron_set: NeuronSet
    blocked: dict[str, list[int]]
    stats_path: Path
    stats: Stats
    prompts: list[Prompt]
    holdout: list[Prompt]
    train: dict[int, Path]


def precheck_inputs(neurons: str | Path, options: VerifyOptions) -> VerifyInputs:
    """Resolve and validate every input file (InputError with one line); loads no model."""
    neurons_path = Path(neurons)
    neuron_set = load_neuron_set(neurons_path)
    blocked = {ln.id: list(ln.neurons) for ln in neuron_set.nonempty()}
    if not blocked:
        raise InputError(f"{neurons_path}: the neuron set holds no neurons; nothing to verify")
    stats_path = resolve_stats_path(options.stats, neuron_set, neurons_path)
    stats = load_stats(stats_path)
    prompts = memorized_prompts(options, neuron_set, neurons_path)
    holdout = read_prompts(options.holdout, options.column) if options.holdout is not None else []
    if options.holdout is not None and len(holdout) < 2:
        raise InputError(f"{options.holdout}: at least 2 hold-out prompts are needed (drift and sample agreement)")
    for name, value in (("--sscd", options.sscd), ("--clip", options.clip)):
        if value is not None and not Path(value).exists():
            raise InputError(f"{value}: {name} path not found (optional metrics are read from local files only)")
    return VerifyInputs(neuron_set, blocked, stats_path, stats, prompts, holdout,
                        train_image_map(options.train_images, prompts))


# -- the run ----------------------------------------------------------------------------------


Progress = Callable[[str, int], Callable[[int], None]] | None


def _detection_json(det, tau: float) -> dict[str, Any]:
    return {"mean_pairwise": det.mean_pairwise, "max_seed_score": det.score,
            "kept_seeds": det.kept.tolist(), "memorized": bool(det.mean_pairwise > tau and det.kept.numel() > 0)}


def run_verify(
    original: str | Path,
    pruned: str | Path,
    neurons: str | Path,
    options: VerifyOptions = VerifyOptions(),
    stage: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Verify PRUNED against ORIGINAL for a neuron set; write report.json/html and MODEL_CARD.md.

    ``stage(text)`` is called when a phase starts (progress reporting). The
    pruned pipeline is loaded fresh, without hooks. Raises InputError for bad
    input; the verdict itself is in the result (``exit_code``).
    """
    from nemo_surgery.verify.report import write_reports

    started = time.perf_counter()
    say = stage or (lambda _text: None)
    original, pruned, neurons_path = Path(original), Path(pruned), Path(neurons)
    got = precheck_inputs(neurons_path, options)
    neuron_set, blocked, stats_path, stats = got.neuron_set, got.blocked, got.stats_path, got.stats
    prompts, holdout, train = got.prompts, got.holdout, got.train
    for name, path in (("ORIGINAL", original), ("PRUNED", pruned)):
        if not loadable_pipeline(path):
            raise InputError(f"{path}: {name} must be a diffusers pipeline folder with unet, text_encoder, tokenizer "
                             "and vae (verify samples full images)")
    report_dir = options.report or default_report_dir(pruned)
    sampling = options.sampling

    say("loading models")
    orig_model = load_model(original, device=options.device, dtype=options.dtype, with_vae=True)
    check_stats_match(stats, orig_model, stats_path)
    _check_set_matches(neuron_set, orig_model, neurons_path)
    if pruned.resolve() == original.resolve():
        raise InputError(f"{pruned}: PRUNED is the same folder as ORIGINAL; pass the output of `nemo-surgery apply`")
    pruned_model = load_model(pruned, device=options.device, dtype=options.dtype, with_vae=True)
    _check_set_matches(neuron_set, pruned_model, neurons_path, check_fingerprint=False)
    tau = stats.tau
    notes: list[str] = []

    say("equivalence check")
    scorer_o = Scorer(orig_model, orig_model.layers, stats.settings, options.score_batch_size)
    scorer_p = Scorer(pruned_model, pruned_model.layers, stats.settings, options.score_batch_size)
    eq_prompts = [p.text for p in prompts[:2]] + [p.text for p in holdout[:2]]
    equivalence = check_equivalence(orig_model, pruned_model, blocked, eq_prompts,
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

    if options.max_sample_agreement is not None:
        max_agreement, agreement_source = options.max_sample_agreement, "--max-sample-agreement"
    elif holdout_agreement and sampling.seeds > 1:
        values = np.asarray(holdout_agreement)
        max_agreement = float(values.mean() + values.std(ddof=1))
        agreement_source = ("mean + 1 std of the pairwise sample SSIM across seeds of the hold-out prompts "
                            "on the original model (self-calibrated, like tau)")
        if values.mean() > 0.9:
            notes.append(f"hold-out samples already agree across seeds (mean SSIM {values.mean():.3f}): "
                         "on this model the sample-agreement check separates little")
    else:
        max_agreement = FALLBACK_MAX_AGREEMENT
        agreement_source = f"fixed fallback {FALLBACK_MAX_AGREEMENT} (uncalibrated: no --holdout)"

    say("comparing samples")
    checks = []
    h, w = mem_before.shape[2], mem_before.shape[3]
    for k, p in enumerate(prompts):
        det_b, det_a = dets_o[k], dets_p[k]
        kept = det_b.kept
        first = float(ms_ssim(deltas_o[k][kept], deltas_p[k][kept], stats.settings.ssim).max()) if kept.numel() else None
        check = PromptCheck(
            index=p.index, prompt=p.text,
            detection_before=_detection_json(det_b, tau), detection_after=_detection_json(det_a, tau),
            first_step_similarity=first,
            agreement_before=_agreement(mem_before[k]), agreement_after=_agreement(mem_after[k]),
            before_vs_after=[float(v) for v in _paired(mem_before[k], mem_after[k])],
        )
        if p.index in train:
            ref = load_image(train[p.index], h, w)
            check.train_image = str(train[p.index])
            check.train_before = to_reference(mem_before[k], ref).tolist()
            check.train_after = to_reference(mem_after[k], ref).tolist()
        _judge(check, tau, max_agreement, options.max_train_similarity)
        checks.append(check)

    optional = _optional_metrics(options, orig_model.device, prompts, train, mem_before, mem_after,
                                 holdout, hold_before, hold_after, h, w)
    settings = {
        "sampling": {**sampling.to_json(), "scheduler": "DDIM (eta 0)", "generator": "one CPU generator, seeded once",
                     "decode": "pipeline VAE"},
        "score": stats.settings.to_json(),
        "ssim": "scikit-image structural_similarity, channel_axis=-1, data_range=1, win_size=min(7, image side, odd)",
        "device": str(orig_model.device), "dtype": options.dtype,
        "equivalence": {"prompts": len(eq_prompts), "seeds": max(1, options.equivalence_seeds),
                        "timestep": int(scorer_o.timestep), "guidance": 0.0},
    }
    inputs = {
        "original": {"path": str(original), "fingerprint": orig_model.fingerprint, "sha256": _digest_model(original)},
        "pruned": {"path": str(pruned), "fingerprint": pruned_model.fingerprint, "sha256": _digest_model(pruned)},
        "neuron_set": {"path": str(neurons_path), "sha256": sha256_file(neurons_path)},
        "stats": {"path": str(stats_path), "sha256": sha256_file(stats_path)},
    }
    for key, value in (("prompts", options.prompts), ("holdout", options.holdout)):
        if value is not None:
            inputs[key] = {"path": str(value), "sha256": sha256_file(value)}
    if train:
        inputs["train_images"] = {str(i): {"path": str(f), "sha256": sha256_file(f)} for i, f in sorted(train.items())}
    result = VerifyResult(
        original=str(original), pruned=str(pruned), neurons=str(neurons_path), report_dir=report_dir, tau=tau,
        max_sample_agreement=max_agreement, agreement_source=agreement_source,
        max_train_similarity=options.max_train_similarity, max_drift=options.max_drift, checks=checks,
        equivalence=equivalence, drift=drift, neuron_set=neuron_set, settings=settings, inputs=inputs,
        holdout_agreement=holdout_agreement, optional=optional, notes=notes,
    )
    result.images = {"memorized_before": mem_before, "memorized_after": mem_after}
    if hold_before is not None:
        result.images.update(holdout_before=hold_before, holdout_after=hold_after)
    result.seconds = round(time.perf_counter() - started, 3)
    say("writing report")
    write_reports(result, report_dir)
    return result


def _agreement(images: np.ndarray) -> float:
    """Mean pairwise SSIM across seeds (1.0 with a single seed)."""
    values = pairwise_ssim(images)
    return float(values.mean()) if values.size else 1.0


def _paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from nemo_surgery.verify.metrics import paired_ssim

    return paired_ssim(a, b)


def _judge(check: PromptCheck, tau: float, max_agreement: float, max_train: float) -> None:
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


def _check_set_matches(neuron_set: NeuronSet, model: LoadedModel, path: Path, check_fingerprint: bool = True) -> None:
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


def _optional_metrics(options, device, prompts, train, mem_before, mem_after, holdout, hold_before, hold_after,
                      h, w) -> dict[str, Any]:
    """SSCD and CLIP numbers when their local files are given; a clear 'skipped' line otherwise."""
    out: dict[str, Any] = {}
    if options.sscd is None:
        out["sscd"] = {"skipped": "no --sscd PATH given (TorchScript SSCD model); copy-detection not measured"}
    elif not Path(options.sscd).is_file():
        out["sscd"] = {"skipped": f"{options.sscd}: file not found; copy-detection not measured"}
    else:
        metric = load_sscd(options.sscd, device)
        rows = []
        for k, p in enumerate(prompts):
            eb, ea = metric.embed(mem_before[k]), metric.embed(mem_after[k])
            row = {"index": p.index, "between_seeds_before": _mean_offdiag(eb @ eb.T),
                   "between_seeds_after": _mean_offdiag(ea @ ea.T)}
            if p.index in train:
                et = metric.embed(load_image(train[p.index], h, w)[None])
                row["to_train_before"] = (eb @ et.T).flatten().tolist()
                row["to_train_after"] = (ea @ et.T).flatten().tolist()
            rows.append(row)
        out["sscd"] = {"model": str(options.sscd), "prompts": rows}
    if options.clip is None:
        out["clip"] = {"skipped": "no --clip DIR given (local CLIP model folder); prompt alignment not measured"}
    elif not Path(options.clip).is_dir():
        out["clip"] = {"skipped": f"{options.clip}: folder not found; prompt alignment not measured"}
    else:
        metric = load_clip(options.clip, device)
        groups = [("memorized", prompts, mem_before, mem_after)]
        if holdout:
            groups.append(("holdout", holdout, hold_before, hold_after))
        res = {"model": str(options.clip)}
        for name, plist, before, after in groups:
            text = metric.embed_text([p.text for p in plist])
            sb = [float((metric.embed(before[k]) @ text[k]).mean()) for k in range(len(plist))]
            sa = [float((metric.embed(after[k]) @ text[k]).mean()) for k in range(len(plist))]
            res[name] = {"before": float(np.mean(sb)), "after": float(np.mean(sa)), "per_prompt_before": sb,
                         "per_prompt_after": sa}
        out["clip"] = res
    return out


def _mean_offdiag(mat: torch.Tensor) -> float:
    n = mat.shape[0]
    if n < 2:
        return 1.0
    mask = ~torch.eye(n, dtype=torch.bool)
    return float(mat[mask].mean())
