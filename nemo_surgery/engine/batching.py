"""Choose the UNet batch size (samples per forward call) from the device's free memory.

On CUDA one probe forward at a small batch measures the peak memory per
sample (activations at the model's dtype, plus a margin for the fp32 noise
differences, MS-SSIM and masks); the batch is the share of free memory that
fits, rounded down to whole seed groups. CPUs are compute-bound (a bigger
batch buys nothing) and MPS reports no free memory: both keep the fixed default.
"""

from __future__ import annotations

import torch

from nemo_surgery.engine.model import LoadedModel

#: Batch size where free memory cannot be measured (CPU, MPS): the CLI's long-standing default.
FIXED_DEFAULT = 32
PROBE = 4
MARGIN = 1.25


def batch_from_memory(free_bytes: int, per_sample_bytes: float, seeds: int, fraction: float = 0.8, cap: int = 1024) -> int:
    """Samples per call that fit ``fraction`` of ``free_bytes``, at most ``cap``, a multiple of ``seeds`` when possible."""
    n = int(free_bytes * fraction // max(per_sample_bytes, 1.0))
    n = max(1, min(cap, n))
    if n >= seeds:
        n -= n % seeds
    return n


@torch.no_grad()
def per_sample_bytes(model: LoadedModel, guidance_scale: float = 0.0) -> float:
    """Peak CUDA memory of one scored sample, measured by a probe forward of ``PROBE`` samples."""
    dev = model.device
    _, h, w = model.latent_shape
    reps = 2 if guidance_scale > 1.0 else 1  # guidance stacks unconditional and conditional halves
    cond = model.encode([""]).repeat(PROBE * reps)
    x = torch.randn(PROBE * reps, model.unet.config.in_channels, h, w, device=dev, dtype=model.dtype)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    model.unet(x, torch.tensor(500, device=dev), **cond.unet_kwargs())
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    return peak / PROBE * MARGIN


def auto_batch_size(model: LoadedModel, guidance_scale: float = 0.0, seeds: int = 10) -> int:
    """The batch size for ``--batch-size auto``: measured on CUDA, :data:`FIXED_DEFAULT` elsewhere."""
    if model.device.type != "cuda":
        return FIXED_DEFAULT
    torch.cuda.empty_cache()
    per = per_sample_bytes(model, guidance_scale)
    free, _ = torch.cuda.mem_get_info(model.device)
    return batch_from_memory(free, per, seeds)


def resolve_batch_size(value: int | str, model: LoadedModel, guidance_scale: float = 0.0, seeds: int = 10) -> int:
    """An explicit batch size as given; ``auto`` (or 0) chosen from free memory."""
    if value in ("auto", 0, None):
        return auto_batch_size(model, guidance_scale, seeds)
    return int(value)
