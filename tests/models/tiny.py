"""Build tiny, real Stable Diffusion pipelines in code (no model hub needed).

The tokenizer is a genuine CLIP byte-level BPE tokenizer whose vocabulary is a
small word list; the UNet, text encoder and VAE are real diffusers/transformers
models built from configs. Tests, benchmarks and the demo model all use this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Words the tiny tokenizer knows as whole tokens; anything else falls back to bytes.
DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting",
    "drawing", "image", "red", "green", "blue", "yellow", "white", "black", "orange",
    "purple", "circle", "square", "triangle", "cross", "stripe", "stripes", "dot", "dots",
    "ring", "small", "large", "big", "tiny", "bright", "dark", "background", "left",
    "right", "top", "bottom", "center", "cat", "dog", "house", "tree", "car", "bird",
    "flower", "portrait", "astronaut", "coffee", "camera", "man", "woman", "moon", "rocket",
    "brick", "wall", "grass", "sky", "sea", "mountain", "city", "street", "night", "day",
    "by", "artist", "famous", "style", "poster", "logo", "shape", "shapes", "two", "three",
)


def _byte_alphabet() -> list[str]:
    """Return the 256 printable stand-ins byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS, max_length: int = 77):
    """Build a CLIPTokenizer whose BPE merges spell every word of ``words`` as one token.

    The merges are learned with the ``tokenizers`` BPE trainer on the word list
    itself; the byte alphabet keeps any other text encodable.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=_byte_alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([w.lower() for w in words], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    for ch in _byte_alphabet():  # every byte also as a word end
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD-style pipeline (pixel space, VAE scale factor 1 by default)."""

    sample_size: int = 8
    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    words: tuple[str, ...] = field(default=DEFAULT_WORDS)
    seed: int = 0


def build_unet(spec: TinySpec):
    """Build a tiny UNet2DConditionModel with cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    n = len(spec.block_out_channels)
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=min(spec.norm_num_groups, min(spec.block_out_channels)),
        norm_eps=spec.norm_eps,
    )


def build_text_encoder(spec: TinySpec, vocab_size: int):
    """Build a tiny CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=spec.text_hidden,
    )
    return CLIPTextModel(cfg)


def build_vae(spec: TinySpec):
    """Build a one-level AutoencoderKL (scale factor 1); unused by scanning."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,),
        layers_per_block=1,
        latent_channels=spec.in_channels,
        norm_num_groups=8,
        sample_size=spec.sample_size,
    )


def build_scheduler():
    """Return SD's DDIM scheduler configuration (scaled_linear betas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(spec: TinySpec = TinySpec()):
    """Build a complete tiny StableDiffusionPipeline with seeded random weights."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(spec.words)
    text_encoder = build_text_encoder(spec, vocab_size=len(tokenizer))
    unet = build_unet(spec)
    vae = build_vae(spec)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, folder: str | Path) -> Path:
    """Save a pipeline as a standard diffusers folder (safetensors weights)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_xl_pipeline(seed: int = 0):
    """Build a tiny StableDiffusionXLPipeline (two text encoders, added time conditioning)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    spec1, spec2 = TinySpec(text_hidden=16), TinySpec(text_hidden=32)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    text_encoder = build_text_encoder(spec1, len(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(build_text_encoder(spec2, len(tokenizer_2)).config)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=spec1.text_hidden + spec2.text_hidden,
        attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=spec2.text_hidden + 6 * time_dim,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=build_vae(TinySpec()),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=build_scheduler(),
    )
