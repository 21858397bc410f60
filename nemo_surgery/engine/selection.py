"""NeMo's neuron search: initial selection, then refinement to a 1-minimal set, batched.

Pure logic over boolean "blocked" vectors of length T (the concatenated
neurons of the scanned layers) and an oracle that scores many candidate sets
in one call. Three refinement strategies share one contract (the result F
has score(F) < tau and score(F minus n) >= tau for every n in F, re-measured):

* ``split`` (default): adaptive splitting of the z-ordered candidates (find
  the shortest mitigating prefix with several probes per oracle call, keep its
  last neuron, repeat on the part before it), then a certification call;
  O(|F| log |C|) scored sets instead of O(|C|). A candidate set no larger than
  one call's width goes straight to certification.
* ``greedy``: NeMo's layer-wise then neuron-wise greedy drop, with the next
  decisions speculated in one oracle call (same result as sequential), and
  repeated until a pass drops nothing.
* ``reference``: NeMo's sequential order, one candidate set per oracle call,
  one layer pass and one neuron pass: the baseline the benchmark compares to.

Size: a little over 350 lines because the strategies share their
oracle conventions and tests compare them with each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Scores a batch of candidate sets: bool [M, T] -> float [M] (lower = less memorized).
Oracle = Callable[[torch.Tensor], torch.Tensor]


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
    best, last_score, last_idx = float("inf"), 1.0, len(steps) - 1
    extra = speculative_removals(cands[distinct[0]], width) if settings.strategy == "split" else cands[:0]
    start = 0
    while start < len(distinct):
        room = max(1, width - extra.shape[0])
        block = distinct[start : start + room]
        start += len(block)
        scores = oracle(torch.cat([cands[block], extra]))[: len(block)]  # extra rows: remembered by a CachedOracle
        extra = cands[:0]
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


def search_oracle(oracle: Oracle, settings: SelectionSettings) -> Oracle:
    """The oracle a strategy searches with: remembered scores, except for the sequential reference."""
    return oracle if settings.strategy == "reference" else CachedOracle(oracle)


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
    strategy: str = "split",
) -> tuple[torch.Tensor, float]:
    """Reduce a mitigating set (``score`` < tau) to a 1-minimal one with ``strategy``; return it and its score."""
    if strategy == "split":
        if int(blocked.sum()) <= width:  # all one-removals fit one call: certify directly
            return certify(blocked, oracle, tau, score, width)
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


def priority_order(blocked: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Members of ``blocked`` ordered by z-score, highest first (ties: lower index first)."""
    idx = torch.nonzero(blocked).flatten()
    return idx[torch.argsort(z[idx], descending=True, stable=True)]


def probe_positions(lo: int, hi: int, width: int) -> list[int]:
    """Up to ``width`` prefix lengths strictly between ``lo`` and ``hi``, spaced geometrically from ``lo``.

    Geometric spacing finds a short prefix (a good z-ordering puts the needed
    neurons first) in one or two calls and still shrinks a long gap by about
    a factor ``width + 1`` in log scale per call. ``lo`` = -1 means "the empty
    prefix is not known to fail": 0 is then probed first, since at the end of
    a search the kept neurons often mitigate on their own.
    """
    first = lo + 1
    if hi - first <= width:
        return list(range(first, hi))
    if lo < 0:
        return [0] + probe_positions(0, hi, width - 1) if width > 1 else [0]
    ratio = (hi - lo) ** (1.0 / (width + 1))
    out: list[int] = []
    for k in range(1, width + 1):
        p = max(lo + round(ratio**k), (out[-1] + 1) if out else first)
        if p < hi:
            out.append(p)
    return out


#: After this many searches in a row that cut nothing, split_search finishes with a greedy pass.
DENSE_AFTER = 2


def split_search(
    blocked: torch.Tensor, z: torch.Tensor, oracle: Oracle, tau: float, width: int, score: float
) -> tuple[torch.Tensor, float]:
    """Adaptive splitting: a mitigating subset of ``blocked`` built from necessary neurons.

    Candidates are ordered by z-score (most anomalous first). With ``kept``
    the neurons found so far and ``rest`` the ordered candidates still in play
    (``kept | rest`` mitigates, measured), find the shortest prefix of ``rest``
    that mitigates together with ``kept``, probing ``width`` prefix lengths per
    oracle call; its last neuron joins ``kept`` and ``rest`` shrinks to the part
    before it. Stops when ``kept`` mitigates alone, or when ``kept`` plus the
    prefix has at most ``width`` neurons (then it is returned whole and
    certification decides, in one call, which of them are needed). When
    :data:`DENSE_AFTER` searches in a row cut nothing (the needed neurons are
    dense), the rest is finished by the speculative greedy pass, lowest z
    first, which costs about |rest| / width calls there. Every accepted set was
    measured, so the result mitigates even when the score is not monotone;
    :func:`certify` then proves 1-minimality.
    """
    rest = priority_order(blocked, z)
    kept = torch.zeros_like(blocked)
    full = 0  # consecutive searches whose shortest prefix was all of ``rest`` (nothing to cut)
    while rest.numel():
        if full >= DENSE_AFTER:  # needed neurons are dense here: greedy beats splitting
            current, _, score = greedy_drop(kept | _mask_of(rest, kept), list(rest.flip(0).split(1)), oracle, tau,
                                            width, predict_drop=False, score=score)
            return current, score
        lo, hi, hi_score = (0 if not kept.any() else -1), rest.numel(), score
        while hi - lo > 1 and int(kept.sum()) + hi > width:
            positions = probe_positions(lo, hi, width)
            masks = kept.repeat(len(positions), 1)
            for row, p in enumerate(positions):
                masks[row, rest[:p]] = True
            scores = oracle(masks).tolist()
            passing = [(p, s) for p, s in zip(positions, scores) if s < tau]
            if passing:
                hi, hi_score = passing[0]
            lo = max([lo] + [p for p in positions if p < hi])
        score = hi_score
        if 0 < hi and int(kept.sum()) + hi <= width:  # fits one certification call: stop splitting
            kept[rest[:hi]] = True
            break
        if hi == 0:
            break
        full = full + 1 if hi == rest.numel() else 0
        kept[rest[hi - 1]] = True
        rest = rest[: hi - 1]
    return kept, score


def _mask_of(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[indices] = True
    return out


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
