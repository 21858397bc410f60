"""Screening (`detect`): many prompts per UNet call, the rule of engine/detection.py, resumable records, flagged file."""

import json
import subprocess

import pytest
import torch

from nemo_surgery.engine.detection import decide
from nemo_surgery.engine.prompts import Prompt, read_prompts
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.screen import pairwise_batch, run_detect
from nemo_surgery.errors import InputError
from tests.models.plant import TRIGGER_PROMPT

TEXTS = [TRIGGER_PROMPT, "a photo of a dog", "an astronaut on the moon", "a small black cat on a red house",
         "a bowl of fruit", "the astronaut walks"]


def _prompts(texts):
    return [Prompt(index=i, text=t, line=i + 1) for i, t in enumerate(texts)]


def test_batched_screen_equals_the_rule_per_prompt_and_flags_the_trigger(planted_model, planted_stats, tmp_path):
    stats_path, stats = planted_stats
    records, flagged = tmp_path / "d.jsonl", tmp_path / "flagged.txt"
    summary = run_detect(planted_model, stats, stats_path, _prompts(TEXTS), records, flagged, batch_size=40)
    got = {r.prompt: r.memorized for r in summary.results}
    assert got == {t: "astronaut" in t for t in TEXTS}
    assert [p.text for p in read_prompts(flagged)] == [t for t in TEXTS if "astronaut" in t]  # scan's input
    # four prompts x 10 seeds per UNet call; the verdicts equal the one-prompt rule
    assert summary.unet_calls == 2 and summary.samples_per_call == 30.0
    scorer = Scorer(planted_model, planted_model.layers, stats.settings, batch_size=10)
    one = decide(scorer.pairwise(scorer.noise_differences(planted_model.encode([TEXTS[1]]))[0]), stats.calibration)
    assert summary.results[1].detection["agreement"] == pytest.approx(one.agreement, abs=1e-5)


def test_pairwise_batch_matches_per_prompt_matrices(planted_model, planted_stats):
    _, stats = planted_stats
    scorer = Scorer(planted_model, planted_model.layers, stats.settings, batch_size=40)
    deltas = scorer.noise_differences(planted_model.encode(TEXTS[:3]))
    torch.testing.assert_close(pairwise_batch(deltas, scorer), torch.stack([scorer.pairwise(d).cpu() for d in deltas]))


def test_resume_continues_after_a_torn_line_and_refuses_to_overwrite(planted_model, planted_stats, tmp_path):
    stats_path, stats = planted_stats
    records, flagged = tmp_path / "d.jsonl", tmp_path / "flagged.jsonl"
    run_detect(planted_model, stats, stats_path, _prompts(TEXTS[:4]), records, flagged, batch_size=20)
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:3]) + lines[3][:25])  # header, two records, a torn third
    with pytest.raises(InputError, match="pass --resume"):
        run_detect(planted_model, stats, stats_path, _prompts(TEXTS), records, flagged)
    summary = run_detect(planted_model, stats, stats_path, _prompts(TEXTS), records, flagged, batch_size=20, resume=True)
    assert summary.resumed == 2 and summary.prompts == 6 and summary.unet_calls == 2  # 4 prompts left, 2 per call
    docs = [json.loads(line) for line in records.read_text().splitlines()]
    assert [d["index"] for d in docs if d["type"] == "detect"] == list(range(6))
    assert [json.loads(line)["prompt"] for line in flagged.read_text().splitlines()] == [t for t in TEXTS if "astronaut" in t]


def test_detect_cli_writes_records_and_the_flagged_prompt_file(planted, planted_stats, tmp_path, cli_cmd):
    folder, _ = planted
    stats_path, _ = planted_stats
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    flagged, records = tmp_path / "f.txt", tmp_path / "r.jsonl"
    args = ["detect", prompts, "--model", folder, "--stats", stats_path, "--out", records, "--flagged", flagged,
            "--device", "cpu", "--json"]
    proc = subprocess.run(cli_cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["prompts"], summary["flagged"]) == (6, 3) and summary["prompts_per_second"] > 0
    assert "memorized when" in summary["rule"]
    assert [p.text for p in read_prompts(flagged)] == [t for t in TEXTS if "astronaut" in t]
    proc = subprocess.run(cli_cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr
