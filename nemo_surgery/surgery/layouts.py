"""Checkpoint layouts: detect one from header keys and map layer ids to tensor keys.

The whole mapping is the data table ``LAYOUTS``: per layout, a detector over the
key names and the key rules that turn one neuron-set layer into the tensor
key(s) to patch. Pure functions only; no file access.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from nemo_surgery.errors import InputError
from nemo_surgery.keymap import (
    LDM_EMA_PREFIX,
    LDM_UNET_PREFIX,
    SD_LAYERS_PER_BLOCK,
    diffusers_to_ldm,
    diffusers_weight_key,
    ldm_ema_weight_key,
    ldm_weight_key,
)
from nemo_surgery.neuron_set import LayerNeurons

_DIFFUSERS_UNET_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.")


def _ldm_id(layer: LayerNeurons) -> str:
    return layer.ldm_id or diffusers_to_ldm(layer.id, SD_LAYERS_PER_BLOCK)


@dataclass(frozen=True)
class KeyRule:
    """How one layer becomes one tensor key; ``only_if_prefix`` makes the rule conditional.

    A conditional rule applies when any key of the checkpoint starts with that
    prefix (e.g. EMA copies); once it applies, its key must exist.
    """

    role: str
    key_for: Callable[[LayerNeurons], str]
    only_if_prefix: str | None = None


@dataclass(frozen=True)
class Layout:
    """A named checkpoint layout: how to recognise it and which keys a layer maps to."""

    name: str
    description: str
    detect: Callable[[Collection[str]], bool]
    rules: tuple[KeyRule, ...]


#: The one table mapping layer ids to keys, per layout (first matching layout wins).
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="ldm-single-file",
        description="single-file LDM checkpoint (model.diffusion_model.*, optional model_ema.* copies)",
        detect=lambda keys: any(k.startswith(LDM_UNET_PREFIX) for k in keys),
        rules=(
            KeyRule("value", lambda layer: ldm_weight_key(_ldm_id(layer))),
            KeyRule("ema", lambda layer: ldm_ema_weight_key(_ldm_id(layer)), only_if_prefix=LDM_EMA_PREFIX),
        ),
    ),
    Layout(
        name="diffusers-unet",
        description="diffusers UNet2DConditionModel weights",
        detect=lambda keys: any(k.startswith(_DIFFUSERS_UNET_PREFIXES) for k in keys),
        rules=(KeyRule("value", lambda layer: diffusers_weight_key(layer.id)),),
    ),
)


def detect_layout(keys: Collection[str], name: str = "<checkpoint>") -> Layout:
    """Return the layout whose detector accepts these tensor keys, or raise InputError."""
    for layout in LAYOUTS:
        if layout.detect(keys):
            return layout
    raise InputError(
        f"{name}: not a Stable Diffusion UNet checkpoint (no diffusers UNet keys and no "
        f"'{LDM_UNET_PREFIX}*' keys); pass the UNet, the pipeline folder or the single-file model"
    )


@dataclass(frozen=True)
class KeyTarget:
    """One tensor key a layer maps to, with the role of that key."""

    layer_id: str
    role: str
    key: str


def targets_for(layout: Layout, layers: list[LayerNeurons], keys: Collection[str]) -> list[KeyTarget]:
    """Map each layer to its key(s) under ``layout``; conditional rules apply per ``keys``."""
    active = [r for r in layout.rules if r.only_if_prefix is None or any(k.startswith(r.only_if_prefix) for k in keys)]
    return [KeyTarget(layer.id, rule.role, rule.key_for(layer)) for layer in layers for rule in active]
