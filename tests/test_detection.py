"""The detection rule (engine/detection.py): cluster statistics, calibration at a false-positive rate, verdicts."""

from itertools import combinations

import pytest
import torch

from nemo_surgery.engine.detection import (
    calibrate,
    clopper_pearson,
    cluster_agreement,
    decide,
    decide_many,
    min_holdout,
    rule_text,
)


def _matrices(count, n=10, seed=0, low=0.05, high=0.35):
    """Symmetric pairwise matrices of ordinary prompts: independent pair scores in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    mats = low + (high - low) * torch.rand(count, n, n, generator=gen)
    mats = torch.triu(mats, 1)
    mats = mats + mats.transpose(1, 2)
    return mats + torch.eye(n)


def _brute_force(mat, m):
    """Best weakest link over all m-subsets, by enumeration (independent of the implementation)."""
    n = mat.shape[0]
    best, who = -1.0, None
    for subset in combinations(range(n), m):
        weakest = min(float(mat[i, j]) for i, j in combinations(subset, 2))
        if weakest > best:
            best, who = weakest, list(subset)
    return best, who


def test_cluster_agreement_equals_enumeration():
    mats = _matrices(3, n=7, seed=1)
    agreement, _ = cluster_agreement(mats)
    for p in range(3):
        for m in range(2, 8):
            assert agreement[p, m - 2].item() == pytest.approx(_brute_force(mats[p], m)[0], abs=1e-7)
        assert agreement[p].tolist() == sorted(agreement[p].tolist(), reverse=True)  # larger clusters agree less


def test_partial_memorization_is_caught_where_the_mean_is_not():
    """Three of ten seeds agree strongly (a training image in 3 seeds): the 3-cluster fires, kept = those seeds."""
    holdout = _matrices(200, seed=2)
    cal = calibrate(cluster_agreement(holdout)[0], fpr=0.05, tau=0.3)
    partial = _matrices(1, seed=3)[0]
    cluster = [1, 4, 8]
    for i, j in combinations(cluster, 2):
        partial[i, j] = partial[j, i] = 0.8
    verdict = decide(partial, cal)
    assert verdict.memorized and verdict.cluster_size == 3 and verdict.kept_seeds == cluster
    assert verdict.mean_pairwise < max(float(holdout[q][torch.triu_indices(10, 10, 1).unbind()].mean()) for q in range(200))
    # whole-prompt memorization: every seed agrees, the largest cluster is all seeds
    whole = torch.full((10, 10), 0.7)
    assert decide(whole, cal).kept_seeds == list(range(10))


def test_calibration_meets_the_target_rate_on_the_holdout_and_decide_agrees():
    stats = cluster_agreement(_matrices(300, seed=4))[0]
    for fpr in (0.01, 0.05, 0.2):
        cal = calibrate(stats, fpr=fpr, tau=0.3)
        assert cal.flagged <= int(fpr * 300) and cal.achieved == cal.flagged / 300
        assert cal.flagged >= int(fpr * 300) - 9  # the union rule uses most of its budget
        lo, hi = cal.ci
        assert lo <= cal.achieved <= hi
        # the same rule, applied by decide, flags exactly the calibration's count
        verdicts = decide_many(_matrices(300, seed=4), cal)
        assert sum(v.memorized for v in verdicts) == cal.flagged
        assert cal.warning is None if 300 >= min_holdout(fpr) else cal.warning
    assert rule_text(cal).count("300 hold-out prompts") == 1


def test_small_holdout_warns_and_uses_the_maxima():
    stats = cluster_agreement(_matrices(16, seed=5))[0]
    cal = calibrate(stats, fpr=0.05, tau=0.3)
    assert cal.flagged == 0 and "use at least 59" in cal.warning
    torch.testing.assert_close(torch.tensor(cal.thresholds), stats.max(dim=0).values)


def test_clopper_pearson_known_values():
    assert clopper_pearson(0, 50)[1] == pytest.approx(1 - 0.025 ** (1 / 50))
    lo, hi = clopper_pearson(5, 100)
    assert lo == pytest.approx(0.01643, abs=1e-4) and hi == pytest.approx(0.11284, abs=1e-4)
    assert min_holdout(0.05) == 59


def test_nemo_rule_is_recorded_beside_ours():
    cal = calibrate(cluster_agreement(_matrices(100, seed=6))[0], fpr=0.05, tau=0.3)
    verdict = decide(_matrices(1, seed=7)[0], cal)
    assert set(verdict.nemo) == {"memorized", "kept_seeds", "max_seed_score"}
    assert verdict.nemo["max_seed_score"] == pytest.approx(verdict.score)
    assert verdict.nemo["memorized"] == (verdict.score > 0.3)
    with pytest.raises(ValueError, match="calibrated for 10 seeds"):
        decide(torch.eye(6), cal)
