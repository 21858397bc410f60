"""Data-parallel scan: each shard scans its share of the prompts, the main process merges the neuron sets.

A prompt's result depends only on the prompt (its detection, its candidate
sets and their UNet batches), so scanning disjoint shares and taking the union
of the per-shard neuron sets gives exactly the set one process would find.
Under a launcher, shard I writes ``<out stem>.shard-I-of-N.json`` and its own
records file (``--resume`` continues each shard where it stopped); after a
barrier the main process writes ``out``. With an explicit ``--shard I/N`` the
shard's ``--out`` is its part, merged later by ``nemo-surgery merge``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nemo_surgery.engine.scan import PromptResult, ScanSummary, check_outputs, records_path_for, run_scan
from nemo_surgery.engine.shards import Shard, shard_path
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet, load_neuron_set


def run_sharded_scan(model, stats, stats_path, prompts, out: str | Path, shard: Shard = Shard(), resume: bool = False,
                     force: bool = False, **scan_kwargs: Any) -> ScanSummary:
    """Scan this shard's prompts; under a launcher the main process then merges every shard into ``out``.

    Returns the merged summary on the main process of a launched job, else
    this shard's own summary.
    """
    if shard.single:
        return run_scan(model, stats, stats_path, prompts, out, resume=resume, force=force, **scan_kwargs)
    out = Path(out)
    if not shard.launched:
        return run_scan(model, stats, stats_path, shard.take(prompts), out, resume=resume, force=force, **scan_kwargs)
    check_outputs(out, resume, force)  # every process, so that all stop together instead of waiting at the barrier
    summary = run_scan(model, stats, stats_path, shard.take(prompts), shard_path(out, shard), resume=resume,
                       force=force, **scan_kwargs)
    shard.wait()
    if shard.is_main:
        parts = [shard_path(out, Shard(i, shard.count)) for i in range(shard.count)]
        merged = merge_neuron_sets(parts, out)
        summary = _merged_summary(summary, parts, merged, out)
    shard.wait()
    return summary


def merge_neuron_sets(paths: Sequence[str | Path], out: str | Path) -> NeuronSet:
    """Union of neuron sets scanned on disjoint prompt shares of one job; written atomically to ``out``.

    The parts must agree on model fingerprint, layers and settings; a prompt
    index found in two parts must carry the same record.
    """
    sets = [(Path(p), load_neuron_set(p)) for p in paths]
    if not sets:
        raise InputError("merge: no neuron sets given")
    first_path, first = sets[0]
    geometry = [(la.id, la.ldm_id, la.rows, la.cols) for la in first.layers]
    needed: dict[str, dict[int, set[int]]] = {la.id: {} for la in first.layers}
    prompts: dict[int, dict[str, Any]] = {}
    for path, part in sets:
        for what, mine, theirs in (("model fingerprint", part.fingerprint, first.fingerprint),
                                   ("layers", [(la.id, la.ldm_id, la.rows, la.cols) for la in part.layers], geometry),
                                   ("settings", part.settings, first.settings)):
            if mine != theirs:
                raise InputError(f"{path}: different {what} than {first_path}; merge only shards of one scan")
        for layer in part.layers:
            by_neuron = needed[layer.id]
            users = layer.needed_by or [[] for _ in layer.neurons]
            for n, who in zip(layer.neurons, users):
                by_neuron.setdefault(n, set()).update(who)
        for rec in part.prompts:
            old = prompts.setdefault(rec["index"], rec)
            if old != rec:
                raise InputError(f"{path}: prompt {rec['index']} differs from another part's record of it")
    layers = [
        LayerNeurons(id=lid, ldm_id=ldm, rows=rows, cols=cols, neurons=sorted(needed[lid]),
                     needed_by=[sorted(needed[lid][n]) for n in sorted(needed[lid])])
        for lid, ldm, rows, cols in geometry
    ]
    merged = NeuronSet(layers=layers, fingerprint=first.fingerprint, source=first.source, settings=first.settings,
                       weights_fingerprint=first.weights_fingerprint,
                       prompts=[prompts[i] for i in sorted(prompts)])
    merged.save(out)
    return merged


def read_records(path: Path) -> list[PromptResult]:
    """Prompt records of a records file (torn last line ignored)."""
    results = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            break
        if doc.get("type") == "prompt":
            results.append(PromptResult.from_json(doc))
    return results


def _merged_summary(own: ScanSummary, parts: list[Path], merged: NeuronSet, out: Path) -> ScanSummary:
    wanted = {rec["index"] for rec in merged.prompts}
    results = sorted((r for p in parts for r in read_records(records_path_for(p)) if r.index in wanted), key=lambda r: r.index)
    return replace(
        own,
        out=str(out),
        records=", ".join(str(records_path_for(p)) for p in parts),
        prompts=len(results),
        memorized=sum(r.memorized for r in results),
        mitigated=sum(bool(r.mitigated) for r in results),
        not_mitigated=[r.index for r in results if r.memorized and not r.mitigated],
        total_neurons=merged.total,
        neurons_per_layer={la.id: len(la.neurons) for la in merged.layers if la.neurons},
        unet_calls=sum(r.unet_calls for r in results),
        samples=sum(r.samples for r in results),
        truncated=[r.index for r in results if r.truncated],
        results=results,
    )
