"""Speculation in the detection call: the room a prompt's first UNet call has left scores candidate sets.

Detection needs the N seeds' unblocked noise differences: N samples, often
far fewer than one call holds. The rest of that call scores the search's
first candidate sets for all N seeds (which seeds localization keeps is not
known yet), if the prompt's z-scores already show NeMo's first candidates:
the widest set (the unmovable-seed floor), the first step, the subset
lattice of its top neurons (which finds and certifies a set of up to three
of them with no further call), then the later steps. Once detection has chosen the kept
seeds, a set's score is the maximum of its per-seed scores over them, the
same number a later oracle call would measure, because each blocked
prediction is compared with the unblocked one of the same seed. Pure
bookkeeping; the UNet work is ``Scorer.noise_differences_with``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemo_surgery.engine.oracles import CachedOracle, Oracle
from nemo_surgery.engine.selection import SelectionSettings, candidate_sets, rank_within_layers, schedule
from nemo_surgery.engine.split import priority_order, subset_lattice


def spare_sets(seeds: int, batch_size: int) -> int:
    """How many sets of ``seeds`` samples fit in the detection calls' spare room without another call."""
    calls = -(-seeds // max(1, batch_size))
    return (calls * batch_size - seeds) // seeds


#: At most this many sets ride along, and only for a prompt whose z-scores already hold NeMo's first candidates
#: (some neuron beyond theta_start): the widest set, the first step, the subset lattice of its top three neurons
#: (7 sets) and one more step. Such a prompt, if it is not memorized after all, pays up to 10 N more samples; a
#: compute-bound call's time follows its samples. A GPU batch would hold a hundred.
MAX_SPECULATED = 10


def speculation_room(seeds: int, batch_size: int) -> int:
    """Sets the detection call can score: the spare room (:func:`spare_sets`), at most :data:`MAX_SPECULATED`."""
    return min(MAX_SPECULATED, spare_sets(seeds, batch_size))


def detection_sets(
    z: torch.Tensor, acts: torch.Tensor, slices: Sequence[slice], settings: SelectionSettings, room: int
) -> torch.Tensor:
    """Up to ``room`` sets to score in the detection call; none when no neuron's z-score exceeds theta_start.

    A prompt whose first (theta_start) candidate set is empty gets nothing:
    on the demo's 60 hold-out captions the largest z-score is 4.9, on its
    five famous captions 50-73, so ordinary prompts cost N samples, as in
    NeMo's order. Otherwise, in this order: the widest step (the
    unmovable-seed floor), the first step, the subset lattice
    (:func:`~nemo_surgery.engine.split.subset_lattice`) of the first step's
    top-z neurons, as many as fit, then the later steps. Empty and repeated
    sets are left out (an empty set scores 1.0 without a UNet call). Returns
    bool [M, T], M <= room; row 0 is the widest set when M > 0.
    """
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, slices), steps[-1:] + steps)
    first = cands[1]
    if room <= 0 or not first.any():
        return cands[:0]
    rows: list[torch.Tensor] = []

    def fresh(candidates: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for row in candidates:
            if row.any() and not any(torch.equal(row, r) for r in rows + out):
                out.append(row)
        return out

    rows += fresh(cands[:2])[:room]
    order = priority_order(first, z)
    for m in range(min(order.numel(), (room - len(rows) + 1).bit_length()), 0, -1):  # the largest lattice that fits
        lattice = fresh(subset_lattice(order, m, first))
        if len(lattice) <= room - len(rows):
            rows += lattice
            break
    rows += fresh(cands[2:])[: room - len(rows)]
    return torch.stack(rows) if rows else cands[:0]


def remember_kept(oracle: Oracle, sets: torch.Tensor, per_seed: torch.Tensor, kept: torch.Tensor) -> None:
    """Teach a remembering oracle the speculated sets' scores: the maximum of their per-seed scores over the kept seeds.

    An oracle that does not remember (the ``reference`` strategy) is left alone.
    """
    if isinstance(oracle, CachedOracle) and sets.shape[0] and kept.numel():
        oracle.remember(sets, per_seed[:, kept].amax(dim=1))
