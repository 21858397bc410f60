"""Scoring candidate sets through an oracle: memory of scored sets, the speculative greedy drop, certification.

Shared by every refinement strategy (:mod:`nemo_surgery.engine.selection`,
:mod:`nemo_surgery.engine.split`). An oracle scores a batch of "blocked"
vectors in one UNet call; lower scores are less memorized, and a set
mitigates when its score is below tau.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

#: Scores a batch of candidate sets: bool [M, T] -> float [M] (lower = less memorized).
Oracle = Callable[[torch.Tensor], torch.Tensor]


class CachedOracle:
    """An oracle that remembers every set it scored: asking again costs no UNet call.

    Speculative rows (e.g. :func:`speculative_removals`) ride along in one
    call and are answered from memory later; identical rows of one request are
    scored once.
    """

    def __init__(self, oracle: Oracle):
        self.oracle = oracle
        self.cache: dict[bytes, float] = {}

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        keys = [row.numpy().tobytes() for row in masks.cpu()]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            scores = self.oracle(masks[[first[k] for k in todo]]).tolist()
            self.cache.update(zip(todo, scores))
        return torch.tensor([self.cache[k] for k in keys])

    def known(self, mask: torch.Tensor) -> float | None:
        """The remembered score of one set, or None when it was never scored."""
        return self.cache.get(mask.cpu().numpy().tobytes())

    def certified_subset(self, within: torch.Tensor, tau: float) -> torch.Tensor | None:
        """The smallest remembered subset of ``within`` that mitigates and whose one-removals are all remembered.

        Such a set needs no UNet call to be handed to :func:`certify` (e.g. a
        subset lattice scored in the detection call). Ties: the lower score.
        None when there is none.
        """
        inside = ~within.cpu().numpy()
        found: list[tuple[int, float, np.ndarray]] = []
        for key, score in self.cache.items():
            row = np.frombuffer(key, dtype=np.bool_)
            if score < tau and row.shape == inside.shape and row.any() and not (row & inside).any():
                found.append((int(row.sum()), score, row))
        for *_, row in sorted(found, key=lambda item: item[:2]):
            members = np.flatnonzero(row)
            removals = np.repeat(row[None], members.size, axis=0)
            removals[np.arange(members.size), members] = False
            if all(not r.any() or r.tobytes() in self.cache for r in removals):
                return torch.from_numpy(row.copy()).to(within.device)
        return None

    def remember(self, masks: torch.Tensor, scores: torch.Tensor) -> None:
        """Record scores measured elsewhere (e.g. in the detection call) for sets [M, T]."""
        self.cache.update(zip((row.numpy().tobytes() for row in masks.cpu()), scores.tolist()))


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


def certify(current: torch.Tensor, oracle: Oracle, tau: float, score: float, width: int = 1) -> tuple[torch.Tensor, float]:
    """Score every one-neuron removal of ``current`` in one batch; while some still mitigate, drop them.

    The removable neurons are dropped greedily, best first, ``width``
    speculated decisions per call (:func:`greedy_drop`), then the smaller set
    is certified again. Returns a 1-minimal set and its score: the last call
    proved that no single removal mitigates.
    """
    current = current.clone()
    while True:
        members = torch.nonzero(current).flatten()
        if members.numel() == 0:
            return current, score
        masks = current.repeat(members.numel(), 1)
        masks[torch.arange(members.numel()), members] = False
        scores = oracle(masks)
        order = torch.argsort(scores, stable=True)
        removable = [members[i].view(1) for i in order.tolist() if float(scores[i]) < tau]
        if not removable:
            return current, score
        if len(removable) == 1 or width <= 1:
            current[removable[0]] = False
            score = float(scores[order[0]])
            continue
        current, _, score = greedy_drop(current, removable, oracle, tau, width, predict_drop=True, score=score)
