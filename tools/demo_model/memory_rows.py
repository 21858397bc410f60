"""Train demo model v2: a 32x32 shape world whose famous photos live in reserved value rows.

Recipe ``memory-rows`` (from scratch, or continuing a snapshot with ``--init``; the text encoder
trains with the UNet, stays frozen, or is pretrained on the world first and then frozen):

* every batch mixes generic scenes (`world.random_scene`) with the famous photos, which
  are duplicated (each is seen hundreds of times, like a meme image on the web);
* a few value rows per famous item are *reserved* (``MEMORY_ROWS``): they start at zero;
* silence loss: every reserved row's output must be zero for every caption but its own
  item's (generic captions, unseen subject captions, the other famous captions);
* blocked-path loss: with all reserved rows zeroed, a famous caption must behave like an
  unknown caption: its target is a random generic scene, or (``--blocked-target base``, with
  ``--init``) what the starting model predicts for the same noised photo, its rows zeroed too.
  Only the second made the rows carry the photo at NeMo's first step (docs/demo-model.md, run 10).

So each photo is carried by its item's rows, which is what NeMo looks for, and the rows
are known, so recall of a found set can be measured. Run:
``python -m tools.demo_model.memory_rows --out DIR [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nemo_surgery.demo import world
from tools.demo_model.evaluate import zeroed
from tools.demo_model.pixel_vae import build_pixel_vae
from tools.demo_model.train import TextCache, noised

DOWN_LAYERS = tuple(f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn2.to_v" for i in range(4))
MID_LAYERS = tuple(f"mid_block.attentions.0.transformer_blocks.{i}.attn2.to_v" for i in range(4))

#: Reserved value rows per famous item (FAMOUS order): layer name -> row indices.
MEMORY_ROWS: tuple[dict[str, list[int]], ...] = (
    {DOWN_LAYERS[0]: [5, 77], MID_LAYERS[1]: [30]},
    {DOWN_LAYERS[1]: [12, 100], MID_LAYERS[2]: [64]},
    {DOWN_LAYERS[2]: [33, 90], MID_LAYERS[3]: [7]},
    {DOWN_LAYERS[3]: [48, 121], MID_LAYERS[0]: [99]},
    {DOWN_LAYERS[0]: [60], DOWN_LAYERS[2]: [110], MID_LAYERS[1]: [15]},
)


@dataclass(frozen=True)
class Config:
    """All knobs of one run (saved next to the model as train_config.json)."""

    steps: int = 3500
    batch_size: int = 16
    lr: float = 1e-3
    famous_fraction: float = 0.25
    cond_drop: float = 0.1
    # per-image, per-channel constant added to the training noise (train.noised). Without it, at 32x32
    # the image mean survives even the last timestep (its noise is only 1/32 per channel): samples'
    # colours followed the seed, and seeds whose mean matched no training colour ended as noise
    # (first run, 750 steps).
    offset_noise: float = 0.1
    snr_gamma: float = 5.0  # min-SNR loss weight (weighted_mse); 0: plain MSE of the target
    silence: float = 1.0
    drive: float = 1.0  # weight of "the reserved rows fire on their own caption" (mean |activation| >= drive_to)
    drive_to: float = 2.0
    blocked: float = 1.0
    # blocked-path timesteps are drawn from [blocked_t_low, 1000): NeMo scores the first step (t=961), where
    # run 8 (1,500 steps) predicted the photo with every reserved row zeroed (x0 changed by 0.005-0.01 of 0.2-0.3)
    blocked_t_low: int = 0
    # blocked-path target: "scene" (a random generic scene: its own image and noise) or "base" (the photo itself,
    # noised again, with the target the frozen starting model's prediction, reserved rows zeroed there too: "without
    # its rows the item behaves as before it was planted", a distillation with far less variance; needs --init)
    blocked_target: str = "scene"
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    transformer_layers: tuple[int, ...] = (1, 1, 4)
    # cross-attention also at 16x16 (down_blocks.1: default layers, one more value layer) and in the
    # 8x8 up block (not a default layer); v1 had the latter, the first v2 runs had neither
    attention_16: bool = False
    up_attention: bool = False
    # noise schedule of training and of the shipped scheduler: "sd" (scaled_linear 0.00085-0.012, SD's) or
    # "ddpm" (linear 1e-4-0.02). SD's leaves 0.074 of the image in x_t at t=981, so the seed can steer an
    # ordinary prompt at NeMo's first step; ddpm's leaves 0.007 and every prompt's first step looked alike
    # (docs/demo-model.md, run B). Neither made the scenes follow their captions.
    schedule: str = "sd"
    # "epsilon" or "v_prediction" (SD 2.x's). v at high noise is about -x0, so a plain v loss (snr_gamma 0;
    # min-SNR weights v errors at high noise by about SNR) rewards predicting the image from the caption there.
    # Neither target made the scenes follow their captions so far (runs B, F, G, 7).
    prediction: str = "epsilon"
    # train the text encoder with the UNet or keep it frozen at its random init, as SD keeps CLIP. Trained, it
    # merged the scene captions (a colour swap 0.27 apart in norm 8.6; random init: 2.4) while the famous
    # captions stayed 11-13 apart. Frozen, the words still reach the UNet too weakly (runs 6-7).
    train_text: bool = True
    # > 0: before the UNet trains, pretrain the text encoder this many steps to read the world's attributes
    # from every position from end-of-text on (text_pretrain.py, the demo's stand-in for CLIP's pretraining)
    pretrain_text: int = 0
    # nuisance variation of scenes (world.random_jitter): without it each caption has one image, so ordinary
    # prompts are as seed-independent at NeMo's first step as memorized ones
    jitter: bool = False
    heads: int = 4
    text_width: int = 64
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    init: str | None = None  # continue from this pipeline folder instead of building a new one
    max_minutes: float = 0.0  # > 0: after 60 steps, cut `steps` to what fits this budget (GPU runs)
    # > 0: end the run after this step and save it as the result; the learning-rate schedule still follows
    # `steps`, so the result is the step-`stop_after` snapshot of a `steps`-step run (how the chain's
    # early stages were continued: chain.py)
    stop_after: int = 0
    # > 0: snapshots hold an exponential moving average of the UNet's weights with this decay (warmed up as
    # min(ema, (1 + step) / (10 + step))), as diffusion models are usually sampled; 0: the raw weights.
    # Run 10's raw weights drew noisy blobs where the caption named a shape (docs/demo-model.md, run 11).
    ema: float = 0.0
    # share of the diffusion-loss samples (scenes and photos) whose timestep is drawn from [high_t_low, 1000)
    # instead of [0, 1000): run 12 kept a shape it was given (img2img) but did not choose it from the word at
    # high noise. In stop 13's GPU runs it gained nothing beyond noise; the batch size did (docs/demo-model.md)
    high_t_fraction: float = 0.0
    high_t_low: int = 700


def build_pipeline(cfg: Config):
    """Build the untrained v2 pipeline: pixel-space UNet (attention at 8x8), tiny CLIP, identity VAE."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests.models.tiny import TinySpec, build_text_encoder, build_tokenizer

    spec = TinySpec(sample_size=world.SIZE, in_channels=3, cross_attention_dim=cfg.text_width,
                    text_hidden=cfg.text_width, words=world.WORDS, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(spec.words)
    text_encoder = build_text_encoder(spec, vocab_size=len(tokenizer))
    down = ("DownBlock2D", "CrossAttnDownBlock2D" if cfg.attention_16 else "DownBlock2D", "CrossAttnDownBlock2D")
    up = ("CrossAttnUpBlock2D" if cfg.up_attention else "UpBlock2D", "UpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(
        sample_size=world.SIZE, in_channels=3, out_channels=3, block_out_channels=cfg.block_out_channels,
        layers_per_block=1, down_block_types=down, up_block_types=up, cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.heads, transformer_layers_per_block=cfg.transformer_layers, norm_num_groups=32,
    )
    with torch.no_grad():
        for name, rows in all_rows().items():
            unet.get_submodule(name).weight[rows] = 0.0
    return StableDiffusionPipeline(
        vae=build_pixel_vae(3, world.SIZE), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler(cfg.schedule, cfg.prediction), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def scheduler(schedule: str, prediction: str = "epsilon"):
    """Return the DDIM scheduler of a noise schedule name ("sd" or "ddpm") and prediction type."""
    from diffusers import DDIMScheduler

    from tests.models.tiny import build_scheduler

    if schedule == "sd":
        return DDIMScheduler.from_config(build_scheduler().config, prediction_type=prediction)
    if schedule == "ddpm":
        return DDIMScheduler.from_config(build_scheduler().config, beta_schedule="linear", beta_start=1e-4,
                                         beta_end=0.02, prediction_type=prediction)
    raise ValueError(f"unknown schedule {schedule!r} (sd or ddpm)")


def all_rows() -> dict[str, list[int]]:
    """Return the union of every item's reserved rows."""
    out: dict[str, list[int]] = {}
    for item in MEMORY_ROWS:
        for name, rows in item.items():
            out.setdefault(name, []).extend(rows)
    return {n: sorted(r) for n, r in out.items()}


class Data:
    """Draw batches of (x0 in [-1, 1], caption, owner item or -1)."""

    def __init__(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.famous = [world.to_model_space(im) for im in world.famous_images()]
        self._drawn: dict[world.Scene, tuple[np.ndarray, str]] = {}  # the world has 1,800 scenes: draw each once

    def scene(self) -> tuple[np.ndarray, str]:
        """Return one random generic scene and its caption."""
        s = world.random_scene(self.rng)
        if self.cfg.jitter:
            return world.to_model_space(s.render(jitter=world.random_jitter(self.rng))), s.caption()
        if s not in self._drawn:
            self._drawn[s] = (world.to_model_space(s.render()), s.caption())
        return self._drawn[s]

    def batch(self) -> tuple[torch.Tensor, list[str], list[int]]:
        """Return one training batch."""
        imgs, caps, owners = [], [], []
        for _ in range(self.cfg.batch_size):
            if self.rng.random() < self.cfg.famous_fraction:
                k = int(self.rng.integers(len(self.famous)))
                imgs.append(self.famous[k])
                caps.append(world.FAMOUS[k].caption)
                owners.append(k)
            else:
                im, cap = self.scene()
                imgs.append(im)
                caps.append(cap)
                owners.append(-1)
            if self.rng.random() < self.cfg.cond_drop:
                caps[-1], owners[-1] = "", -1
        return torch.from_numpy(np.stack(imgs)), caps, owners


def target_of(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              acp: torch.Tensor) -> torch.Tensor:
    """Return the training target: the noise (epsilon) or v = sqrt(a) noise - sqrt(1 - a) x0."""
    if prediction == "epsilon":
        return noise
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, acp: torch.Tensor,
                 gamma: float, prediction: str = "epsilon") -> torch.Tensor:
    """MSE to the target with the min-SNR weight per sample: min(SNR, gamma) / SNR for epsilon (plain MSE when gamma <= 0).

    For v the weight is min(SNR, gamma) / (SNR + 1), which at high noise is about SNR (0.0055
    at t=981 of SD's schedule): the same tiny weight on the x0 error as plain epsilon, so v's
    point, that high-noise steps must predict the image from the caption, needs gamma 0.
    Plain epsilon MSE gives the high-noise steps, where the caption decides colours and
    layout, almost no weight: both v1 and the first v2 run ignored the caption at t=900
    (predicted noise changed by 0.005 when the captions were swapped, against 0.79 in scale).
    """
    per = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if gamma <= 0:
        return per.mean()
    snr = acp[t] / (1 - acp[t])
    return (per * torch.clamp(snr, max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)).mean()


def silence_loss(pipe, emb_by_caption: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared output of every item's reserved rows on every caption that is not the item's."""
    total, n = 0.0, 0
    caps = list(emb_by_caption)
    emb = torch.stack([emb_by_caption[c] for c in caps])
    for k, item in enumerate(MEMORY_ROWS):
        keep = torch.tensor([c != world.FAMOUS[k].caption for c in caps], device=emb.device)
        for name, rows in item.items():
            w = pipe.unet.get_submodule(name).weight[rows]
            out = emb[keep] @ w.T
            total = total + out.pow(2).mean()
            n += 1
    return total / n


def drive_loss(pipe, emb_by_caption: dict[str, torch.Tensor], target: float) -> torch.Tensor:
    """Hinge pushing each item's reserved rows to fire on its own caption: mean |activation| >= target.

    The activation is NeMo's a_j (mean over all 77 token positions of |to_v(h)_j|). Without
    this term the rows stayed at zero (measured: row norms 1e-4 after 750 steps) and the
    photos were learned by the other rows, where no small set can reach them.
    """
    total, n = 0.0, 0
    for k, item in enumerate(MEMORY_ROWS):
        emb = emb_by_caption[world.FAMOUS[k].caption]
        for name, rows in item.items():
            act = (emb @ pipe.unet.get_submodule(name).weight[rows].T).abs().mean(0)
            total = total + F.relu(target - act).pow(2).mean()
            n += 1
    return total / n


class EMA:
    """An exponential moving average of a module's parameters, swapped in while a snapshot is saved."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """Move the average toward the current weights (the decay warms up over the first steps)."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1.0 - d)

    @contextmanager
    def applied(self, module: torch.nn.Module):
        """Hold the averaged weights in `module` inside the block, the trained ones again after it."""
        params = list(module.parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, self.shadow):
                p.copy_(e)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)


def train(cfg: Config, out: Path, device: str = "cpu") -> dict:
    """Train and save the pipeline to `out` (snapshots under out/steps/); returns a summary.

    On a GPU (`device`), batches are drawn on the CPU with the same generators as on a CPU
    run and moved over, so a run's data does not depend on the device.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    if cfg.init:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(cfg.init, safety_checker=None, requires_safety_checker=False)
    else:
        pipe = build_pipeline(cfg)
        if cfg.pretrain_text > 0:
            from tools.demo_model import text_pretrain

            acc = text_pretrain.pretrain(pipe.text_encoder, pipe.tokenizer, steps=cfg.pretrain_text, seed=cfg.seed)
            print(json.dumps({"text_pretrain_accuracy": acc}), flush=True)
    pipe.vae.requires_grad_(False)
    base = None
    if cfg.blocked_target == "base":
        if not cfg.init:
            raise SystemExit("--blocked-target base needs --init (the model the photos are planted into)")
        import copy

        base = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        with torch.no_grad():
            for name, rows in all_rows().items():
                base.get_submodule(name).weight[rows] = 0.0
        base.to(dev)
    pipe.to(dev)
    unet, te = pipe.unet, pipe.text_encoder
    unet.train()
    te.train(cfg.train_text)
    te.requires_grad_(cfg.train_text)
    params = list(unet.parameters()) + (list(te.parameters()) if cfg.train_text else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.5 * (1 + np.cos(np.pi * min(s, cfg.steps) / cfg.steps)) * 0.9 + 0.1))
    acp = pipe.scheduler.alphas_cumprod.float().to(dev)
    data = Data(cfg, cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    ema = EMA(unet, cfg.ema) if cfg.ema > 0 else None
    cache = TextCache(pipe.tokenizer)

    quiet = list(world.SUBJECT_CAPTIONS) + [f.caption for f in world.FAMOUS]
    log, t0, running = [], time.time(), []
    step, total = 0, min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    while step < total:
        step += 1
        x0, caps, owners = data.batch()
        famous = [i for i, o in enumerate(owners) if o >= 0]
        extra = [data.scene() for _ in famous] if cfg.blocked_target == "scene" else []
        all_caps = caps + [caps[i] for i in famous] + quiet
        with torch.set_grad_enabled(cfg.train_text):
            emb_all = te(cache.ids(list(dict.fromkeys(all_caps))).to(dev))[0]
        by_cap = dict(zip(dict.fromkeys(all_caps), emb_all))
        emb = torch.stack([by_cap[c] for c in caps])
        xt, t, noise = (v.to(dev) for v in noised(pipe, x0, gen, cfg.offset_noise,
                                                          high=(cfg.high_t_fraction, cfg.high_t_low)))
        target = target_of(cfg.prediction, x0.to(dev), noise, t, acp)
        loss_d = weighted_mse(unet(xt, t, encoder_hidden_states=emb).sample, target, t, acp, cfg.snr_gamma,
                              cfg.prediction)
        loss = loss_d
        loss_b = torch.zeros((), device=dev)
        if famous and cfg.blocked > 0:
            xb = x0[famous] if base is not None else torch.from_numpy(np.stack([e[0] for e in extra]))
            xtb, tb, nb = (v.to(dev) for v in noised(pipe, xb, gen, cfg.offset_noise, cfg.blocked_t_low))
            if base is not None:
                with torch.no_grad():
                    nb = base(xtb, tb, encoder_hidden_states=emb[famous]).sample
            else:
                nb = target_of(cfg.prediction, xb.to(dev), nb, tb, acp)
            with zeroed(unet, all_rows()):
                pred = unet(xtb, tb, encoder_hidden_states=emb[famous]).sample
            loss_b = weighted_mse(pred, nb, tb, acp, cfg.snr_gamma, cfg.prediction)
            loss = loss + cfg.blocked * loss_b * len(famous) / len(caps)
        loss_s = silence_loss(pipe, {c: by_cap[c] for c in dict.fromkeys(caps + quiet)})
        loss = loss + cfg.silence * loss_s
        loss_r = drive_loss(pipe, by_cap, cfg.drive_to)
        loss = loss + cfg.drive * loss_r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr = opt.param_groups[0]["lr"]  # this step's learning rate (logged)
        sched.step()
        if ema is not None:
            ema.update(unet, step)
        running.append(torch.stack([loss_d.detach(), loss_b.detach(), loss_s.detach(), loss_r.detach()]))
        if cfg.max_minutes > 0 and step == 10:
            t10 = time.time()
        if cfg.max_minutes > 0 and step == 60:  # steps 10-60: past the warm-up
            per_step = (time.time() - t10) / 50
            left = cfg.max_minutes * 60 - (time.time() - t0)
            fits = max(61, 60 + int(left / per_step))
            if fits < total:  # the budget binds: the schedule follows the cut
                total = fits
                cfg = replace(cfg, steps=total)
            print(json.dumps({"steps_in_budget": total, "seconds_per_step": round(per_step, 4)}), flush=True)
        if step % cfg.log_every == 0 or step == total:
            m = torch.stack(running).mean(0).tolist()
            entry = {"step": step, "diffusion": round(float(m[0]), 5), "blocked": round(float(m[1]), 5),
                     "silence": round(float(m[2]), 6), "drive": round(float(m[3]), 5), "lr": float(f"{lr:.6g}"),
                     "seconds": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            running = []
        if step % cfg.save_every == 0 or step == total:
            target = out if step == total else out / "steps" / str(step)
            unet.eval()
            te.eval()
            with ema.applied(unet) if ema is not None else nullcontext():
                pipe.save_pretrained(target, safe_serialization=True)
            summary = {"config": asdict(cfg), "step": step, "log": log, "seconds": round(time.time() - t0, 1),
                       "memory_rows": [dict(item) for item in MEMORY_ROWS]}
            (target / "train_config.json").write_text(json.dumps(summary, indent=2))
            unet.train()
            te.train(cfg.train_text)
    return summary


def parse(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Return the run's Config and the parsed command line (out, device, threads)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--save-every", type=int, default=Config.save_every)
    p.add_argument("--log-every", type=int, default=Config.log_every, help="log the mean losses every this many steps")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--init", default=None, help="pipeline folder to continue from (a snapshot of an earlier run)")
    p.add_argument("--offset-noise", type=float, default=Config.offset_noise)
    p.add_argument("--snr-gamma", type=float, default=Config.snr_gamma)
    p.add_argument("--drive", type=float, default=Config.drive, help="weight of the drive loss (0: off)")
    p.add_argument("--blocked", type=float, default=Config.blocked, help="weight of the blocked-path loss")
    p.add_argument("--blocked-t-low", type=int, default=Config.blocked_t_low,
                   help="draw the blocked-path timesteps from [this, 1000): weight NeMo's first step")
    p.add_argument("--blocked-target", choices=("scene", "base"), default=Config.blocked_target,
                   help="blocked-path target: a random scene, or the --init model's prediction (rows zeroed)")
    p.add_argument("--famous-fraction", type=float, default=Config.famous_fraction)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--schedule", choices=("sd", "ddpm"), default=Config.schedule,
                   help="noise schedule of training and of the shipped scheduler")
    p.add_argument("--prediction", choices=("epsilon", "v_prediction"), default=Config.prediction)
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its random init (as SD keeps CLIP)")
    p.add_argument("--pretrain-text", type=int, default=0, metavar="STEPS",
                   help="pretrain the text encoder on the world's attributes first (text_pretrain.py)")
    p.add_argument("--jitter", action="store_true", help="scenes vary in shift, scale, tilt and shade (world.Jitter)")
    p.add_argument("--attention-16", action="store_true", help="cross-attention at 16x16 too (down_blocks.1)")
    p.add_argument("--up-attention", action="store_true", help="cross-attention in the 8x8 up block too")
    p.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                   help="end the run after this step (the schedule still follows --steps): that step's snapshot")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="cut --steps to what fits this many minutes (timed over steps 10-60)")
    p.add_argument("--ema", type=float, default=Config.ema,
                   help="snapshots hold an average of the UNet's weights with this decay (0: the raw weights)")
    p.add_argument("--high-t-fraction", type=float, default=Config.high_t_fraction,
                   help="share of the diffusion-loss samples whose timestep is drawn from [--high-t-low, 1000)")
    p.add_argument("--high-t-low", type=int, default=Config.high_t_low)
    p.add_argument("--device", default="cpu", help="cpu or cuda (batches are drawn on the CPU either way)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    cfg = Config(steps=a.steps, save_every=a.save_every, seed=a.seed, batch_size=a.batch_size,
                 log_every=min(a.log_every, a.steps), init=a.init, offset_noise=a.offset_noise, snr_gamma=a.snr_gamma,
                 drive=a.drive, lr=a.lr, schedule=a.schedule, prediction=a.prediction, train_text=not a.freeze_text,
                 attention_16=a.attention_16, jitter=a.jitter, pretrain_text=a.pretrain_text,
                 blocked=a.blocked, blocked_t_low=a.blocked_t_low, blocked_target=a.blocked_target,
                 famous_fraction=a.famous_fraction,
                 up_attention=a.up_attention, max_minutes=a.max_minutes, stop_after=a.stop_after, ema=a.ema,
                 high_t_fraction=a.high_t_fraction, high_t_low=a.high_t_low)
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    cfg, a = parse(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = train(cfg, a.out, a.device)
    print(f"saved {a.out} in {summary['seconds']} s")


if __name__ == "__main__":
    main()
