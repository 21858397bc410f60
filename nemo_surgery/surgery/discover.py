"""Find the safetensors weight files of a checkpoint path; refuse pickle weights.

A checkpoint is a single file, a diffusers UNet folder or a diffusers pipeline
folder (whose ``unet/`` is patched, and its ``unet_ema/`` where a training repo
ships one: the EMA UNet gets the same rows, see docs/apply.md). Inside a weight folder every variant
(``diffusion_pytorch_model[.fp16].safetensors``) and every sharded set
(``*.safetensors.index.json`` + shards) is one ``WeightGroup``: one full copy of
the UNet weights, all of which get patched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from nemo_surgery.errors import InputError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"
#: The EMA UNet folder some training repos ship beside ``unet/`` in a pipeline folder.
EMA_FOLDER = "unet_ema"


def pickle_refusal(path: Path) -> InputError:
    """The one-line error for a pickle checkpoint (never unpickled)."""
    return InputError(
        f"{path}: pickle checkpoints are refused (never unpickled); convert to safetensors first, "
        "e.g. diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors, "
        "or `pipe.save_pretrained(dir, safe_serialization=True)`"
    )


@dataclass
class WeightGroup:
    """One full copy of UNet weights: a single safetensors file or a sharded set."""

    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] | None = None
    part: str = ""  # pipeline folders: the subfolder, "unet" or "unet_ema"

    @property
    def is_ema(self) -> bool:
        """True for the weights of a pipeline's ``unet_ema/`` (EMA UNet, not the one pipelines load)."""
        return self.part == EMA_FOLDER

    @property
    def label(self) -> str:
        """Short name for messages: the index or the file."""
        return (self.index or self.files[0]).name


@dataclass
class Source:
    """What CKPT turned out to be and where its weights are."""

    path: Path
    kind: str  # "file" | "unet-folder" | "pipeline-folder"
    groups: list[WeightGroup] = field(default_factory=list)

    @property
    def is_folder(self) -> bool:
        """True for folder checkpoints (output is a mirrored folder)."""
        return self.kind != "file"


def _load_index(index: Path, folder: Path) -> WeightGroup:
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map keys to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: corrupt shard index ({exc})") from None
    names = sorted(set(weight_map.values()))
    files = []
    for name in names:
        shard = folder / name
        if Path(name).name != name or not shard.is_file():
            raise InputError(f"{index}: shard {name!r} listed in weight_map is missing")
        files.append(shard)
    return WeightGroup(files=files, index=index, weight_map=dict(weight_map))


def weight_groups(folder: Path) -> list[WeightGroup]:
    """Return every weight group in a weight folder (refusing pickle weights there)."""
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InputError(
            f"{folder}: holds pickle weights ({', '.join(pickles)}) that apply cannot patch and would "
            "leave unpatched; delete them or convert them to safetensors, then rerun"
        )
    groups: list[WeightGroup] = []
    sharded: set[Path] = set()
    for index in sorted(folder.glob("*" + INDEX_SUFFIX)):
        group = _load_index(index, folder)
        groups.append(group)
        sharded.update(group.files)
    for path in sorted(folder.glob("*.safetensors")):
        if path.is_file() and path not in sharded:
            groups.append(WeightGroup(files=[path]))
    if not groups:
        raise InputError(f"{folder}: no .safetensors weights found")
    return groups


def discover(ckpt: str | Path) -> Source:
    """Classify CKPT and list its weight groups; raise InputError for anything else."""
    path = Path(ckpt)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        raise InputError(f"{path}: not a regular file or folder (a device, FIFO or socket); pass the checkpoint file")
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            raise pickle_refusal(path)
        if path.name.endswith(INDEX_SUFFIX):
            raise InputError(f"{path}: pass the folder that holds this shard index, not the index")
        return Source(path=path, kind="file", groups=[WeightGroup(files=[path])])
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        unet = path / "unet"
        if not unet.is_dir():
            raise InputError(f"{path}: pipeline folder without a unet/ subfolder")
        groups = [replace(g, part="unet") for g in weight_groups(unet)]
        ema = path / EMA_FOLDER
        if ema.is_dir() and any(p.is_file() and p.name.endswith((".safetensors", *PICKLE_SUFFIXES))
                                for p in ema.iterdir()):
            groups += [replace(g, part=EMA_FOLDER) for g in weight_groups(ema)]  # pickles there are refused
        return Source(path=path, kind="pipeline-folder", groups=groups)
    return Source(path=path, kind="unet-folder", groups=weight_groups(path))
