"""Benchmark the localization search: NeMo's sequential order against adaptive splitting.

In one run, on the same prompts, scans three models with the ``reference``
strategy (NeMo's order: one candidate set per UNet call, one layer pass and one
neuron pass) and with ``split`` (the default: adaptive splitting of the
z-ordered candidates, several sets per call, a certification call), and prints
per memorized prompt: UNet calls, UNet samples, wall seconds, samples per
second, neurons found, and the ratios. Every UNet call of a prompt counts,
detection included. ``split`` also scores candidate sets in the spare room of
the detection call, so a prompt that is NOT memorized costs it more samples
(never more calls): the column "other smp" prints samples per such prompt.
The detection call has room for more sets at a larger batch (a GPU's):
``--batch-size 40,160`` (the default) measures each case at both, each ratio within one run.

* ``planted``: tests/models/plant.py (rows 3 and 7 of mid_block carry the trigger), theta from 2
  (--planted-theta) so that the initial candidate set is larger than the two planted rows;
* ``demo``: the shipped demo model with its stats.json, NeMo's default layers (as `make demo`);
* ``many``: a planted model (128 channels) whose memorization needs four neurons, all of
  which must be blocked, scanned over every value layer from theta = 1, so the initial
  candidate set has about 250 neurons and refinement has real work.

Run: python benchmarks/bench_scan.py [--cases planted,demo,many] [--batch-size 40,160]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.models

from nemo_surgery.demo.paths import DEMO_MODEL_DIR, DEMO_STATS
from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import ScanSummary, run_scan
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.selection import SelectionSettings
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats import compute_stats, load_stats
from nemo_surgery.errors import InputError
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT, PlantSpec, build_planted_pipeline
from tests.models.tiny import save_pipeline

PLANTED_PROMPTS = [TRIGGER_PROMPT, "an astronaut on the moon", "a painting of an astronaut by a famous artist",
                   "two astronaut shapes on a blue background", "a photo of a dog", "a city at night"]
DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "demo_memorized.txt"
DEMO_HOLDOUT = DEMO_PROMPTS.with_name("demo_holdout.txt")
#: The many-candidate plant: four rows, each enough on its own to keep the memorized pattern.
MANY_SPEC = PlantSpec(channels=128, rows=(3, 7, 20, 41), seed=1)
MANY_PROMPTS = [TRIGGER_PROMPT, "an astronaut on the moon"]
STRATEGIES = ("reference", "split")


@dataclass
class Case:
    """One benchmark model: where it is, its statistics, prompts, layers and selection schedule."""

    name: str
    model_dir: Path
    stats_path: Path
    prompts: list[str]
    layers: str
    theta_start: float


def _planted_case(tmp: Path, name: str, spec: PlantSpec, prompts: list[str], layers: str, theta: float,
                  batch_size: int) -> Case:
    folder = tmp / name
    pipe, _ = build_planted_pipeline(spec)
    save_pipeline(pipe, folder)
    model = load_model(folder, device="cpu")
    _, h, w = model.latent_shape
    stats = compute_stats(model, list(ORDINARY_PROMPTS), ScoreSettings(ssim=SSIMConfig.fit(h, w)), batch_size=batch_size)
    stats_path = tmp / f"{name}-stats.json"
    stats.save(stats_path)
    return Case(name, folder, stats_path, prompts, layers, theta)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _demo_case(tmp: Path, batch_size: int) -> Case:
    """The shipped demo model and statistics; recomputed with the shipped settings if their format is outdated."""
    stats_path = DEMO_STATS
    try:
        load_stats(stats_path)
    except InputError:
        settings = ScoreSettings.from_json(json.loads(DEMO_STATS.read_text())["settings"])
        model = load_model(DEMO_MODEL_DIR, device="cpu")
        stats_path = tmp / "demo-stats.json"
        compute_stats(model, _lines(DEMO_HOLDOUT), settings, batch_size=batch_size).save(stats_path)
        print(f"  [demo: shipped statistics are an older format; recomputed on {DEMO_HOLDOUT.name}]", file=sys.stderr)
    return Case("demo", DEMO_MODEL_DIR, stats_path, _lines(DEMO_PROMPTS), "default", 5.0)


def _run(case: Case, strategy: str, batch_size: int, tmp: Path) -> tuple[ScanSummary, float]:
    model = load_model(case.model_dir, device="cpu")
    stats = load_stats(case.stats_path)
    prompts = [Prompt(i, t, i + 1) for i, t in enumerate(case.prompts)]
    selection = SelectionSettings(theta_start=case.theta_start, strategy=strategy)
    started = time.perf_counter()
    summary = run_scan(model, stats, case.stats_path, prompts, tmp / f"{case.name}-{strategy}.json", layers=case.layers,
                       batch_size=batch_size, force=True, selection=selection)
    return summary, time.perf_counter() - started


def _row(case: Case, batch_size: int, strategy: str, summary: ScanSummary, wall: float) -> dict:
    memorized = [r for r in summary.results if r.memorized and r.mitigated]
    mean = lambda attr: statistics.mean(getattr(r, attr) for r in memorized) if memorized else float("nan")  # noqa: E731
    return {
        "case": case.name, "batch": batch_size, "strategy": strategy, "memorized": len(memorized),
        "candidates": mean("initial_count"), "calls": mean("unet_calls"), "samples": mean("samples"),
        "seconds": mean("seconds"), "set": mean("count"), "sets": [r.count for r in memorized],
        "samples_per_s": summary.samples / wall if wall else float("nan"),
        "other_samples": statistics.mean(others) if (others := [r.samples for r in summary.results
                                                                  if not r.memorized]) else float("nan"),
        "not_mitigated": len(summary.not_mitigated), "neurons": [r.neurons for r in summary.results],
    }


def _print(rows: list[dict], args) -> None:
    print(f"\nbench_scan  (CPU, {args.threads} threads; per memorized and mitigated prompt)")
    head = ("case", "batch", "strategy", "prompts", "candidates", "UNet calls", "samples", "seconds", "samples/s", "set size",
            "other smp", "sizes")
    print("  " + "  ".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = (r["case"], str(r["batch"]), r["strategy"], str(r["memorized"]), f"{r['candidates']:.1f}", f"{r['calls']:.1f}",
                 f"{r['samples']:.1f}", f"{r['seconds']:.2f}", f"{r['samples_per_s']:.1f}", f"{r['set']:.2f}",
                 f"{r['other_samples']:.1f}", ",".join(map(str, r["sets"])))
        print("  " + "  ".join(f"{c:>11}" for c in cells))
    print("  ratios, reference / split (higher = split needs less):")
    for name, batch in dict.fromkeys((r["case"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["case"] == name and r["batch"] == batch]
        if {r["strategy"] for r in mine} != set(STRATEGIES):
            continue
        ref, ours = (next(r for r in mine if r["strategy"] == s) for s in STRATEGIES)
        same = "same neurons" if ref["neurons"] == ours["neurons"] else "different neurons"
        print(f"    {name:>8} @ {batch:>4}: UNet calls {ref['calls'] / ours['calls']:.1f}x, "
              f"samples {ref['samples'] / ours['samples']:.1f}x, "
              f"wall {ref['seconds'] / ours['seconds']:.1f}x; set size {ours['set']:.2f} vs {ref['set']:.2f} ({same}); "
              f"not mitigated: {ref['not_mitigated']} / {ours['not_mitigated']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", default="40,160",
                        help="UNet samples per call, one or a comma list (10 kept seeds: 40 = 4 sets per call, "
                        "160 = 16, a GPU-sized call)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="planted,demo,many")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="which searches to run (the ratios need both)")
    parser.add_argument("--planted-theta", type=float, default=2.0,
                        help="theta start on the planted model (NeMo: 5, where the first candidate set is already "
                        "the two planted rows; 2 gives refinement work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    batches = [int(b) for b in args.batch_size.split(",") if b.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in wanted:
            if name == "planted":
                case = _planted_case(tmp, "planted", PlantSpec(), PLANTED_PROMPTS, "default", args.planted_theta, batches[0])
            elif name == "many":
                case = _planted_case(tmp, "many", MANY_SPEC, MANY_PROMPTS, "all", 1.0, batches[0])
            elif name == "demo":
                case = _demo_case(tmp, batches[0])
            else:
                raise SystemExit(f"unknown case {name!r}; use planted, demo, many")
            for batch in batches:
                for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
                    summary, wall = _run(case, strategy, batch, tmp)
                    rows.append(_row(case, batch, strategy, summary, wall))
                    print(f"  [{name} @ {batch} / {strategy}: {wall:.1f} s]", file=sys.stderr, flush=True)
            _print([r for r in rows if r["case"] == name], args)
    if len(wanted) > 1:
        _print(rows, args)


if __name__ == "__main__":
    main()
