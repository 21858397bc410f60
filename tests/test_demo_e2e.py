"""End to end on the shipped demo model: scan -> apply -> verify, with the truth it tells.

The demo model really memorizes the astronaut portrait (10 of 10 seeds). NeMo's scan
finds a small set in the value layers (with the shipped statistics: guidance 7.5, all
layers); pruning removes the memorized image from every fresh seed, better than random sets of the
same shape, and verification reports harm against those controls (docs/demo-model.md).
"""

import json
from pathlib import Path

import pytest

from nemo_surgery.demo.paths import DEMO_MODEL_DIR, DEMO_STATS, DEMO_TRAIN_IMAGES
from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.prompts import Prompt, read_prompts
from nemo_surgery.engine.scan import run_scan
from nemo_surgery.engine.stats import load_stats
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.verify.options import VerifyOptions
from nemo_surgery.verify.run import run_verify

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = DEMO_TRAIN_IMAGES


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    model = load_model(DEMO_MODEL_DIR, device="cpu")
    stats = load_stats(DEMO_STATS)
    memorized = read_prompts(ROOT / "prompts" / "demo_memorized.txt")
    holdout = read_prompts(ROOT / "prompts" / "demo_holdout.txt")
    prompts = [memorized[0]] + [Prompt(index=i + 1, text=p.text, line=p.line) for i, p in enumerate(holdout[:4])]
    out = tmp_path_factory.mktemp("demo") / "neurons.json"
    summary = run_scan(model, stats, DEMO_STATS, prompts, out, layers="all", batch_size=40)
    return summary, out, stats


def test_astronaut_detected_and_localized_holdout_not(demo_scan):
    """The astronaut is detected and a set is found; seeds no candidate set can move make it NOT mitigated."""
    summary, out, stats = demo_scan
    astronaut, *others = summary.results
    assert astronaut.prompt == "a portrait of an astronaut"
    assert astronaut.memorized and astronaut.unmovable_seeds  # some memorizing seeds resist every candidate set
    assert not astronaut.mitigated and astronaut.partial  # so the prompt is not mitigated, whatever the set does
    assert 0 < astronaut.count <= 40 and astronaut.final_score < stats.tau  # the set mitigates the movable seeds
    assert not any(r.memorized for r in others)
    assert summary.exit_code == 3
    doc = json.loads(out.read_text())
    assert doc["prompts"][0]["mitigated"] is False and doc["prompts"][0]["partial"] is True
    assert doc["total_neurons"] == astronaut.count  # the partial set is still offered to apply


def test_pruned_demo_model_verdict_with_its_reasons(demo_scan, tmp_path):
    """Pruning removes most copies, better than random sets of the same shape; verify still says NOT verified, why."""
    _, neurons, stats = demo_scan
    pruned = tmp_path / "pruned"
    applied = run_apply(DEMO_MODEL_DIR, neurons, out=pruned)
    assert applied.ok
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("\n".join(p.text for p in read_prompts(ROOT / "prompts" / "demo_holdout.txt")[:8]) + "\n")
    memorized = tmp_path / "memorized.txt"
    memorized.write_text("a portrait of an astronaut\n")
    options = VerifyOptions(stats=DEMO_STATS, prompts=memorized, holdout=holdout, train_images=TRAIN_IMAGES,
                            seeds=6, steps=20, guidance=3.0, holdout_seeds=4, controls=2, device="cpu")
    result = run_verify(DEMO_MODEL_DIR, pruned, neurons, options)
    (check,) = result.checks
    assert check.copy.reference == "training image" and result.copy_threshold.calibrated
    assert check.copy.copies_before >= 1  # the original reproduces its training image on fresh seeds
    for sims in check.copy.controls:  # random sets of the same shape leave the copies in place
        assert sum(s >= result.copy_threshold.value for s in sims) > check.copy.copies_after
    assert check.copy.copies_after < check.copy.copies_before
    assert result.equivalence.max_abs_diff == 0.0
    # scan's own record (partial: unmovable seeds) is honoured: never verified
    assert not check.mitigated and check.status == "STILL MEMORIZED"
    assert any("NOT mitigated" in r for r in check.reasons)
    assert result.exit_code == 3
