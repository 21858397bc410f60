"""Adaptive attack on a prompt's conditioning: optimise it toward a training image, then sample and measure.

The attacker of "Finding Dori" (arXiv 2507.16880) keeps the model fixed and
searches the text-encoder output (the conditioning the UNet sees) for one that
brings a memorized training image back: Adam on the denoising loss of the
training image's latent, with a fresh batch of noises and timesteps per step.
This module is that attack as pure computation (no file I/O): it records the
loss per step, samples the current conditioning at checkpoints (similarity vs
attack step, for the report's chart) and, at the end, on every verification
seed. Several prompts are attacked in one batched optimisation: Adam is
elementwise and the summed loss keeps each prompt's gradient its own, so this
equals independent attacks, with fewer and larger UNet calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from nemo_surgery.engine.hooks import ValueMask, blocked_masks
from nemo_surgery.engine.model import Conditioning, LoadedModel
from nemo_surgery.verify.metrics import to_reference
from nemo_surgery.verify.sampling import SampleSettings, sample_images

#: similarity(images [N, H, W, 3], reference [H, W, 3]) -> [N]; verification's metric by default.
Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AttackSettings:
    """Knobs of the attack (defaults: the paper's 50 Adam steps, lr 0.1, batch 8)."""

    steps: int = 50
    lr: float = 0.1
    batch: int = 8  # noises/timesteps per prompt per step
    every: int = 10  # checkpoint interval (steps) of the similarity-vs-step curve
    probe_seeds: int = 2  # seeds sampled at each checkpoint (the first verification seeds)
    seed: int = 1234  # CPU generator of the attack's noises and timesteps
    chunk: int = 32  # most samples per UNet forward/backward (gradients are accumulated)
    eval_batch: int = 8  # fixed timesteps x noises of the before/after loss

    def checkpoints(self) -> list[int]:
        """Attack steps at which the current conditioning is sampled: 0, every, 2*every, ..., steps."""
        marks = list(range(0, self.steps, max(1, self.every)))
        return marks + [self.steps]

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON."""
        return {"steps": self.steps, "lr": self.lr, "batch": self.batch, "checkpoint_every": self.every,
                "probe_seeds": self.probe_seeds, "seed": self.seed, "chunk": self.chunk,
                "eval_batch": self.eval_batch, "optimizer": "Adam (default betas) on an fp32 copy of the "
                "text-encoder output", "timesteps": "uniform over the training timesteps"}


@dataclass
class AttackTrace:
    """One attacked prompt: loss per step, similarity at checkpoints and at the end."""

    prompt: str
    losses: list[float]  # mean denoising loss of the step's batch, before the step's update
    loss_before: float  # loss on fixed timesteps/noises with the starting conditioning
    loss_after: float  # the same after the attack
    checkpoints: list[int]
    checkpoint_similarity: list[list[float]]  # [checkpoint][probe seed]
    similarity_before: list[float]  # every verification seed, starting conditioning
    similarity_after: list[float]  # every verification seed, attacked conditioning
    embedding_change: float  # ||e - e0|| / ||e0||
    images: np.ndarray | None = field(default=None, repr=False)  # attacked samples [N, H, W, 3]

    @property
    def best(self) -> float:
        """Highest similarity of any seed after the attack (a copy in one seed is a copy)."""
        return max(self.similarity_after)

    def to_json(self) -> dict[str, Any]:
        """The numbers as JSON."""
        return {"prompt": self.prompt, "loss_per_step": self.losses,
                "fixed_loss": {"before": self.loss_before, "after": self.loss_after},
                "checkpoints": self.checkpoints, "checkpoint_similarity": self.checkpoint_similarity,
                "similarity_before": self.similarity_before, "similarity_after": self.similarity_after,
                "max_similarity_after": self.best, "embedding_change": self.embedding_change}


@torch.no_grad()
def image_latents(model: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """Encode float images [P, H, W, 3] in [0, 1] with the pipeline's VAE: latents [P, C, h, w] (float32).

    The latent is the posterior mean times the VAE's scaling factor (what the
    UNet was trained on). SD VAEs that must run in fp32 are encoded in fp32.
    """
    vae = model.pipe.vae
    if vae is None:
        raise ValueError("the pipeline was loaded without its VAE; load it with with_vae=True")
    dtype = next(vae.parameters()).dtype
    if bool(getattr(vae.config, "force_upcast", False)) and dtype == torch.float16:
        dtype = torch.float32
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) * 2 - 1
    vae_in = vae if dtype == next(vae.parameters()).dtype else vae.to(dtype)
    latent = vae_in.encode(x.to(model.device, dtype)).latent_dist.mean
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    return latent.float() * scaling


def _scheduler(model: LoadedModel):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model.pipe.scheduler.config)


def _target(kind: str, x0: torch.Tensor, noise: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, per the scheduler's prediction type (``acp``: alpha-bar_t)."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return acp.sqrt() * noise - (1 - acp).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction type {kind!r}")


def _losses(model: LoadedModel, scheduler, hidden: torch.Tensor, added: dict[str, torch.Tensor] | None,
            owner: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising MSE [B] of latents ``x0[owner]`` noised with ``noise`` at timesteps ``t``."""
    dev = model.device
    owner, t = owner.to(dev), t.to(dev)
    clean = x0[owner]
    eps = noise.to(dev)
    acp = scheduler.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
    noisy = acp.sqrt() * clean + (1 - acp).sqrt() * eps
    target = _target(scheduler.config.prediction_type, clean, eps, acp)
    cond = Conditioning(hidden[owner].to(model.dtype),
                        {k: v[owner] for k, v in added.items()} if added else None)
    pred = model.unet(noisy.to(model.dtype), t, **cond.unet_kwargs()).sample
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def _fixed_loss(model: LoadedModel, scheduler, hidden: torch.Tensor, added, x0: torch.Tensor,
                settings: AttackSettings) -> list[float]:
    """Per-prompt denoising loss on fixed, evenly spaced timesteps and seeded noises (no gradient)."""
    p, n = x0.shape[0], settings.eval_batch
    total = scheduler.config.num_train_timesteps
    t = torch.linspace(0, total - 1, n).round().long().repeat(p)
    gen = torch.Generator("cpu").manual_seed(settings.seed + 1)
    noise = torch.randn((p * n, *x0.shape[1:]), generator=gen)
    owner = torch.arange(p).repeat_interleave(n)
    out = torch.zeros(p)
    with torch.no_grad():
        for s in range(0, p * n, settings.chunk):
            sl = slice(s, s + settings.chunk)
            loss = _losses(model, scheduler, hidden, added, owner[sl], x0, noise[sl], t[sl]).cpu()
            out.index_add_(0, owner[sl], loss / n)
    return out.tolist()


def _sample_similarity(model: LoadedModel, hidden: torch.Tensor, added, sampling: SampleSettings,
                       blocked, targets: np.ndarray, similarity: Similarity) -> tuple[np.ndarray, list[list[float]]]:
    cond = Conditioning(hidden.detach().to(model.dtype), added)
    images = sample_images(model, cond, sampling, blocked=blocked).numpy()
    return images, [[float(v) for v in similarity(images[k], targets[k])] for k in range(len(targets))]


def attack_prompts(
    model: LoadedModel,
    cond: Conditioning,
    targets: np.ndarray,
    settings: AttackSettings,
    sampling: SampleSettings,
    *,
    prompts: Sequence[str] | None = None,
    blocked: Mapping[str, Sequence[int]] | None = None,
    similarity: Similarity = to_reference,
    progress: Callable[[int], None] | None = None,
) -> list[AttackTrace]:
    """Attack P prompts at once: optimise their conditioning toward their target images [P, H, W, 3].

    ``cond`` is the prompts' text-encoder output (the attack's start); SDXL's
    pooled/time conditioning is kept as given. The optimised copy is float32
    whatever the model's dtype (fp16 runs use dynamic loss scaling). The model
    is sampled with ``sampling`` (its first ``settings.probe_seeds`` seeds at each
    checkpoint, every seed before and after) and each sample is compared with its
    target by ``similarity``. ``blocked`` zeroes value neurons by hook (a pruned
    model without a pruned copy); ``progress(step)`` is called after each step.
    """
    p = cond.hidden.shape[0]
    if targets.shape[0] != p:
        raise ValueError(f"{p} prompts but {targets.shape[0]} target images")
    scheduler = _scheduler(model)
    x0 = image_latents(model, targets).to(model.device)
    added = {k: v.detach() for k, v in cond.added.items()} if cond.added else None
    start = cond.hidden.detach().float().clone()
    emb = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([emb], lr=settings.lr)
    masks = blocked_masks(model.layers, blocked or {}, device=model.device)
    probe = replace(sampling, seeds=min(settings.probe_seeds, sampling.seeds))
    marks = settings.checkpoints()
    scale = 2.0**12 if model.dtype == torch.float16 else 1.0
    gen = torch.Generator("cpu").manual_seed(settings.seed)
    owner = torch.arange(p).repeat_interleave(settings.batch)
    total_t = scheduler.config.num_train_timesteps
    losses: list[list[float]] = [[] for _ in range(p)]
    curve: list[list[list[float]]] = [[] for _ in range(p)]
    with ValueMask(model.layers, masks):
        loss_before = _fixed_loss(model, scheduler, start, added, x0, settings)
    _, sim_before = _sample_similarity(model, start, added, sampling, blocked, targets, similarity)
    for k in range(p):
        curve[k].append(sim_before[k][: probe.seeds])
    for step in range(settings.steps):
        t = torch.randint(0, total_t, (owner.numel(),), generator=gen)
        noise = torch.randn((owner.numel(), *x0.shape[1:]), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros(p)
        with ValueMask(model.layers, masks):
            for s in range(0, owner.numel(), settings.chunk):
                sl = slice(s, s + settings.chunk)
                per = _losses(model, scheduler, emb, added, owner[sl], x0, noise[sl], t[sl]) / settings.batch
                (per.sum() * scale).backward()
                step_loss.index_add_(0, owner[sl], per.detach().cpu())
        if scale != 1.0:
            emb.grad.div_(scale)
            if not torch.isfinite(emb.grad).all():  # fp16 overflow: skip this update, lower the scale
                scale /= 2
                optimizer.zero_grad(set_to_none=True)
        if emb.grad is not None:
            optimizer.step()
        for k in range(p):
            losses[k].append(float(step_loss[k]))
        if step + 1 in marks[1:-1]:
            _, sims = _sample_similarity(model, emb, added, probe, blocked, targets, similarity)
            for k in range(p):
                curve[k].append(sims[k])
        if progress is not None:
            progress(step + 1)
    with ValueMask(model.layers, masks):
        loss_after = _fixed_loss(model, scheduler, emb.detach(), added, x0, settings)
    images, sim_after = _sample_similarity(model, emb, added, sampling, blocked, targets, similarity)
    change = ((emb.detach() - start).flatten(1).norm(dim=1) / start.flatten(1).norm(dim=1).clamp_min(1e-12)).tolist()
    names = list(prompts) if prompts is not None else [""] * p
    traces = []
    for k in range(p):
        curve[k].append(sim_after[k][: probe.seeds])
        traces.append(AttackTrace(
            prompt=names[k], losses=losses[k], loss_before=loss_before[k], loss_after=loss_after[k],
            checkpoints=marks, checkpoint_similarity=curve[k], similarity_before=sim_before[k],
            similarity_after=sim_after[k], embedding_change=float(change[k]), images=images[k]))
    return traces
