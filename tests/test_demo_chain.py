"""The demo model's training chain: its stages replay the shipped runs, and the runner chains and resumes them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_surgery.demo.paths import DEMO_RECIPE
from tools.demo_model import chain, memory_rows


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_the_last_stage_is_the_shipped_training_config():
    shipped = json.loads(DEMO_RECIPE.read_text())["training"]
    last = chain.STAGES[-1]
    cfg, _ = memory_rows.parse(last.argv(Path("out"), Path("init"), "cpu", 2))
    mine = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    # init is a local path of the shipped run; max_minutes cut it to the step count the stage names
    different = {k for k, v in shipped.items() if k not in ("init", "max_minutes") and mine.get(k) != v}
    assert different == set()
    assert last.steps == shipped["steps"] == 434
    assert [s.name for s in chain.STAGES] == ["R8", "R9", "R10", "R11", "R12", "R13", "C", "G"]


def test_stop_after_is_the_snapshot_of_the_planned_run(tmp_path):
    torch.set_num_threads(1)
    common = ["--batch-size", "2", "--famous-fraction", "0.5", "--log-every", "1"]
    memory_rows.main(["--out", str(tmp_path / "full"), "--steps", "4", *common, "--save-every", "2"])
    memory_rows.main(["--out", str(tmp_path / "stopped"), "--steps", "4", *common, "--stop-after", "2"])
    memory_rows.main(["--out", str(tmp_path / "short"), "--steps", "2", *common])
    log = {name: json.loads((tmp_path / name / "train_config.json").read_text())["log"]
           for name in ("full", "stopped", "short")}
    # the stopped run took the planned run's first two steps, at the planned run's learning rates ...
    assert [(e["step"], e["lr"]) for e in log["stopped"]] == [(e["step"], e["lr"]) for e in log["full"][:2]]
    # ... which a 2-step run does not (its schedule decays sooner)
    assert log["short"][1]["lr"] < log["stopped"][1]["lr"]
    # and its weights are the planned run's step-2 snapshot (up to float noise between two runs: ~5e-5 here)
    stopped, full_at_2 = _unet(tmp_path / "stopped"), _unet(tmp_path / "full" / "steps" / "2")
    assert stopped.keys() == full_at_2.keys()
    assert max((stopped[k] - full_at_2[k]).abs().max().item() for k in stopped) < 1e-3
    summary = json.loads((tmp_path / "stopped" / "train_config.json").read_text())
    assert summary["step"] == 2 and summary["config"]["steps"] == 4 and summary["config"]["stop_after"] == 2
    assert len(log["full"]) == 4


def test_chain_runs_its_stages_in_order_and_resumes(tmp_path, capsys):
    torch.set_num_threads(1)
    first = chain.run(tmp_path, until="R9", tiny=True, threads=1)
    assert [e["stage"] for e in first] == ["R8", "R9"] and all("seconds" in e for e in first)
    r8 = json.loads((tmp_path / "R8" / "train_config.json").read_text())
    r9 = json.loads((tmp_path / "R9" / "train_config.json").read_text())
    assert r8["step"] == 2 and r8["config"]["steps"] == 4 and r8["config"]["pretrain_text"] == 2
    assert r9["config"]["init"] == str(tmp_path / "R8") and r9["config"]["seed"] == 3
    # a finished stage is skipped; an unfinished one (no train_config.json) runs again
    (tmp_path / "R9" / "train_config.json").unlink()
    again = chain.run(tmp_path, until="R9", tiny=True, threads=1)
    assert again[0] == {"stage": "R8", "skipped": "already done"} and "seconds" in again[1]
    with pytest.raises(SystemExit, match="no stage 'R7'; the stages are R8, R9"):
        chain.run(tmp_path, until="R7")
