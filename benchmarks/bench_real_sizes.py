"""Detection at real model sizes: SD 1.5, SD 2.1-v and SDXL UNets built from their published configs.

No download: the UNet configurations below are the published ones (as data), the
weights random. Text encoders have the real width and depth (CLIP ViT-L, OpenCLIP
ViT-H, OpenCLIP ViT-bigG) with the tests' small vocabulary, since only the shape of
the conditioning matters here. For each model, one subprocess loads nothing from
disk, runs NeMo's detection (first-step noise differences, pairwise MS-SSIM) for
one prompt with 2 seeds (``--seeds``, all in one UNet batch), and reports parameters, peak
resident memory (``ru_maxrss`` of that process), seconds per UNet call and samples per second.

    python benchmarks/bench_real_sizes.py                 # all three, fp32, CPU
    python benchmarks/bench_real_sizes.py --models sd15 --device cuda --dtype fp16 --seeds 10

SDXL's UNet has 2.6 B parameters (10 GB in fp32): run it once, not in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SD_COMMON = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "center_input_sample": False,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}

#: UNet configurations as published with the models (diffusers' unet/config.json).
UNET_CONFIGS: dict[str, dict] = {
    "sd15": {
        **_SD_COMMON, "sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8,
    },
    "sd21v": {
        **_SD_COMMON, "sample_size": 96, "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
    },
    "sdxl": {
        **_SD_COMMON, "sample_size": 128, "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}

#: Text encoders at the published width/depth: (hidden, layers, heads, intermediate, activation, projection).
TEXT_ENCODERS: dict[str, list[tuple[int, int, int, int, str, int]]] = {
    "sd15": [(768, 12, 12, 3072, "quick_gelu", 768)],
    "sd21v": [(1024, 23, 16, 4096, "gelu", 1024)],
    "sdxl": [(768, 12, 12, 3072, "quick_gelu", 768), (1280, 32, 20, 5120, "gelu", 1280)],
}

#: Scheduler settings as published (SD 2.1 768 predicts v).
PREDICTION = {"sd15": "epsilon", "sd21v": "v_prediction", "sdxl": "epsilon"}


def _text_encoder(spec: tuple[int, int, int, int, str, int], vocab: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, heads, inter, act, proj = spec
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, hidden_act=act, projection_dim=proj, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def build_pipeline(name: str, dtype, device=None):
    """A real-size pipeline without VAE (scanning does not decode): random weights, published shapes.

    With a `device`, the weights are drawn there (a GPU draws SDXL's 2.6 B in a second, a CPU in a minute).
    """
    import torch

    with torch.device(device or "cpu"):
        return _build_pipeline(name, dtype)


def _build_pipeline(name: str, dtype):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from tests.models.tiny import build_scheduler, build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS[name]).to(dtype).eval()
    scheduler = DDIMScheduler.from_config(build_scheduler().config, prediction_type=PREDICTION[name])
    tokenizer = build_tokenizer()
    encoders = TEXT_ENCODERS[name]
    if name == "sdxl":
        return StableDiffusionXLPipeline(
            vae=None, text_encoder=_text_encoder(encoders[0], len(tokenizer), False).to(dtype),
            text_encoder_2=_text_encoder(encoders[1], len(tokenizer), True).to(dtype),
            tokenizer=tokenizer, tokenizer_2=build_tokenizer(), unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=None, text_encoder=_text_encoder(encoders[0], len(tokenizer), False).to(dtype), tokenizer=tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def run_one(name: str, device: str, dtype_name: str, seeds: int, calls: int) -> dict:
    """Build one model in this process, run detection ``calls`` times, return the measurements."""
    import torch

    from nemo_surgery.engine.model import LoadedModel, resolve_device, resolve_dtype
    from nemo_surgery.engine.score import Scorer, ScoreSettings
    from nemo_surgery.engine.ssim import SSIMConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev, dtype = resolve_device(device), resolve_dtype(dtype_name)
    t0 = time.perf_counter()
    pipe = build_pipeline(name, dtype, dev).to(dev)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(pipe=pipe, source=f"random {name}", device=dev, dtype=dtype)
    build_s = time.perf_counter() - t0
    _, h, w = model.latent_shape
    settings = ScoreSettings(seeds=seeds, ssim=SSIMConfig.fit(h, w))
    scorer = Scorer(model, model.layers, settings, batch_size=seeds)
    cond = model.encode(["a photo of an astronaut with a coffee camera"])
    seconds = []
    for _ in range(calls):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        calls_before = scorer.counter.calls
        deltas = scorer.noise_differences(cond)
        det = scorer.detect(deltas[0], tau=0.5)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds.append((time.perf_counter() - t) / (scorer.counter.calls - calls_before))
    return {
        "model": name,
        "device": str(dev),
        "dtype": dtype_name,
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "value_layers": len(model.layers),
        "value_neurons": sum(layer.rows for layer in model.layers),
        "latent": [model.latent_shape[0], h, w],
        "prediction_type": model.prediction_type,
        "seeds": seeds,
        "build_s": round(build_s, 1),
        "s_per_unet_call": [round(s, 4) for s in seconds],
        "samples_per_s": round(seeds / min(seconds), 1),
        "mean_pairwise": round(det.mean_pairwise, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
    }


def main() -> None:
    """Run each model in its own subprocess (separate peak memory) and print one JSON line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sd21v,sdxl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2, help="detection repeats (the first includes warm-up)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.dtype, args.seeds, args.calls)), flush=True)
        return
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype,
               "--seeds", str(args.seeds), "--calls", str(args.calls)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not line:
            print(json.dumps({"model": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
        else:
            print(line, flush=True)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
