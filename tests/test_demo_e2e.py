"""End to end on the shipped demo model: scan -> apply -> verify, with the truth it tells.

The demo model really memorizes the astronaut portrait (10 of 10 seeds). NeMo's scan
finds a small set in the value layers (with the shipped statistics: guidance 7.5, all
layers); pruning removes the memorized image from full samples, and verification reports
the hold-out drift honestly (docs/demo-model.md has the full numbers).
"""

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
    summary, _, stats = demo_scan
    astronaut, *others = summary.results
    assert astronaut.prompt == "a portrait of an astronaut"
    assert astronaut.memorized and astronaut.mitigated and astronaut.final_score < stats.tau
    assert 0 < astronaut.count <= 26  # at most 10 % of the 256 value neurons
    assert not any(r.memorized for r in others)


def test_pruned_demo_model_loses_the_memorized_image(demo_scan, tmp_path):
    _, neurons, stats = demo_scan
    pruned = tmp_path / "pruned"
    applied = run_apply(DEMO_MODEL_DIR, neurons, out=pruned)
    assert applied.ok
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("\n".join(p.text for p in read_prompts(ROOT / "prompts" / "demo_holdout.txt")[:6]) + "\n")
    memorized = tmp_path / "memorized.txt"
    memorized.write_text("a portrait of an astronaut\n")
    options = VerifyOptions(
        stats=DEMO_STATS, prompts=memorized, holdout=holdout, train_images=TRAIN_IMAGES,
        seeds=3, steps=20, guidance=3.0, device="cpu",
    )
    result = run_verify(DEMO_MODEL_DIR, pruned, neurons, options)
    check = result.checks[0]
    assert check.train_before is not None and max(check.train_before) > 0.5  # it was memorized
    assert max(check.train_after) < 0.3  # no after-sample matches the training image
    assert check.detection_after["mean_pairwise"] < stats.tau
    assert check.mitigated
    assert result.equivalence.max_abs_diff == 0.0
    assert result.drift is not None
    # the verdict follows the drift limit, whatever the drift is on this tiny model
    assert result.exit_code == (0 if result.drift.drift <= options.max_drift else 3)
