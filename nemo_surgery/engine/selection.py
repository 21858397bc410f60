"""NeMo's neuron search: initial selection, then refinement to a 1-minimal set, batched.

Pure logic over boolean "blocked" vectors of length T (the concatenated
neurons of the scanned layers) and an oracle that scores many candidate sets
in one call. Three refinement strategies share one contract (the result F
has score(F) < tau and score(F minus n) >= tau for every n in F, re-measured):

* ``split`` (default, :mod:`nemo_surgery.engine.split`): adaptive splitting of
  the z-ordered candidates (find the shortest mitigating prefix with several
  probes per oracle call, keep its last neuron, repeat on the part before
  it), then a certification call; O(|F| log |C|) scored sets instead of
  O(|C|). The first probe call carries a "ladder" that finds and certifies a
  one- or two-neuron answer at once; a candidate set whose one-removals fit
  one call is scored with them and its ladder together.
* ``greedy``: NeMo's layer-wise then neuron-wise greedy drop, with the next
  decisions speculated in one oracle call (same result as sequential), and
  repeated until a pass drops nothing.
* ``reference``: NeMo's sequential order, one candidate set per oracle call,
  one layer pass and one neuron pass: the baseline the benchmark compares to.

Scored sets are remembered (:class:`~nemo_surgery.engine.oracles.CachedOracle`),
except by ``reference``; the initial selection skips steps already scored
(e.g. in the detection call, :mod:`nemo_surgery.engine.speculation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemo_surgery.engine.oracles import CachedOracle, Oracle, certify, greedy_drop  # noqa: F401 (re-exported)
from nemo_surgery.engine.split import small_set_search, split_search

#: Refinement strategies (see the module docstring).
STRATEGIES = ("split", "greedy", "reference")


@dataclass(frozen=True)
class SelectionSettings:
    """Schedule of the initial selection and the refinement strategy."""

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    strategy: str = "split"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown search strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")


@dataclass
class InitialSelection:
    """Outcome of the initial selection."""

    blocked: torch.Tensor  # [T] bool: the first candidate set that mitigates, or the last tried
    score: float
    mitigated: bool
    theta: float
    k: int
    best_score: float


def schedule(settings: SelectionSettings) -> list[tuple[float, int]]:
    """The (theta, k) pairs of the initial selection, theta = 1 included."""
    out, theta, k = [], settings.theta_start, 0
    while theta >= settings.theta_min - 1e-9:
        out.append((round(theta, 6), k))
        theta -= settings.theta_step
        k += 1
    return out


def rank_within_layers(acts: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """Rank of each neuron by raw activation inside its layer (0 = highest)."""
    ranks = torch.empty(acts.shape[0], dtype=torch.long)
    for sl in slices:
        order = torch.argsort(acts[sl], descending=True, stable=True)
        r = torch.empty_like(order)
        r[order] = torch.arange(order.numel())
        ranks[sl] = r
    return ranks


def candidate_sets(z: torch.Tensor, ranks: torch.Tensor, steps: list[tuple[float, int]]) -> torch.Tensor:
    """Candidate sets {z > theta} | {top-k per layer}, one row per schedule step: bool [S, T]."""
    thetas = torch.tensor([t for t, _ in steps]).unsqueeze(1)
    ks = torch.tensor([k for _, k in steps]).unsqueeze(1)
    return (z.unsqueeze(0) > thetas) | (ranks.unsqueeze(0) < ks)


def initial_selection(
    z: torch.Tensor,
    acts: torch.Tensor,
    slices: Sequence[slice],
    oracle: Oracle,
    tau: float,
    width: int,
    settings: SelectionSettings = SelectionSettings(),
) -> InitialSelection:
    """Return the first schedule step whose candidate set mitigates (score < tau).

    Steps are evaluated ``width`` at a time in one oracle call (one at a time
    for the ``reference`` strategy); identical consecutive sets are scored once.
    """
    if settings.strategy == "reference":
        width = 1
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, slices), steps)
    distinct = [j for j in range(len(steps)) if j == 0 or not torch.equal(cands[j], cands[j - 1])]
    known = oracle.known if isinstance(oracle, CachedOracle) else (lambda mask: None)
    best, last_score, last_idx = float("inf"), 1.0, len(steps) - 1
    speculate = settings.strategy == "split"
    start = 0
    while start < len(distinct):
        block, fresh, extra = [], 0, cands[:0]
        while start < len(distinct):  # steps already scored (e.g. in the detection call) take no room
            mask, had = cands[distinct[start]], known(cands[distinct[start]])
            if had is None:
                if speculate and not fresh:  # the first set this call scores: its one-removals ride along
                    extra, speculate = speculative_removals(mask, width), False
                if fresh >= max(1, width - extra.shape[0]):
                    break
                fresh += 1
            block.append(distinct[start])
            start += 1
            if had is not None and had < tau:
                break  # a remembered step mitigates: nothing after it is needed
        scores = oracle(torch.cat([cands[block], extra]))[: len(block)]  # extra rows: remembered by a CachedOracle
        for idx, score in zip(block, scores.tolist()):
            best = min(best, score)
            last_score, last_idx = score, idx
            if score < tau:
                theta, k = steps[idx]
                return InitialSelection(cands[idx].clone(), score, True, theta, k, best)
    theta, k = steps[last_idx]
    return InitialSelection(cands[-1].clone(), last_score, False, theta, k, best)


def speculative_removals(first: torch.Tensor, width: int) -> torch.Tensor:
    """The one-neuron removals of the schedule's first candidate set, when it and they fit one call.

    Scored in the first initial-selection call, they let a small first set
    that mitigates be certified 1-minimal without another UNet call.
    """
    members = torch.nonzero(first).flatten()
    if members.numel() == 0 or members.numel() + 1 > width:
        return first.new_zeros((0, first.numel()))
    masks = first.repeat(members.numel(), 1)
    masks[torch.arange(members.numel()), members] = False
    return masks


def search_oracle(oracle: Oracle, settings: SelectionSettings) -> Oracle:
    """The oracle a strategy searches with: remembered scores, except for the sequential reference."""
    return oracle if settings.strategy == "reference" else CachedOracle(oracle)


def refine(
    blocked: torch.Tensor,
    slices: Sequence[slice],
    z: torch.Tensor,
    oracle: Oracle,
    tau: float,
    width: int,
    score: float,
    strategy: str = "split",
) -> tuple[torch.Tensor, float]:
    """Reduce a mitigating set (``score`` < tau) to a 1-minimal one with ``strategy``; return it and its score."""
    if strategy == "split":
        oracle = oracle if isinstance(oracle, CachedOracle) else CachedOracle(oracle)
        known = oracle.certified_subset(blocked, tau)  # e.g. the detection call's subset lattice
        if known is not None:
            return certify(known, oracle, tau, float(oracle.known(known)), width)
        if int(blocked.sum()) <= width:  # all one-removals fit one call
            return certify(*small_set_search(blocked, z, oracle, tau, width, score), width)
        found, found_score = split_search(blocked, z, oracle, tau, width, score)
        return certify(found, oracle, tau, found_score, width)
    if strategy == "reference":
        return reference_refine(blocked, slices, oracle, tau, score)
    return greedy_refine(blocked, slices, z, oracle, tau, width, score)


def reference_refine(
    blocked: torch.Tensor, slices: Sequence[slice], oracle: Oracle, tau: float, score: float
) -> tuple[torch.Tensor, float]:
    """NeMo's sequential refinement: one layer pass, one neuron pass (index order), one set per call."""
    layer_groups = [torch.arange(sl.start, sl.stop) for sl in reversed(slices)]
    current, _, score = greedy_drop(blocked, layer_groups, oracle, tau, 1, score=score)
    neurons = []
    for sl in reversed(slices):
        neurons.extend((torch.nonzero(current[sl]).flatten() + sl.start).split(1))
    current, _, score = greedy_drop(current, neurons, oracle, tau, 1, score=score)
    return current, score


def greedy_refine(
    blocked: torch.Tensor,
    slices: Sequence[slice],
    z: torch.Tensor,
    oracle: Oracle,
    tau: float,
    width: int,
    score: float,
) -> tuple[torch.Tensor, float]:
    """Layer-wise then neuron-wise greedy refinement (layers in reverse order), speculatively batched.

    ``score`` is the score of ``blocked``; returns the refined set and its score.

    Within a layer, neurons with the lowest z-score are tried first. The
    neuron-wise pass repeats until it drops nothing, which proves that no
    single neuron can be removed without breaking mitigation.
    """
    layer_groups = [torch.arange(sl.start, sl.stop) for sl in reversed(slices)]
    current, _, score = greedy_drop(blocked, layer_groups, oracle, tau, width, predict_drop=True, score=score)
    predict = True
    while True:
        neurons = []
        for sl in reversed(slices):
            idx = torch.nonzero(current[sl]).flatten() + sl.start
            neurons.extend(idx[torch.argsort(z[idx], stable=True)].split(1))
        current, dropped, score = greedy_drop(current, neurons, oracle, tau, width, predict_drop=predict, score=score)
        if dropped == 0:
            return current, score
        predict = False  # later passes mostly confirm: speculate "keep"
