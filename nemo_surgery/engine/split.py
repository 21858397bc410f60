"""The ``split`` refinement: adaptive splitting of the z-ordered candidates, with ladders of short prefixes.

See :func:`split_search` and :func:`small_set_search`; the result is handed
to :func:`nemo_surgery.engine.oracles.certify`, which proves 1-minimality.
Pure logic over boolean "blocked" vectors and an oracle.
"""

from __future__ import annotations

import torch

from nemo_surgery.engine.oracles import CachedOracle, Oracle, greedy_drop


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


def ladder_sets(order: torch.Tensor, width: int, like: torch.Tensor) -> torch.Tensor:
    """The prefixes 1..m of ``order`` and every one-removal of each, as bool rows [m(m+1)/2, T].

    Rows 0..m-1 are the prefixes; the rest are the removals that are not
    themselves shorter prefixes. Scored in one call, they find AND certify a
    first mitigating prefix of up to m neurons (NeMo reports that one to a
    handful of neurons often carry a memorized prompt). m is the largest with
    m(m+1)/2 <= max(3, width // 2), so at least one other probe fits; none
    below width 4.
    """
    m = 0
    while (m + 1) * (m + 2) // 2 <= max(3, width // 2) and m + 1 < order.numel():
        m += 1
    if width < 4 or m < 2:
        return like.new_zeros((0, like.numel()))
    rows = []
    for p in range(1, m + 1):
        row = like.new_zeros(like.numel())
        row[order[:p]] = True
        rows.append(row)
    for p in range(2, m + 1):
        for i in range(p - 1):
            row = rows[p - 1].clone()
            row[order[i]] = False
            rows.append(row)
    return torch.stack(rows)


def subset_lattice(order: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Every non-empty subset of ``order[:m]`` as bool rows [2^m - 1, T], smallest first.

    Scored together they find the smallest mitigating subset of the m
    top-ranked neurons AND certify it: each of its one-removals is a smaller
    subset in the same rows (the empty set scores 1.0 without a call).
    """
    top = order[:m].tolist()
    rows = []
    for bits in sorted(range(1, 1 << len(top)), key=lambda b: (bin(b).count("1"), b)):
        row = like.new_zeros(like.numel())
        row[[n for i, n in enumerate(top) if bits >> i & 1]] = True
        rows.append(row)
    return torch.stack(rows) if rows else like.new_zeros((0, like.numel()))


def ladder_rungs(rows: int) -> int:
    """The m of a ladder of ``rows`` = m(m+1)/2 sets (0 for none)."""
    m = 0
    while (m + 1) * (m + 2) // 2 <= rows:
        m += 1
    return m


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
        first = not kept.any()  # the first search of a set starts with a ladder (see ladder_sets)
        while hi - lo > 1 and int(kept.sum()) + hi > width:
            ladder = ladder_sets(rest, width, kept) if first else kept.new_zeros((0, kept.numel()))
            rungs, first = ladder_rungs(ladder.shape[0]), False
            positions = list(range(1, rungs + 1)) + probe_positions(max(lo, rungs) if rungs else lo, hi, width - ladder.shape[0])
            masks = kept.repeat(len(positions) - rungs, 1)
            for row, p in enumerate(positions[rungs:]):
                masks[row, rest[:p]] = True
            scores = oracle(torch.cat([ladder[:rungs], masks, ladder[rungs:]])).tolist()[: len(positions)]
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


def small_set_search(
    blocked: torch.Tensor, z: torch.Tensor, oracle: CachedOracle, tau: float, width: int, score: float
) -> tuple[torch.Tensor, CachedOracle, float, float]:
    """A set whose one-removals fit one call: its removals and its ladder (:func:`ladder_sets`) in one call.

    When both do not fit, the ladder alone is scored (few neurons usually
    carry a memorized prompt). Returns the shortest ladder prefix that
    mitigates, else ``blocked``, with the arguments :func:`certify` takes
    next (it finds the removals it needs remembered).
    """
    ladder = ladder_sets(priority_order(blocked, z), width, blocked)
    members = torch.nonzero(blocked).flatten()
    removals = blocked.repeat(members.numel(), 1)
    removals[torch.arange(members.numel()), members] = False
    both = ladder.shape[0] + members.numel() <= width
    oracle(torch.cat([ladder, removals]) if both or not ladder.shape[0] else ladder)
    rungs = ladder_rungs(ladder.shape[0])
    for row, rung_score in zip(ladder[:rungs], oracle(ladder[:rungs]).tolist()):  # remembered: no call
        if rung_score < tau:
            return row.clone(), oracle, tau, rung_score
    return blocked, oracle, tau, score
