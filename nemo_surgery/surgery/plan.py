"""Build the patch plan: which files, keys, rows and byte ranges a neuron set zeroes.

Reads only headers (validated and cross-checked with ``safetensors.safe_open``);
every problem (missing key, wrong shape, index out of range, non-float dtype)
is raised here, before anything is written. A pipeline's ``unet_ema/`` gets the
same rows as ``unet/`` (role ``ema``), and the plan notes what that means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError
from nemo_surgery.neuron_set import NeuronSet
from nemo_surgery.surgery.discover import Source, WeightGroup
from nemo_surgery.surgery.layouts import detect_layout, targets_for
from nemo_surgery.surgery.safetensors_file import ZEROABLE_DTYPES, Header, cross_check, merge_ranges, read_header, row_ranges


@dataclass
class TensorPatch:
    """Rows to zero in one tensor and their buffer-relative byte ranges."""

    key: str
    layer_id: str
    role: str
    dtype: str
    shape: tuple[int, ...]
    rows: list[int]
    ranges: list[tuple[int, int]]

    @property
    def bytes_zeroed(self) -> int:
        """Number of bytes this patch zeroes."""
        return sum(length for _, length in self.ranges)

    def to_json(self) -> dict[str, Any]:
        """Summary for reports and --json."""
        return {
            "key": self.key,
            "layer": self.layer_id,
            "role": self.role,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "rows_zeroed": len(self.rows),
            "rows": list(self.rows),
            "byte_ranges": len(self.ranges),
            "bytes_zeroed": self.bytes_zeroed,
        }


@dataclass
class FilePlan:
    """One safetensors file to patch: its header and its tensor patches."""

    src: Path
    rel: Path
    layout: str
    header: Header
    tensors: list[TensorPatch] = field(default_factory=list)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """All buffer-relative ranges of the file, sorted and merged."""
        return merge_ranges([r for t in self.tensors for r in t.ranges])

    @property
    def bytes_zeroed(self) -> int:
        """Bytes zeroed in this file."""
        return sum(t.bytes_zeroed for t in self.tensors)


@dataclass
class PatchPlan:
    """Everything apply will do, computed from headers only."""

    source: Source
    layout: str
    files: list[FilePlan]
    notes: list[str] = field(default_factory=list)  # for the report (e.g. what patching unet_ema/ means)


def _rel(source: Source, path: Path) -> Path:
    return Path(path.name) if not source.is_folder else path.relative_to(source.path)


def _key_locations(group: WeightGroup, headers: dict[Path, Header]) -> dict[str, Path]:
    if group.weight_map is None:
        only = group.files[0]
        return {k: only for k in headers[only].tensors}
    folder = group.files[0].parent
    where = {k: folder / name for k, name in group.weight_map.items()}
    for key, path in where.items():
        if key not in headers[path].tensors:
            raise InputError(f"{group.index}: weight_map puts {key} in {path.name}, which does not hold it")
    return where


def build_plan(source: Source, neuron_set: NeuronSet) -> PatchPlan:
    """Resolve every layer of the set to keys, rows and byte ranges in every weight group."""
    layers = neuron_set.nonempty()
    plans: dict[Path, FilePlan] = {}
    layout_names: set[str] = set()
    for group in source.groups:
        headers: dict[Path, Header] = {}
        for path in group.files:
            header = read_header(path)
            cross_check(path, header)
            headers[path] = header
        where = _key_locations(group, headers)
        layout = detect_layout(where.keys(), group.label)
        layout_names.add(layout.name)
        by_id = {layer.id: layer for layer in layers}
        for target in targets_for(layout, layers, where.keys()):
            layer = by_id[target.layer_id]
            path = where.get(target.key)
            if path is None:
                raise InputError(
                    f"{group.label}: missing key {target.key} for layer {layer.id}; "
                    f"the neuron set does not match this checkpoint ({layout.name})"
                )
            tensor = headers[path].tensors[target.key]
            if tensor.shape != (layer.rows, layer.cols):
                raise InputError(
                    f"neuron set is for another architecture: {target.key} has shape {list(tensor.shape)} "
                    f"but the set says {[layer.rows, layer.cols]}"
                )
            if layer.neurons and (min(layer.neurons) < 0 or max(layer.neurons) >= tensor.shape[0]):
                bad = max(layer.neurons) if max(layer.neurons) >= tensor.shape[0] else min(layer.neurons)
                raise InputError(f"{target.key}: neuron index {bad} out of range 0..{tensor.shape[0] - 1}")
            if tensor.dtype not in ZEROABLE_DTYPES:
                raise InputError(f"{target.key}: dtype {tensor.dtype} is not a float type; cannot zero rows")
            fp = plans.get(path)
            if fp is None:
                fp = plans[path] = FilePlan(src=path, rel=_rel(source, path), layout=layout.name, header=headers[path])
            fp.tensors.append(
                TensorPatch(
                    key=target.key,
                    layer_id=layer.id,
                    role="ema" if group.is_ema else target.role,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    rows=list(layer.neurons),
                    ranges=row_ranges(tensor, layer.neurons),
                )
            )
    if len(layout_names) > 1:
        raise InputError(f"{source.path}: weight files of mixed layouts ({', '.join(sorted(layout_names))})")
    layout = next(iter(layout_names))
    kind = {"file": layout, "unet-folder": "diffusers-unet-folder", "pipeline-folder": "diffusers-pipeline"}
    return PatchPlan(source=source, layout=kind[source.kind], files=sorted(plans.values(), key=lambda f: str(f.rel)),
                     notes=ema_notes(source, getattr(neuron_set, "weights_fingerprint", None)))


def ema_notes(source: Source, wanted: str | None) -> list[str]:
    """What patching a pipeline's ``unet_ema/`` means, for the report: same rows, whose fingerprint, not verified.

    Reads the fingerprinted tensors of every weight group (value, conv_in and
    conv_out weights: tens of MB at SD 1.5 size); nothing when there is no
    ``unet_ema/``.
    """
    from nemo_surgery.surgery.fingerprint import group_fingerprint

    ema = [g for g in source.groups if g.is_ema]
    if not ema:
        return []
    prints = [(g, group_fingerprint(g)) for g in source.groups]
    matched = {g.part for g, fp in prints if wanted and fp == wanted}
    ema_prints = ", ".join(sorted({fp[5:17] if fp else "none" for g, fp in prints if g.is_ema}))
    if not wanted:
        whose = "the set records no weights fingerprint, so the UNet it was scanned on is not recorded"
    elif matched == {"unet"}:
        whose = (f"its weights fingerprint ({ema_prints}) is not the one the set was scanned on ({wanted[5:17]}, "
                 "unet/'s): the rows were located on unet/ and are taken to be the same neurons of the EMA "
                 "average of that training run")
    elif "unet_ema" in matched:
        whose = (f"the set was scanned on these EMA weights (fingerprint {wanted[5:17]}); unet/ got the same rows "
                 "without being the scanned UNet")
    else:
        whose = f"neither unet/ nor unet_ema/ has the set's weights fingerprint ({wanted[5:17]})"
    files = sum(len(g.files) for g in ema)
    return [f"unet_ema/ (EMA UNet, {files} weight file(s)) patched with the same rows as unet/; {whose}; "
            "`verify` loads and samples unet/ only, so the EMA UNet's mitigation is not measured"]
