"""Layer ids and the map between diffusers and original (LDM) key names.

A layer id is the diffusers module path of a cross-attention value projection,
e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v``. The LDM
(CompVis / single-file) name of the same module is derived by the rule in
``shared/docs/checkpoint-layouts.md``; it depends on ``layers_per_block``
(2 for SD 1.x, 2.x and XL).
"""

from __future__ import annotations

import re

VALUE_SUFFIX = "attn2.to_v"

#: ``layers_per_block`` of every UNet that exists as an LDM single file (SD 1.x, 2.x, XL). Callers
#: that map without a loaded UNet config pass it explicitly, so the assumption is visible there.
SD_LAYERS_PER_BLOCK = 2

#: Prefixes of single-file checkpoints: the UNet and its flattened EMA copy.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema.diffusion_model"

_DIFFUSERS_RE = re.compile(
    r"^(?:(?P<kind>down|up)_blocks\.(?P<block>\d+)\.attentions\.(?P<attn>\d+)|mid_block\.attentions\.0)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn2\.to_v$"
)
_LDM_RE = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<idx>\d+)\.1|middle_block\.1)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn2\.to_v$"
)


def is_value_layer_id(layer_id: str) -> bool:
    """Return True when layer_id names a diffusers cross-attention value projection."""
    return _DIFFUSERS_RE.match(layer_id) is not None


def diffusers_to_ldm(layer_id: str, layers_per_block: int) -> str:
    """Map a diffusers value-layer id to its LDM module path."""
    m = _DIFFUSERS_RE.match(layer_id)
    if m is None:
        raise ValueError(f"not a cross-attention value layer id: {layer_id!r}")
    tb = m.group("tb")
    if m.group("kind") is None:
        return f"middle_block.1.transformer_blocks.{tb}.attn2.to_v"
    block, attn = int(m.group("block")), int(m.group("attn"))
    if m.group("kind") == "down":
        idx = 1 + block * (layers_per_block + 1) + attn
        return f"input_blocks.{idx}.1.transformer_blocks.{tb}.attn2.to_v"
    idx = block * (layers_per_block + 1) + attn
    return f"output_blocks.{idx}.1.transformer_blocks.{tb}.attn2.to_v"


def ldm_to_diffusers(ldm_id: str, layers_per_block: int) -> str:
    """Map an LDM value-layer module path back to its diffusers id."""
    m = _LDM_RE.match(ldm_id)
    if m is None:
        raise ValueError(f"not an LDM cross-attention value layer: {ldm_id!r}")
    tb = m.group("tb")
    if m.group("kind") is None:
        return f"mid_block.attentions.0.transformer_blocks.{tb}.attn2.to_v"
    idx = int(m.group("idx"))
    if m.group("kind") == "input":
        block, attn = divmod(idx - 1, layers_per_block + 1)
        return f"down_blocks.{block}.attentions.{attn}.transformer_blocks.{tb}.attn2.to_v"
    block, attn = divmod(idx, layers_per_block + 1)
    return f"up_blocks.{block}.attentions.{attn}.transformer_blocks.{tb}.attn2.to_v"


def diffusers_weight_key(layer_id: str) -> str:
    """Key of the value weight in a diffusers UNet safetensors file."""
    return f"{layer_id}.weight"


def ldm_weight_key(ldm_id: str) -> str:
    """Key of the value weight in a single-file (LDM) checkpoint."""
    return f"{LDM_UNET_PREFIX}{ldm_id}.weight"


def ldm_ema_weight_key(ldm_id: str) -> str:
    """Key of the flattened EMA copy of the value weight in a single-file checkpoint."""
    return LDM_EMA_PREFIX + f"{ldm_id}.weight".replace(".", "")
