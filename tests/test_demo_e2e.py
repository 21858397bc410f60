"""End to end through the CLI: the shipped demo model is verified, the spread negative control is not.

The demo model (v2, docs/demo-model.md) copies its astronaut training image in every seed,
and the copy is planted in 3 value rows of the default layers (recipe.json's
`memory_rows_by_item`). `nemo-surgery scan` with NeMo's own settings (the shipped
statistics: guidance 0, default layers) must find planted rows only, and `apply` with its
built-in verify must say "verified": every fresh seed copies before and none after, while
random sets of the same shape leave the copies. The spread model (tests/models/spread.py)
carries its memorization in 16 rows: scan finds no small set and says NOT mitigated, and
the small set a first-step-only check would accept (its 4 strong rows, which bring NeMo's
first-step score below tau) leaves every seed copying, so verify must say "NOT verified"
with that reason.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from nemo_surgery.demo.paths import DEMO_RECIPE, DEMO_TRAIN_IMAGES
from nemo_surgery.engine.prompts import read_prompts

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT = "a portrait of an astronaut"
# the demo's full-sample settings on CPU (make demo's): copies show at guidance 3 (docs/demo-model.md)
VERIFY_FAST = ["--guidance", "3", "--steps", "20", "--seeds", "6", "--holdout-seeds", "2", "--controls", "2",
               "--device", "cpu", "--json"]


def _run(cmd: list[str], expect: int) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory, cli_cmd):
    """Scan of the astronaut and three hold-out captions on the embedded model, all defaults."""
    tmp = tmp_path_factory.mktemp("demo")
    holdout = [p.text for p in read_prompts(ROOT / "prompts" / "demo_holdout.txt")]
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join([ASTRONAUT, *holdout[:2], holdout[-1]]) + "\n")
    summary = _run([*cli_cmd, "scan", str(prompts), "-o", str(tmp / "neurons.json"), "--json", "--quiet"], 0)
    return tmp, summary, json.loads((tmp / "neurons.json").read_text())


def test_demo_scan_finds_planted_rows_with_nemos_settings(demo_scan):
    """Detected and mitigated by at most 3 neurons, every one a planted row; hold-out captions not detected."""
    _, _, doc = demo_scan
    assert doc["settings"]["score"]["guidance_scale"] == 0.0  # NeMo's first-step score, unguided
    assert all(not name.startswith("up_blocks") for name in doc["settings"]["layers"])  # NeMo's default layers
    astronaut, *others = doc["prompts"]
    assert astronaut["prompt"] == ASTRONAUT and astronaut["memorized"] and astronaut["mitigated"]
    assert not any(p["memorized"] for p in others)
    planted = json.loads(DEMO_RECIPE.read_text())["memory_rows_by_item"][0]
    found = {(layer["id"], n) for layer in doc["layers"] for n in layer["neurons"]}
    assert 1 <= len(found) <= 3
    assert found <= {(name, r) for name, rows in planted.items() for r in rows}  # precision 1


def test_demo_verified(demo_scan, cli_cmd, tmp_path):
    """The demo's found set removes every copy (random sets of its shape do not): verified, exit 0."""
    tmp, _, _ = demo_scan
    (tmp_path / "hold.txt").write_text(
        "\n".join(p.text for p in read_prompts(ROOT / "prompts" / "demo_holdout.txt")[:6]) + "\n")
    (tmp_path / "memorized.txt").write_text(ASTRONAUT + "\n")
    # the copy threshold make demo calibrated on all 60 hold-out captions x 2 seeds (recipe.json). Calibrated on
    # this test's 12 hold-out samples it would be their maximum: 0.067, below the pruned astronaut's 0.105, while
    # a few unseen-subject captions draw a photo in some seeds, so small sets that include them give 0.5 or more
    given = json.loads(DEMO_RECIPE.read_text())["evaluation"]["make_demo"]["copy_threshold"]
    doc = _run([*cli_cmd, "apply", str(ROOT / "nemo_surgery" / "demo" / "assets" / "model"),
                "--neurons", str(tmp / "neurons.json"), "--out", str(tmp_path / "pruned"),
                "--prompts", str(tmp_path / "memorized.txt"), "--holdout", str(tmp_path / "hold.txt"),
                "--copy-threshold", str(given), "--train-images", str(DEMO_TRAIN_IMAGES), *VERIFY_FAST], 0)
    verify = doc["verify"]  # apply --json: the patch summary with verify's summary inside
    assert verify["verdict"] == "verified", verify
    report = json.loads((tmp_path / "pruned" / "nemo_report" / "report.json").read_text())
    (prompt,) = report["memorized_prompts"]
    copies = prompt["copies"]
    assert copies["reference"] == "training image"
    assert report["thresholds"]["copy"]["value"] == given
    assert report["thresholds"]["copy"]["source"].startswith("given by the user")
    assert copies["copies_before"] >= 5 and copies["copies_after"] == 0
    assert all(c["copies_after"] >= 4 for c in copies["controls"])  # random sets of the same shape keep the copies
    # the demo's prompt-alignment score: the checker read every drift sample of the 6 scene captions, paired
    scenes = report["harm"]["scene_alignment"]
    drift_seeds = report["settings"]["sampling"]["drift_seeds"]
    assert (scenes["prompts"], scenes["samples"], len(scenes["controls"])) == (6, 6 * drift_seeds, 2)
    assert scenes["lost"] + scenes["gained"] <= scenes["samples"]


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """The spread negative control saved as a pipeline folder, its hold-out and trigger prompt files, its Plant."""
    from tests.models.plant import ORDINARY_PROMPTS
    from tests.models.spread import build_spread_pipeline
    from tests.models.tiny import save_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("spread")
    pipe, plant = build_spread_pipeline()
    folder = save_pipeline(pipe, root / "orig")
    (root / "hold.txt").write_text("\n".join(ORDINARY_PROMPTS) + "\n")
    (root / "memorized.txt").write_text(plant.prompt + "\n")
    return root, folder, plant


def test_spread_control_not_verified(spread_model, cli_cmd):
    """Scan finds no small set (exit 3); the 4 strong rows lower the first step but samples copy: NOT verified, exit 3."""
    from nemo_surgery.engine.model import load_model
    from nemo_surgery.neuron_set import LayerNeurons, NeuronSet

    root, folder, plant = spread_model
    m = ["-m", str(folder), "--device", "cpu"]
    _run([*cli_cmd, "stats", str(root / "hold.txt"), *m, "-o", str(root / "stats.json"), "--json", "--quiet"], 0)
    scan = _run([*cli_cmd, "scan", str(root / "memorized.txt"), *m, "--stats", str(root / "stats.json"),
                 "-o", str(root / "scan.json"), "--json", "--quiet"], 3)
    (record,) = json.loads((root / "scan.json").read_text())["prompts"]
    assert record["memorized"] and not record["mitigated"] and scan["exit_code"] == 3
    # the small set a first-step-only tool would accept: the 4 strongest of the 16 rows that carry the copy
    model = load_model(folder, device="cpu")
    layer = next(la for la in model.layers if la.id == plant.layer_id)
    ns = NeuronSet(layers=[LayerNeurons(id=layer.id, rows=layer.rows, cols=layer.cols, neurons=list(plant.rows))],
                   fingerprint=model.fingerprint, settings={"stats": {"path": str(root / "stats.json")}},
                   prompts=[{"index": 0, "prompt": plant.prompt, "memorized": True, "mitigated": True}])
    small = ns.save(root / "small.json")
    doc = _run([*cli_cmd, "apply", str(folder), "--neurons", str(small), "--out", str(root / "pruned"),
                "--holdout", str(root / "hold.txt"), "--seeds", "6", "--steps", "10", "--holdout-seeds", "4",
                "--controls", "1", "--device", "cpu", "--json"], 3)
    verify = doc["verify"]  # apply --json: the patch summary with verify's summary inside
    assert verify["verdict"] == "NOT verified"
    (prompt,) = verify["prompts"]
    assert prompt["detection_after"] < json.loads((root / "stats.json").read_text())["tau"]  # the first step agrees
    assert prompt["copies_after"] == prompt["seeds"]  # ... yet every fresh seed still copies
    assert any("fresh seeds still copy" in r for r in verify["reasons"])
    report = json.loads((root / "pruned" / "nemo_report" / "report.json").read_text())
    assert report["harm"]["scene_alignment"] is None  # its hold-out captions are not demo-world scenes
