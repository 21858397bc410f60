"""Full DDIM sampling with fixed seeds, batched over prompts x seeds, optionally with neurons blocked."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nemo_surgery.engine.hooks import ValueMask
from nemo_surgery.engine.model import Conditioning, LoadedModel
from nemo_surgery.engine.score import draw_latents


@dataclass(frozen=True)
class SampleSettings:
    """How verification draws full samples (identical before and after pruning; defaults in verify.options)."""

    seeds: int
    seed: int
    steps: int
    guidance: float
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return asdict(self)


def _cat_cond(a: Conditioning, b: Conditioning) -> Conditioning:
    added = {k: torch.cat([a.added[k], b.added[k]]) for k in b.added} if b.added else None
    return Conditioning(torch.cat([a.hidden, b.hidden]), added)


@torch.no_grad()
def _decode(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents with the pipeline's VAE into float32 images [B, H, W, 3] in [0, 1]."""
    vae = model.pipe.vae
    if vae is None:
        raise ValueError("the pipeline was loaded without its VAE; load it with with_vae=True")
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    dtype = next(vae.parameters()).dtype
    if bool(getattr(vae.config, "force_upcast", False)) and dtype == torch.float16:
        from nemo_surgery.engine.model import _quiet_diffusers

        with _quiet_diffusers():  # SD's VAE overflows in fp16 (as the pipeline does: decode in fp32)
            vae.to(torch.float32)
        dtype = torch.float32
    images = vae.decode(latents.to(dtype) / scaling).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def _set_masks(model: LoadedModel, sets: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """Per layer, a [S, rows] keep-mask: row s blocks set s's neurons (layers no set touches are omitted)."""
    by_id = {layer.id: layer for layer in model.layers}
    ids = sorted({lid for blocked in sets for lid, rows in blocked.items() if len(rows)})
    out = {}
    for lid in ids:
        keep = torch.ones(len(sets), by_id[lid].rows, device=model.device)
        for s, blocked in enumerate(sets):
            rows = list(blocked.get(lid, []))
            if rows:
                keep[s, torch.as_tensor(rows, dtype=torch.long, device=model.device)] = 0.0
        out[lid] = keep
    return out


@torch.no_grad()
def sample_sets(
    model: LoadedModel,
    cond: Conditioning,
    settings: SampleSettings,
    sets: Sequence[Mapping[str, Sequence[int]]] = ({},),
    advance: Callable[[int], None] | None = None,
    seeds_per_prompt: bool = False,
) -> torch.Tensor:
    """Draw DDIM samples of S blocked sets x P prompts x N seeds: float32 [S, P, N, H, W, 3] in [0, 1].

    The N initial latents come in turn from one CPU generator seeded with
    ``settings.seed``, so every set, prompt and model sees the same noise.
    DDIM with eta 0 is deterministic after that. Each set ({layer id: rows})
    zeroes its value neurons by a per-sample hook mask, so several sets share
    one UNet batch; ``advance(n)`` reports finished samples. With
    ``seeds_per_prompt`` every prompt gets its own N latents (P x N draws from
    the generator: independent samples across prompts, e.g. for calibration).
    """
    from diffusers import DDIMScheduler

    s_count, p, n = len(sets), cond.hidden.shape[0], settings.seeds
    init = draw_latents(model.latent_shape, p * n if seeds_per_prompt else n, settings.seed)
    total = s_count * p * n
    set_of = torch.arange(s_count).repeat_interleave(p * n)
    prompt_of = torch.arange(p).repeat_interleave(n).repeat(s_count)
    seed_of = torch.arange(n).repeat(s_count * p)
    if seeds_per_prompt:
        seed_of = seed_of + prompt_of * n
    keep = _set_masks(model, sets)
    use_cfg = settings.guidance > 1.0
    uncond = model.encode([""]) if use_cfg else None
    out = []
    for start in range(0, total, settings.batch_size):
        sl = slice(start, start + settings.batch_size)
        b = set_of[sl].numel()
        batch = cond.select(prompt_of[sl].to(cond.hidden.device))
        if use_cfg:
            batch = _cat_cond(uncond.repeat(b), batch)
        masks = {lid: m[set_of[sl].to(m.device)] for lid, m in keep.items()}
        # the UNet's own prediction type (v for SD 2.x 768-v); DDIM's step converts it
        scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config, prediction_type=model.prediction_type)
        scheduler.set_timesteps(settings.steps, device=model.device)
        x = (init[seed_of[sl]] * scheduler.init_noise_sigma).to(model.device, model.dtype)
        with ValueMask(model.layers, masks):
            for t in scheduler.timesteps:
                xin = torch.cat([x, x]) if use_cfg else x
                xin = scheduler.scale_model_input(xin, t)
                eps = model.unet(xin, t, **batch.unet_kwargs()).sample
                if use_cfg:
                    e_u, e_c = eps.chunk(2)
                    eps = e_u + settings.guidance * (e_c - e_u)
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(_decode(model, x))
        if advance is not None:
            advance(b)
    images = torch.cat(out)
    return images.view(s_count, p, n, *images.shape[1:])


def sample_images(
    model: LoadedModel,
    cond: Conditioning,
    settings: SampleSettings,
    blocked: Mapping[str, Sequence[int]] | None = None,
    advance: Callable[[int], None] | None = None,
    seeds_per_prompt: bool = False,
) -> torch.Tensor:
    """Draw DDIM samples of P prompts x N seeds with one blocked set (or none): [P, N, H, W, 3]."""
    return sample_sets(model, cond, settings, [blocked or {}], advance, seeds_per_prompt)[0]
