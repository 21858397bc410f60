"""NeMo's neuron search (initial selection, layer- and neuron-wise refinement), batched.

Pure logic over boolean "blocked" vectors of length T (the concatenated
neurons of the scanned layers) and an oracle that scores many candidate sets
in one call. Every step is a greedy decision sequence that the sequential
algorithm would take; we evaluate the next few decisions speculatively in one
oracle call and keep the prefix that is valid, so the result equals the
sequential one while UNet calls drop. A final certification pass makes the
result 1-minimal: removing any single neuron breaks mitigation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Scores a batch of candidate sets: bool [M, T] -> float [M] (lower = less memorized).
Oracle = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SelectionSettings:
    """Schedule of the initial selection."""

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0


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

    Steps are evaluated ``width`` at a time in one oracle call; identical
    consecutive sets are scored once.
    """
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, slices), steps)
    distinct = [j for j in range(len(steps)) if j == 0 or not torch.equal(cands[j], cands[j - 1])]
    best, last_score, last_idx = float("inf"), 1.0, len(steps) - 1
    for start in range(0, len(distinct), max(1, width)):
        block = distinct[start : start + max(1, width)]
        for idx, score in zip(block, oracle(cands[block]).tolist()):
            best = min(best, score)
            last_score, last_idx = score, idx
            if score < tau:
                theta, k = steps[idx]
                return InitialSelection(cands[idx].clone(), score, True, theta, k, best)
    theta, k = steps[last_idx]
    return InitialSelection(cands[-1].clone(), last_score, False, theta, k, best)


def greedy_drop(
    blocked: torch.Tensor,
    groups: Sequence[torch.Tensor],
    oracle: Oracle,
    tau: float,
    width: int,
    predict_drop: bool = True,
    score: float = float("nan"),
) -> tuple[torch.Tensor, int, float]:
    """Greedily drop each group (index tensor) from the set if the set without it still mitigates.

    Exactly the sequential greedy pass, evaluated ``width`` decisions per
    oracle call: the next decisions are speculated (each predicted equal to
    the last actual decision) and the evaluated prefix up to and including
    the first mis-prediction is kept. Returns the reduced set, the number
    of groups dropped, and the reduced set's score (``score`` when nothing
    was dropped).
    """
    current = blocked.clone()
    groups = [g for g in groups if current[g].any()]
    dropped, pos, predict = 0, 0, predict_drop
    while pos < len(groups):
        masks, preds = [], []
        state = current.clone()
        for g in groups[pos : pos + max(1, width)]:
            trial = state.clone()
            trial[g] = False
            masks.append(trial)
            preds.append(predict)
            if predict:
                state = trial
        scores = oracle(torch.stack(masks)).tolist()
        for mask, pred, trial_score in zip(masks, preds, scores):
            pos += 1
            drop = trial_score < tau
            if drop:
                current, score = mask, trial_score
                dropped += 1
            predict = drop
            if drop != pred:
                break
    return current, dropped, score


def refine(
    blocked: torch.Tensor,
    slices: Sequence[slice],
    z: torch.Tensor,
    oracle: Oracle,
    tau: float,
    width: int,
    score: float,
) -> tuple[torch.Tensor, float]:
    """Layer-wise then neuron-wise refinement (layers in reverse order), then certify 1-minimality.

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
