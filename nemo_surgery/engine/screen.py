"""`detect`: screen many prompts for memorization (detection only, no localization), resumable.

Prompts are scored many per UNet call (``batch_size`` samples = prompts x
seeds per call), all seed pairs of a chunk in one MS-SSIM call, and judged by
THE rule (:func:`nemo_surgery.engine.detection.decide_many`). One JSONL record
per prompt is appended durably as soon as its chunk is done, so an
interrupted screen resumes where it stopped; the flagged prompts are written
as a prompt file that ``scan`` takes next.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_surgery.atomic import atomic_open
from nemo_surgery.engine.detection import decide_many, rule_text
from nemo_surgery.engine.model import LoadedModel
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.records import RecordLog
from nemo_surgery.engine.score import Scorer, pairwise_indices
from nemo_surgery.engine.ssim import ms_ssim
from nemo_surgery.engine.stats import Stats, check_stats_match
from nemo_surgery.errors import InputError
from nemo_surgery.provenance import sha256_file


@dataclass
class Screened:
    """One prompt's detection record."""

    index: int
    prompt: str
    memorized: bool
    detection: dict[str, Any]
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        """Return the record as JSON."""
        return {"type": "detect", "index": self.index, "prompt": self.prompt, "memorized": self.memorized,
                "truncated": self.truncated, "detection": self.detection}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Screened:
        """Rebuild a record from JSON."""
        return cls(doc["index"], doc["prompt"], doc["memorized"], doc["detection"], doc.get("truncated", False))


@dataclass
class ScreenSummary:
    """Outcome of a screening run."""

    records: str
    flagged_file: str
    prompts: int
    flagged: int
    resumed: int
    seconds: float
    prompts_per_second: float
    unet_calls: int
    samples_per_call: float
    rule: str
    results: list[Screened] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Return the summary as JSON (without the per-prompt records, which are in the records file)."""
        return {k: v for k, v in self.__dict__.items() if k != "results"}


def pairwise_batch(deltas: torch.Tensor, scorer: Scorer) -> torch.Tensor:
    """Pairwise MS-SSIM matrices of P prompts' seeds: [P, N, C, H, W] -> [P, N, N], one MS-SSIM call."""
    p, n = deltas.shape[:2]
    i, j = pairwise_indices(n)
    values = ms_ssim(deltas[:, i].flatten(0, 1), deltas[:, j].flatten(0, 1), scorer.settings.ssim).view(p, -1).cpu()
    mats = torch.eye(n).repeat(p, 1, 1)
    mats[:, i, j] = values
    mats[:, j, i] = values
    return mats


def write_flagged(path: Path, results: list[Screened]) -> Path:
    """Write the flagged prompts as a prompt file: JSONL for ``.jsonl``, else one prompt per line."""
    flagged = [r for r in sorted(results, key=lambda r: r.index) if r.memorized]
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps({"prompt": r.prompt, "source_index": r.index}) + "\n" for r in flagged)
    else:
        multi = [r.index for r in flagged if "\n" in r.prompt or "\r" in r.prompt]
        if multi:
            raise InputError(f"{path}: flagged prompt {multi[0]} spans several lines; write the flagged prompts to a .jsonl file")
        text = "# prompts flagged as memorized by nemo-surgery detect\n" + "".join(r.prompt + "\n" for r in flagged)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return path


def run_detect(
    model: LoadedModel,
    stats: Stats,
    stats_path: str | Path,
    prompts: list[Prompt],
    records: str | Path,
    flagged_out: str | Path,
    batch_size: int = 64,
    resume: bool = False,
    force: bool = False,
    on_chunk=None,
) -> ScreenSummary:
    """Screen ``prompts`` with the statistics' calibrated rule; stream records; write the flagged prompt file.

    ``on_chunk(n)`` is called after every chunk of n prompts (progress).
    """
    records, flagged_out = Path(records), Path(flagged_out)
    if not (resume or force):
        for path in (records, flagged_out):
            if path.exists():
                raise InputError(f"{path}: exists; pass --resume to continue that screen or --force to start over")
    check_stats_match(stats, model, stats_path)
    log = RecordLog(records, {"fingerprint": model.fingerprint, "stats_sha256": sha256_file(stats_path),
                              "layers": None, "settings": {"score": stats.settings.to_json(), "fpr": stats.fpr}},
                    kind="detect", parse=Screened.from_json)
    done: list[Screened] = log.load() if resume and records.exists() else []
    if not done:
        log.start()
    finished = {(r.index, r.prompt) for r in done}
    todo = [p for p in prompts if (p.index, p.text) not in finished]
    scorer = Scorer(model, model.layers, stats.settings, batch_size=batch_size)
    per_call = max(1, batch_size // stats.settings.seeds)
    calibration = stats.calibration
    started = time.perf_counter()
    results = list(done)
    for start in range(0, len(todo), per_call):
        chunk = todo[start : start + per_call]
        cond = model.encode([p.text for p in chunk])
        verdicts = decide_many(pairwise_batch(scorer.noise_differences(cond), scorer), calibration)
        screened = [Screened(prompt.index, prompt.text, verdict.memorized, verdict.to_json(),
                             bool(cond.truncated[k]) if cond.truncated else False)
                    for k, (prompt, verdict) in enumerate(zip(chunk, verdicts))]
        log.extend(screened)
        results.extend(screened)
        if on_chunk is not None:
            on_chunk(len(chunk))
    seconds = time.perf_counter() - started
    wanted = {(p.index, p.text) for p in prompts}
    results = sorted((r for r in results if (r.index, r.prompt) in wanted), key=lambda r: r.index)
    write_flagged(flagged_out, results)
    calls = scorer.counter.calls
    return ScreenSummary(
        records=str(records),
        flagged_file=str(flagged_out),
        prompts=len(results),
        flagged=sum(r.memorized for r in results),
        resumed=len(done),
        seconds=round(seconds, 3),
        prompts_per_second=round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0,
        unet_calls=calls,
        samples_per_call=round(scorer.counter.samples / calls, 2) if calls else 0.0,
        rule=rule_text(calibration),
        results=results,
    )
