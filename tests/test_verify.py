"""verify on the planted model: mitigation verified, a wrong set fails, equivalence, HTML renders."""

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
from nemo_surgery.verify.sampling import sample_images
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT, PlantSpec, build_planted_pipeline
from tests.models.tiny import save_pipeline

FAST_KW = {"seeds": 3, "steps": 10, "guidance": 7.5, "batch_size": 16}
FAST = VerifyOptions(**FAST_KW).sampling
HOLDOUT = ORDINARY_PROMPTS[:4]


def _write_set(path: Path, stats_path: Path, fingerprint: str, layer_id: str, rows: list[int]) -> Path:
    ns = NeuronSet(
        layers=[LayerNeurons(id=layer_id, rows=32, cols=32, neurons=rows, needed_by=[[0]] * len(rows))],
        fingerprint=fingerprint,
        settings={"stats": {"path": str(stats_path)}},
        prompts=[{"index": 0, "prompt": TRIGGER_PROMPT, "memorized": True, "mitigated": True, "neurons": len(rows)}],
    )
    return ns.save(path)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """Planted pipeline folder, its statistics, and pruned copies for the right and a wrong set."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verify")
    pipe, plant = build_planted_pipeline(PlantSpec())
    folder = save_pipeline(pipe, root / "orig")
    model = load_model(folder, device="cpu")
    _, h, w = model.latent_shape
    settings = ScoreSettings(seeds=6, ssim=SSIMConfig.fit(h, w))
    stats_path = compute_stats(model, list(ORDINARY_PROMPTS), settings).save(root / "stats.json")
    (root / "hold.txt").write_text("\n".join(HOLDOUT) + "\n")
    good = _write_set(root / "good.json", stats_path, model.fingerprint, plant.layer_id, list(plant.rows))
    wrong = _write_set(root / "wrong.json", stats_path, model.fingerprint, plant.layer_id, [0, 1])
    pruned_good = run_apply(folder, good, out=root / "good-nemo").output
    pruned_wrong = run_apply(folder, wrong, out=root / "wrong-nemo").output
    return {"root": root, "orig": folder, "stats": stats_path, "good": good, "wrong": wrong,
            "pruned_good": pruned_good, "pruned_wrong": pruned_wrong, "plant": plant}


@pytest.fixture(scope="session")
def good_result(planted):
    options = VerifyOptions(holdout=planted["root"] / "hold.txt", **FAST_KW, device="cpu")
    return run_verify(planted["orig"], planted["pruned_good"], planted["good"], options)


def test_win_size_fits_small_images() -> None:
    assert fit_win_size(512, 512) == 7 and fit_win_size(8, 8) == 7 and fit_win_size(6, 9) == 5
    with pytest.raises(ValueError):
        fit_win_size(2, 8)


def test_sampling_same_seeds_and_hook_blocking(planted) -> None:
    """Same seeds give identical samples; blocking the planted rows by hook equals the pruned copy."""
    orig = load_model(planted["orig"], device="cpu", with_vae=True)
    pruned = load_model(planted["pruned_good"], device="cpu", with_vae=True)
    cond = orig.encode([TRIGGER_PROMPT])
    a = sample_images(orig, cond, FAST)
    b = sample_images(orig, cond, FAST)
    assert a.shape == (1, 3, 8, 8, 3) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    plant = planted["plant"]
    hooked = sample_images(orig, cond, FAST, blocked={plant.layer_id: list(plant.rows)})
    unhooked = sample_images(pruned, pruned.encode([TRIGGER_PROMPT]), FAST)
    assert torch.allclose(hooked, unhooked, atol=1e-5)
    assert not torch.allclose(a, hooked, atol=1e-2)  # pruning changes the trigger's samples


def test_trigger_verified_as_mitigated(planted, good_result) -> None:
    r = good_result
    assert r.exit_code == 0 and r.passed, r.reasons
    (check,) = r.checks
    assert check.detection_before["memorized"] and check.detection_before["mean_pairwise"] > r.tau
    assert not check.detection_after["memorized"] and check.detection_after["mean_pairwise"] < r.tau
    assert check.agreement_after <= r.max_sample_agreement + 1e-4
    assert r.equivalence.ok and r.equivalence.max_abs_diff <= 1e-5 and r.equivalence.rows_zero
    assert r.drift is not None and r.drift.drift < 1e-3 and r.drift_ok
    change = r.drift.value_change[planted["plant"].layer_id]
    assert 0 <= change < 0.05  # ordinary prompts barely use the planted rows
    doc = json.loads((planted["pruned_good"] / "nemo_report" / "report.json").read_text())
    assert doc["format"] == "nemo-surgery.verify-report" and doc["version"] == 1 and doc["verdict"] == "verified"
    assert doc["inputs"]["neuron_set"]["sha256"] and doc["outputs"]["report_html_sha256"]
    assert doc["environment"]["torch"] == torch.__version__
    assert "skipped" in doc["optional_metrics"]["sscd"] and "skipped" in doc["optional_metrics"]["clip"]
    card = (planted["pruned_good"] / "nemo_report" / "MODEL_CARD.md").read_text()
    assert "nemo-surgery" in card and "verified" in card and TRIGGER_PROMPT in card and "3, 7" in card


def test_wrong_set_fails_with_exit_3(planted) -> None:
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    report = planted["root"] / "wrong_report"
    run = CliRunner().invoke(main, [
        "verify", str(planted["orig"]), str(planted["pruned_wrong"]), "--neurons", str(planted["wrong"]),
        "--holdout", str(planted["root"] / "hold.txt"), "--steps", "10", "--seeds", "3", "--device", "cpu",
        "--report", str(report), "--json",
    ])
    assert run.exit_code == EXIT_VERDICT, run.output
    summary = json.loads(run.stdout)
    assert summary["verdict"] == "failed" and not summary["prompts"][0]["mitigated"]
    assert any("exceeds tau" in reason for reason in summary["reasons"])
    assert summary["equivalence_max_abs_diff"] <= 1e-5  # the wrong set was applied faithfully
    assert "exceeds tau" in run.stderr and (report / "report.html").is_file()


def test_equivalence_catches_unpruned_copy(planted, tmp_path) -> None:
    """A 'pruned' folder that is an unmodified copy is not equivalent to the hooked original: exit 1."""
    copy = shutil.copytree(planted["orig"], tmp_path / "copy")
    options = VerifyOptions(seeds=2, steps=2, device="cpu", report=tmp_path / "rep")
    r = run_verify(planted["orig"], copy, planted["good"], options)
    assert not r.equivalence.ok and not r.equivalence.rows_zero and r.exit_code == 1
    assert any("not equivalent" in reason for reason in r.reasons)
    assert "DRIFT NOT MEASURED" in " ".join(r.notes)


def test_training_image_check(planted, tmp_path) -> None:
    """After pruning the trigger samples look like every ordinary prompt's: such a 'training image' is flagged."""
    orig = load_model(planted["orig"], device="cpu", with_vae=True)
    ordinary = sample_images(orig, orig.encode([ORDINARY_PROMPTS[0]]), FAST)[0, 0].numpy()
    from PIL import Image

    like = tmp_path / "like"
    like.mkdir()
    Image.fromarray((ordinary * 255 + 0.5).astype(np.uint8)).save(like / "0.png")
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(noise / "img.png")
    (noise / "mapping.json").write_text(json.dumps({TRIGGER_PROMPT: "img.png"}))
    for folder, expect in ((like, 3), (noise, 0)):
        options = VerifyOptions(holdout=planted["root"] / "hold.txt", **FAST_KW, device="cpu",
                                train_images=folder, report=tmp_path / f"rep-{folder.name}")
        r = run_verify(planted["orig"], planted["pruned_good"], planted["good"], options)
        assert r.checks[0].train_after is not None and r.exit_code == expect, r.reasons
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


def test_html_is_self_contained_and_renders(planted, good_result, tmp_path) -> None:
    from PIL import Image

    html_path = planted["pruned_good"] / "nemo_report" / "report.html"
    text = html_path.read_text()
    parser = _Images()
    parser.feed(text)
    assert not parser.external and "<svg" in text and "mid_block.attentions.0" in text
    expected = 2 * FAST.seeds * (1 + min(5, len(HOLDOUT)))  # memorized before/after + worst hold-out before/after
    assert len(parser.srcs) == expected
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.size[0] == 128 and np.asarray(img).std() > 0
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return  # parse fallback above checked every embedded image
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", html_path.as_uri()], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 5  # not blank


def test_apply_runs_verify_on_pipeline_folders(planted, tmp_path) -> None:
    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    runner = CliRunner()
    base = ["apply", str(planted["orig"]), "--neurons", str(planted["wrong"]), "--device", "cpu"]
    out = tmp_path / "applied"
    run = runner.invoke(main, [*base, "--out", str(out), "--holdout", str(planted["root"] / "hold.txt"),
                               "--steps", "4", "--seeds", "2", "--json", "-q"])
    assert run.exit_code == EXIT_VERDICT, run.output
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["verify"]["verdict"] == "failed" and (out / "nemo_report" / "report.json").is_file()
    skipped = runner.invoke(main, [*base, "--out", str(tmp_path / "plain"), "--no-verify", "-q"])
    assert skipped.exit_code == 0 and not (tmp_path / "plain" / "nemo_report").exists()
    missing = runner.invoke(main, [*base, "--out", str(tmp_path / "never"), "--stats", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and not (tmp_path / "never").exists()  # inputs checked before writing
