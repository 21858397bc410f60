"""Measure memorization of a demo pipeline and whether zeroing value neurons removes it.

Independent of the scan engine: full DDIM samples over 10 seeds, SSIM of every sample
to its training image, and the effect of zeroing the value rows (``attn2.to_v``
output channels) with the highest z-scores (z = |a_j - mean_j| / std_j, a_j = mean
over the 77 tokens of |to_v(text_emb)_j|, mean/std over hold-out captions).

Run: ``python -m tools.demo_model.evaluate --model DIR [--out report.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tools.demo_model import data


@dataclass(frozen=True)
class SampleSettings:
    """How full samples are drawn here: 10 seeds (0-9), 50 DDIM steps, guidance 3 (verify has its own options and seeds)."""

    steps: int = 50
    guidance: float = 3.0
    seeds: tuple[int, ...] = tuple(range(10))


@dataclass
class CaptionResult:
    """Memorization measurements of one memorized caption."""

    caption: str
    ssim_before: list[float]
    first_step_score: float
    top_z: float
    pruned: dict[str, float] = field(default_factory=dict)  # k -> max SSIM over seeds after zeroing top-k


def load_pipeline(folder: str | Path):
    """Load a pipeline folder on CPU in float32."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def value_layers(unet, which: str = "all") -> dict[str, torch.nn.Linear]:
    """Return attn2.to_v modules by id; which='default' keeps down and mid blocks only (the engine's sets)."""
    from nemo_surgery.engine.layers import discover_value_layers, select_layers

    return {layer.id: layer.module for layer in select_layers(discover_value_layers(unet), which)}


@contextlib.contextmanager
def zeroed(unet, neurons: dict[str, list[int]]):
    """Context manager: zero the outputs of the given value rows (the engine's ValueMask hook)."""
    from nemo_surgery.engine.hooks import ValueMask, blocked_masks
    from nemo_surgery.engine.layers import discover_value_layers

    layers = discover_value_layers(unet)
    with ValueMask(layers, blocked_masks(layers, {name: rows for name, rows in neurons.items() if rows})):
        yield


@torch.no_grad()
def text_embeddings(pipe, captions: list[str]) -> torch.Tensor:
    """Encode captions exactly as the pipeline does (padded to 77, no attention mask)."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def activations(pipe, captions: list[str], which: str = "all") -> dict[str, np.ndarray]:
    """Return per layer an array (n_captions, width) of a_j = mean_tokens |to_v(emb)_j|."""
    emb = text_embeddings(pipe, captions)
    return {n: m(emb).abs().mean(dim=1).numpy() for n, m in value_layers(pipe.unet, which).items()}


def zscores(act: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """z = |a - mean| / std (unbiased std over the hold-out rows of `ref`)."""
    return {n: np.abs(a - ref[n].mean(0)) / (ref[n].std(0, ddof=1) + 1e-8) for n, a in act.items()}


def top_neurons(z: dict[str, np.ndarray], k: int) -> dict[str, list[int]]:
    """Return the k neurons with the highest z over all layers, grouped by layer."""
    flat = [(float(v), n, j) for n, arr in z.items() for j, v in enumerate(arr)]
    flat.sort(reverse=True)
    out: dict[str, list[int]] = {}
    for _, n, j in flat[:k]:
        out.setdefault(n, []).append(j)
    return out


@torch.no_grad()
def sample(pipe, caption: str, s: SampleSettings) -> np.ndarray:
    """Draw full DDIM samples, one per seed; returns (n, H, W, 3) in [0, 1]."""
    gens = [torch.Generator().manual_seed(seed) for seed in s.seeds]
    out = pipe(caption, num_inference_steps=s.steps, guidance_scale=s.guidance, generator=gens,
               num_images_per_prompt=len(s.seeds), output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, 3) images in [0, 1] (7x7 window, channels averaged)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


@torch.no_grad()
def first_step_score(pipe, caption: str, n: int = 10, seed: int = 1) -> float:
    """Cheap stand-in for NeMo's detection score: mean over seeds of the max pairwise SSIM
    of min-max-scaled (eps(x_T, t_2) - x_T) at DDIM-50's second timestep, guidance 0."""
    unet = pipe.unet
    gen = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=gen) for _ in range(n)])
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[1]
    emb = text_embeddings(pipe, [caption]).expand(n, -1, -1)
    d = unet(x, t, encoder_hidden_states=emb).sample - x
    lo = d.amin(dim=(2, 3), keepdim=True)
    hi = d.amax(dim=(2, 3), keepdim=True)
    d = ((d - lo) / (hi - lo + 1e-8)).permute(0, 2, 3, 1).numpy()
    best = np.zeros(n)
    for i in range(n):
        for j in range(i + 1, n):
            v = ssim(d[i], d[j])
            best[i] = max(best[i], v)
            best[j] = max(best[j], v)
    return float(best.mean())


def evaluate(model: str | Path, ks: tuple[int, ...] = (1, 2, 4, 8, 13, 26, 52), which: str = "all",
             settings: SampleSettings = SampleSettings(), holdout_n: int = 12,
             extra_sets: dict[str, dict[str, list[int]]] | None = None) -> dict:
    """Run all measurements on one model folder; returns a JSON-able report."""
    pipe = load_pipeline(model)
    train_imgs = data.memorized_images(pipe.unet.config.sample_size)
    holdout = data.holdout_captions()
    ref = activations(pipe, holdout, which)
    total = sum(a.shape[1] for a in ref.values())
    hold_scores = [first_step_score(pipe, c) for c in holdout]
    tau = float(np.mean(hold_scores) + np.std(hold_scores, ddof=1))
    results, union = [], {}
    for item, img in zip(data.MEMORIZED, train_imgs):
        before = sample(pipe, item.caption, settings)
        z = zscores(activations(pipe, [item.caption], which), ref)
        z1 = {n: v[0] for n, v in z.items()}
        res = CaptionResult(item.caption, [round(ssim(s, img), 3) for s in before],
                            round(first_step_score(pipe, item.caption), 3),
                            round(float(max(v.max() for v in z1.values())), 2))
        for k in ks:
            with zeroed(pipe.unet, top_neurons(z1, k)):
                after = sample(pipe, item.caption, settings)
            res.pruned[str(k)] = round(max(ssim(s, img) for s in after), 3)
        for name, neurons in (extra_sets or {}).items():
            with zeroed(pipe.unet, neurons):
                after = sample(pipe, item.caption, settings)
            res.pruned[name] = round(max(ssim(s, img) for s in after), 3)
        results.append(res)
        print(json.dumps(asdict(res)), flush=True)
        for n, rows in top_neurons(z1, ks[min(3, len(ks) - 1)]).items():
            union.setdefault(n, set()).update(rows)
    drift = {}
    sets = {f"union_top{ks[min(3, len(ks) - 1)]}": {n: sorted(r) for n, r in union.items()}}
    sets.update(extra_sets or {})
    for name, neurons in sets.items():
        vals = []
        for c in holdout[:holdout_n]:
            a = sample(pipe, c, settings)
            with zeroed(pipe.unet, neurons):
                b = sample(pipe, c, settings)
            vals.append(float(np.mean([ssim(x, y) for x, y in zip(a, b)])))
        drift[name] = {"neurons": sum(len(r) for r in neurons.values()), "mean_ssim": round(float(np.mean(vals)), 3),
                       "min_ssim": round(float(np.min(vals)), 3)}
        print(name, drift[name], flush=True)
    return {
        "model": str(model), "value_neurons": total, "layers": which, "settings": asdict(settings),
        "tau_first_step": round(tau, 3), "holdout_first_step": [round(v, 3) for v in hold_scores],
        "memorized": [asdict(r) for r in results], "holdout_drift": drift,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--guidance", type=float, default=SampleSettings.guidance)
    p.add_argument("--layers", default="all", choices=("all", "default"))
    p.add_argument("--neuron-set", type=Path, default=None, help="JSON {layer: [rows]} to test as well")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    extra = None
    if a.neuron_set:
        extra = {a.neuron_set.stem: json.loads(a.neuron_set.read_text())}
    rep = evaluate(a.model, which=a.layers, settings=SampleSettings(guidance=a.guidance), extra_sets=extra)
    text = json.dumps(rep, indent=2)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
