"""Regression test of issue 15: memorization spread over many neurons; a small set lowers the first-step score
below tau but full samples still copy. verify must say exit 3 with the reason, with and without training images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats import compute_stats
from nemo_surgery.errors import EXIT_VERDICT
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.verify.options import VerifyOptions
from nemo_surgery.verify.run import run_verify
from nemo_surgery.verify.sampling import sample_images
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT
from tests.models.spread import build_spread_pipeline
from tests.models.tiny import save_pipeline

KW = {"seeds": 6, "steps": 10, "batch_size": 32, "controls": 1, "holdout_seeds": 4, "device": "cpu"}


@pytest.fixture(scope="session")
def spread(tmp_path_factory):
    """The spread model, its statistics, the small 'found' set (the 4 strong rows) applied, a training image."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("spread")
    pipe, plant = build_spread_pipeline()
    folder = save_pipeline(pipe, root / "orig")
    model = load_model(folder, device="cpu", with_vae=True)
    _, h, w = model.latent_shape
    stats_path = compute_stats(model, list(ORDINARY_PROMPTS), ScoreSettings(ssim=SSIMConfig.fit(h, w))).save(
        root / "stats.json")
    (root / "hold.txt").write_text("\n".join(ORDINARY_PROMPTS) + "\n")
    ns = NeuronSet(layers=[LayerNeurons(id=plant.layer_id, rows=32, cols=32, neurons=list(plant.rows))],
                   fingerprint=model.fingerprint, settings={"stats": {"path": str(stats_path)}},
                   prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": True}])
    neurons = ns.save(root / "set.json")
    pruned = run_apply(folder, neurons, out=root / "pruned").output
    from PIL import Image

    train = root / "train"  # the 'training image': what the original reproduces for the trigger
    train.mkdir()
    image = sample_images(model, model.encode([TRIGGER_PROMPT]), VerifyOptions(seeds=2, seed=77, steps=10).sampling)
    Image.fromarray((image[0, 0].numpy() * 255 + 0.5).astype(np.uint8)).save(train / "0.png")
    return {"root": root, "orig": folder, "pruned": pruned, "neurons": neurons, "train": train}


def test_first_step_score_falls_but_seeds_still_copy_medoid_reference(spread) -> None:
    r = run_verify(spread["orig"], spread["pruned"], spread["neurons"],
                   VerifyOptions(holdout=spread["root"] / "hold.txt", **KW))
    (check,) = r.checks
    # the pattern of issue 15: NeMo's first-step score falls below tau on fresh seeds ...
    assert check.detection_before["mean_pairwise"] > r.tau > check.detection_after["mean_pairwise"]
    # ... yet every fresh seed still copies the original's own memorized output
    assert check.copy.reference.startswith("medoid") and check.copy.copies_after == len(check.copy.after)
    assert r.copy_threshold.calibrated and min(check.copy.after) >= r.copy_threshold.value
    assert r.exit_code == EXIT_VERDICT and r.verdict == "NOT verified" and check.status == "STILL MEMORIZED"
    assert any("fresh seeds still copy the medoid" in reason for reason in r.reasons)


def test_first_step_score_falls_but_seeds_still_copy_training_image_cli(spread, tmp_path) -> None:
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    run = CliRunner().invoke(main, ["verify", str(spread["orig"]), str(spread["pruned"]), "--neurons",
                                    str(spread["neurons"]), "--holdout", str(spread["root"] / "hold.txt"),
                                    "--train-images", str(spread["train"]), "--report", str(tmp_path / "rep"), "--json",
                                    *[f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]])
    assert run.exit_code == EXIT_VERDICT, run.output
    doc = json.loads(run.stdout)
    (prompt,) = doc["prompts"]
    assert prompt["status"] == "STILL MEMORIZED" and prompt["copies_after"] == prompt["seeds"]
    assert prompt["detection_after"] < json.loads((tmp_path / "rep" / "report.json").read_text())["thresholds"]["tau"]["value"]
    assert any("fresh seeds still copy the training image" in r for r in doc["reasons"])
    assert "NOT verified" in run.stderr
