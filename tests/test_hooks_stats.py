"""Masking hooks are exact and always removed; statistics merge exactly and guard the model."""

import json

import pytest
import torch

from nemo_surgery.engine.hooks import ValueMask, blocked_masks
from nemo_surgery.engine.model import load_model
from nemo_surgery.engine.stats import Moments, check_stats_match, load_stats
from nemo_surgery.errors import InputError


def _predict(model, prompt, latents):
    cond = model.encode([prompt] * latents.shape[0])
    with torch.no_grad():
        return model.unet(latents, 961, encoder_hidden_states=cond.hidden).sample


def test_mask_hook_equals_zeroed_weight_rows(tmp_path):
    from tests.models.tiny import build_pipeline, save_pipeline

    folder = save_pipeline(build_pipeline(), tmp_path / "tiny")
    model = load_model(folder, device="cpu")
    layer = model.layers[-1]
    latents = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    with ValueMask(model.layers, blocked_masks(model.layers, {layer.id: [1, 5, 6]})):
        hooked = _predict(model, "a red circle", latents)
    assert not layer.module._forward_hooks, "hook must be removed on exit"
    with torch.no_grad():
        layer.module.weight[[1, 5, 6]] = 0.0
    pruned = _predict(model, "a red circle", latents)
    torch.testing.assert_close(hooked, pruned, rtol=0, atol=1e-6)


def test_per_sample_masks_and_removal_on_error(planted_model):
    layer = planted_model.layers[0]
    hidden = planted_model.encode(["a", "b"]).hidden
    plain = layer.module(hidden)
    assert plain[:, :, :4].abs().sum() > 0  # the rows we block carry signal, so blocking is visible
    mask = torch.ones(2, layer.rows)
    mask[1, :4] = 0
    with pytest.raises(RuntimeError, match="boom"):
        with ValueMask(planted_model.layers, {layer.id: mask}):
            masked = layer.module(hidden)
            cfg = layer.module(torch.cat([hidden, hidden]))  # classifier-free guidance doubles the batch
            raise RuntimeError("boom")
    # per sample: sample 0 untouched, sample 1 has rows 0-3 zeroed and the others untouched
    torch.testing.assert_close(masked[0], plain[0])
    assert torch.equal(masked[1, :, :4], torch.zeros_like(masked[1, :, :4]))
    torch.testing.assert_close(masked[1, :, 4:], plain[1, :, 4:])
    # the masks repeat for each half of a guidance batch
    torch.testing.assert_close(cfg[:2], masked)
    torch.testing.assert_close(cfg[2:], masked)
    # the error removed the hook: the layer computes the unmasked output again
    assert len(layer.module._forward_hooks) == 0
    torch.testing.assert_close(layer.module(hidden), plain)


def test_moments_of_shards_merge_exactly():
    data = torch.randn(101, 7, dtype=torch.float64) * 3 + 1
    whole = Moments.of(data)
    merged = Moments.of(data[:10]).merge(Moments.of(data[10:57])).merge(Moments.of(data[57:]))
    assert merged.count == 101
    torch.testing.assert_close(merged.mean, whole.mean)
    torch.testing.assert_close(merged.m2, whole.m2)
    torch.testing.assert_close(merged.std, data.std(dim=0))


def test_stats_file_round_trip_and_fingerprint_guard(planted_stats, planted_model, tmp_path):
    path, stats = planted_stats
    again = load_stats(path)
    assert again.tau == pytest.approx(stats.tau)
    assert again.prompt_count == 16 and again.holdout_flagged == 0
    for lid, ls in stats.layers.items():
        torch.testing.assert_close(again.layers[lid].moments.mean, ls.moments.mean)
    doc = json.loads(path.read_text())
    assert doc["settings"]["ssim"] == {"scales": 1, "kernel_size": 7, "sigma": pytest.approx(0.954545), "k1": 0.01, "k2": 0.03,
                                       "betas": [1.0], "data_range": None}
    check_stats_match(again, planted_model, path)
    doc["model"]["fingerprint"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="computed on another model"):
        check_stats_match(load_stats(other), planted_model, other)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="expected 'nemo-surgery.stats'"):
        load_stats(broken)


def test_tau_is_mean_plus_one_std_of_holdout_pairwise_scores(planted_stats, planted_model, holdout_file):
    from nemo_surgery.engine.prompts import read_prompts
    from nemo_surgery.engine.score import Scorer, pairwise_indices

    _, stats = planted_stats
    scorer = Scorer(planted_model, planted_model.layers, stats.settings, batch_size=40)
    prompts = [p.text for p in read_prompts(holdout_file)]
    deltas = scorer.noise_differences(planted_model.encode(prompts))
    i, j = pairwise_indices(stats.settings.seeds)
    values = torch.cat([scorer.pairwise(d)[i, j] for d in deltas]).double()
    assert stats.tau == pytest.approx(float(values.mean() + values.std()), rel=1e-5)


def test_fingerprint_does_not_depend_on_dtype(planted, planted_model, planted_stats):
    stats_path, stats = planted_stats
    bf16 = load_model(planted[0], device="cpu", dtype="bf16")
    assert bf16.fingerprint == planted_model.fingerprint
    check_stats_match(stats, bf16, stats_path)
