"""verify and apply's built-in verify on single-file (LDM / A1111 / ComfyUI) checkpoints, with --config.

The planted tiny pipeline (conftest ``planted``) is written as one LDM-layout
.safetensors file plus a weight-less config folder; the set blocks the planted
rows. Runs are kept short (2 seeds, 3 DDIM steps, 1 control): these tests check
loading, equivalence, report placement and the refusals, not the verdict.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_surgery.errors import EXIT_VERDICT, InputError
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet
from nemo_surgery.verify.options import VerifyOptions
from tests.models.plant import TRIGGER_PROMPT

QUICK = {"seeds": 2, "steps": 3, "controls": 1, "batch_size": 16, "device": "cpu"}


def _set(path: Path, stats: Path, fingerprint: str, layer_id: str, rows: list[int]) -> Path:
    ns = NeuronSet(
        layers=[LayerNeurons(id=layer_id, rows=32, cols=32, neurons=rows, needed_by=[[0]] * len(rows))],
        fingerprint=fingerprint,
        settings={"stats": {"path": str(stats)}},
        prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": True, "neurons": len(rows)}],
    )
    return ns.save(path)


@pytest.fixture(scope="module")
def single(planted, planted_stats, tmp_path_factory):
    """The planted model as an LDM single file + config folder, the right and a wrong set, both applied."""
    from nemo_surgery.engine.model import load_model
    from nemo_surgery.surgery.apply import run_apply
    from tests.models.single_file import write_config_folder, write_single_file

    folder, plant = planted
    root = tmp_path_factory.mktemp("verify_single")
    model = load_model(folder, device="cpu", with_vae=True)
    ckpt = write_single_file(model.pipe, root / "model.safetensors")
    config = write_config_folder(folder, root / "config")
    good = _set(root / "good.json", planted_stats[0], model.fingerprint, plant.layer_id, list(plant.rows))
    wrong = _set(root / "wrong.json", planted_stats[0], model.fingerprint, plant.layer_id, [0, 1])
    return {
        "root": root, "folder": folder, "ckpt": ckpt, "config": config, "good": good, "wrong": wrong, "plant": plant,
        "stats": planted_stats[0],
        "pruned": run_apply(ckpt, good, out=root / "model-nemo.safetensors").output,
        "pruned_wrong": run_apply(ckpt, wrong, out=root / "model-wrong.safetensors").output,
        "pruned_folder": run_apply(folder, good, out=root / "pipe-nemo").output,
    }


def test_verify_single_files_matches_the_folder_run(single) -> None:
    """ORIGINAL and PRUNED as single files: equivalent, report beside PRUNED, the same numbers as the folders."""
    from nemo_surgery.verify.run import run_verify

    s = single
    r = run_verify(s["ckpt"], s["pruned"], s["good"], VerifyOptions(config=s["config"], **QUICK))
    assert r.equivalence.ok and r.equivalence.rows_zero and r.equivalence.max_abs_diff <= 1e-5
    assert r.exit_code == EXIT_VERDICT and r.verdict == "unverified"  # no --holdout: missing evidence, not failure
    report = s["pruned"].with_name("model-nemo.safetensors.nemo_report")
    doc = json.loads((report / "report.json").read_text())
    assert doc["inputs"]["original"]["sha256"] == {"model.safetensors": r.inputs["original"]["sha256"]["model.safetensors"]}
    assert doc["inputs"]["config"]["path"] == str(s["config"])
    # the same model as the pipeline folders: identical samples, hence identical per-seed SSIMs
    f = run_verify(s["folder"], s["pruned_folder"], s["good"], VerifyOptions(report=s["root"] / "rep_folder", **QUICK))
    assert f.checks[0].copy.after == pytest.approx(r.checks[0].copy.after, abs=1e-6)
    assert f.checks[0].copy.before == pytest.approx(r.checks[0].copy.before, abs=1e-6)


def test_equivalence_on_single_files_catches_a_wrong_file(single) -> None:
    """A single file pruned with other rows is not the hooked original: rows not zero, predictions differ."""
    from nemo_surgery.verify.equivalence import check_equivalence
    from nemo_surgery.verify.run import load_for_verify

    s = single
    options = VerifyOptions(config=s["config"], device="cpu")
    orig = load_for_verify(s["ckpt"], options)
    blocked = {s["plant"].layer_id: list(s["plant"].rows)}
    x = torch.randn(2, *orig.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(900)
    right = check_equivalence(orig, load_for_verify(s["pruned"], options), blocked, [TRIGGER_PROMPT], x, t)
    wrong = check_equivalence(orig, load_for_verify(s["pruned_wrong"], options), blocked, [TRIGGER_PROMPT], x, t)
    assert right.ok and right.max_abs_diff <= 1e-5
    assert not wrong.ok and not wrong.rows_zero and wrong.max_abs_diff > 100 * right.tolerance


def test_single_file_without_config_is_refused_before_writing(single, tmp_path, monkeypatch) -> None:
    """No --config and nothing cached: verify and apply fail with one line naming --config and the cache."""
    from nemo_surgery.verify.run import run_verify
    from nemo_surgery.workflow import apply_and_verify

    s = single
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError) as info:
        run_verify(s["ckpt"], s["pruned"], s["good"], VerifyOptions(report=tmp_path / "rep", **QUICK))
    message = str(info.value)
    assert "--config" in message and "cache" in message and "\n" not in message
    assert not (tmp_path / "rep").exists()
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError) as info:
        apply_and_verify(s["ckpt"], s["good"], out=out, verify=VerifyOptions(**QUICK))
    assert "--config" in str(info.value) and "--no-verify" in str(info.value)
    assert not out.exists()
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    folders = CliRunner().invoke(main, ["verify", str(s["folder"]), str(s["pruned_folder"]), "--neurons",
                                        str(s["good"]), "--config", str(s["config"]), "--device", "cpu"])
    lines = [line for line in folders.stderr.splitlines() if line.strip()]
    assert folders.exit_code == 2 and len(lines) == 1 and "only used with single-file" in lines[0], folders.stderr
    other = _set(tmp_path / "other.json", s["stats"], "f" * 64, s["plant"].layer_id, [3])
    with pytest.raises(InputError, match="found on another model"):  # a set of other weights: before writing
        apply_and_verify(s["ckpt"], other, out=out, verify=VerifyOptions(config=s["config"], stats=s["stats"]))
    assert not out.exists()
    with pytest.raises(InputError, match="only used with single-file"):  # apply: before writing anything
        apply_and_verify(s["folder"], s["good"], out=tmp_path / "pipe-out", verify=VerifyOptions(config=s["config"]))
    assert not (tmp_path / "pipe-out").exists()
    with pytest.raises(InputError, match="holding UNet, VAE and text encoder"):
        run_verify(s["ckpt"], s["root"] / "good.json", s["good"], VerifyOptions(config=s["config"], **QUICK))


def test_cli_apply_single_file_runs_its_verification(single, tmp_path, cli_cmd) -> None:
    """The CLI as a subprocess: `apply CKPT.safetensors --config DIR` patches, then verifies against CKPT."""
    s = single
    out = tmp_path / "applied.safetensors"
    run = subprocess.run([*cli_cmd, "apply", str(s["ckpt"]), "--neurons", str(s["good"]), "-o", str(out),
                          "--config", str(s["config"]), "--seeds", "2", "--steps", "3", "--controls", "1",
                          "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == EXIT_VERDICT, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["verify"]["verdict"] == "unverified" and doc["verify"]["equivalence_max_abs_diff"] <= 1e-5
    report = tmp_path / "applied.safetensors.nemo_report" / "report.json"
    assert json.loads(report.read_text())["inputs"]["pruned"]["path"] == str(out)
    assert out.read_bytes() == s["pruned"].read_bytes() and "equivalent" in run.stderr


def test_ema_copies_in_a_single_file_are_noted(single, tmp_path) -> None:
    """An LDM file with model_ema.* copies: apply patched them, verify samples the non-EMA UNet and says so."""
    from nemo_surgery.verify.inputs import ema_notes
    from tests.checkpoint_fixtures import write_ldm_file

    (note,) = ema_notes(write_ldm_file(tmp_path / "with_ema.safetensors", ema=True))
    assert "model_ema" in note and "not verified" in note
    assert ema_notes(write_ldm_file(tmp_path / "no_ema.safetensors", ema=False)) == []
    assert ema_notes(single["pruned"]) == [] and ema_notes(single["pruned_folder"]) == []
