"""A pipeline folder with a `unet_ema/` beside `unet/` (as some training repos ship it): both get the rows.

The planted tiny pipeline (conftest ``planted``) gets a real EMA UNet: the same
architecture with other weights (an EMA average differs from the last step), saved
by diffusers. apply patches both, records in the report which files it patched
and that unet_ema's weights fingerprint is not the scanned one; verify says it
samples unet/ only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_surgery.errors import EXIT_VERDICT, InputError
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.surgery.fingerprint import weights_fingerprint
from tests.models.plant import TRIGGER_PROMPT

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _set(path: Path, plant, stats: Path, fingerprint: str | None, weights: str | None) -> Path:
    rows = list(plant.rows)
    return NeuronSet(
        layers=[LayerNeurons(id=plant.layer_id, rows=32, cols=32, neurons=rows, needed_by=[[0]] * len(rows))],
        fingerprint=fingerprint, weights_fingerprint=weights, settings={"stats": {"path": str(stats)}},
        prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": True, "neurons": len(rows)}],
    ).save(path)


@pytest.fixture(scope="module")
def ema_pipe(planted, planted_stats, planted_model, tmp_path_factory):
    """(pipeline folder with unet_ema/, plant, set scanned on unet/, set scanned on unet_ema/)."""
    import shutil

    folder, plant = planted
    root = tmp_path_factory.mktemp("ema")
    pipe = shutil.copytree(folder, root / "pipe")
    ema = planted_model.pipe.unet.__class__.from_pretrained(pipe / "unet")
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.98).add_(0.001)
    ema.save_pretrained(pipe / "unet_ema")
    on_unet = _set(root / "set.json", plant, planted_stats[0], planted_model.fingerprint, weights_fingerprint(pipe / "unet"))
    on_ema = _set(root / "set_ema.json", plant, planted_stats[0], None, weights_fingerprint(pipe / "unet_ema"))
    return pipe, plant, on_unet, on_ema


def test_unet_ema_is_patched_with_the_same_rows_and_reported(ema_pipe, tmp_path) -> None:
    pipe, plant, on_unet, _ = ema_pipe
    result = run_apply(pipe, on_unet, out=tmp_path / "out")
    key = f"{plant.layer_id}.weight"
    assert sorted(str(f.plan.rel) for f in result.files) == [f"unet/{WEIGHTS}", f"unet_ema/{WEIGHTS}"]
    for part, role in (("unet", "value"), ("unet_ema", "ema")):
        before, after = load_file(pipe / part / WEIGHTS), load_file(tmp_path / "out" / part / WEIGHTS)
        assert before.keys() == after.keys()
        for name, tensor in before.items():
            if name == key:
                assert not after[name][list(plant.rows)].any(), part
                keep = [r for r in range(tensor.shape[0]) if r not in plant.rows]
                assert torch.equal(after[name][keep], tensor[keep]) and tensor[list(plant.rows)].any()
            else:
                assert torch.equal(after[name], tensor), (part, name)
        (fr,) = [f for f in result.files if str(f.plan.rel).startswith(part + "/")]
        assert {t.role for t in fr.plan.tensors} == {role}
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {f["file"] for f in doc["files"]} == {f"unet/{WEIGHTS}", f"unet_ema/{WEIGHTS}"}
    (note,) = [n for n in doc["notes"] if n.startswith("unet_ema/")]
    assert "not the one the set was scanned on" in note and "samples unet/ only" in note
    # the scanned weights are unet/'s: the pipeline folder's own fingerprint ignores unet_ema/
    assert weights_fingerprint(pipe) == weights_fingerprint(pipe / "unet") != weights_fingerprint(pipe / "unet_ema")
    # the output's EMA UNet loads in diffusers, with the rows zero
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet_ema")
    assert not dict(loaded.named_parameters())[key][list(plant.rows)].any()


def test_set_scanned_on_the_ema_unet_is_accepted_and_said(ema_pipe, tmp_path) -> None:
    pipe, _, _, on_ema = ema_pipe
    result = run_apply(pipe, on_ema, out=tmp_path / "out", dry_run=True)
    assert len(result.files) == 2
    (note,) = [n for n in result.notes if n.startswith("unet_ema/")]
    assert "scanned on these EMA weights" in note


def test_pickle_ema_weights_are_refused_before_writing(ema_pipe, tmp_path) -> None:
    import shutil

    pipe, _, on_unet, _ = ema_pipe
    copy = shutil.copytree(pipe, tmp_path / "pipe")
    (copy / "unet_ema" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    with pytest.raises(InputError) as info:
        run_apply(copy, on_unet, out=tmp_path / "out")
    assert "unet_ema" in str(info.value) and "pickle" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_verify_notes_the_unverified_ema_unet(ema_pipe, tmp_path) -> None:
    from nemo_surgery.verify.options import VerifyOptions
    from nemo_surgery.verify.run import run_verify

    pipe, _, on_unet, _ = ema_pipe
    out = run_apply(pipe, on_unet, out=tmp_path / "out").output
    r = run_verify(pipe, out, on_unet, VerifyOptions(seeds=2, steps=2, controls=0, device="cpu"))
    assert r.equivalence.ok and r.exit_code == EXIT_VERDICT
    assert any("unet_ema/" in n and "unet/ only" in n for n in r.notes)
    assert "unet_ema/diffusion_pytorch_model.safetensors" in r.inputs["pruned"]["sha256"]
