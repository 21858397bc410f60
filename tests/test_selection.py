"""The search strategies on deterministic oracles: the 1-minimal contract and the work (calls, sets) they need."""

import pytest
import torch

from nemo_surgery.engine.oracles import CachedOracle, certify
from nemo_surgery.engine.selection import (
    SelectionSettings,
    candidate_sets,
    initial_selection,
    rank_within_layers,
    refine,
    schedule,
    search_oracle,
)
from nemo_surgery.engine.speculation import detection_sets, remember_kept, spare_sets, speculation_room
from nemo_surgery.engine.split import (
    ladder_rungs,
    ladder_sets,
    priority_order,
    probe_positions,
    split_search,
    subset_lattice,
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


def test_ladder_sets_hold_every_prefix_and_its_one_removals():
    order = torch.tensor([5, 2, 9, 0, 7])
    like = torch.zeros(10, dtype=torch.bool)
    rows = [sorted(torch.nonzero(r).flatten().tolist()) for r in ladder_sets(order, 4, like)]
    assert rows == [[5], [2, 5], [2]]  # prefixes 1, 2, then {5, 2} minus 5
    wide = [sorted(torch.nonzero(r).flatten().tolist()) for r in ladder_sets(order, 12, like)]
    assert wide == [[5], [2, 5], [2, 5, 9], [2], [2, 9], [5, 9]] and ladder_rungs(len(wide)) == 3
    assert ladder_sets(order, 3, like).shape == (0, 10)  # no room for a ladder and a probe
    assert ladder_sets(order[:2], 40, like).shape[0] == 0  # a ladder stops short of the whole order (known to pass)
    assert ladder_sets(order[:3], 40, like).shape[0] == 3
    assert ladder_rungs(0) == 0


def test_a_top_two_set_is_found_and_certified_in_one_call():
    """Twelve candidates, the two highest z-scores needed: the first probe call's ladder certifies them."""
    oracle = Oracle(12, [4, 9])
    z = torch.arange(12, dtype=torch.float32)
    z[[4, 9]] = torch.tensor([20.0, 19.0])
    blocked = torch.ones(12, dtype=torch.bool)
    start = float(oracle(blocked.unsqueeze(0))[0])
    oracle.calls = 0
    cached = CachedOracle(oracle)
    found, score = refine(blocked, [slice(0, 12)], z, cached, TAU, 4, start, "split")
    assert torch.nonzero(found).flatten().tolist() == [4, 9]
    assert oracle.calls == 1  # {4}, {4, 9}, {9} and one longer probe; certification answered from memory
    _assert_one_minimal(oracle, found, score)


def test_initial_selection_skips_remembered_steps():
    """Steps scored in the detection call take no room; a remembered mitigating step costs no call."""
    z = torch.linspace(0, 6, 40)
    acts = torch.linspace(0, 1, 40)
    settings = SelectionSettings(theta_start=5.0)
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, [slice(0, 40)]), steps)
    raw = Oracle(40, [0])  # neuron 0 has the lowest z and activation: no candidate set holds it
    oracle = CachedOracle(raw)
    oracle.remember(cands[:2], torch.tensor([0.9, 0.9]))
    init = initial_selection(z, acts, [slice(0, 40)], oracle, TAU, 4, settings)
    fresh = {tuple(c.tolist()) for c in cands[2:]} - {tuple(c.tolist()) for c in cands[:2]}
    assert not init.mitigated and raw.sets == len(fresh) > 4
    assert raw.calls == -(-raw.sets // 4)  # four fresh steps per call (the first set is too big for removals)
    raw2 = Oracle(40, [39])
    oracle2 = CachedOracle(raw2)
    oracle2.remember(cands[:2], torch.tensor([0.9, 0.2]))
    init2 = initial_selection(z, acts, [slice(0, 40)], oracle2, TAU, 4, settings)
    assert init2.mitigated and init2.theta == steps[1][0] and raw2.calls == 0


def _members(rows):
    return [sorted(torch.nonzero(r).flatten().tolist()) for r in rows]


def test_speculation_fills_only_the_room_of_the_detection_call():
    assert [spare_sets(10, b) for b in (10, 19, 32, 40, 8, 1024)] == [0, 0, 2, 3, 0, 101]
    assert [speculation_room(10, b) for b in (19, 32, 40, 1024)] == [0, 2, 3, 10]  # capped: a cost for others
    z = torch.linspace(0, 6, 40)  # neurons 33-39 lie beyond theta_start 5
    acts = torch.zeros(40)
    settings = SelectionSettings(theta_start=5.0)
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, [slice(0, 40)]), steps)
    sets = detection_sets(z, acts, [slice(0, 40)], settings, 3)
    assert sets.shape == (3, 40) and torch.equal(sets[0], cands[-1])  # the widest (unmovable-seed floor) first
    assert torch.equal(sets[1], cands[0]) and _members(sets[2:]) == [[39]]  # then the first step, the top-z neuron
    ten = detection_sets(z, acts, [slice(0, 40)], settings, 10)
    assert _members(ten[2:9]) == [[39], [38], [37], [38, 39], [37, 39], [37, 38], [37, 38, 39]]  # top-3 lattice
    assert torch.equal(ten[9], cands[1])  # the room left: the next step
    assert detection_sets(z, acts, [slice(0, 40)], settings, 0).shape == (0, 40)
    assert detection_sets(z * 0.8, acts, [slice(0, 40)], settings, 100).shape == (0, 40)  # no z beyond 5: nothing
    oracle = CachedOracle(Oracle(40, [0]))
    per_seed = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.1, 0.9], [0.4, 0.4, 0.4]])
    remember_kept(oracle, sets, per_seed, torch.tensor([0, 1]))
    assert [oracle.known(s) for s in sets] == pytest.approx([0.5, 0.2, 0.4])


def test_a_remembered_lattice_is_refined_and_certified_without_a_call():
    """The detection call's subset lattice holds the answer and its removals: refine asks the UNet nothing."""
    z = torch.zeros(20)
    z[[3, 8, 11, 15]] = torch.tensor([9.0, 8.9, 8.8, 6.0])  # a tied top three, then one more candidate
    blocked = z > 5
    raw = Oracle(20, [8, 11])  # the second and third by z: no ladder prefix is the answer
    oracle = CachedOracle(raw)
    lattice = subset_lattice(priority_order(blocked, z), 3, blocked)
    oracle.remember(torch.cat([blocked[None], lattice]), raw(torch.cat([blocked[None], lattice])))
    raw.calls = 0
    found, score = refine(blocked, [slice(0, 20)], z, oracle, TAU, 4, float(oracle.known(blocked)), "split")
    assert _members([found]) == [[8, 11]] and raw.calls == 0
    _assert_one_minimal(raw, found, score)
    assert oracle.certified_subset(blocked & (z < 8.85), TAU) is None  # {8, 11} is not inside: nothing remembered


@pytest.mark.parametrize("needed, width, calls", [
    ([4, 9], 4, 1),  # four candidates, the top two needed: the ladder finds and certifies them
    ([1, 4, 6, 9], 4, 2),  # all four needed: the ladder call finds nothing, certification needs one more
    ([1, 4, 6, 9], 8, 1),  # ladder and all four removals fit one call
])
def test_a_small_first_set_tries_its_ladder_with_its_removals(needed, width, calls):
    oracle = Oracle(12, needed)
    z = torch.zeros(12)
    z[[4, 9, 1, 6]] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    blocked = torch.zeros(12, dtype=torch.bool)
    blocked[[1, 4, 6, 9]] = True
    start = float(oracle(blocked.unsqueeze(0))[0])
    oracle.calls = 0
    found, score = refine(blocked, [slice(0, 12)], z, oracle, TAU, width, start, "split")
    assert sorted(torch.nonzero(found).flatten().tolist()) == sorted(needed) and oracle.calls == calls
    _assert_one_minimal(oracle, found, score)
