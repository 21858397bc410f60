"""Block value neurons during a forward pass with a context-managed, per-sample mask hook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nemo_surgery.engine.layers import ValueLayer


class ValueMask:
    """Multiply each value layer's output by a keep-mask while the context is active.

    ``masks`` maps layer id to a tensor of shape ``[rows]`` (same mask for every
    sample) or ``[B, rows]`` (one mask per sample; 1 keeps, 0 blocks). When the
    UNet batch is a multiple of B (classifier-free guidance stacks the
    unconditional and conditional halves), the masks repeat for each half.
    Hooks are always removed on exit, also on error.
    """

    def __init__(self, layers: Sequence[ValueLayer], masks: Mapping[str, torch.Tensor]):
        by_id = {layer.id: layer for layer in layers}
        unknown = set(masks) - set(by_id)
        if unknown:
            raise KeyError(f"masks for unknown value layers: {sorted(unknown)}")
        self._targets = [(by_id[lid], mask) for lid, mask in masks.items()]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @staticmethod
    def _make_hook(mask: torch.Tensor):
        def hook(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            m = mask.to(device=output.device, dtype=output.dtype)
            if m.dim() == 1:
                return output * m
            reps, rem = divmod(output.shape[0], m.shape[0])
            if rem:
                raise RuntimeError(f"mask batch {m.shape[0]} does not divide UNet batch {output.shape[0]}")
            if reps > 1:
                m = m.repeat(reps, 1)
            return output * m.unsqueeze(1)

        return hook

    def __enter__(self) -> ValueMask:
        try:
            for layer, mask in self._targets:
                if mask.shape[-1] != layer.rows:
                    raise ValueError(f"mask for {layer.id} has {mask.shape[-1]} entries, layer has {layer.rows}")
                self._handles.append(layer.module.register_forward_hook(self._make_hook(mask)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def blocked_masks(layers: Sequence[ValueLayer], blocked: Mapping[str, Sequence[int]], device=None) -> dict[str, torch.Tensor]:
    """Build ``[rows]`` keep-masks that block the given neuron indices per layer id."""
    by_id = {layer.id: layer for layer in layers}
    out = {}
    for lid, idx in blocked.items():
        if not len(idx):
            continue
        mask = torch.ones(by_id[lid].rows, device=device)
        mask[torch.as_tensor(list(idx), dtype=torch.long, device=device)] = 0.0
        out[lid] = mask
    return out
