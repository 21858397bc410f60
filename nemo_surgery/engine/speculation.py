"""Speculation in the detection call: the room a prompt's first UNet call has left scores candidate sets.

Detection needs the N seeds' unblocked noise differences: N samples, often
far fewer than one call holds. The rest of that call scores the search's
first candidate sets for all N seeds (which seeds localization keeps is not
known yet): the widest set (the unmovable-seed floor), then the initial
selection's schedule steps in order. Once detection has chosen the kept
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


def spare_sets(seeds: int, batch_size: int) -> int:
    """How many sets of ``seeds`` samples fit in the detection calls' spare room without another call."""
    calls = -(-seeds // max(1, batch_size))
    return (calls * batch_size - seeds) // seeds


#: At most this many sets ride along: each costs a prompt that is NOT memorized N more samples. The widest set is
#: needed by every memorized prompt; the first schedule steps are where a search from theta 5 starts. A GPU batch
#: would hold a hundred, but once a call is compute-bound its time follows its samples.
MAX_SPECULATED = 3


def speculation_room(seeds: int, batch_size: int) -> int:
    """Sets to score in the detection call: the spare room (:func:`spare_sets`), at most :data:`MAX_SPECULATED`."""
    return min(MAX_SPECULATED, spare_sets(seeds, batch_size))


def detection_sets(
    z: torch.Tensor, acts: torch.Tensor, slices: Sequence[slice], settings: SelectionSettings, room: int
) -> torch.Tensor:
    """Up to ``room`` sets to score in the detection call: the widest step first, then the schedule in order.

    Empty and repeated sets are left out (an empty set scores 1.0 without a
    UNet call). Returns bool [M, T], M <= room; row 0 is the widest set when
    M > 0.
    """
    steps = schedule(settings)
    cands = candidate_sets(z, rank_within_layers(acts, slices), steps[-1:] + steps)
    rows: list[torch.Tensor] = []
    for row in cands:
        if len(rows) >= room:
            break
        if row.any() and not any(torch.equal(row, r) for r in rows):
            rows.append(row)
    return torch.stack(rows) if rows else cands[:0]


def remember_kept(oracle: Oracle, sets: torch.Tensor, per_seed: torch.Tensor, kept: torch.Tensor) -> None:
    """Teach a remembering oracle the speculated sets' scores: the maximum of their per-seed scores over the kept seeds.

    An oracle that does not remember (the ``reference`` strategy) is left alone.
    """
    if isinstance(oracle, CachedOracle) and sets.shape[0] and kept.numel():
        oracle.remember(sets, per_seed[:, kept].amax(dim=1))
