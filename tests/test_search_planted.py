"""The split search on the planted UNet: same neurons as NeMo's sequential order, 5x fewer UNet calls, 1-minimal."""

import pytest
import torch

from nemo_surgery.engine.layers import select_layers
from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import run_scan
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.selection import SelectionSettings
from nemo_surgery.engine.stats import value_activations
from tests.models.plant import ORDINARY_PROMPTS, TRIGGER_PROMPT


def _assert_contract(model, stats, layers_spec, result):
    """The contract, re-measured in fresh UNet calls: F mitigates and F minus any one neuron does not."""
    layers = select_layers(model.layers, layers_spec)
    scorer = Scorer(model, layers, stats.settings, batch_size=40)
    cond = model.encode([result.prompt])
    base = scorer.noise_differences(cond)[0]
    kept = torch.tensor(result.kept_seeds)
    flat = torch.zeros(scorer.total_neurons, dtype=torch.bool)
    for layer, sl in zip(layers, scorer.slices):
        flat[[sl.start + n for n in result.neurons.get(layer.id, [])]] = True
    members = torch.nonzero(flat).flatten()
    masks = flat.repeat(members.numel() + 1, 1)
    masks[torch.arange(1, members.numel() + 1), members] = False
    scores = scorer.mitigation_scores(cond, base, kept, masks)
    assert scores[0] < stats.tau and scores[0].item() == pytest.approx(result.final_score, abs=1e-5)
    assert (scores[1:] >= stats.tau).all()


def test_split_needs_five_times_fewer_unet_calls_than_the_reference_order(planted, planted_model, planted_stats, tmp_path):
    """theta from 1 over every value layer: ~80 candidates, of which the planted rows 3 and 7 are needed."""
    stats_path, stats = planted_stats
    _, plant = planted
    results = {}
    for strategy in ("reference", "split"):
        summary = run_scan(planted_model, stats, stats_path, [Prompt(0, TRIGGER_PROMPT, 1)], tmp_path / f"{strategy}.json",
                           layers="all", batch_size=40, selection=SelectionSettings(theta_start=1.0, strategy=strategy))
        results[strategy] = summary.results[0]
    ref, ours = results["reference"], results["split"]
    assert ref.initial_count == ours.initial_count >= 50
    assert ours.neurons == ref.neurons == {plant.layer_id: sorted(plant.rows)}
    assert ours.unet_calls * 5 <= ref.unet_calls, (ours.unet_calls, ref.unet_calls)
    assert ours.samples < ref.samples
    _assert_contract(planted_model, stats, "all", ours)


@pytest.mark.parametrize("theta", [5.0, 2.0])
def test_a_planted_prompt_costs_two_unet_calls(planted, planted_model, planted_stats, tmp_path, theta):
    """Batch 40 = detection + 3 speculated sets, then one call that finds and certifies the two planted rows.

    theta 5 (NeMo's start) gives the two rows as the first candidate set; theta 2 a set of 5-20 candidates
    (the benchmark's planted case). NeMo's order needs 7-14 calls for these.
    """
    stats_path, stats = planted_stats
    _, plant = planted
    summary = run_scan(planted_model, stats, stats_path, [Prompt(0, TRIGGER_PROMPT, 1)], tmp_path / "split.json",
                       batch_size=40, selection=SelectionSettings(theta_start=theta))
    res = summary.results[0]
    assert res.mitigated and res.neurons == {plant.layer_id: sorted(plant.rows)}
    assert res.unet_calls <= 2, (res.unet_calls, res.samples, res.initial_count)
    _assert_contract(planted_model, stats, "default", res)


def test_sets_scored_in_the_detection_call_equal_a_separate_call(planted_model, planted_stats):
    """Speculation is exact: the same noise differences and per-seed scores, and no extra UNet call."""
    _, stats = planted_stats
    layers = select_layers(planted_model.layers, "default")
    scorer = Scorer(planted_model, layers, stats.settings, batch_size=40)
    cond = planted_model.encode([TRIGGER_PROMPT])
    sets = torch.rand(3, scorer.total_neurons, generator=torch.Generator().manual_seed(0)) < 0.1
    base, per_seed = scorer.noise_differences_with(cond, sets)
    assert scorer.counter.calls == 1 and scorer.counter.samples == 40
    alone = scorer.noise_differences(cond)[0]
    torch.testing.assert_close(base, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_seed, scorer.seed_scores(cond, alone, torch.arange(10), sets), atol=1e-6, rtol=0)


def test_a_wide_detection_call_finds_and_certifies_the_planted_rows(planted, planted_model, planted_stats, tmp_path):
    """Batch 160: the detection call holds the lattice of the first set's top neurons, so the answer costs no other call.

    An ordinary prompt with no neuron beyond theta_start gets no speculated set: it costs its 10 seeds' samples.
    """
    stats_path, stats = planted_stats
    _, plant = planted
    summary = run_scan(planted_model, stats, stats_path, [Prompt(0, TRIGGER_PROMPT, 1), Prompt(1, ORDINARY_PROMPTS[0], 2)],
                       tmp_path / "wide.json", batch_size=160, selection=SelectionSettings(theta_start=5.0))
    res, other = summary.results
    assert res.mitigated and res.neurons == {plant.layer_id: sorted(plant.rows)}
    assert res.unet_calls == 1, (res.unet_calls, res.samples, res.initial_count)
    _assert_contract(planted_model, stats, "default", res)
    layers = select_layers(planted_model.layers, "default")
    cond = planted_model.encode([ORDINARY_PROMPTS[0]])
    assert stats.z_scores(layers, value_activations(layers, cond.hidden)[0]).max() <= 5.0  # nothing beyond theta_start
    assert not other.memorized and other.unet_calls == 1 and other.samples == stats.settings.seeds == 10
