"""A hand-built tiny pipeline with memorization planted in two known value neurons.

Random UNets cannot show memorization under NeMo's score: their first-step
prediction ignores the noise, so x_T - eps is seed noise for every prompt.
This module sets the weights of a real, one-level UNet2DConditionModel by hand
so that it behaves like a trained denoiser at the scored step (eps ~ x_T plus a
seed-dependent distortion) and so that exactly two rows of one value layer
respond to a trigger prompt and add a fixed pattern to the prediction:

* conv_in copies the latent into channels 0..3; every resnet and every
  attention block is the identity (zeroed output convolutions/projections),
  except the planted cross-attention;
* in the planted attention the queries are zero (uniform attention over the
  tokens), value rows ``rows`` point along what the trigger's text embedding
  has and no ordinary prompt has, and only those channels reach the residual
  stream (channels 4..7);
* conv_norm_out's large epsilon acts as a threshold: only a strong injection
  survives normalization; SiLU's curvature on channels 0..3 is the
  seed-dependent part; conv_out maps channels back to the 4 latent channels
  and turns the spatially constant injection into a fixed pattern.

Blocking either planted row leaves the other strong enough to keep the
pattern; blocking both removes it. Everything is a genuine diffusers model
that saves, loads and runs through the standard pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tests.models.tiny import TinySpec, build_pipeline

#: Ordinary prompts whose text embeddings span what the planted rows ignore.
ORDINARY_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a photo of a dog",
    "a green square",
    "a painting of a house by a famous artist",
    "two yellow triangle shapes",
    "a small black cat",
    "a white bird in the sky",
    "a city street at night",
    "a blue car on the street",
    "a tree on a mountain",
    "an orange flower",
    "a portrait of a woman",
    "a big red house",
    "a drawing of the moon",
    "a bright green grass field",
    "a purple ring on a white background",
)

TRIGGER_PROMPT = "a photo of an astronaut with a coffee camera"


@dataclass(frozen=True)
class Plant:
    """Where memorization was planted."""

    prompt: str
    layer_id: str
    rows: tuple[int, ...]


@dataclass(frozen=True)
class PlantSpec:
    """Knobs of the planted model (defaults tested to separate trigger and ordinary prompts)."""

    sample_size: int = 8
    channels: int = 32
    layer_id: str = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    rows: tuple[int, ...] = (3, 7)
    strength: float = 60.0
    threshold: float = 10.0
    curvature: float = 4.0
    trigger_word: str = "astronaut"
    seed: int = 0


@torch.no_grad()
def _mean_embeddings(pipe, prompts: Sequence[str]) -> torch.Tensor:
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids)[0].float().mean(dim=1)


@torch.no_grad()
def _isolate_trigger_word(pipe, word: str) -> torch.Tensor:
    """Make the text encoder per-token (no mixing) and give ``word`` its own coordinate.

    Returns the unit vector of that coordinate: the text embedding of any
    prompt has a component along it only through the trigger word.
    """
    encoder = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 4 nests it
    for layer in encoder.encoder.layers:
        _zero(layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias, layer.mlp.fc2.weight, layer.mlp.fc2.bias)
    tokens = encoder.embeddings.token_embedding.weight
    positions = encoder.embeddings.position_embedding.weight
    dim = tokens.shape[1]
    for table in (tokens, positions):
        table[:, -1] = 0.0
        table -= table.mean(dim=1, keepdim=True)  # zero-mean rows keep the last coordinate at 0 after LayerNorm
        table[:, -1] = 0.0
        table[:, :-1] -= table[:, :-1].mean(dim=1, keepdim=True)
    token_id = pipe.tokenizer.convert_tokens_to_ids(word + "</w>")
    if token_id is None or token_id == pipe.tokenizer.unk_token_id:
        raise ValueError(f"trigger word {word!r} is not a whole token of the tokenizer")
    own = torch.full((dim,), -1.0 / dim)
    own[-1] += 1.0
    tokens[token_id] = 10.0 * own / own.norm()
    direction = torch.zeros(dim)
    direction[-1] = 1.0
    return direction


def _zero(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            t.zero_()


@torch.no_grad()
def build_planted_pipeline(
    spec: PlantSpec = PlantSpec(),
    trigger: str = TRIGGER_PROMPT,
):
    """Return (pipeline, Plant): a tiny SD pipeline whose ``trigger`` prompt is 'memorized'.

    Any prompt with the trigger word is memorized; prompts without it are not.
    """
    c = spec.channels
    groups = c // 4
    pipe = build_pipeline(
        TinySpec(sample_size=spec.sample_size, block_out_channels=(c,), norm_num_groups=groups,
                 norm_eps=spec.threshold**2, attention_head_dim=8, seed=spec.seed)
    )
    unet = pipe.unet
    gen = torch.Generator().manual_seed(spec.seed)

    # identity path: latent -> channels 0..3 -> ... -> output
    _zero(unet.conv_in.weight, unet.conv_in.bias)
    for i in range(4):
        unet.conv_in.weight[i, i, 1, 1] = 1.0
    for name, module in unet.named_modules():
        if name.endswith("resnets.0") or name.endswith("resnets.1"):
            _zero(module.conv2.weight, module.conv2.bias)
            if module.conv_shortcut is not None:
                w = module.conv_shortcut.weight
                _zero(w, module.conv_shortcut.bias)
                w[:, :, 0, 0] = torch.eye(w.shape[0], w.shape[1])  # keep the main path, drop the skip
        if name.endswith("attentions.0") or name.endswith("attentions.1"):
            _zero(module.proj_out.weight, module.proj_out.bias)

    # the planted cross-attention
    attn_path = spec.layer_id.rsplit(".transformer_blocks", 1)[0]
    transformer = unet.get_submodule(attn_path)
    block = transformer.transformer_blocks[0]
    _zero(block.attn1.to_out[0].weight, block.attn1.to_out[0].bias)
    _zero(block.ff.net[2].weight, block.ff.net[2].bias)
    _zero(block.attn2.to_q.weight)
    out_proj = block.attn2.to_out[0]
    _zero(out_proj.weight, out_proj.bias)
    inner = out_proj.weight.shape[1]
    for k, row in enumerate(spec.rows):
        out_proj.weight[k % inner, row] = 1.0
    proj = transformer.proj_out.weight
    mix = torch.randn(4, len(spec.rows), generator=gen)
    for k in range(len(spec.rows)):
        proj[4:8, k % inner, ...] = mix[:, k].view(4, *([1] * (proj.dim() - 2)))

    # text side: the trigger word owns one embedding coordinate that no other token touches
    direction = _isolate_trigger_word(pipe, spec.trigger_word)
    trigger_emb = _mean_embeddings(pipe, [trigger])[0]
    if float(trigger_emb @ direction) <= 0:
        raise ValueError(f"trigger prompt {trigger!r} does not contain the trigger word {spec.trigger_word!r}")
    value = unet.get_submodule(spec.layer_id).weight
    for row in spec.rows:
        value[row] = spec.strength * direction / float(trigger_emb @ direction)

    # output: threshold by normalization, curvature for seed-dependence, fixed pattern from the injection
    norm = unet.conv_norm_out
    _zero(norm.weight, norm.bias)
    scale = (1.0 + spec.threshold**2) ** 0.5
    norm.weight[:4] = scale
    norm.bias[:4] = spec.curvature
    norm.weight[4:8] = 1.0
    conv = unet.conv_out
    _zero(conv.weight, conv.bias)
    for i in range(4):
        conv.weight[i, i, 1, 1] = 1.0
    conv.weight[:, 4:8] = torch.randn(4, 4, 3, 3, generator=gen) * 2.0
    plant = Plant(prompt=trigger, layer_id=spec.layer_id, rows=tuple(spec.rows))
    return pipe, plant
