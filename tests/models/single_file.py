"""Write a tiny SD pipeline as a single-file (LDM / CompVis) safetensors checkpoint, and its config folder.

The key names follow the original LDM layout that A1111/ComfyUI files use
(``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*``), derived by rule from the diffusers names,
so diffusers' own ``from_single_file`` converts them back. The rules are the
layout's (see shared/docs/checkpoint-layouts.md); they cover the block types the
tiny SD pipeline uses.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_has_attn: list[bool]) -> str:
    """LDM name (under model.diffusion_model.) of a diffusers UNet key."""
    lpb = layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for d, ldm in fixed.items():
        if key.startswith(d + "."):
            return ldm + key[len(d):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (lpb + 1) + j
        return f"input_blocks.{idx}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (lpb + 1) + j
        return f"output_blocks.{idx}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, levels: int) -> str:
    """LDM name (under first_stage_model.) of a diffusers AutoencoderKL key."""
    if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key):
        part, kind, i, sub, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
        level = i if kind == "down" else levels - 1 - i
        if sub == "resnets":
            return f"{part}.{kind}.{level}.block.{j}.{_resnet(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{part}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key  # encoder.conv_in, encoder.conv_out, decoder.conv_in, decoder.conv_out, quant_conv, post_quant_conv


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder as one LDM-named state dict."""
    ucfg = pipe.unet.config
    up_has_attn = ["CrossAttn" in t for t in ucfg.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, ucfg.layers_per_block, up_has_attn)] = value
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        ldm = vae_key(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out["first_stage_model." + ldm] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # SD 1.x files name the CLIP text model as transformers 4.x did: text_model.<...>
        out["cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_single_file(pipe, path: str | Path) -> Path:
    """Save the pipeline's weights as one LDM-layout .safetensors file."""
    path = Path(path)
    save_file(ldm_state_dict(pipe), str(path))
    return path


def write_config_folder(pipeline_folder: str | Path, config: str | Path) -> Path:
    """Copy a saved diffusers pipeline folder without its weights: what ``--config DIR`` takes."""
    config = Path(config)
    shutil.copytree(pipeline_folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return config
