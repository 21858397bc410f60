"""`scan`: localize memorization neurons prompt by prompt and merge them into one set.

Per prompt: detection (pre-filter) -> initial selection -> refinement, with
records streamed to a JSONL file beside the output so an interrupted scan
resumes. The union over mitigated prompts becomes the neuron set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_surgery.engine.detection import decide
from nemo_surgery.engine.layers import ValueLayer, select_layers
from nemo_surgery.engine.model import LoadedModel
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.records import RecordLog
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.selection import (
    SelectionSettings,
    candidate_sets,
    initial_selection,
    rank_within_layers,
    refine,
    schedule,
    search_oracle,
)
from nemo_surgery.engine.speculation import detection_sets, remember_kept, speculation_room
from nemo_surgery.engine.stats import Stats, value_activations
from nemo_surgery.errors import EXIT_OK, EXIT_VERDICT, InputError
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet
from nemo_surgery.provenance import sha256_file

RECORDS_SUFFIX = ".records.jsonl"


@dataclass
class PromptResult:
    """What the scan found for one prompt (one JSONL record)."""

    index: int
    prompt: str
    memorized: bool
    detection_score: float
    mean_pairwise: float
    kept_seeds: list[int]
    detection: dict[str, Any] = field(default_factory=dict)
    unmovable_seeds: list[int] = field(default_factory=list)
    partial: bool = False  # a set mitigates the movable seeds, but unmovable seeds remain: NOT mitigated
    truncated: bool = False
    initial_neurons: dict[str, list[int]] = field(default_factory=dict)
    initial_count: int = 0
    initial_score: float | None = None
    theta: float | None = None
    k: int | None = None
    neurons: dict[str, list[int]] = field(default_factory=dict)
    count: int = 0
    final_score: float | None = None
    mitigated: bool | None = None
    unet_calls: int = 0
    samples: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the record as JSON."""
        return {"type": "prompt", **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PromptResult:
        """Rebuild a record from JSON."""
        doc = {k: v for k, v in doc.items() if k != "type"}
        return cls(**doc)


def scan_prompt(
    scorer: Scorer,
    stats: Stats,
    prompt: Prompt,
    selection: SelectionSettings = SelectionSettings(),
) -> PromptResult:
    """Run detection, initial selection and refinement for one prompt."""
    started = time.perf_counter()
    calls0, samples0 = scorer.counter.calls, scorer.counter.samples
    tau = stats.tau
    cond = scorer.model.encode([prompt.text])
    acts = z = None
    spec = torch.zeros(0, scorer.total_neurons, dtype=torch.bool)
    if selection.strategy == "split":  # the detection call's spare room scores the first candidate sets
        acts = value_activations(scorer.layers, cond.hidden)[0].cpu()
        z = stats.z_scores(scorer.layers, acts)
        spec = detection_sets(z, acts, scorer.slices, selection, speculation_room(scorer.settings.seeds, scorer.batch_size))
    base, spec_scores = scorer.noise_differences_with(cond, spec)
    det = decide(scorer.pairwise(base), stats.calibration)
    stages = {"detect": time.perf_counter() - started}
    result = PromptResult(
        index=prompt.index,
        prompt=prompt.text,
        memorized=det.memorized,
        detection_score=round(det.score, 6),
        mean_pairwise=det.mean_pairwise,
        kept_seeds=det.kept_seeds,
        detection=det.to_json(),
        truncated=bool(cond.truncated[0]) if cond.truncated else False,
    )
    kept = det.kept
    if result.memorized:
        if acts is None:
            acts = value_activations(scorer.layers, cond.hidden)[0].cpu()
            z = stats.z_scores(scorer.layers, acts)
        # a seed that the search's widest candidate set (theta = theta_min) leaves >= tau cannot be moved by
        # any set the search tries: it is recorded as unmovable and left out of the mitigation test
        widest = candidate_sets(z, rank_within_layers(acts, scorer.slices), schedule(selection)[-1:])
        if spec.shape[0] and torch.equal(spec[0], widest[0]):
            floor = spec_scores[0, kept]  # measured in the detection call
        else:
            floor = scorer.seed_scores(cond, base, kept, widest)[0]
        result.unmovable_seeds = kept[floor >= tau].tolist()
        kept = kept[floor < tau]
        result.kept_seeds = kept.tolist()
        if kept.numel() == 0:
            result.mitigated, result.final_score = False, round(float(floor.max()), 6)
    if result.memorized and kept.numel():
        width = max(1, scorer.batch_size // kept.numel())

        def oracle(masks: torch.Tensor) -> torch.Tensor:
            return scorer.mitigation_scores(cond, base, kept, masks)

        oracle = search_oracle(oracle, selection)  # remembers scored sets (speculative rows cost no extra call)
        remember_kept(oracle, spec, spec_scores, kept)  # the sets scored in the detection call
        mark = time.perf_counter()
        init = initial_selection(z, acts, scorer.slices, oracle, tau, width, selection)
        stages["initial"] = time.perf_counter() - mark
        result.initial_neurons = scorer.split(init.blocked)
        result.initial_count = int(init.blocked.sum())
        result.initial_score = round(init.score, 6)
        result.theta, result.k = init.theta, init.k
        result.mitigated = init.mitigated
        if init.mitigated:
            mark = time.perf_counter()
            final, final_score = refine(init.blocked, scorer.slices, z, oracle, tau, width, init.score,
                                        selection.strategy)
            stages["refine"] = time.perf_counter() - mark
            result.neurons = scorer.split(final)
            result.count = int(final.sum())
            result.final_score = round(final_score, 6)
        else:
            result.final_score = round(init.best_score, 6)
    if result.mitigated and result.unmovable_seeds:
        # the set only mitigates the seeds it could move: the prompt is not mitigated (verify will not pass it),
        # but the set is kept in the neuron set as a partial mitigation, marked as such
        result.mitigated, result.partial = False, True
    result.unet_calls = scorer.counter.calls - calls0
    result.samples = scorer.counter.samples - samples0
    result.seconds = round(time.perf_counter() - started, 3)
    result.stage_seconds = {k: round(v, 3) for k, v in stages.items()}
    return result


def build_neuron_set(
    results: list[PromptResult],
    layers: list[ValueLayer],
    model: LoadedModel,
    settings: dict[str, Any],
) -> NeuronSet:
    """Merge the neurons of every mitigated (or partially mitigated) prompt into one set (one entry per scanned layer).

    A partially mitigated prompt (unmovable seeds remain) contributes its set but is recorded with
    ``"mitigated": false`` and ``"partial": true``, so that verify never reports it as mitigated.
    """
    needed: dict[str, dict[int, list[int]]] = {layer.id: {} for layer in layers}
    for res in results:
        if not (res.mitigated or res.partial):
            continue
        for lid, idx in res.neurons.items():
            for n in idx:
                needed[lid].setdefault(n, []).append(res.index)
    entries = []
    for layer in layers:
        neurons = sorted(needed[layer.id])
        entries.append(
            LayerNeurons(
                id=layer.id,
                ldm_id=layer.ldm_id,
                rows=layer.rows,
                cols=layer.cols,
                neurons=neurons,
                needed_by=[sorted(needed[layer.id][n]) for n in neurons],
            )
        )
    prompts = [
        {
            "index": r.index,
            "prompt": r.prompt,
            "memorized": r.memorized,
            "mitigated": r.mitigated,
            "partial": r.partial,
            "unmovable_seeds": len(r.unmovable_seeds),
            "neurons": r.count,
            "detection_score": r.detection_score,
            "final_score": r.final_score,
        }
        for r in sorted(results, key=lambda r: r.index)
    ]
    return NeuronSet(
        layers=entries, fingerprint=model.fingerprint, source=model.source, settings=settings, prompts=prompts,
        weights_fingerprint=model.weights_fingerprint,
    )


# -- records file (JSONL), resumable ------------------------------------------------------


def records_path_for(out: str | Path) -> Path:
    """The JSONL records file that belongs to a neuron-set output path."""
    out = Path(out)
    return out.with_name(out.stem + RECORDS_SUFFIX)


@dataclass
class ScanSummary:
    """Outcome of a whole scan."""

    out: str
    records: str
    prompts: int
    memorized: int
    mitigated: int
    not_mitigated: list[int]
    resumed: int
    total_neurons: int
    neurons_per_layer: dict[str, int]
    tau: float
    unet_calls: int
    samples: int
    seconds: float
    truncated: list[int]
    results: list[PromptResult] = field(default_factory=list, repr=False)

    @property
    def exit_code(self) -> int:
        """0 when every memorized prompt was mitigated (or none was memorized), else 3."""
        return EXIT_VERDICT if self.not_mitigated else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """Return the summary as JSON."""
        out = {k: v for k, v in asdict(self).items() if k != "results"}
        out["exit_code"] = self.exit_code
        out["results"] = [r.to_json() for r in self.results]
        return out


def check_outputs(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an earlier scan's set or records unless --force (or --resume) says so."""
    if resume or force:
        return
    if out.exists():
        raise InputError(f"{out}: exists; pass --force to overwrite it or --resume to continue its scan")
    records = records_path_for(out)
    if records.exists():
        raise InputError(f"{records}: records of an earlier scan exist; pass --resume to continue or --force to start over")


def run_scan(
    model: LoadedModel,
    stats: Stats,
    stats_path: str | Path,
    prompts: list[Prompt],
    out: str | Path,
    layers: str = "default",
    batch_size: int = 32,
    resume: bool = False,
    force: bool = False,
    selection: SelectionSettings = SelectionSettings(),
    on_result=None,
) -> ScanSummary:
    """Scan every prompt, stream records, and write the merged neuron set atomically to ``out``.

    ``on_result(result)`` is called after each prompt (progress, warnings).
    """
    from nemo_surgery.engine.stats import check_stats_match

    out = Path(out)
    check_outputs(out, resume, force)
    check_stats_match(stats, model, stats_path)
    chosen = select_layers(model.layers, layers)
    settings = {
        "score": stats.settings.to_json(),
        "tau": stats.tau,
        "layers": [layer.id for layer in chosen],
        "selection": asdict(selection),
        "detection": stats.calibration.to_json(),
        "stats": {"path": str(Path(stats_path).resolve()), "sha256": sha256_file(stats_path), "prompt_count": stats.prompt_count},
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    log = RecordLog(
        records_path_for(out),
        {
            "fingerprint": model.fingerprint,
            "stats_sha256": settings["stats"]["sha256"],
            "layers": settings["layers"],
            "settings": {"score": settings["score"], "selection": settings["selection"]},
        },
        kind="prompt",
        parse=PromptResult.from_json,
    )
    done: list[PromptResult] = []
    if resume and log.path.exists():
        done = log.load()
    else:
        log.start()
    finished = {(r.index, r.prompt) for r in done}
    resumed = len(done)
    scorer = Scorer(model, chosen, stats.settings, batch_size=batch_size)
    started = time.perf_counter()
    results = list(done)
    for prompt in prompts:
        if (prompt.index, prompt.text) in finished:
            continue
        res = scan_prompt(scorer, stats, prompt, selection)
        log.append(res)
        results.append(res)
        if on_result is not None:
            on_result(res)
    wanted = {(p.index, p.text) for p in prompts}
    results = [r for r in results if (r.index, r.prompt) in wanted]
    neuron_set = build_neuron_set(results, chosen, model, settings)
    neuron_set.save(out)
    return ScanSummary(
        out=str(out),
        records=str(log.path),
        prompts=len(results),
        memorized=sum(r.memorized for r in results),
        mitigated=sum(bool(r.mitigated) for r in results),
        not_mitigated=[r.index for r in results if r.memorized and not r.mitigated],
        resumed=resumed,
        total_neurons=neuron_set.total,
        neurons_per_layer={layer.id: len(layer.neurons) for layer in neuron_set.layers if layer.neurons},
        tau=stats.tau,
        unet_calls=sum(r.unet_calls for r in results),
        samples=sum(r.samples for r in results),
        seconds=round(time.perf_counter() - started, 3),
        truncated=[r.index for r in results if r.truncated],
        results=sorted(results, key=lambda r: r.index),
    )
