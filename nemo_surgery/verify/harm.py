"""Harm measured as harm: relative change of the denoising loss on hold-out image-caption pairs.

The loss is the mean squared error of the predicted noise at fixed timesteps
with fixed noises (the same for every model and set), text-conditional. It
measures how well the model still models non-memorized data, and unlike
sample drift it does not punish a harmless change of a sampling trajectory.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nemo_surgery.engine.hooks import ValueMask, blocked_masks
from nemo_surgery.engine.model import Conditioning, LoadedModel
from nemo_surgery.errors import InputError
from nemo_surgery.verify.metrics import load_image

#: Fixed timesteps (fractions of the training schedule) and noises per pair.
LOSS_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
LOSS_NOISE_SEED = 0


@dataclass(frozen=True)
class ImageCaption:
    """One hold-out pair."""

    image: Path
    caption: str


def read_image_captions(path: Path) -> list[ImageCaption]:
    """A CSV (columns ``image``, ``caption``; images relative to the file) or a folder with ``captions.csv``
    or ``<name>.png`` + ``<name>.txt`` pairs."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: --holdout-images not found; pass a CSV of image,caption or a folder of image + .txt")
    table = path if path.is_file() else path / "captions.csv"
    pairs: list[ImageCaption] = []
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise InputError(f"{table}: --holdout-images CSV needs the columns image and caption")
            for row in reader:
                pairs.append(ImageCaption(table.parent / row["image"], row["caption"].strip()))
    else:
        for txt in sorted(path.glob("*.txt")):
            image = next((txt.with_suffix(s) for s in (".png", ".jpg", ".jpeg", ".webp") if txt.with_suffix(s).is_file()),
                         None)
            if image is not None:
                pairs.append(ImageCaption(image, txt.read_text(encoding="utf-8").strip()))
    missing = [str(p.image) for p in pairs if not p.image.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: hold-out image listed in {table} is not found")
    if len(pairs) < 2:
        raise InputError(f"{path}: at least 2 hold-out image-caption pairs are needed for the denoising loss")
    return pairs


@dataclass
class LossProbe:
    """Encoded hold-out pairs with their fixed noises and timesteps, ready to score any blocked set."""

    latents: torch.Tensor  # [M, C, h, w] clean latents, repeated per timestep
    noises: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    cond_index: torch.Tensor  # which caption each row uses
    pairs: int


@torch.no_grad()
def prepare_loss_probe(model: LoadedModel, pairs: Sequence[ImageCaption]) -> LossProbe:
    """Encode the images with the pipeline's VAE and fix timesteps and noises."""
    vae = model.pipe.vae
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    _, h, w = model.latent_shape
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    images = np.stack([load_image(p.image, h * factor, w * factor) for p in pairs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(model.device, next(vae.parameters()).dtype) * 2 - 1
    clean = vae.encode(x).latent_dist.mean * scaling
    train_steps = int(model.pipe.scheduler.config.num_train_timesteps)
    steps = torch.tensor([int(f * (train_steps - 1)) for f in LOSS_TIMESTEPS])
    n, k = clean.shape[0], steps.numel()
    latents = clean.repeat_interleave(k, dim=0).float().cpu()
    t = steps.repeat(n)
    gen = torch.Generator().manual_seed(LOSS_NOISE_SEED)
    noises = torch.randn(latents.shape, generator=gen)
    alphas = model.pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noises
    return LossProbe(latents, noises, t, noisy, torch.arange(n).repeat_interleave(k), n)


@torch.no_grad()
def denoising_loss(model: LoadedModel, probe: LossProbe, cond: Conditioning,
                   blocked: Mapping[str, Sequence[int]] | None = None, batch_size: int = 32) -> float:
    """Mean squared noise-prediction error over the probe (``cond``: the captions' conditioning)."""
    masks = blocked_masks(model.layers, blocked or {}, device=model.device)
    total, count = 0.0, 0
    with ValueMask(model.layers, masks):
        for start in range(0, probe.noisy.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            batch = cond.select(probe.cond_index[sl].to(cond.hidden.device))
            eps = model.unet(probe.noisy[sl].to(model.device, model.dtype), probe.timesteps[sl].to(model.device),
                             **batch.unet_kwargs()).sample.float().cpu()
            total += float(((eps - probe.noises[sl]) ** 2).mean(dim=(1, 2, 3)).sum())
            count += eps.shape[0]
    return total / count

