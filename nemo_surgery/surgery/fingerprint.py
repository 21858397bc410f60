"""The weights fingerprint: one SHA-256 computed from stored safetensors bytes, alike for every layout.

Definition (version 1, ``wfp1:`` prefix). Take the UNet tensors that decide
where a neuron set applies, as stored (no decoding, no dtype conversion):

- every cross-attention value weight (key ending ``attn2.to_v.weight``;
  diffusers keys under ``down_blocks.``/``mid_block.``/``up_blocks.``, LDM keys
  under ``model.diffusion_model.``; EMA copies excluded),
- ``conv_in.weight`` (LDM ``model.diffusion_model.input_blocks.0.0.weight``) and
  ``conv_out.weight`` (LDM ``model.diffusion_model.out.2.weight``).

For each, the line ``<role>|<dtype>|<shape>|<sha256 of its data bytes>`` with role
``value``, ``conv_in`` or ``conv_out``, dtype as safetensors names it (``F32``)
and shape as ``320x768``. The fingerprint is ``wfp1:`` + SHA-256 of the sorted
lines joined by newlines. Sorting makes it independent of key names, so a
diffusers UNet folder, a pipeline folder and a single-file (LDM) checkpoint of
the same weights agree, without a key mapping and without torch. It identifies
weights *as stored*: an fp16 copy of an fp32 model is another model here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from nemo_surgery.errors import InputError
from nemo_surgery.keymap import LDM_UNET_PREFIX
from nemo_surgery.surgery.discover import Source, WeightGroup
from nemo_surgery.surgery.safetensors_file import Header, TensorInfo, read_header

PREFIX = "wfp1:"
_VALUE_SUFFIX = "attn2.to_v.weight"
_DIFFUSERS_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
_CONV = {
    "conv_in.weight": "conv_in",
    "conv_out.weight": "conv_out",
    LDM_UNET_PREFIX + "input_blocks.0.0.weight": "conv_in",
    LDM_UNET_PREFIX + "out.2.weight": "conv_out",
}
_BLOCK = 8 << 20


def role_of(key: str) -> str | None:
    """``value``, ``conv_in`` or ``conv_out`` for a key the fingerprint covers, else None."""
    if key in _CONV:
        return _CONV[key]
    if key.endswith(_VALUE_SUFFIX) and key.startswith((*_DIFFUSERS_BLOCKS, LDM_UNET_PREFIX)):
        return "value"
    return None


def _tensor_sha(fd: int, header: Header, t: TensorInfo) -> str:
    h = hashlib.sha256()
    pos, end = header.data_start + t.begin, header.data_start + t.end
    while pos < end:
        block = os.pread(fd, min(_BLOCK, end - pos), pos)
        if not block:
            raise InputError(f"file ended inside tensor {t.name}")
        h.update(block)
        pos += len(block)
    return h.hexdigest()


def fingerprint_lines(files: Mapping[Path, Header]) -> list[str]:
    """The sorted ``role|dtype|shape|sha256`` lines of the covered tensors of one weight group."""
    lines = []
    for path, header in files.items():
        covered = [(role_of(k), t) for k, t in header.tensors.items()]
        covered = [(r, t) for r, t in covered if r is not None]
        if not covered:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            for role, t in covered:
                shape = "x".join(str(d) for d in t.shape)
                lines.append(f"{role}|{t.dtype}|{shape}|{_tensor_sha(fd, header, t)}")
        finally:
            os.close(fd)
    return sorted(lines)


def group_fingerprint(group: WeightGroup, headers: Mapping[Path, Header] | None = None) -> str | None:
    """The fingerprint of one weight group (a file or a sharded set); None when it holds no value weight."""
    files = {p: (headers or {}).get(p) or read_header(p) for p in group.files}
    lines = fingerprint_lines(files)
    if not any(line.startswith("value|") for line in lines):
        return None
    return PREFIX + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def source_fingerprints(source: Source) -> list[str]:
    """Fingerprints of every weight group of a checkpoint (variants of a folder differ by dtype)."""
    return [fp for g in source.groups if (fp := group_fingerprint(g)) is not None]


def weights_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of a checkpoint path: its default weight group (a folder's non-variant weights).

    Used by ``scan`` to record in the neuron set which weights it ran on.
    """
    from nemo_surgery.surgery.discover import discover

    source = discover(path)
    groups = [g for g in source.groups if not g.is_ema]  # a pipeline's unet_ema/ is not the UNet it loads
    default = [g for g in groups if g.label.startswith("diffusion_pytorch_model.safetensors")]
    return group_fingerprint((default or groups)[0])
