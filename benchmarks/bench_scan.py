"""Benchmark the scan on the planted tiny pipeline: throughput, UNet work, time per stage.

Prints, measured in one run: prompts per second, UNet calls and samples per
memorized prompt, seconds per stage, and the ratio of UNet calls with
speculative batching (default --batch-size) to one candidate set per call
(--batch-size equal to the number of kept seeds), which is the sequential
NeMo reference behaviour. Run: python benchmarks/bench_scan.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.models

from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import run_scan
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.selection import SelectionSettings
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats import compute_stats
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT, build_planted_pipeline
from tests.models.tiny import save_pipeline

MEMORIZED = [TRIGGER_PROMPT, "an astronaut on the moon", "a painting of an astronaut by a famous artist",
             "two astronaut shapes on a blue background"]
ORDINARY = ["a photo of a dog", "a small black cat on a red house", "a green tree on a mountain", "a city at night"]


def _scan(model, stats, stats_path, prompts, out, batch_size, selection):
    started = time.perf_counter()
    summary = run_scan(model, stats, stats_path, prompts, out, batch_size=batch_size, force=True,
                       selection=selection)
    return summary, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--theta-start", type=float, default=2.0,
                        help="Start of the initial selection (NeMo: 5); 2 makes candidate sets large, "
                        "so refinement has real work to do")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "planted"
        pipe, _ = build_planted_pipeline()
        save_pipeline(pipe, folder)
        model = load_model(folder, device="cpu")
        _, h, w = model.latent_shape
        settings = ScoreSettings(ssim=SSIMConfig.fit(h, w))
        started = time.perf_counter()
        stats = compute_stats(model, list(ORDINARY_PROMPTS), settings, batch_size=args.batch_size)
        stats_seconds = time.perf_counter() - started
        stats_path = Path(tmp) / "stats.json"
        stats.save(stats_path)
        texts = MEMORIZED + ORDINARY
        prompts = [Prompt(i, t, i + 1) for i, t in enumerate(texts)]
        selection = SelectionSettings(theta_start=args.theta_start)
        _scan(model, stats, stats_path, prompts[:1], Path(tmp) / "warm.json", args.batch_size, selection)
        batched, batched_s = _scan(model, stats, stats_path, prompts, Path(tmp) / "a.json", args.batch_size, selection)
        kept = max(len(r.kept_seeds) for r in batched.results if r.memorized)
        sequential, sequential_s = _scan(model, stats, stats_path, prompts, Path(tmp) / "b.json", kept, selection)

    def per_memorized(summary, attr):
        return statistics.mean(getattr(r, attr) for r in summary.results if r.memorized)

    def stage(summary, name):
        return statistics.mean(r.stage_seconds.get(name, 0.0) for r in summary.results if r.memorized)

    same = [r.neurons for r in batched.results] == [r.neurons for r in sequential.results]
    rows = [
        ("hold-out statistics (16 prompts)", f"{stats_seconds:.2f} s", ""),
        ("prompts scanned (4 memorized, 4 ordinary)", str(len(prompts)), ""),
        ("initial candidate neurons per memorized prompt", f"{per_memorized(batched, 'initial_count'):.1f}", ""),
        ("prompts per second", f"{len(prompts) / batched_s:.2f}", f"sequential: {len(prompts) / sequential_s:.2f}"),
        ("UNet calls per memorized prompt", f"{per_memorized(batched, 'unet_calls'):.1f}",
         f"sequential: {per_memorized(sequential, 'unet_calls'):.1f}"),
        ("UNet samples per memorized prompt", f"{per_memorized(batched, 'samples'):.1f}",
         f"sequential: {per_memorized(sequential, 'samples'):.1f}"),
        ("seconds: detection", f"{stage(batched, 'detect'):.3f}", f"sequential: {stage(sequential, 'detect'):.3f}"),
        ("seconds: initial selection", f"{stage(batched, 'initial'):.3f}", f"sequential: {stage(sequential, 'initial'):.3f}"),
        ("seconds: refinement", f"{stage(batched, 'refine'):.3f}", f"sequential: {stage(sequential, 'refine'):.3f}"),
        ("UNet calls, batched / sequential", f"{batched.unet_calls / sequential.unet_calls:.2f}", ""),
        ("wall time, batched / sequential", f"{batched_s / sequential_s:.2f}", ""),
        ("same neuron sets", str(same), f"neurons: {batched.total_neurons}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"bench_scan  (planted tiny pipeline, CPU, {args.threads} threads, batch size {args.batch_size}, "
          f"theta from {args.theta_start})")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
