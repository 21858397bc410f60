"""THE detection rule: is a prompt memorized, and which seeds carry it.

Every caller that calls a prompt memorized goes through :func:`decide`
(one prompt) or :func:`decide_many` (a batch): ``stats`` (calibration),
``scan`` and ``detect`` (screening), ``verify`` (before/after). Every sentence
that describes the rule comes from :func:`rule_text`. Do not restate the rule
elsewhere: call these.

Input: the symmetric matrix of first-step MS-SSIM scores between the N seeds
of one prompt (``Scorer.pairwise``). Statistics:

* **cluster agreement** ``a_m`` for every cluster size m = 2..N: over all
  sets of m seeds, the best weakest link (max over sets of the min pairwise
  score inside the set). ``a_2`` is the best pair (NeMo's detection score);
  ``a_N`` the worst pair. A prompt that reproduces a training image in a
  subset of its seeds has a tight cluster of that size; whole-prompt
  memorization makes every ``a_m`` high.
* **mean pairwise** score: recorded (it was this project's first rule).

The rule: memorized when ``a_m > T_m`` for some m. Each ``T_m`` is a quantile
of that statistic over the hold-out (non-memorized) prompts: the
(j+1)-th largest hold-out value, with one j for all sizes, the largest whose
union rule flags at most ``floor(fpr * n)`` hold-out prompts
(:func:`calibrate`). The achieved hold-out false-positive rate is reported
with an exact (Clopper-Pearson) 95% interval. The kept seeds for
localization are the best cluster of the largest size that fired.

NeMo's own rule (a seed is kept when its best match exceeds tau; the prompt
is memorized when any seed is kept) is evaluated beside ours in every
:class:`Verdict`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import combinations
from typing import Any

import torch

#: Default target false-positive rate of ``stats --fpr``.
DEFAULT_FPR = 0.05
#: Confidence level of the reported interval.
CONFIDENCE = 0.95
#: Exhaustive cluster search enumerates all seed subsets: keep N small.
MAX_SEEDS = 16
#: A statistic must exceed its threshold by more than this to count: scores of one
#: prompt differ by ~1e-7 between UNet batch compositions, and a threshold is a hold-out value.
TIE_TOLERANCE = 1e-6


@lru_cache(maxsize=32)
def _subset_pairs(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For all m-subsets of n seeds: their members [S, m] and the indices of their pairs [S, m(m-1)/2].

    Pair indices follow ``torch.triu_indices(n, n, 1)`` order.
    """
    pair_index = {}
    for k, (i, j) in enumerate(combinations(range(n), 2)):
        pair_index[(i, j)] = k
    subsets = list(combinations(range(n), m))
    members = torch.tensor(subsets, dtype=torch.long)
    pairs = torch.tensor([[pair_index[p] for p in combinations(s, 2)] for s in subsets], dtype=torch.long)
    return members, pairs


def cluster_agreement(pairwise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best weakest link per cluster size, exhaustively, for a batch of prompts.

    ``pairwise`` is [P, N, N]; returns ``agreement`` [P, N-1] (column m-2 is
    size m) and ``best`` [P, N-1], the index of the best m-subset in
    :func:`cluster_members` order.
    """
    p, n, _ = pairwise.shape
    if not 2 <= n <= MAX_SEEDS:
        raise ValueError(f"cluster statistics need 2 to {MAX_SEEDS} seeds, got {n}")
    i, j = torch.triu_indices(n, n, 1)
    values = pairwise[:, i, j].float().cpu()  # [P, n(n-1)/2]
    agreement = torch.empty(p, n - 1)
    best = torch.empty(p, n - 1, dtype=torch.long)
    for m in range(2, n + 1):
        _, pairs = _subset_pairs(n, m)
        agreement[:, m - 2], best[:, m - 2] = values[:, pairs].amin(dim=2).max(dim=1)
    return agreement, best


def cluster_members(n: int, m: int, index: int) -> list[int]:
    """Seeds of the ``index``-th m-subset of n seeds (lexicographic order)."""
    return _subset_pairs(n, m)[0][index].tolist()


def mean_pairwise(pairwise: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal pairwise scores: [P, N, N] -> [P]."""
    n = pairwise.shape[-1]
    i, j = torch.triu_indices(n, n, 1)
    return pairwise[:, i, j].float().mean(dim=1).cpu()


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    return min(1.0, sum(math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                        for i in range(k + 1)))


def _solve(f, target: float) -> float:
    """The p in [0, 1] where the decreasing function f crosses target (bisection to 1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial confidence interval for k successes in n trials."""
    tail = (1.0 - confidence) / 2
    lo = 0.0 if k == 0 else _solve(lambda p: binomial_cdf(k - 1, n, p), 1.0 - tail)
    hi = 1.0 if k == n else _solve(lambda p: binomial_cdf(k, n, p), tail)
    return lo, hi


def min_holdout(fpr: float, confidence: float = CONFIDENCE) -> int:
    """Fewest hold-out prompts for which zero false positives bound the rate below ``fpr``."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - fpr))


@dataclass(frozen=True)
class Calibration:
    """Thresholds of the rule, calibrated on hold-out prompts, and what they achieve there."""

    fpr: float
    thresholds: tuple[float, ...]  # T_m for m = 2..N
    holdout: int
    flagged: int
    exceedances: int  # j: hold-out prompts allowed above each single threshold
    ci: tuple[float, float]
    tau: float  # NeMo's pairwise threshold (mitigation test, NeMo's rule)
    nemo_flagged: int
    warning: str | None = None

    @property
    def seeds(self) -> int:
        """N, the seeds per prompt the thresholds were calibrated for."""
        return len(self.thresholds) + 1

    @property
    def achieved(self) -> float:
        """Hold-out false-positive rate of the rule."""
        return self.flagged / self.holdout if self.holdout else 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the calibration as JSON (thresholds keyed by cluster size)."""
        out = asdict(self)
        out["thresholds"] = {str(m): t for m, t in zip(range(2, self.seeds + 1), self.thresholds)}
        out["ci"] = list(self.ci)
        out["achieved"] = self.achieved
        out["rule"] = rule_text(self)
        out["nemo_rule"] = nemo_rule_text(self.tau)
        return out


def calibrate(agreement: torch.Tensor, fpr: float, tau: float, nemo_flagged: int = 0) -> Calibration:
    """Thresholds T_m from hold-out cluster agreements [n, N-1] at target false-positive rate ``fpr``.

    T_m is the (j+1)-th largest hold-out value of a_m; j is the largest
    count whose union rule flags at most floor(fpr * n) hold-out prompts.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"false-positive rate must be between 0 and 1, got {fpr}")
    n = agreement.shape[0]
    if n < 1:
        raise ValueError("calibration needs at least one hold-out prompt")
    ordered = agreement.sort(dim=0, descending=True).values
    budget = math.floor(fpr * n)
    chosen, flagged = 0, 0
    for j in range(n):
        count = int((agreement > ordered[j] + TIE_TOLERANCE).any(dim=1).sum())
        if count > budget:
            break
        chosen, flagged = j, count
    warning = None
    need = min_holdout(fpr)
    if n < need:
        warning = (f"{n} hold-out prompts cannot show a false-positive rate of {fpr:g}: even with none flagged the 95% "
                   f"upper bound is {clopper_pearson(0, n)[1]:.3f}; use at least {need} (thresholds are the hold-out maxima)"
                   if budget == 0 else
                   f"{n} hold-out prompts are few for a false-positive rate of {fpr:g}; use at least {need}")
    return Calibration(
        fpr=fpr,
        thresholds=tuple(float(t) for t in ordered[chosen]),
        holdout=n,
        flagged=flagged,
        exceedances=chosen,
        ci=clopper_pearson(flagged, n),
        tau=float(tau),
        nemo_flagged=nemo_flagged,
        warning=warning,
    )


@dataclass
class Verdict:
    """The rule's answer for one prompt, with NeMo's rule beside it (one record's ``detection``)."""

    memorized: bool
    cluster_size: int  # largest size that fired (0: none)
    cluster_agreement: float | None
    kept_seeds: list[int]  # the memorizing cluster: the seeds localization compares
    fired: list[int]  # cluster sizes whose threshold was exceeded
    agreement: list[float]  # a_m for m = 2..N
    mean_pairwise: float
    nemo: dict[str, Any] = field(default_factory=dict)  # NeMo's rule: memorized, kept_seeds, max_seed_score

    @property
    def kept(self) -> torch.Tensor:
        """Kept seeds as a tensor of indices."""
        return torch.tensor(self.kept_seeds, dtype=torch.long)

    @property
    def score(self) -> float:
        """The best pairwise score (a_2, NeMo's detection score)."""
        return self.agreement[0]

    def to_json(self) -> dict[str, Any]:
        """Return the verdict as JSON."""
        return asdict(self)


def decide_many(pairwise: torch.Tensor, calibration: Calibration) -> list[Verdict]:
    """THE detection rule for a batch of prompts: [P, N, N] pairwise MS-SSIM -> one Verdict each."""
    n = pairwise.shape[-1]
    if n != calibration.seeds:
        raise ValueError(f"thresholds were calibrated for {calibration.seeds} seeds, got {n}")
    agreement, best = cluster_agreement(pairwise)
    means = mean_pairwise(pairwise)
    thresholds = torch.tensor(calibration.thresholds)
    over = agreement > thresholds + TIE_TOLERANCE
    eye = torch.eye(n, dtype=torch.bool)
    seed_scores = pairwise.float().cpu().masked_fill(eye, float("-inf")).amax(dim=2)  # [P, N]
    out = []
    for q in range(pairwise.shape[0]):
        fired = [m + 2 for m in torch.nonzero(over[q]).flatten().tolist()]
        size = max(fired, default=0)
        nemo_kept = torch.nonzero(seed_scores[q] > calibration.tau).flatten().tolist()
        out.append(Verdict(
            memorized=bool(fired),
            cluster_size=size,
            cluster_agreement=float(agreement[q, size - 2]) if size else None,
            kept_seeds=cluster_members(n, size, int(best[q, size - 2])) if size else [],
            fired=fired,
            agreement=[round(float(v), 6) for v in agreement[q]],
            mean_pairwise=round(float(means[q]), 6),
            nemo={"memorized": bool(nemo_kept), "kept_seeds": nemo_kept,
                  "max_seed_score": round(float(seed_scores[q].max()), 6)},
        ))
    return out


def decide(pairwise: torch.Tensor, calibration: Calibration) -> Verdict:
    """THE detection rule for one prompt: [N, N] pairwise MS-SSIM -> Verdict."""
    return decide_many(pairwise.unsqueeze(0), calibration)[0]


def rule_text(calibration: Calibration | None = None) -> str:
    """The rule in one sentence, with the calibration's numbers when given."""
    text = ("memorized when, for some cluster size m from 2 to the number of seeds, the m seeds that agree best have "
            "every pairwise first-step MS-SSIM above that size's threshold (kept seeds: the largest such cluster)")
    if calibration is None:
        return text
    lo, hi = calibration.ci
    return (f"{text}; thresholds calibrated on {calibration.holdout} hold-out prompts for a false-positive rate of "
            f"{calibration.fpr:g}: {calibration.flagged} flagged there ({calibration.achieved:.3f}, 95% CI {lo:.3f}-{hi:.3f})")


def nemo_rule_text(tau: float | None = None) -> str:
    """NeMo's rule in one sentence (recorded beside ours)."""
    at = f" {tau:.4f}" if tau is not None else ""
    return (f"NeMo: a seed is kept when its best pairwise first-step MS-SSIM exceeds tau{at}; "
            "the prompt is memorized when any seed is kept")


def short_rule() -> str:
    """A caption-sized description of the rule (tables)."""
    return "detection: largest cluster of seeds whose every pair exceeds its size's calibrated threshold"
