"""The refinement strategies on deterministic oracles: the 1-minimal contract and the work they need."""

import pytest
import torch

from nemo_surgery.engine.selection import (
    CachedOracle,
    SelectionSettings,
    certify,
    initial_selection,
    probe_positions,
    refine,
    search_oracle,
    split_search,
)

TAU = 0.35


class Oracle:
    """A deterministic score over blocked sets: high while any needed neuron is unblocked.

    ``wobble`` adds a non-monotone term that depends on which other neurons
    are blocked. Counts oracle calls and scored sets like the UNet counter.
    """

    def __init__(self, total, needed, wobble=0.0, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.rand(total, generator=gen)
        self.needed = torch.tensor(sorted(needed))
        self.wobble = wobble
        self.calls = self.sets = 0

    def __call__(self, masks):
        self.calls += 1
        self.sets += masks.shape[0]
        missing = (~masks[:, self.needed]).float().sum(dim=1)
        return 0.2 + 0.5 * missing + self.wobble * torch.sin((masks.float() * self.weights).sum(dim=1) * 7)


def _assert_one_minimal(oracle, found, score):
    """The contract, re-measured: found mitigates, and removing any one member does not."""
    again = oracle(found.unsqueeze(0))[0]
    assert again < TAU and again.item() == pytest.approx(score)
    members = torch.nonzero(found).flatten()
    masks = found.repeat(members.numel(), 1)
    masks[torch.arange(members.numel()), members] = False
    assert (oracle(masks) >= TAU).all()


def _case(total=400, n_needed=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    needed = torch.randperm(total, generator=gen)[:n_needed].tolist()
    z = torch.rand(total, generator=gen) * 3
    z[needed] += 1.5  # informative but imperfect ordering: some ordinary neurons outrank needed ones
    return needed, z


@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("wobble", [0.0, 0.2])
def test_split_search_result_is_one_minimal(width, wobble):
    blocked = torch.ones(400, dtype=torch.bool)
    for seed in range(width, width + 20):  # a case whose full candidate set mitigates
        needed, z = _case(seed=seed)
        oracle = Oracle(400, needed, wobble=wobble, seed=seed)
        start = float(oracle(blocked.unsqueeze(0))[0])
        if start < TAU:
            break
    assert start < TAU
    found, score = refine(blocked, [slice(0, 200), slice(200, 400)], z, oracle, TAU, width, start, "split")
    _assert_one_minimal(oracle, found, score)
    if wobble == 0.0:  # a monotone score: exactly the needed neurons
        assert set(torch.nonzero(found).flatten().tolist()) == set(needed)


def test_split_needs_far_fewer_sets_and_calls_than_the_reference_order():
    needed, z = _case()
    slices = [slice(0, 200), slice(200, 400)]
    blocked = torch.ones(400, dtype=torch.bool)
    ref, ours = Oracle(400, needed), Oracle(400, needed)
    start = float(ref(blocked.unsqueeze(0))[0])
    ref.calls = ref.sets = 0
    ref_set, _ = refine(blocked, slices, z, ref, TAU, 4, start, "reference")
    got, score = refine(blocked, slices, z, ours, TAU, 4, start, "split")
    assert got.sum() <= ref_set.sum()
    assert ref.calls == ref.sets  # one set per call
    assert ours.calls * 5 <= ref.calls and ours.sets * 5 <= ref.sets, (ours.calls, ours.sets, ref.calls)


def test_certify_removes_what_split_search_could_not_know_was_redundant():
    """Non-monotone case: a set whose members are not all needed is cut down by certification."""
    oracle = Oracle(10, [2, 5])
    blocked = torch.zeros(10, dtype=torch.bool)
    blocked[[1, 2, 5, 8]] = True
    found, score = certify(blocked, oracle, TAU, float(oracle(blocked.unsqueeze(0))[0]))
    assert torch.nonzero(found).flatten().tolist() == [2, 5]
    _assert_one_minimal(oracle, found, score)


def test_split_search_stops_when_the_kept_neurons_mitigate():
    oracle = Oracle(50, [0, 1])
    z = torch.zeros(50)
    z[:2] = float("inf")
    blocked = torch.ones(50, dtype=torch.bool)
    found, _ = split_search(blocked, z, oracle, TAU, 4, float(oracle(blocked.unsqueeze(0))[0]))
    assert torch.nonzero(found).flatten().tolist() == [0, 1]
    assert oracle.calls <= 5


def test_probe_positions():
    assert probe_positions(0, 4, 8) == [1, 2, 3]
    assert probe_positions(-1, 3, 8) == [0, 1, 2]
    assert probe_positions(0, 100, 4) == [3, 6, 16, 40]  # geometric: short prefixes are found in one call
    assert probe_positions(-1, 100, 4)[0] == 0 and len(probe_positions(-1, 100, 4)) == 4
    assert probe_positions(10, 11, 4) == []


def test_reference_initial_selection_scores_one_step_per_call():
    oracle = Oracle(40, [3])
    z = torch.arange(40, dtype=torch.float32) / 10  # neuron 3 has z 0.3: found only via top-k
    acts = torch.zeros(40)
    acts[3] = 1.0
    ref = initial_selection(z, acts, [slice(0, 40)], oracle, TAU, 8, SelectionSettings(strategy="reference"))
    assert ref.mitigated and oracle.calls == oracle.sets
    with pytest.raises(ValueError, match="unknown search strategy"):
        SelectionSettings(strategy="fast")


def test_small_first_set_is_certified_in_the_initial_selection_call():
    """Speculative one-removals ride along with the first schedule step; certification then costs no call."""
    raw = Oracle(40, [3, 7])
    z = torch.zeros(40)
    z[[3, 7]] = float("inf")
    settings = SelectionSettings()
    oracle = search_oracle(raw, settings)
    assert isinstance(oracle, CachedOracle) and search_oracle(raw, SelectionSettings(strategy="reference")) is raw
    init = initial_selection(z, torch.zeros(40), [slice(0, 40)], oracle, TAU, 4, settings)
    assert init.mitigated and raw.calls == 1 and raw.sets == 4  # two schedule steps, then {7} and {3}
    found, score = refine(init.blocked, [slice(0, 40)], z, oracle, TAU, 4, init.score, "split")
    assert raw.calls == 1  # answered from memory
    assert torch.nonzero(found).flatten().tolist() == [3, 7]
    _assert_one_minimal(raw, found, score)


@pytest.mark.parametrize("wobble", [0.0, 0.2])
def test_certify_drops_many_redundant_neurons_in_few_calls(wobble):
    """A wide batch certifies a mostly redundant set without one call per dropped neuron."""
    oracle = Oracle(30, [2, 5], wobble=wobble, seed=3)
    blocked = torch.ones(30, dtype=torch.bool)
    start = float(oracle(blocked.unsqueeze(0))[0])
    oracle.calls = 0
    found, score = certify(blocked, oracle, TAU, start, width=32)
    _assert_one_minimal(oracle, found, score)
    if wobble == 0.0:
        assert torch.nonzero(found).flatten().tolist() == [2, 5] and oracle.calls <= 5  # width 1 would need 29


def test_dense_needed_neurons_switch_to_greedy_and_stay_below_the_reference():
    """When a third of the candidates are needed, splitting alone would cost more than NeMo's linear pass."""
    needed, z = _case(total=150, n_needed=50, seed=5)
    slices = [slice(0, 150)]
    blocked = torch.ones(150, dtype=torch.bool)
    ref, ours = Oracle(150, needed), Oracle(150, needed)
    start = float(ref(blocked.unsqueeze(0))[0])
    ref.calls = ref.sets = 0
    refine(blocked, slices, z, ref, TAU, 4, start, "reference")
    found, score = refine(blocked, slices, z, ours, TAU, 4, start, "split")
    assert set(torch.nonzero(found).flatten().tolist()) == set(needed)
    assert ours.calls < ref.calls, (ours.calls, ref.calls)
    _assert_one_minimal(Oracle(150, needed), found, score)
