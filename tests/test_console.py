"""Human output: tables are not cut in logs; progress shows counts, ETA and live work inside an item."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from nemo_surgery.console import progress_columns

ROOT = Path(__file__).resolve().parents[1]
LONG_ID = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"


def test_tables_are_not_cut_when_stderr_is_a_log():
    code = (
        "from rich.table import Table\n"
        "from nemo_surgery.console import console\n"
        "t = Table('layer', 'rows', 'cols', 'neurons', 'verdict')\n"
        f"t.add_row('{LONG_ID}', '640', '768', '3, 7, 12, 97', 'mitigated')\n"
        "console.print(t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert LONG_ID in run.stderr and "mitigated" in run.stderr


def test_progress_shows_count_eta_and_live_text():
    calls = {"n": 0}
    out = io.StringIO()
    bar = Progress(*progress_columns(lambda: f"{calls['n']} UNet calls"), console=Console(file=out, width=160,
                   force_terminal=False), auto_refresh=False)
    task = bar.add_task("prompts", total=5)
    bar.advance(task, 2)
    calls["n"] = 37
    bar.console.print(bar.get_renderable())
    text = out.getvalue()
    assert "2/5" in text and "ETA" in text and "37 UNet calls" in text


def test_loaded_model_counts_unet_calls(planted_model):
    from nemo_surgery.engine.model import LoadedModel
    from nemo_surgery.engine.score import Scorer, ScoreSettings

    before, total_before = planted_model.unet_calls, LoadedModel.all_unet_calls
    scorer = Scorer(planted_model, planted_model.layers, ScoreSettings(seeds=3), batch_size=2)
    scorer.noise_differences(planted_model.encode(["a photo of a dog"]))
    assert planted_model.unet_calls - before == 2 == scorer.counter.calls
    assert LoadedModel.all_unet_calls - total_before == 2
