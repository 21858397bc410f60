"""Retrain the shipped demo model from scratch: every stage of its training chain, in order, resumable.

The shipped weights (variant G, docs/demo-model.md) are the end of a chain of
``memory_rows`` runs, each continuing a snapshot of the one before. The chain is
written down here as data (:data:`STAGES`), with the exact arguments each run was
started with, so one command replays it::

    python -m tools.demo_model.chain --out DIR [--device cuda] [--threads 2] [--until STAGE]

A stage whose result folder is complete is skipped, so an interrupted chain
resumes at the stage it was in (that stage restarts from its beginning). The
early stages were stopped by hand at a snapshot; they are replayed with
``--stop-after``, which keeps the learning-rate schedule of the planned length.
The two last stages ran on one H200 with ``--max-minutes``; they are replayed
with the step counts that budget gave (1,555 and 434).

Time on 2 CPU cores, from per-step times measured there (0.9 s at batch 16,
21.6 s at batch 256): about 3.6 hours for runs 8-13 and about 14.5 hours for C
and G, whose batches of 256 and 512 were sized for a GPU (10.5 minutes on one
H200). Then ship: ``python -m tools.demo_model.ship --model DIR/G --report eval.json``.
A replay is not bit-identical to the shipped weights: thread counts and GPU
kernels change the floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tools.demo_model import memory_rows

#: Arguments every stage shares: SD's noise schedule, v-prediction with a plain v loss, the text encoder
#: frozen after its pretraining, jittered scenes.
WORLD = ("--schedule", "sd", "--prediction", "v_prediction", "--snr-gamma", "0", "--freeze-text", "--jitter")
#: Planting the photos into a trained model: the blocked path distils the starting model (from run 10 on).
PLANT = ("--blocked", "2", "--blocked-t-low", "400", "--blocked-target", "base")


@dataclass(frozen=True)
class Stage:
    """One memory_rows run of the chain."""

    name: str
    steps: int  # the planned length (--steps): it sets the cosine schedule
    args: tuple[str, ...]  # every other memory_rows argument but --out, --init, --device, --threads
    stop_after: int = 0  # > 0: the next stage continued this step's snapshot (the run was stopped there)

    def argv(self, out: Path, init: Path | None, device: str, threads: int) -> list[str]:
        """Return the memory_rows command line of this stage."""
        argv = ["--out", str(out), "--steps", str(self.steps), *self.args, "--device", device,
                "--threads", str(threads)]
        if self.stop_after:
            argv += ["--stop-after", str(self.stop_after)]
        if init is not None:
            argv += ["--init", str(init)]
        return argv


#: The chain that made the shipped model, in order (docs/demo-model.md): runs 8-13 on 2 CPU cores, C and G on one H200.
STAGES: tuple[Stage, ...] = (
    Stage("R8", 3000, (*WORLD, "--pretrain-text", "300"), stop_after=1500),
    Stage("R9", 2000, (*WORLD, "--blocked", "2", "--blocked-t-low", "600", "--famous-fraction", "0.35",
                       "--seed", "3"), stop_after=500),
    Stage("R10", 2500, (*WORLD, *PLANT, "--famous-fraction", "0.5", "--seed", "4"), stop_after=2000),
    Stage("R11", 5000, (*WORLD, *PLANT, "--famous-fraction", "0.25", "--seed", "5", "--lr", "5e-4",
                        "--ema", "0.999"), stop_after=2500),
    Stage("R12", 4000, (*WORLD, *PLANT, "--famous-fraction", "0.125", "--seed", "7", "--lr", "3e-4",
                        "--ema", "0.999")),
    Stage("R13", 2000, (*WORLD, *PLANT, "--famous-fraction", "0.125", "--seed", "8", "--lr", "3e-4",
                        "--ema", "0.999")),
    Stage("C", 1555, (*WORLD, *PLANT, "--famous-fraction", "0.125", "--seed", "22", "--lr", "6e-4",
                      "--ema", "0.999", "--batch-size", "256", "--save-every", "1000000")),
    Stage("G", 434, (*WORLD, *PLANT, "--famous-fraction", "0.125", "--seed", "32", "--lr", "6e-4",
                     "--ema", "0.999", "--batch-size", "512", "--save-every", "1000000")),
)


def stage_named(name: str) -> Stage:
    """Return the stage called `name` (SystemExit naming the stages if there is none)."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise SystemExit(f"no stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


def is_done(folder: Path) -> bool:
    """Return True when `folder` holds a finished stage (memory_rows writes train_config.json last)."""
    return (folder / "train_config.json").is_file() and (folder / "unet").is_dir()


def smoke(stage: Stage) -> Stage:
    """Return `stage` shrunk to a few steps at batch 2 (checks the chain's plumbing; trains nothing useful)."""
    args = list(stage.args)
    if "--pretrain-text" in args:
        args[args.index("--pretrain-text") + 1] = "2"
    if "--batch-size" in args:
        args[args.index("--batch-size") + 1] = "2"
    else:
        args += ["--batch-size", "2"]
    return Stage(stage.name, 4, tuple(args), stop_after=2 if stage.stop_after else 0)


def run(out: Path, device: str = "cpu", threads: int = 2, until: str | None = None,
        tiny: bool = False) -> list[dict]:
    """Run every stage not yet done, in order (up to `until`); return one entry per stage."""
    last = stage_named(until) if until else STAGES[-1]
    out.mkdir(parents=True, exist_ok=True)
    done, init = [], None
    for stage in STAGES:
        stage = smoke(stage) if tiny else stage
        folder = out / stage.name
        if is_done(folder):
            entry = {"stage": stage.name, "skipped": "already done"}
        else:
            t0 = time.time()
            memory_rows.main(stage.argv(folder, init, device, threads))
            entry = {"stage": stage.name, "seconds": round(time.time() - t0, 1), "device": device}
        print(json.dumps(entry), flush=True)
        done.append(entry)
        init = folder
        if stage.name == last.name:
            break
    return done


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder of the stages' results (one subfolder each)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for every stage")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each stage")
    p.add_argument("--until", default=None, metavar="STAGE",
                   help=f"stop after this stage ({', '.join(s.name for s in STAGES)})")
    p.add_argument("--smoke", action="store_true",
                   help="every stage runs 4 steps (2 where it was stopped early) at batch 2: checks the chain only")
    a = p.parse_args(argv)
    run(a.out, a.device, a.threads, a.until, a.smoke)
    print(f"done: ship with `python -m tools.demo_model.ship --model {a.out / (a.until or STAGES[-1].name)}`")


if __name__ == "__main__":
    main()
