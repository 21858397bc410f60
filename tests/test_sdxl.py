"""SDXL-style pipelines (two text encoders, added time conditioning) go through stats and scan."""

import pytest

from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import run_scan
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.ssim import SSIMConfig
from nemo_surgery.engine.stats import compute_stats
from tests.models.tiny import build_xl_pipeline, save_pipeline


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    folder = save_pipeline(build_xl_pipeline(), tmp_path_factory.mktemp("xl") / "pipe")
    return load_model(folder, device="cpu")


def test_xl_conditioning_and_layers(xl_model):
    assert xl_model.is_xl
    cond = xl_model.encode(["a red cat", "a dog"])
    assert tuple(cond.hidden.shape) == (2, 77, 48)
    assert set(cond.added) == {"text_embeds", "time_ids"}
    ids = [layer.id for layer in xl_model.layers]
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v" in ids
    assert xl_model.layers[1].ldm_id == "input_blocks.3.1.transformer_blocks.1.attn2.to_v"  # layers_per_block=1


def test_xl_stats_and_scan_run(xl_model, tmp_path):
    prompts = ["a red circle", "a photo of a dog", "a green square", "a small black cat"]
    settings = ScoreSettings(seeds=4, ssim=SSIMConfig.fit(8, 8))
    stats = compute_stats(xl_model, prompts, settings, batch_size=16)
    assert len(stats.layers) == len(xl_model.layers)
    path = stats.save(tmp_path / "stats.json")
    summary = run_scan(xl_model, stats, path, [Prompt(0, "a blue house", 1)], tmp_path / "set.json")
    assert summary.prompts == 1 and summary.results[0].unet_calls == 1
