"""verify on real tiny models: the planted model is verified and specific; wrong, random, scan-unmitigated and
spread-memorization sets are not; missing evidence is never exit 0; the report renders in a browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats import compute_stats
from nemo_surgery.errors import EXIT_VERDICT, InputError
from nemo_surgery.neuron_set import LayerNeurons, NeuronSet
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.verify.metrics import fit_win_size
from nemo_surgery.verify.options import VerifyOptions
from nemo_surgery.verify.run import run_verify
from nemo_surgery.verify.sampling import sample_images, sample_sets
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT, PlantSpec, build_planted_pipeline
from tests.models.tiny import save_pipeline

FAST_KW = {"seeds": 6, "steps": 10, "guidance": 7.5, "batch_size": 32, "controls": 2}
FAST = VerifyOptions(**FAST_KW).sampling
HOLDOUT = ORDINARY_PROMPTS  # 16 prompts x 13 own seeds = 208 calibration samples for 10 judged seeds


def _write_set(path: Path, stats_path: Path, fingerprint: str, layer_id: str, rows: list[int],
               mitigated: bool = True) -> Path:
    ns = NeuronSet(
        layers=[LayerNeurons(id=layer_id, rows=32, cols=32, neurons=rows, needed_by=[[0]] * len(rows))],
        fingerprint=fingerprint,
        settings={"stats": {"path": str(stats_path)}},
        prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": mitigated,
                  "neurons": len(rows)}],
    )
    return ns.save(path)


def _save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """Planted pipeline folder, its statistics, hold-out data, and pruned copies for the right and a wrong set."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verify")
    pipe, plant = build_planted_pipeline(PlantSpec())
    folder = save_pipeline(pipe, root / "orig")
    model = load_model(folder, device="cpu", with_vae=True)
    _, h, w = model.latent_shape
    settings = ScoreSettings(seeds=6, ssim=SSIMConfig.fit(h, w))
    stats_path = compute_stats(model, list(ORDINARY_PROMPTS), settings).save(root / "stats.json")
    (root / "hold.txt").write_text("\n".join(HOLDOUT) + "\n")
    pairs = root / "pairs"  # hold-out image-caption pairs: the model's own images of other ordinary prompts
    pairs.mkdir()
    captions = ["a red ball", "a blue sky", "a green tree", "a white house"]
    images = sample_images(model, model.encode(captions), VerifyOptions(seeds=1, seed=5, steps=10).sampling).numpy()
    for k, (caption, im) in enumerate(zip(captions, images)):
        _save_png(im[0], pairs / f"{k}.png")
        (pairs / f"{k}.txt").write_text(caption)
    good = _write_set(root / "good.json", stats_path, model.fingerprint, plant.layer_id, list(plant.rows))
    wrong = _write_set(root / "wrong.json", stats_path, model.fingerprint, plant.layer_id, [0, 1])
    pruned_good = run_apply(folder, good, out=root / "good-nemo").output
    pruned_wrong = run_apply(folder, wrong, out=root / "wrong-nemo").output
    return {"root": root, "orig": folder, "stats": stats_path, "good": good, "wrong": wrong, "pairs": pairs,
            "pruned_good": pruned_good, "pruned_wrong": pruned_wrong, "plant": plant, "fingerprint": model.fingerprint}


@pytest.fixture(scope="session")
def good_result(planted):
    options = VerifyOptions(holdout=planted["root"] / "hold.txt", holdout_images=planted["pairs"],
                            **{**FAST_KW, "seeds": 10}, holdout_seeds=13, device="cpu")
    return run_verify(planted["orig"], planted["pruned_good"], planted["good"], options)


def test_win_size_fits_small_images() -> None:
    assert fit_win_size(512, 512) == 7 and fit_win_size(8, 8) == 7 and fit_win_size(6, 9) == 5
    with pytest.raises(ValueError):
        fit_win_size(2, 8)


def test_sampling_same_seeds_hook_blocking_and_batched_sets(planted) -> None:
    """Same seeds give identical samples; hook blocking equals the pruned copy; sets share batches faithfully."""
    orig = load_model(planted["orig"], device="cpu", with_vae=True)
    pruned = load_model(planted["pruned_good"], device="cpu", with_vae=True)
    cond = orig.encode([TRIGGER_PROMPT])
    a = sample_images(orig, cond, FAST)
    assert a.shape == (1, FAST.seeds, 8, 8, 3) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, sample_images(orig, cond, FAST))
    plant = planted["plant"]
    blocked = {plant.layer_id: list(plant.rows)}
    hooked = sample_images(orig, cond, FAST, blocked=blocked)
    assert torch.allclose(hooked, sample_images(pruned, pruned.encode([TRIGGER_PROMPT]), FAST), atol=1e-5)
    assert not torch.allclose(a, hooked, atol=1e-2)  # pruning changes the trigger's samples
    mixed = sample_sets(orig, cond, VerifyOptions(**{**FAST_KW, "batch_size": 5}).sampling,
                        [{}, blocked])  # batch of 5 mixes both sets in one UNet call
    assert torch.allclose(mixed[0], a, atol=1e-5) and torch.allclose(mixed[1], hooked, atol=1e-5)


def test_seed_rule_bound_and_detection_probability_by_simulation() -> None:
    """Default seeds: a prompt copying in half its seeds is caught with >= 99.9 %; the bound covers at 95 %."""
    from scipy.stats import beta

    from nemo_surgery.verify.seeds import DEFAULT_SEEDS, SeedEvidence, copy_rate_bound, detection_probability

    n = DEFAULT_SEEDS
    rng = np.random.default_rng(0)
    trials = 200_000
    copies = rng.binomial(n, 0.5, size=trials)
    caught = float((copies > 0).mean())
    assert caught >= 0.998 and abs(caught - detection_probability(n)) < 0.001
    bound = copy_rate_bound(0, n)
    assert abs(bound - (1 - 0.05 ** (1 / n))) < 1e-12 and bound < 0.26
    at_bound = float((rng.binomial(n, bound, size=trials) == 0).mean())  # a rate at the bound shows 0 copies 5 %
    assert abs(at_bound - 0.05) < 0.003
    assert abs(copy_rate_bound(3, n) - beta.ppf(0.95, 4, n - 3)) < 1e-9 and copy_rate_bound(n, n) == 1.0
    assert "at most 25.9 % of seeds copy, with 95 % confidence" in SeedEvidence(0, n).sentence()


def test_planted_set_verified_and_specific(planted, good_result) -> None:
    r = good_result
    assert r.exit_code == 0 and r.verdict == "verified", r.reasons + r.all_missing
    (check,) = r.checks
    assert check.copy.reference.startswith("medoid") and check.copy.copies_before == check.copy.seeds_before
    assert check.copy.copies_after == 0 and len(check.copy.after) == 10 and check.seeds.bound < 0.26
    assert r.copy_threshold.calibrated and "calibrated on this model" in r.copy_threshold.source
    # every random control of the same shape leaves the copy in every seed; the found set removes it
    assert r.specificity.specific and r.specificity.beaten == 2
    for sims in check.copy.controls:
        assert min(sims) >= r.copy_threshold.value
    assert check.detection_after["mean_pairwise"] < check.detection_before["mean_pairwise"]
    assert r.equivalence.ok and r.equivalence.max_abs_diff <= 1e-5
    assert r.harm.drift is not None and r.harm.drift.drift < 1e-3 and not r.harm.failures()
    assert r.harm.loss_before is not None and abs(r.harm.loss_increase) < 1e-3 and len(r.harm.loss_controls) == 2
    doc = json.loads((planted["pruned_good"] / "nemo_report" / "report.json").read_text())
    assert doc["format"] == "nemo-surgery.verify-report" and doc["version"] == 2 and doc["verdict"] == "verified"
    seeds = doc["settings"]["seeds"]
    assert seeds["scan_detection"]["seed"] != seeds["verification"]["seed"]
    assert doc["thresholds"]["copy"]["source"] and doc["thresholds"]["tau"]["source"]
    assert len(doc["controls"]["sets"]) == 2 and all(len(s[planted["plant"].layer_id]) == 2 for s in doc["controls"]["sets"])
    assert not set(doc["controls"]["sets"][0][planted["plant"].layer_id]) & set(planted["plant"].rows)
    card = (planted["pruned_good"] / "nemo_report" / "MODEL_CARD.md").read_text()
    assert "**Verification verdict: verified**" in card and TRIGGER_PROMPT in card and "3, 7" in card


def test_random_set_is_not_specific_exit_3(planted) -> None:
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    report = planted["root"] / "wrong_report"
    run = CliRunner().invoke(main, [
        "verify", str(planted["orig"]), str(planted["pruned_wrong"]), "--neurons", str(planted["wrong"]),
        "--holdout", str(planted["root"] / "hold.txt"), "--steps", "10", "--seeds", "6", "--device", "cpu",
        "--report", str(report), "--json",
    ])
    assert run.exit_code == EXIT_VERDICT, run.output
    summary = json.loads(run.stdout)
    assert summary["verdict"] == "NOT verified" and summary["prompts"][0]["status"] == "STILL MEMORIZED"
    assert summary["prompts"][0]["copies_after"] == 6 and not summary["specificity"]["specific"]
    assert any(r.startswith("not specific") for r in summary["reasons"])
    assert any("fresh seeds still copy" in r for r in summary["reasons"])
    assert summary["equivalence_max_abs_diff"] <= 1e-5  # the wrong set was applied faithfully
    assert "NOT verified" in run.stderr and (report / "report.html").is_file()


def test_scan_unmitigated_prompt_is_never_verified(planted, tmp_path) -> None:
    """The right rows, but scan recorded the prompt as not mitigated: the verdict is not 0 and says why."""
    p = planted
    unmitigated = _write_set(tmp_path / "set.json", p["stats"], p["fingerprint"], p["plant"].layer_id,
                             list(p["plant"].rows), mitigated=False)
    options = VerifyOptions(holdout=p["root"] / "hold.txt", **FAST_KW, device="cpu", report=tmp_path / "rep")
    r = run_verify(p["orig"], p["pruned_good"], unmitigated, options)
    assert r.exit_code == EXIT_VERDICT and r.verdict == "NOT verified"
    assert r.checks[0].status == "STILL MEMORIZED" and r.checks[0].copy.copies_after == 0
    assert any("scan recorded it as NOT mitigated" in reason for reason in r.reasons)


def test_apply_default_path_without_evidence_is_unverified(planted, tmp_path, cli_cmd) -> None:
    """`apply` with no hold-out data: 'unverified', exit 3, and the flags that would make it verifiable."""
    out = tmp_path / "applied"
    run = subprocess.run([*cli_cmd, "apply", str(planted["orig"]), "--neurons", str(planted["good"]), "--out",
                          str(out), "--steps", "4", "--seeds", "4", "--controls", "1", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == EXIT_VERDICT, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["verify"]["verdict"] == "unverified" and not doc["verify"]["reasons"]
    assert any("--holdout PROMPTS" in m for m in doc["verify"]["missing"])
    assert "unverified" in run.stderr and "--holdout" in run.stderr
    assert (out / "nemo_report" / "report.json").is_file()


def test_apply_flags_and_precheck(planted, tmp_path) -> None:
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    runner = CliRunner()
    base = ["apply", str(planted["orig"]), "--neurons", str(planted["wrong"]), "--device", "cpu"]
    skipped = runner.invoke(main, [*base, "--out", str(tmp_path / "plain"), "--no-verify", "-q"])
    assert skipped.exit_code == 0 and not (tmp_path / "plain" / "nemo_report").exists()
    missing = runner.invoke(main, [*base, "--out", str(tmp_path / "never"), "--stats", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and not (tmp_path / "never").exists()  # inputs checked before writing
    same_seed = runner.invoke(main, [*base, "--out", str(tmp_path / "never2"), "--seed", "1"])
    assert same_seed.exit_code == 2 and "fresh seeds" in same_seed.output and not (tmp_path / "never2").exists()


def test_equivalence_catches_unpruned_copy(planted, tmp_path) -> None:
    """A 'pruned' folder that is an unmodified copy is not equivalent to the hooked original: exit 1."""
    copy = shutil.copytree(planted["orig"], tmp_path / "copy")
    options = VerifyOptions(seeds=2, steps=2, controls=0, device="cpu", report=tmp_path / "rep")
    r = run_verify(planted["orig"], copy, planted["good"], options)
    assert not r.equivalence.ok and not r.equivalence.rows_zero and r.exit_code == 1
    assert r.verdict == "not equivalent" and any("not equivalent" in reason for reason in r.reasons)
    with pytest.raises(InputError, match="train-images"):
        run_verify(planted["orig"], planted["pruned_good"], planted["good"],
                   VerifyOptions(train_images=tmp_path / "missing", device="cpu"))


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", attrs.get(key) or ""):
                self.external.append(attrs[key])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_is_self_contained_and_renders_in_chromium(planted, good_result, tmp_path) -> None:
    from PIL import Image

    html_path = planted["pruned_good"] / "nemo_report" / "report.html"
    text = html_path.read_text()
    parser = _Images()
    parser.feed(text)
    assert not parser.external and "<svg" in text and "mid_block.attentions.0" in text
    assert "found set" in text and "control 2" in text and "seed 9 SSIM" in text
    expected = 1 + 2 * 10 + 2 * 2 * min(5, len(HOLDOUT))  # reference, before/after, 5 worst hold-out x 2 drift seeds
    assert len(parser.srcs) == expected
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.size[0] == 128 and np.asarray(img).std() > 0
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (make install adds Debian's chromium where apt-get is available)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert pixels.std() > 5  # not blank
    green = (np.abs(pixels - np.array([0x1E, 0x84, 0x49])).sum(axis=2) < 40).sum()
    assert green > 50  # the verdict line is drawn in the 'verified' colour


def test_a_prompt_detection_missed_that_copies_its_training_image_is_never_verified(planted, tmp_path) -> None:
    """Scan passed prompt 1, yet the pruned model draws the training image given for it: NOT verified, and why.

    The training image is the original's own sample of that prompt at the first fresh seed (a copy the model
    makes on demand, as a memorized prompt that NeMo's first-step detection misses would). With --prompts naming
    what to judge, verify judges only those.
    """
    p = planted
    missed = ORDINARY_PROMPTS[0]
    ns = NeuronSet(
        layers=[LayerNeurons(id=p["plant"].layer_id, rows=32, cols=32, neurons=list(p["plant"].rows),
                             needed_by=[[0]] * len(p["plant"].rows))],
        fingerprint=p["fingerprint"], settings={"stats": {"path": str(p["stats"])}},
        prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": True, "neurons": 2},
                 {"index": 1, "prompt": missed, "memorized": False, "mitigated": None, "neurons": 0}])
    set_path = ns.save(tmp_path / "set.json")
    model = load_model(p["orig"], device="cpu", with_vae=True)
    image = sample_images(model, model.encode([missed]), VerifyOptions(**FAST_KW).sampling).numpy()[0, 0]
    (tmp_path / "train").mkdir()
    _save_png(image, tmp_path / "train" / "1.png")
    options = VerifyOptions(holdout=p["root"] / "hold.txt", train_images=tmp_path / "train", **FAST_KW, device="cpu",
                            report=tmp_path / "rep")
    r = run_verify(p["orig"], p["pruned_good"], set_path, options)
    (u,) = r.undetected
    assert u.index == 1 and u.copies and u.copy.after[0] > 0.9 and u.copy.reference == "training image"
    assert [c.index for c in r.checks] == [0] and r.checks[0].mitigated  # the set's own prompt is mitigated ...
    assert r.verdict == "NOT verified" and r.exit_code == EXIT_VERDICT  # ... yet the missed prompt still copies
    assert [reason for reason in r.reasons if "scan did not flag it" in reason] == r.reasons
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["undetected_prompts"][0]["status"] == "STILL MEMORIZED"
    assert "Prompts scan did not flag" in (tmp_path / "rep" / "report.html").read_text()
    (tmp_path / "only.txt").write_text(TRIGGER_PROMPT + "\n")
    named = run_verify(p["orig"], p["pruned_good"], set_path,
                       VerifyOptions(**{**options.__dict__, "prompts": tmp_path / "only.txt", "report": tmp_path / "r2"}))
    assert named.undetected == [] and named.passed
