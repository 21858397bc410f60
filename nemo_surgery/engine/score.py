"""The NeMo memorization score: first-step noise differences compared by MS-SSIM, batched.

One UNet call evaluates many (seed, neuron-mask) pairs: masks are boolean
"blocked" vectors over the concatenated neurons of the scanned layers, split
per layer and applied per sample by :class:`~nemo_surgery.engine.hooks.ValueMask`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nemo_surgery.engine.hooks import ValueMask
from nemo_surgery.engine.layers import ValueLayer
from nemo_surgery.engine.model import Conditioning, LoadedModel
from nemo_surgery.engine.ssim import SSIMConfig, ms_ssim


@dataclass(frozen=True)
class ScoreSettings:
    """Settings shared by calibration (stats) and detection (scan); stored with the statistics."""

    seeds: int = 10
    seed: int = 1
    inference_steps: int = 50
    timestep_index: int = 1
    guidance_scale: float = 0.0
    ssim: SSIMConfig = field(default_factory=SSIMConfig)

    def to_json(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        out = asdict(self)
        out["ssim"] = self.ssim.to_json()
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ScoreSettings:
        """Rebuild settings from their JSON form."""
        doc = dict(doc)
        doc["ssim"] = SSIMConfig.from_json(doc.get("ssim", {}))
        return cls(**doc)


def min_max_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale each sample's channels to [0, 1] over the spatial dims (constant maps become 0)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def draw_latents(shape: tuple[int, int, int], count: int, seed: int) -> torch.Tensor:
    """Draw ``count`` standard-normal latents in turn from one CPU generator seeded with ``seed``."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=gen) for _ in range(count)])


def pairwise_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i < j) of n items."""
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


@dataclass
class CallCounter:
    """UNet calls and samples evaluated so far."""

    calls: int = 0
    samples: int = 0


@dataclass
class Detection:
    """Result of the pre-filter on one prompt."""

    pairwise: torch.Tensor  # [N, N] symmetric MS-SSIM, diagonal 1
    seed_scores: torch.Tensor  # [N] each seed's max against the others
    kept: torch.Tensor  # [K] indices of seeds whose score exceeds tau
    mean_pairwise: float

    @property
    def score(self) -> float:
        """The prompt's detection score: the highest seed score."""
        return float(self.seed_scores.max())


class Scorer:
    """Computes noise differences and memorization scores for one model and layer set."""

    def __init__(
        self,
        model: LoadedModel,
        layers: list[ValueLayer],
        settings: ScoreSettings,
        batch_size: int = 32,
    ):
        from diffusers import DDIMScheduler

        self.model = model
        self.layers = layers
        self.settings = settings
        self.batch_size = max(1, batch_size)
        self.counter = CallCounter()
        scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
        scheduler.set_timesteps(settings.inference_steps)
        if not 0 <= settings.timestep_index < len(scheduler.timesteps):
            raise ValueError(f"timestep index {settings.timestep_index} outside the {settings.inference_steps}-step schedule")
        self.timestep = scheduler.timesteps[settings.timestep_index].to(model.device)
        self.latents = (
            draw_latents(model.latent_shape, settings.seeds, settings.seed) * scheduler.init_noise_sigma
        ).to(model.device, model.dtype)
        self.slices: list[slice] = []
        start = 0
        for layer in layers:
            self.slices.append(slice(start, start + layer.rows))
            start += layer.rows
        self.total_neurons = start
        self._uncond: Conditioning | None = None

    # -- UNet evaluation ------------------------------------------------------------------

    def _uncond_for(self, n: int) -> Conditioning:
        if self._uncond is None:
            self._uncond = self.model.encode([""])
        return self._uncond.repeat(n)

    @torch.no_grad()
    def _predict(self, batch: Conditioning, latents: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """Noise differences (min-max scaled, float32) for a batch of B (conditioning, latent, mask)."""
        b = latents.shape[0]
        g = self.settings.guidance_scale
        x = latents
        if g > 1.0:
            uncond = self._uncond_for(b)
            batch = Conditioning(
                torch.cat([uncond.hidden, batch.hidden]),
                {k: torch.cat([uncond.added[k], batch.added[k]]) for k in batch.added} if batch.added else None,
            )
            x = torch.cat([latents, latents])
        masks = {}
        if blocked is not None:
            keep = (~blocked).to(self.model.dtype)
            # every scanned layer gets its mask (an all-ones mask is a cheap multiply): no host sync per layer
            masks = {layer.id: keep[:, sl] for layer, sl in zip(self.layers, self.slices)}
        with ValueMask(self.layers, masks):
            eps = self.model.epsilon(self.model.unet(x, self.timestep, **batch.unet_kwargs()).sample, x, self.timestep)
        self.counter.calls += 1
        self.counter.samples += b
        if g > 1.0:
            e_u, e_c = eps.chunk(2)
            eps = e_u + g * (e_c - e_u)
        return min_max_scale(eps.float() - latents.float())  # fp32 from here on (fp16-safe)

    def noise_differences(self, cond: Conditioning) -> torch.Tensor:
        """Unblocked noise differences of P prompts x N seeds: [P, N, C, H, W] float32.

        Prompts and seeds are flattened into UNet batches of at most batch_size.
        """
        p, n = cond.hidden.shape[0], self.latents.shape[0]
        flat_lat = self.latents.repeat(p, 1, 1, 1)
        prompt_of = torch.arange(p, device=cond.hidden.device).repeat_interleave(n)
        parts = []
        for start in range(0, p * n, self.batch_size):
            sel = prompt_of[start : start + self.batch_size]
            parts.append(self._predict(cond.select(sel), flat_lat[start : start + self.batch_size], None))
        return torch.cat(parts).view(p, n, *self.latents.shape[1:])

    def noise_differences_with(self, cond: Conditioning, blocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's unblocked noise differences and, in the same UNet calls, per-seed scores of candidate sets.

        ``blocked`` is bool [M, T]; each set is evaluated for all N seeds (which
        seeds localization keeps is not known yet). Returns the noise
        differences [N, C, H, W] (float32) and MS-SSIM(unblocked, blocked) per
        set and seed [M, N]. Batches hold at most batch_size samples.
        """
        n, m = self.latents.shape[0], blocked.shape[0]
        if m == 0:
            return self.noise_differences(cond)[0], torch.empty(0, n)
        masks = torch.cat([blocked.new_zeros(1, blocked.shape[1]), blocked]).repeat_interleave(n, dim=0)
        lat = self.latents.repeat(m + 1, 1, 1, 1)
        parts = []
        for start in range(0, masks.shape[0], self.batch_size):
            chunk = masks[start : start + self.batch_size].to(self.model.device, non_blocking=True)
            parts.append(self._predict(cond.repeat(chunk.shape[0]), lat[start : start + self.batch_size], chunk))
        deltas = torch.cat(parts)
        sims = ms_ssim(deltas[:n].repeat(m, 1, 1, 1), deltas[n:], self.settings.ssim)
        return deltas[:n], sims.view(m, n).float().cpu()

    # -- detection ------------------------------------------------------------------------

    def pairwise(self, deltas: torch.Tensor) -> torch.Tensor:
        """Symmetric [N, N] matrix of MS-SSIM between the seeds' noise differences."""
        n = deltas.shape[0]
        i, j = pairwise_indices(n)
        values = ms_ssim(deltas[i], deltas[j], self.settings.ssim)
        mat = torch.eye(n, device=deltas.device)
        mat[i, j] = values
        mat[j, i] = values
        return mat

    def detect(self, deltas: torch.Tensor, tau: float) -> Detection:
        """NeMo's per-seed quantities (each seed's best match; seeds above tau) for one prompt.

        Not the detection rule: whether a prompt is memorized, and which seeds
        localization keeps, is :func:`nemo_surgery.engine.detection.decide`
        on :meth:`pairwise`. Kept for callers that still read these fields.
        """
        mat = self.pairwise(deltas)
        n = mat.shape[0]
        off = mat.masked_fill(torch.eye(n, dtype=torch.bool, device=mat.device), float("-inf"))
        seed_scores = off.max(dim=1).values
        i, j = pairwise_indices(n)
        return Detection(
            pairwise=mat.cpu(),
            seed_scores=seed_scores.cpu(),
            kept=torch.nonzero(seed_scores > tau).flatten().cpu(),
            mean_pairwise=float(mat[i, j].mean()) if n > 1 else 1.0,
        )

    # -- mitigation -----------------------------------------------------------------------

    def mitigation_scores(
        self, cond: Conditioning, base: torch.Tensor, kept: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        """Score of each candidate set: max over kept seeds of MS-SSIM(unblocked, blocked).

        ``blocked`` is a bool tensor [M, T] (T = neurons of the scanned layers);
        returns a float tensor [M]. Several masks share one UNet call.
        """
        return self.seed_scores(cond, base, kept, blocked).amax(dim=1)

    def seed_scores(
        self, cond: Conditioning, base: torch.Tensor, kept: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        """Per kept seed, MS-SSIM(unblocked, blocked) of each candidate set: [M, K] (see mitigation_scores)."""
        m, k = blocked.shape[0], kept.numel()
        out = torch.empty(m, k)
        empty = ~blocked.any(dim=1)
        out[empty] = 1.0  # blocking nothing leaves the prediction as it was
        todo = torch.nonzero(~empty).flatten()
        per_call = max(1, self.batch_size // k)
        lat = self.latents[kept.to(self.latents.device)]
        ref = base[kept.to(base.device)]
        parts = []  # stay on the device: one copy to the host per oracle call, not per UNet call
        for start in range(0, todo.numel(), per_call):
            idx = todo[start : start + per_call]
            masks = blocked[idx].to(self.model.device, non_blocking=True).repeat_interleave(k, dim=0)
            deltas = self._predict(cond.repeat(masks.shape[0]), lat.repeat(idx.numel(), 1, 1, 1), masks)
            sims = ms_ssim(ref.repeat(idx.numel(), 1, 1, 1), deltas, self.settings.ssim)
            parts.append(sims.view(idx.numel(), k))
        if parts:
            out[todo] = torch.cat(parts).float().cpu()
        return out

    # -- neuron bookkeeping ---------------------------------------------------------------

    def split(self, flat: torch.Tensor) -> dict[str, list[int]]:
        """Turn a [T] blocked vector into {layer id: sorted neuron indices} (non-empty layers)."""
        out = {}
        for layer, sl in zip(self.layers, self.slices):
            idx = torch.nonzero(flat[sl]).flatten().tolist()
            if idx:
                out[layer.id] = idx
        return out
