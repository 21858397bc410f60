"""Discover the UNet's cross-attention value layers and select the ones to scan."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from nemo_surgery.errors import InputError
from nemo_surgery.keymap import VALUE_SUFFIX, diffusers_to_ldm

#: Layer-set names accepted by --layers, besides an explicit list.
DEFAULT_SET = "default"
ALL_SET = "all"

_ORDER_RE = re.compile(
    r"^(?:(?P<kind>down|up)_blocks\.(?P<block>\d+)\.attentions\.(?P<attn>\d+)|mid_block\.attentions\.(?P<mattn>\d+))"
    r"\.transformer_blocks\.(?P<tb>\d+)\."
)
_GROUP_RANK = {"down": 0, "mid": 1, "up": 2}


@dataclass(frozen=True)
class ValueLayer:
    """One cross-attention value projection (``attn2.to_v``) of the UNet."""

    id: str
    ldm_id: str
    group: str
    rows: int
    cols: int
    module: torch.nn.Module = field(compare=False, repr=False, hash=False)


def _order_key(layer_id: str) -> tuple[int, int, int, int]:
    m = _ORDER_RE.match(layer_id)
    if m is None:
        return (3, 0, 0, 0)
    if m.group("kind") is None:
        return (1, 0, int(m.group("mattn")), int(m.group("tb")))
    return (_GROUP_RANK[m.group("kind")], int(m.group("block")), int(m.group("attn")), int(m.group("tb")))


def discover_value_layers(unet: torch.nn.Module) -> list[ValueLayer]:
    """Return every cross-attention value layer of a UNet, in forward order (down, mid, up)."""
    layers_per_block = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if isinstance(layers_per_block, (list, tuple)):
        layers_per_block = layers_per_block[0]
    found = []
    for name, module in unet.named_modules():
        if not name.endswith(VALUE_SUFFIX) or not isinstance(module, torch.nn.Linear):
            continue
        group = "mid" if name.startswith("mid_block") else name.split("_", 1)[0]
        found.append(
            ValueLayer(
                id=name,
                ldm_id=diffusers_to_ldm(name, layers_per_block) if _ORDER_RE.match(name) else name,
                group=group,
                rows=module.out_features,
                cols=module.in_features,
                module=module,
            )
        )
    found.sort(key=lambda layer: _order_key(layer.id))
    return found


def select_layers(layers: list[ValueLayer], spec: str = DEFAULT_SET) -> list[ValueLayer]:
    """Pick layers by name: ``default`` (down + mid blocks, as NeMo), ``all``, or a comma list.

    A list item is a full layer id or a prefix such as ``mid_block`` or
    ``down_blocks.1.attentions.0`` that selects every value layer below it.
    """
    spec = spec.strip()
    if spec == DEFAULT_SET:
        chosen = [layer for layer in layers if layer.group in ("down", "mid")]
    elif spec == ALL_SET:
        chosen = list(layers)
    else:
        wanted = [item.strip() for item in spec.split(",") if item.strip()]
        chosen_ids: set[str] = set()
        for item in wanted:
            hits = [layer.id for layer in layers if layer.id == item or layer.id.startswith(item.rstrip(".") + ".")]
            if not hits:
                raise InputError(
                    f"--layers: unknown value layer {item!r}; use 'default', 'all' or ids such as {layers[0].id}"
                )
            chosen_ids.update(hits)
        chosen = [layer for layer in layers if layer.id in chosen_ids]
    if not chosen:
        raise InputError(f"--layers {spec!r} selects no cross-attention value layer in this model")
    return chosen
