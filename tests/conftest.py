"""Shared fixtures: a real tiny pipeline with planted memorization, its statistics, prompt files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cli_cmd() -> list[str]:
    """The CLI as a subprocess command, with this interpreter (the console script's entry point)."""
    return [sys.executable, "-m", "nemo_surgery"]


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(folder, Plant): a saved diffusers pipeline whose 'astronaut' prompts are memorized."""
    from tests.models.plant import build_planted_pipeline
    from tests.models.tiny import save_pipeline

    folder = tmp_path_factory.mktemp("planted") / "pipe"
    pipe, plant = build_planted_pipeline()
    save_pipeline(pipe, folder)
    return folder, plant


@pytest.fixture(scope="session")
def holdout_file(tmp_path_factory) -> Path:
    """A hold-out prompt file (ordinary, non-memorized prompts)."""
    from tests.models.plant import ORDINARY_PROMPTS

    path = tmp_path_factory.mktemp("prompts") / "holdout.txt"
    path.write_text("# ordinary prompts\n" + "\n".join(ORDINARY_PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def planted_model(planted):
    """The planted pipeline loaded the way the CLI loads it."""
    from nemo_surgery.engine.model import load_model

    return load_model(planted[0], device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def planted_stats(planted, planted_model, holdout_file):
    """(path, Stats) computed on the planted model with the detection defaults."""
    from nemo_surgery.engine.prompts import read_prompts
    from nemo_surgery.engine.score import ScoreSettings
    from nemo_surgery.engine.ssim import SSIMConfig
    from nemo_surgery.engine.stats import compute_stats

    _, h, w = planted_model.latent_shape
    settings = ScoreSettings(ssim=SSIMConfig.fit(h, w))
    prompts = [p.text for p in read_prompts(holdout_file)]
    stats = compute_stats(planted_model, prompts, settings, batch_size=40)
    path = planted[0].parent / "stats.json"
    stats.save(path)
    return path, stats


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
