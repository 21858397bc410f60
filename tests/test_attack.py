"""The adaptive-attack robustness probe on the shipped demo model (a real, trained, memorizing tiny pipeline).

The demo model copies its astronaut training image. The probe is exercised both ways on
prunings built for the purpose: an empty pruning (the memorization is intact, so the
attacked "pruned" model copies as easily as the original: shallow) and a pruning of every
value row (the conditioning no longer reaches the UNet, so no conditioning can bring the
image back: robust). The planted test model is not used here: it is not a denoiser (its
denoising loss toward its own trigger sample is 55 against 15 for an ordinary prompt), so
a denoising-loss attack has no meaning on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_surgery.demo.paths import DEMO_MODEL_DIR, DEMO_RECIPE, DEMO_TRAIN_IMAGES
from nemo_surgery.engine.model import load_model
from nemo_surgery.verify.attack import AttackSettings, attack_prompts
from nemo_surgery.verify.attack_probe import ROBUST, SHALLOW, attack_verdict, control_image, run_probe
from nemo_surgery.verify.metrics import load_image
from nemo_surgery.verify.sampling import SampleSettings

ASTRONAUT = "a portrait of an astronaut"
CONTROL = "a large black ring at the top on a yellow background"  # a hold-out scene of the demo's world
FAST_SAMPLING = SampleSettings(seeds=2, seed=0, steps=8, guidance=3.0, batch_size=16)


@pytest.fixture(scope="module")
def demo():
    """(model, training image [1, H, W, 3] at the model's sample size, memorized and control conditionings)."""
    torch.set_num_threads(1)
    model = load_model(DEMO_MODEL_DIR, device="cpu", with_vae=True)
    _, h, w = model.latent_shape  # the demo is in pixel space: latents are the image
    image = load_image(DEMO_TRAIN_IMAGES / "0.png", h, w)[None]
    return model, image, model.encode([ASTRONAUT]), model.encode([CONTROL])


def test_verdict_rule_both_ways() -> None:
    # the attacked pruned model copies and lands near the original: shallow
    assert attack_verdict(0.8, 0.9, 0.1, threshold=0.3) == SHALLOW
    # it stays below the copy threshold: robust, whatever the original does
    assert attack_verdict(0.25, 0.9, 0.0, threshold=0.3) == ROBUST
    # it reaches the threshold, but so does the never-memorized control: nothing specific came back
    assert attack_verdict(0.45, 0.95, 0.5, threshold=0.3) == ROBUST
    # exactly halfway between control and original counts as near the original
    assert attack_verdict(0.5, 0.8, 0.2, threshold=0.3) == SHALLOW


def test_control_image_keeps_content_changes_layout() -> None:
    rng = np.random.default_rng(0)
    square, wide = rng.random((8, 8, 3)), rng.random((6, 10, 3))
    rotated = control_image(square)
    assert rotated.shape == square.shape and np.allclose(rotated, np.rot90(square))
    assert np.allclose(np.sort(rotated.ravel()), np.sort(square.ravel())) and not np.allclose(rotated, square)
    assert np.allclose(control_image(wide), wide[::-1, ::-1])


def test_attack_lowers_the_loss_toward_the_training_image(demo) -> None:
    """On the demo pruned by the astronaut's 3 planted rows, 10 Adam steps lower the fixed-noise loss toward the image."""
    model, image, memorized, _ = demo
    rows = json.loads(DEMO_RECIPE.read_text())["memory_rows_by_item"][0]
    settings = AttackSettings(steps=10, lr=0.1, batch=4, every=10)
    once = SampleSettings(seeds=1, seed=0, steps=2, guidance=3.0, batch_size=4)
    start = memorized.hidden.clone()
    (trace,) = attack_prompts(model, memorized, image, settings, once, prompts=[ASTRONAUT], blocked=rows)
    assert torch.equal(memorized.hidden, start)  # the caller's conditioning is not modified
    assert len(trace.losses) == 10 and trace.checkpoints == [0, 10]
    assert trace.embedding_change > 0.01
    assert trace.loss_after < 0.97 * trace.loss_before, (trace.loss_before, trace.loss_after)


@pytest.fixture(scope="module")
def probes(demo):
    """The probe with an empty pruning and with every value row pruned (same attack settings)."""
    model, image, memorized, control = demo
    every_row = {layer.id: list(range(layer.rows)) for layer in model.layers}
    settings = AttackSettings(steps=4, lr=0.1, batch=4, every=2)
    return {name: run_probe(model, model, memorized, control, [(0, ASTRONAUT, CONTROL)], image, settings,
                            FAST_SAMPLING, 0.3, "test threshold", blocked_pruned=blocked)
            for name, blocked in (("empty", {}), ("every row", every_row))}


def test_probe_shallow_when_memorization_is_intact(probes) -> None:
    probe = probes["empty"]
    case = probe.cases[0]
    s = {name: t.best for name, t in case.traces.items()}
    assert s["pruned"] >= 0.3 and s["control"] < 0.3, s
    assert case.verdict == SHALLOW and probe.verdict == SHALLOW
    assert [i for i, _ in probe.findings()] == [0] and "shallow" in probe.findings()[0][1]
    assert case.control_to_train < 0.3  # the control target is not the training image


def test_probe_robust_when_no_conditioning_reaches_the_unet(probes) -> None:
    probe = probes["every row"]
    case = probe.cases[0]
    pruned, original = case.traces["pruned"], case.traces["original"]
    assert original.best >= 0.3  # the attack works where memorization is intact ...
    assert pruned.best < 0.3 and pruned.embedding_change < 1e-6  # ... and has no handle here
    assert pruned.loss_after == pytest.approx(pruned.loss_before)
    assert case.verdict == ROBUST and probe.verdict == ROBUST and probe.findings() == []
    doc = probe.to_json()
    assert doc["verdict"] == ROBUST and doc["prompts"][0]["pruned"]["checkpoints"] == [0, 2, 4]
    assert len(doc["prompts"][0]["control"]["checkpoint_similarity"]) == 3
    assert set(probe.images()) == {f"attack/0/{k}" for k in ("pruned", "original", "control", "train_image",
                                                              "control_target")}


def _demo_set(path, model, layer_id: str, rows: list[int]):
    """A neuron set of the demo model (its statistics recorded) with ``rows`` of one value layer."""
    from nemo_surgery.demo.paths import DEMO_STATS
    from nemo_surgery.neuron_set import LayerNeurons, NeuronSet

    layer = next(la for la in model.layers if la.id == layer_id)
    ns = NeuronSet(layers=[LayerNeurons(id=layer_id, rows=layer.rows, cols=layer.cols, neurons=rows,
                                        needed_by=[[0]] * len(rows))],
                   fingerprint=model.fingerprint, settings={"stats": {"path": str(DEMO_STATS)}},
                   prompts=[{"index": 0, "prompt": ASTRONAUT, "memorized": True, "mitigated": True,
                             "neurons": len(rows)}])
    return ns.save(path)


def test_cli_verify_attack_shallow_warns_or_fails(demo, tmp_path, cli_cmd) -> None:
    """`verify --attack` end to end: a pruning that leaves the memorization (one row nothing was planted in) is shallow.

    Without --require-robust the finding is a warning note and no reason; with it, the
    prompt fails with the attack's numbers. Report JSON, HTML chart and model card carry it.
    """
    import subprocess

    from nemo_surgery.surgery.apply import run_apply

    model = demo[0]
    layer_id = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    planted = {(name, r) for item in json.loads(DEMO_RECIPE.read_text())["memory_rows_by_item"]
               for name, rows in item.items() for r in rows}
    assert (layer_id, 0) not in planted
    neurons = _demo_set(tmp_path / "set.json", model, layer_id, [0])
    pruned = run_apply(DEMO_MODEL_DIR, neurons, out=tmp_path / "pruned").output
    (tmp_path / "prompts.txt").write_text(ASTRONAUT + "\n")
    (tmp_path / "hold.txt").write_text(CONTROL + "\na small white square on the left on a blue background\n")
    docs = {}
    for required in (False, True):
        report = tmp_path / f"report-{required}"
        cmd = [*cli_cmd, "verify", str(DEMO_MODEL_DIR), str(pruned), "--neurons", str(neurons),
               "--prompts", str(tmp_path / "prompts.txt"), "--holdout", str(tmp_path / "hold.txt"),
               "--train-images", str(DEMO_TRAIN_IMAGES), "--seeds", "2", "--holdout-seeds", "1", "--steps", "5",
               "--guidance", "3", "--controls", "0", "--device", "cpu", "--report", str(report),
               "--attack", "--attack-steps", "2", "--attack-batch", "2", "--quiet"]
        proc = subprocess.run(cmd + (["--require-robust"] if required else []), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 3, proc.stderr[-2000:]
        docs[required] = json.loads((report / "report.json").read_text())
        attack = docs[required]["attack"]
        assert attack["verdict"] == SHALLOW and attack["required"] is required
        assert attack["settings"]["steps"] == 2 and attack["settings"]["batch"] == 2
        html = (report / "report.html").read_text()
        assert "Adaptive attack" in html and html.count("<polyline") >= 4  # threshold + three attacks
        assert "Adaptive attack" in (report / "MODEL_CARD.md").read_text()
    warned, failed = docs[False], docs[True]
    assert not any("adaptive attack" in r for r in warned["reasons"])
    assert any("adaptive attack" in n and "WARNING" in n for n in warned["notes"])
    assert any("adaptive attack" in r for r in failed["reasons"])
