"""The scan on a real pipeline with planted memorization: detection, the set, its contract."""

import json

import pytest
import torch

from nemo_surgery.engine.prompts import Prompt
from nemo_surgery.engine.scan import records_path_for, run_scan
from nemo_surgery.engine.score import Scorer
from nemo_surgery.engine.selection import greedy_drop
from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import load_neuron_set
from tests.models.plant import TRIGGER_PROMPT

ORDINARY = ["a photo of a dog", "a small black cat on a red house"]


def _prompts(*texts):
    return [Prompt(index=i, text=t, line=i + 1) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def scanned(planted, planted_model, planted_stats, tmp_path_factory):
    stats_path, stats = planted_stats
    out = tmp_path_factory.mktemp("scan") / "set.json"
    prompts = _prompts(TRIGGER_PROMPT, *ORDINARY, "an astronaut on the moon")
    summary = run_scan(planted_model, stats, stats_path, prompts, out, batch_size=40)
    return summary, out


def test_trigger_prompts_are_flagged_and_ordinary_ones_are_not(scanned):
    summary, _ = scanned
    flags = {r.prompt: r.memorized for r in summary.results}
    assert flags == {TRIGGER_PROMPT: True, ORDINARY[0]: False, ORDINARY[1]: False, "an astronaut on the moon": True}
    for r in summary.results:
        if not r.memorized:
            assert r.neurons == {} and r.count == 0 and r.unet_calls == 1
    assert summary.exit_code == 0 and summary.not_mitigated == []


def test_set_contains_the_planted_rows_and_meets_the_contract(scanned, planted, planted_model, planted_stats):
    summary, _ = scanned
    _, plant = planted
    _, stats = planted_stats
    res = summary.results[0]
    assert res.mitigated and set(plant.rows) <= set(res.neurons.get(plant.layer_id, []))
    # contract, checked by re-scoring: F mitigates; F minus any one neuron does not
    from nemo_surgery.engine.layers import select_layers

    layers = select_layers(planted_model.layers, "default")
    scorer = Scorer(planted_model, layers, stats.settings, batch_size=40)
    cond = planted_model.encode([res.prompt])
    base = scorer.noise_differences(cond)[0]
    kept = scorer.detect(base, stats.tau).kept
    flat = torch.zeros(scorer.total_neurons, dtype=torch.bool)
    for layer, sl in zip(layers, scorer.slices):
        for n in res.neurons.get(layer.id, []):
            flat[sl.start + n] = True
    members = torch.nonzero(flat).flatten()
    masks = flat.repeat(members.numel() + 1, 1)
    masks[torch.arange(1, members.numel() + 1), members] = False
    scores = scorer.mitigation_scores(cond, base, kept, masks)
    assert scores[0] < stats.tau
    assert scores[0].item() == pytest.approx(res.final_score, abs=1e-5)
    assert (scores[1:] >= stats.tau).all()


def test_neuron_set_file_format(scanned, planted, planted_model):
    summary, out = scanned
    _, plant = planted
    doc = json.loads(out.read_text())
    assert doc["format"] == "nemo-surgery.neuron-set" and doc["version"] == 1
    assert doc["model"]["fingerprint"] == planted_model.fingerprint
    assert [entry["id"] for entry in doc["layers"]] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    mid = doc["layers"][1]
    assert (mid["rows"], mid["cols"], mid["ldm_id"]) == (32, 32, "middle_block.1.transformer_blocks.0.attn2.to_v")
    assert mid["neurons"] == sorted(plant.rows)
    assert mid["needed_by"] == [[0, 3], [0, 3]]
    assert doc["total_neurons"] == 2 == summary.total_neurons
    assert doc["settings"]["tau"] == pytest.approx(summary.tau)
    assert load_neuron_set(out).total == 2
    records = [json.loads(line) for line in records_path_for(out).read_text().splitlines()]
    assert records[0]["type"] == "header" and len(records) == 5
    for key in ("prompt", "memorized", "detection_score", "initial_neurons", "neurons", "final_score",
                "mitigated", "unet_calls", "samples", "seconds"):
        assert key in records[1]


def test_resume_skips_recorded_prompts_and_drops_a_torn_line(scanned, planted_model, planted_stats, tmp_path):
    stats_path, stats = planted_stats
    summary, out = scanned
    lines = records_path_for(out).read_text().splitlines(keepends=True)
    new_out = tmp_path / "set.json"
    records_path_for(new_out).write_text("".join(lines[:3]) + lines[3][:20])  # header, 2 done, torn third
    prompts = _prompts(TRIGGER_PROMPT, *ORDINARY, "an astronaut on the moon")
    resumed = run_scan(planted_model, stats, stats_path, prompts, new_out, batch_size=40, resume=True)
    assert resumed.resumed == 2
    assert resumed.unet_calls == summary.unet_calls  # recorded counts are kept, not recomputed
    assert [r.neurons for r in resumed.results] == [r.neurons for r in summary.results]
    assert json.loads(new_out.read_text())["layers"] == json.loads(out.read_text())["layers"]
    assert len(records_path_for(new_out).read_text().splitlines()) == 5


def test_no_memorized_prompt_gives_an_empty_set(planted_model, planted_stats, tmp_path):
    stats_path, stats = planted_stats
    summary = run_scan(planted_model, stats, stats_path, _prompts(*ORDINARY), tmp_path / "s.json")
    assert summary.memorized == 0 and summary.total_neurons == 0 and summary.exit_code == 0
    assert all(not layer["neurons"] for layer in json.loads((tmp_path / "s.json").read_text())["layers"])


def test_refusals(planted_model, planted_stats, tmp_path):
    stats_path, stats = planted_stats
    out = tmp_path / "s.json"
    run_scan(planted_model, stats, stats_path, _prompts(ORDINARY[0]), out)
    with pytest.raises(InputError, match="exists; pass --force"):
        run_scan(planted_model, stats, stats_path, _prompts(ORDINARY[0]), out)
    with pytest.raises(InputError, match="unknown value layer"):
        run_scan(planted_model, stats, stats_path, _prompts(ORDINARY[0]), tmp_path / "t.json", layers="nope")


def _sequential_greedy(blocked, groups, oracle, tau):
    current = blocked.clone()
    for g in groups:
        trial = current.clone()
        trial[g] = False
        if trial.equal(current):
            continue
        if oracle(trial.unsqueeze(0))[0] < tau:
            current = trial
    return current


@pytest.mark.parametrize("width", [1, 2, 3, 7, 50])
def test_speculative_greedy_equals_the_sequential_pass(width):
    """Batching decisions never changes the result (a deterministic, non-monotone score)."""
    gen = torch.Generator().manual_seed(width)
    weights = torch.rand(40, generator=gen)
    needed = {3, 17, 29}

    def oracle(masks):
        present = masks.float()
        missing_needed = sum((~masks[:, n]).float() for n in needed)
        return 0.2 + missing_needed * 0.5 + 0.1 * torch.sin((present * weights).sum(dim=1) * 7)

    start = torch.ones(40, dtype=torch.bool)
    groups = [torch.tensor([i]) for i in torch.randperm(40, generator=gen).tolist()]
    expected = _sequential_greedy(start, groups, oracle, tau=0.35)
    got, dropped, score = greedy_drop(start, groups, oracle, 0.35, width, predict_drop=True, score=0.0)
    assert got.equal(expected)
    assert dropped == int(start.sum() - expected.sum())
    assert score == pytest.approx(float(oracle(got.unsqueeze(0))[0]))
    assert set(torch.nonzero(got).flatten().tolist()) >= needed
