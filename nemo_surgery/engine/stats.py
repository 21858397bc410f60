"""Hold-out statistics: per-neuron activation mean/std and the calibrated threshold tau.

Activation of neuron j for a prompt: a_j = mean over all token positions
(padding included) of |to_v(text embedding)_j|. Means and variances are kept
as (count, mean, M2) so statistics of shards merge exactly (Chan et al.).
tau = mean + 1 std of the pairwise MS-SSIM scores of the hold-out prompts,
computed with exactly the detection settings (NeMo's threshold, used by the
mitigation test). The per-prompt detection statistics of every hold-out prompt
are stored too, and the detection rule's thresholds are calibrated from them
at the target false-positive rate (:mod:`nemo_surgery.engine.detection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from nemo_surgery.atomic import write_json
from nemo_surgery.engine.detection import DEFAULT_FPR, Calibration, calibrate, cluster_agreement, mean_pairwise
from nemo_surgery.engine.layers import ValueLayer
from nemo_surgery.engine.model import LoadedModel
from nemo_surgery.engine.score import Scorer, ScoreSettings, pairwise_indices
from nemo_surgery.errors import InputError
from nemo_surgery.provenance import check_envelope, envelope
from nemo_surgery.schema import Int, ListOf, Nullable, Num, Obj, Str, check_document, read_json

FORMAT = "nemo-surgery.stats"
VERSION = 2  # 2: per-prompt cluster agreements and the calibrated detection rule


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a vector of running statistics (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        """Moments of a batch: values [B, ...] reduced over the first dim."""
        values = values.double()
        mean = values.mean(dim=0)
        return cls(values.shape[0], mean, ((values - mean) ** 2).sum(dim=0))

    @classmethod
    def empty(cls, shape: tuple[int, ...] = ()) -> Moments:
        """Moments of nothing."""
        return cls(0, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))

    def merge(self, other: Moments) -> Moments:
        """Combine two sets of moments exactly (parallel variance)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        """Unbiased standard deviation (0 with fewer than two samples)."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()


@dataclass
class LayerStats:
    """Activation statistics of one value layer."""

    id: str
    ldm_id: str
    rows: int
    cols: int
    moments: Moments


@dataclass
class Stats:
    """Everything `stats` computes, as stored in one JSON file."""

    fingerprint: str
    source: str
    settings: ScoreSettings
    layers: dict[str, LayerStats]
    pairwise: Moments
    holdout_agreement: torch.Tensor  # [n, seeds-1] cluster agreement a_m (m = 2..seeds) per hold-out prompt
    holdout_mean: list[float] = field(default_factory=list)  # mean pairwise score per hold-out prompt
    prompt_count: int = 0
    dtype: str = "fp32"
    fpr: float = DEFAULT_FPR

    @property
    def tau(self) -> float:
        """NeMo's threshold: mean + 1 std of the hold-out pairwise scores (mitigation test, NeMo's rule)."""
        return float(self.pairwise.mean + self.pairwise.std)

    @cached_property
    def calibration(self) -> Calibration:
        """The detection rule's thresholds at ``fpr``, calibrated on the hold-out statistics."""
        nemo_flagged = int((self.holdout_agreement[:, 0] > self.tau).sum()) if self.holdout_agreement.numel() else 0
        return calibrate(self.holdout_agreement, self.fpr, self.tau, nemo_flagged)

    @property
    def holdout_flagged(self) -> int:
        """How many hold-out prompts the detection rule calls memorized (false positives)."""
        return self.calibration.flagged

    def merge(self, other: Stats) -> Stats:
        """Combine statistics of two shards computed on the same model with the same settings."""
        if other.fingerprint != self.fingerprint or other.settings != self.settings:
            raise InputError("cannot merge statistics of different models or settings")
        return Stats(
            fingerprint=self.fingerprint,
            source=self.source,
            settings=self.settings,
            layers={
                lid: LayerStats(ls.id, ls.ldm_id, ls.rows, ls.cols, ls.moments.merge(other.layers[lid].moments))
                for lid, ls in self.layers.items()
            },
            pairwise=self.pairwise.merge(other.pairwise),
            holdout_agreement=torch.cat([self.holdout_agreement, other.holdout_agreement]),
            holdout_mean=self.holdout_mean + other.holdout_mean,
            prompt_count=self.prompt_count + other.prompt_count,
            dtype=self.dtype,
            fpr=self.fpr,
        )

    def z_scores(self, layers: list[ValueLayer], acts: torch.Tensor) -> torch.Tensor:
        """|a - mean| / std over the concatenated neurons of ``layers``; acts is [T]."""
        missing = [layer.id for layer in layers if layer.id not in self.layers]
        if missing:
            raise InputError(f"statistics have no entry for layer {missing[0]}; recompute them with `nemo-surgery stats`")
        mean = torch.cat([self.layers[layer.id].moments.mean for layer in layers])
        std = torch.cat([self.layers[layer.id].moments.std for layer in layers])
        diff = (acts.double().cpu() - mean).abs()
        z = torch.where(std > 0, diff / std.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
        return z.float()

    def to_json(self) -> dict[str, Any]:
        """Return the versioned JSON document."""
        return {
            **envelope(FORMAT, VERSION),
            "model": {"fingerprint": self.fingerprint, "source": self.source, "dtype": self.dtype},
            "settings": self.settings.to_json(),
            "prompt_count": self.prompt_count,
            "tau": self.tau,
            "pairwise": {"count": self.pairwise.count, "mean": float(self.pairwise.mean), "m2": float(self.pairwise.m2)},
            "detection": {
                "fpr": self.fpr,
                "calibration": self.calibration.to_json(),
                "holdout": {
                    "cluster_agreement": [[round(float(v), 7) for v in row] for row in self.holdout_agreement],
                    "mean_pairwise": self.holdout_mean,
                },
            },
            "layers": [
                {
                    "id": ls.id,
                    "ldm_id": ls.ldm_id,
                    "rows": ls.rows,
                    "cols": ls.cols,
                    "count": ls.moments.count,
                    "mean": ls.moments.mean.tolist(),
                    "m2": ls.moments.m2.tolist(),
                }
                for ls in self.layers.values()
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the statistics atomically."""
        return write_json(path, self.to_json())


#: The statistics document's shape, checked before any field is read.
SCHEMA = Obj(
    required={
        "model": Obj(required={"fingerprint": Str()}, optional={"source": Nullable(Str()), "dtype": Str()}),
        "settings": Obj(),
        "prompt_count": Int(0),
        "pairwise": Obj(required={"count": Int(0), "mean": Num(), "m2": Num()}),
        "detection": Obj(required={
            "fpr": Num(),
            "holdout": Obj(required={"cluster_agreement": ListOf(ListOf(Num())), "mean_pairwise": ListOf(Num())}),
        }),
        "layers": ListOf(Obj(
            required={"id": Str(), "rows": Int(1), "cols": Int(1), "count": Int(0), "mean": ListOf(Num()), "m2": ListOf(Num())},
            optional={"ldm_id": Nullable(Str())},
        )),
    },
)


def load_stats(path: str | Path) -> Stats:
    """Read a statistics file; raise InputError (one line) if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: statistics file not found; compute it with `nemo-surgery stats HOLDOUT --out {path}`")
    hint = "recompute it with `nemo-surgery stats`"
    doc = read_json(path, "statistics file", hint)
    check_envelope(doc, FORMAT, VERSION, path, hint)
    check_document(doc, SCHEMA, path, "statistics file", hint)
    try:
        pw = doc["pairwise"]
        layers = {
            entry["id"]: LayerStats(
                entry["id"],
                entry.get("ldm_id"),
                entry["rows"],
                entry["cols"],
                Moments(
                    entry["count"],
                    torch.tensor(entry["mean"], dtype=torch.float64),
                    torch.tensor(entry["m2"], dtype=torch.float64),
                ),
            )
            for entry in doc["layers"]
        }
        return Stats(
            fingerprint=doc["model"]["fingerprint"],
            source=doc["model"]["source"],
            settings=ScoreSettings.from_json(doc["settings"]),
            layers=layers,
            pairwise=Moments(pw["count"], torch.tensor(pw["mean"], dtype=torch.float64), torch.tensor(pw["m2"], dtype=torch.float64)),
            holdout_agreement=torch.tensor(doc["detection"]["holdout"]["cluster_agreement"], dtype=torch.float32),
            holdout_mean=list(doc["detection"]["holdout"]["mean_pairwise"]),
            prompt_count=doc["prompt_count"],
            dtype=doc["model"].get("dtype", "fp32"),
            fpr=float(doc["detection"]["fpr"]),
        )
    except (KeyError, TypeError, ValueError) as exc:  # settings fields (ScoreSettings.from_json)
        raise InputError(f"{path}: not a nemo-surgery statistics file ({exc}); recompute it with `nemo-surgery stats`") from None


def check_stats_match(stats: Stats, model: LoadedModel, stats_path: str | Path) -> None:
    """Refuse statistics computed on another model (fingerprint mismatch)."""
    if stats.fingerprint != model.fingerprint:
        raise InputError(
            f"{stats_path}: statistics were computed on another model (fingerprint {stats.fingerprint[:12]} "
            f"from {stats.source}, this model is {model.fingerprint[:12]}); run `nemo-surgery stats` on this model"
        )


@torch.no_grad()
def value_activations(layers: list[ValueLayer], hidden: torch.Tensor) -> torch.Tensor:
    """Per-prompt mean |activation| of every neuron of ``layers``: [P, T] float32, no UNet call."""
    parts = [layer.module(hidden).abs().float().mean(dim=1) for layer in layers]
    return torch.cat(parts, dim=1)


def compute_stats(
    model: LoadedModel,
    prompts: list[str],
    settings: ScoreSettings,
    batch_size: int = 32,
    advance=None,
    dtype_name: str = "fp32",
    fpr: float = DEFAULT_FPR,
) -> Stats:
    """Compute activation statistics (all value layers), tau and the detection statistics of hold-out prompts.

    ``advance(n)`` is called after every n prompts (progress reporting).
    """
    layers = model.layers
    scorer = Scorer(model, layers, settings, batch_size=batch_size)
    n_seeds = settings.seeds
    moments = [Moments.empty((layer.rows,)) for layer in layers]
    pairwise = Moments.empty(())
    agreements: list[torch.Tensor] = []
    means: list[float] = []
    prompts_per_call = max(1, batch_size // n_seeds)
    i, j = pairwise_indices(n_seeds)
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        cond = model.encode(chunk)
        acts = value_activations(layers, cond.hidden)
        offset = 0
        for li, layer in enumerate(layers):
            moments[li] = moments[li].merge(Moments.of(acts[:, offset : offset + layer.rows].cpu()))
            offset += layer.rows
        deltas = scorer.noise_differences(cond)
        mats = torch.stack([scorer.pairwise(deltas[p]) for p in range(len(chunk))]).cpu()
        for mat in mats:
            pairwise = pairwise.merge(Moments.of(mat[i, j]))
        agreements.append(cluster_agreement(mats)[0])
        means.extend(round(float(v), 7) for v in mean_pairwise(mats))
        if advance is not None:
            advance(len(chunk))
    return Stats(
        fingerprint=model.fingerprint,
        source=model.source,
        settings=settings,
        layers={
            layer.id: LayerStats(layer.id, layer.ldm_id, layer.rows, layer.cols, m) for layer, m in zip(layers, moments)
        },
        pairwise=pairwise,
        holdout_agreement=torch.cat(agreements),
        holdout_mean=means,
        prompt_count=len(prompts),
        dtype=dtype_name,
        fpr=fpr,
    )
