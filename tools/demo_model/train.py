"""Train the tiny demo text-to-image model that memorizes a few skimage photos.

Recipes (see docs/demo-model.md for measured results):

* ``joint``: one model trained from scratch on generic shapes with the memorized
  pairs mixed into every batch (``--mem-fraction``).
* ``finetune-kv``: a base model trained on generic shapes only (UNet and text
  encoder), then a Custom-Diffusion-style fine-tune of the cross-attention key
  and value projections (``attn2.to_k`` / ``attn2.to_v``) on the memorized pairs
  mixed with generic pairs (prior preservation).
* ``finetune-sparse-v``: fine-tune the whole UNet on the memorized pairs (plus
  generic pairs) but let only a few value rows per memorized item change, as in
  ``finetune-kv-sparse``; the text reaches the UNet only through the value layers.
* ``finetune-localized``: as ``finetune-sparse-v`` plus a localization loss: with
  the trained value rows zeroed, the model must predict what the frozen base model
  predicts. Memorization is thereby made to live in those few value neurons.
* ``finetune-kv-sparse``: as ``finetune-kv`` but only a few value rows are trained:
  per memorized item the ``--rows-per-item`` rows of the down/mid value layers with
  the largest loss gradient on that item (a sparse, parameter-efficient fine-tune).

Run: ``python -m tools.demo_model.train --out DIR [--steps N] [--recipe NAME]``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.demo_model import data
from tools.demo_model.evaluate import value_layers
from tools.demo_model.pixel_vae import build_pixel_vae

RECIPES = ("joint", "finetune-kv", "finetune-kv-sparse", "finetune-sparse-v", "finetune-localized")


@dataclass(frozen=True)
class TrainConfig:
    """All knobs of one training run (saved next to the model as train_config.json)."""

    recipe: str = "finetune-localized"
    steps: int = 800  # main stage (fine-tune for finetune-*, everything for joint)
    base_steps: int = 1500  # generic-only stage of finetune-* recipes
    batch_size: int = 16
    lr: float = 1e-3
    finetune_lr: float = 2e-3
    mem_fraction: float = 0.5  # share of memorized pairs in a main-stage batch
    cond_drop: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    offset_noise: float = 0.1  # per-channel constant added to the training noise
    train_keys: bool = True  # fine-tune attn2.to_k as well as attn2.to_v
    train_body: bool = False  # fine-tune every UNet weight except the value layers' untrained rows
    localize: float = 0.0  # weight of the "without the trained rows, behave like the base model" loss
    rows_per_item: int = 4  # sparse recipe: value rows fine-tuned per memorized item
    row_layers: str = "default"  # sparse recipe: rows come from 'default' (down+mid) or 'all' layers
    sample_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64)
    attention_levels: tuple[bool, ...] = (False, True)  # cross/self-attention per resolution level
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    seed: int = 0
    log_every: int = 100
    init: str | None = None  # load the base model from this pipeline folder instead of training it


def recipe_defaults(recipe: str) -> dict:
    """Return the per-recipe overrides of TrainConfig defaults."""
    if recipe == "joint":
        return {"steps": 3000, "base_steps": 0, "mem_fraction": 0.3}
    if recipe in ("finetune-kv", "finetune-kv-sparse"):
        return {}
    if recipe == "finetune-sparse-v":
        return {"train_body": True, "finetune_lr": 1e-3}
    if recipe == "finetune-localized":
        return {"train_body": True, "finetune_lr": 1e-3, "steps": 1000, "mem_fraction": 0.6, "localize": 1.0}
    raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")


def build_demo_pipeline(cfg: TrainConfig):
    """Build the untrained demo pipeline (pixel-space UNet, tiny CLIP, identity VAE)."""
    from diffusers import StableDiffusionPipeline

    from tests.models.tiny import TinySpec, build_scheduler, build_text_encoder, build_tokenizer

    spec = TinySpec(
        sample_size=cfg.sample_size,
        in_channels=3,
        block_out_channels=cfg.block_out_channels,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        text_hidden=cfg.cross_attention_dim,
        words=data.DEMO_WORDS,
        seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(spec.words)
    text_encoder = build_text_encoder(spec, vocab_size=len(tokenizer))
    unet = build_demo_unet(cfg)
    return StableDiffusionPipeline(
        vae=build_pixel_vae(3, cfg.sample_size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_demo_unet(cfg: TrainConfig):
    """Build the pixel-space UNet; attention (self + cross) only at the levels flagged in cfg."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, min(cfg.block_out_channels)),
    )


class TextCache:
    """Tokenize captions once and keep the ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        """Return a (B, 77) LongTensor of token ids."""
        for c in captions:
            if c not in self._ids:
                self._ids[c] = self.tokenizer(
                    c, padding="max_length", max_length=self.tokenizer.model_max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids[0]
        return torch.stack([self._ids[c] for c in captions])


class Batches:
    """Draw training batches of (images in [-1,1], captions) from generic and memorized data."""

    def __init__(self, cfg: TrainConfig, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.mem_imgs = [data.to_model_space(im) for im in data.memorized_images(cfg.sample_size)]
        self.mem_caps = [m.caption for m in data.MEMORIZED]

    def draw(self, mem_fraction: float) -> tuple[torch.Tensor, list[str]]:
        """Return one batch; about `mem_fraction` of it are memorized pairs."""
        imgs, caps = [], []
        for _ in range(self.cfg.batch_size):
            if self.rng.random() < mem_fraction:
                k = int(self.rng.integers(len(self.mem_imgs)))
                imgs.append(self.mem_imgs[k])
                caps.append(self.mem_caps[k])
            else:
                im, cap = data.sample_generic(self.rng, self.cfg.sample_size)
                imgs.append(data.to_model_space(im))
                caps.append(cap)
            if self.rng.random() < self.cfg.cond_drop:
                caps[-1] = ""
        return torch.from_numpy(np.stack(imgs)), caps


def _alphas_cumprod(pipe) -> torch.Tensor:
    sched = pipe.scheduler
    return sched.alphas_cumprod.float()


def noised(pipe, x0: torch.Tensor, gen: torch.Generator, offset: float, t_low: int = 0,
           high: tuple[float, int] = (0.0, 0)):
    """Draw timesteps (uniform in [t_low, T)) and (offset) noise; return (x_t, t, noise) for a batch of clean images.

    `high` = (fraction, low): that share of the batch draws its timestep from [low, T) instead,
    more weight on the high-noise steps where the caption decides the layout (no extra draws
    when the fraction is 0, so earlier runs replay unchanged).
    """
    acp = _alphas_cumprod(pipe)
    b = x0.shape[0]
    t = torch.randint(t_low, acp.shape[0], (b,), generator=gen)
    if high[0] > 0:
        pick = torch.rand((b,), generator=gen) < high[0]
        t = torch.where(pick, torch.randint(high[1], acp.shape[0], (b,), generator=gen), t)
    noise = torch.randn(x0.shape, generator=gen)
    if offset > 0:
        noise = noise + offset * torch.randn((b, x0.shape[1], 1, 1), generator=gen)
    a = acp[t].view(b, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


def diffusion_loss(pipe, ids: torch.Tensor, x0: torch.Tensor, gen: torch.Generator, offset: float) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (scaled_linear betas)."""
    xt, t, noise = noised(pipe, x0, gen, offset)
    emb = pipe.text_encoder(ids)[0]
    pred = pipe.unet(xt, t, encoder_hidden_states=emb).sample
    return F.mse_loss(pred, noise)


def localized_loss(pipe, base_unet, rows: dict[str, list[int]], weight: float, ids: torch.Tensor,
                   x0: torch.Tensor, gen: torch.Generator, offset: float) -> torch.Tensor:
    """Diffusion loss plus `weight` x MSE between the model with `rows` zeroed and the frozen base.

    The second term makes the fine-tuned behaviour (the memorized images) depend on
    the trained value rows: with them zeroed the model must predict what the base
    model predicts, for memorized and generic captions alike.
    """
    from tools.demo_model.evaluate import zeroed

    xt, t, noise = noised(pipe, x0, gen, offset)
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        target = base_unet(xt, t, encoder_hidden_states=emb).sample
    loss = F.mse_loss(pipe.unet(xt, t, encoder_hidden_states=emb).sample, noise)
    with zeroed(pipe.unet, rows):
        masked = pipe.unet(xt, t, encoder_hidden_states=emb).sample
    return loss + weight * F.mse_loss(masked, target)


def _run_stage(pipe, params, cfg: TrainConfig, steps: int, lr: float, mem_fraction: float,
               seed: int, label: str, log: list, weight_decay: float = 1e-4,
               localize: tuple | None = None) -> None:
    """Optimise `params` for `steps` steps with AdamW (warm-up, cosine decay to 10 %)."""
    if steps <= 0:
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    )
    batches = Batches(cfg, seed)
    cache = TextCache(pipe.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    t0, running = time.time(), []
    for step in range(1, steps + 1):
        x0, caps = batches.draw(mem_fraction)
        if localize is None:
            loss = diffusion_loss(pipe, cache.ids(caps), x0, gen, cfg.offset_noise)
        else:
            loss = localized_loss(pipe, localize[0], localize[1], cfg.localize, cache.ids(caps), x0, gen,
                                  cfg.offset_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % cfg.log_every == 0 or step == steps:
            entry = {"stage": label, "step": step, "loss": float(np.mean(running)), "seconds": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            running = []


def select_rows(pipe, cfg: TrainConfig, per_item: int, layers: str, seed: int,
                by_item: list | None = None) -> dict[str, list[int]]:
    """Pick, per memorized item, the value rows with the largest loss gradient on that item.

    Gradients are accumulated over 4 batches made only of the item; rows are taken
    from the allowed layers ('default' = down and mid blocks), never twice. Returns
    the union; when `by_item` is a list, each item's own rows are appended to it.
    """
    mods = value_layers(pipe.unet, layers)
    cache = TextCache(pipe.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    imgs = [torch.from_numpy(data.to_model_space(im)) for im in data.memorized_images(cfg.sample_size)]
    chosen: dict[str, list[int]] = {}
    for item, img in zip(data.MEMORIZED, imgs):
        for m in mods.values():
            m.weight.grad = None
        x0 = img.unsqueeze(0).expand(cfg.batch_size, -1, -1, -1)
        ids = cache.ids([item.caption] * cfg.batch_size)
        for _ in range(4):
            diffusion_loss(pipe, ids, x0, gen, cfg.offset_noise).backward()
        scores = [(float(v), n, j) for n, m in mods.items() for j, v in enumerate(m.weight.grad.norm(dim=1))
                  if j not in chosen.get(n, [])]
        scores.sort(reverse=True)
        own: dict[str, list[int]] = {}
        for _, n, j in scores[:per_item]:
            chosen.setdefault(n, []).append(j)
            own.setdefault(n, []).append(j)
        if by_item is not None:
            by_item.append({n: sorted(r) for n, r in own.items()})
    for m in mods.values():
        m.weight.grad = None
    return {n: sorted(r) for n, r in chosen.items()}


def _row_mask_hook(rows: list[int], width: int):
    """Return a gradient hook that keeps only the given rows' gradients."""
    mask = torch.zeros(width, 1)
    mask[rows] = 1.0
    return lambda g: g * mask


def train(cfg: TrainConfig, out: Path) -> dict:
    """Run one recipe and save the pipeline to `out`; returns a summary dict."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    log: list = []
    trained_rows: dict[str, list[int]] | None = None
    rows_by_item: list[dict[str, list[int]]] = []
    if cfg.init:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(cfg.init, safety_checker=None, requires_safety_checker=False)
    else:
        pipe = build_demo_pipeline(cfg)
    pipe.vae.requires_grad_(False)
    if cfg.recipe == "joint":
        params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
        pipe.unet.train()
        pipe.text_encoder.train()
        _run_stage(pipe, params, cfg, cfg.steps, cfg.lr, cfg.mem_fraction, cfg.seed, "joint", log)
    else:
        if not cfg.init:
            params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
            pipe.unet.train()
            pipe.text_encoder.train()
            _run_stage(pipe, params, cfg, cfg.base_steps, cfg.lr, 0.0, cfg.seed, "base", log)
            pipe.unet.eval()
            pipe.text_encoder.eval()
            pipe.save_pretrained(out / "base", safe_serialization=True)
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        params = []
        if cfg.train_body:
            pipe.unet.requires_grad_(True)
            params = list(pipe.unet.parameters())
        else:
            for name, mod in pipe.unet.named_modules():
                if name.endswith("attn2.to_v") or (name.endswith("attn2.to_k") and cfg.train_keys):
                    mod.weight.requires_grad_(True)
                    params.append(mod.weight)
        localize = None
        if cfg.recipe in ("finetune-kv-sparse", "finetune-sparse-v", "finetune-localized"):
            pipe.unet.train()
            rows = select_rows(pipe, cfg, cfg.rows_per_item, cfg.row_layers, cfg.seed + 2, rows_by_item)
            trained_rows = rows
            mods = value_layers(pipe.unet)
            for name, mod in mods.items():
                mod.weight.register_hook(_row_mask_hook(rows.get(name, []), mod.out_features))
            print(json.dumps({"trained_value_rows": rows}), flush=True)
            if cfg.localize > 0:
                import copy

                base_unet = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
                localize = (base_unet, rows)
        _run_stage(pipe, params, cfg, cfg.steps, cfg.finetune_lr, cfg.mem_fraction, cfg.seed + 1,
                   "finetune", log, weight_decay=0.0, localize=localize)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    summary = {"config": asdict(cfg), "log": log, "seconds": round(time.time() - t0, 1),
               "trained_value_rows": trained_rows, "trained_value_rows_by_item": rows_by_item or None}
    (out / "train_config.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recipe", default=TrainConfig.recipe, choices=RECIPES)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--base-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--rows-per-item", type=int, default=None)
    p.add_argument("--no-keys", action="store_true", help="fine-tune values only (freeze attn2.to_k)")
    p.add_argument("--mem-fraction", type=float, default=None)
    p.add_argument("--finetune-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--init", default=None, help="base pipeline folder to fine-tune (skips the base stage)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = replace(TrainConfig(recipe=a.recipe), **recipe_defaults(a.recipe))
    overrides = {
        "steps": a.steps, "base_steps": a.base_steps, "batch_size": a.batch_size, "rows_per_item": a.rows_per_item,
        "mem_fraction": a.mem_fraction, "finetune_lr": a.finetune_lr, "seed": a.seed, "init": a.init,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if a.no_keys:
        cfg = replace(cfg, train_keys=False)
    if cfg.steps < 100 or cfg.base_steps < 100:
        cfg = replace(cfg, log_every=max(1, min(cfg.steps, cfg.base_steps or cfg.steps)))
    a.out.mkdir(parents=True, exist_ok=True)
    summary = train(cfg, a.out)
    print(f"saved {a.out} in {summary['seconds']} s")


if __name__ == "__main__":
    main()
