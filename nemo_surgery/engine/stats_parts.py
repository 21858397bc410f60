"""Hold-out statistics in blocks: computed by any shard, stored as part files, folded exactly.

The hold-out prompts are cut into blocks of ``block_size`` consecutive prompts
(by position in the prompt list). A block's statistics (``compute_stats`` over
its prompts) depend only on its prompts and the batch size (its UNet batches
are the same in every run), and blocks are folded in block order with
``Stats.merge`` (parallel moments). So one process doing every block, N
launched processes each doing every N-th block, and N machines whose part
folders are merged later all give bitwise the same statistics (same device
type, dtype and batch size).

Each finished block is written atomically as ``<out>.parts/block-NNNNNN.safetensors``
(tensors as stored, every other field as exact JSON, and a header in the
metadata that pins model, settings and the prompt list), which is also what
``stats --resume`` skips.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_surgery.atomic import atomic_path
from nemo_surgery.engine.model import LoadedModel
from nemo_surgery.engine.score import ScoreSettings
from nemo_surgery.engine.shards import Shard
from nemo_surgery.engine.stats import LayerStats, Moments, Stats, compute_stats
from nemo_surgery.errors import InputError

PART_FORMAT = "nemo-surgery.stats-part"
PART_VERSION = 1
DEFAULT_BLOCK_SIZE = 64


def block_count(n_prompts: int, block_size: int) -> int:
    """How many blocks ``n_prompts`` prompts make."""
    return -(-n_prompts // block_size)


def block_texts(texts: Sequence[str], index: int, block_size: int) -> list[str]:
    """The prompts of block ``index``."""
    return list(texts[index * block_size : (index + 1) * block_size])


def fold(blocks: Sequence[Stats]) -> Stats:
    """Merge the statistics of blocks 0, 1, 2, ... in that order (Stats.merge: parallel moments)."""
    merged = blocks[0]
    for block in blocks[1:]:
        merged = merged.merge(block)
    return merged


# -- a Stats object as safetensors tensors plus JSON (no pickle: part files may come from other machines) --

_CLASSES = {cls.__name__: cls for cls in (Moments, LayerStats)}


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, ScoreSettings):
        return {"__settings__": value.to_json()}
    if is_dataclass(value) and type(value).__name__ in _CLASSES:
        return {"__class__": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name), f"{key}.{f.name}", tensors) for f in fields(value)}}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{key}[{k}]", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{key}[{i}]", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a statistics part file")


def _decode(doc: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(doc, list):
        return [_decode(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "__tensor__" in doc:
        return tensors[doc["__tensor__"]]
    if "__settings__" in doc:
        return ScoreSettings.from_json(doc["__settings__"])
    if "__dict__" in doc:
        return {k: _decode(v, tensors) for k, v in doc["__dict__"]}
    cls = _CLASSES[doc["__class__"]]
    return cls(**{k: _decode(v, tensors) for k, v in doc["fields"].items()})


def encode_stats(stats: Stats) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every field of ``stats`` as (JSON document, tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {f.name: _encode(getattr(stats, f.name), f.name, tensors) for f in fields(stats)}
    return doc, tensors


def decode_stats(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Stats:
    """Rebuild a Stats object from :func:`encode_stats`'s output."""
    return Stats(**{k: _decode(v, tensors) for k, v in doc.items()})


def part_header(model: LoadedModel, texts: Sequence[str], settings: ScoreSettings, block_size: int,
                dtype_name: str) -> dict[str, Any]:
    """What every part file of one statistics job carries and must agree on."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return {
        "format": PART_FORMAT,
        "version": PART_VERSION,
        "fingerprint": model.fingerprint,
        "source": model.source,
        "dtype": dtype_name,
        "settings": settings.to_json(),
        "block_size": block_size,
        "prompt_count": len(texts),
        "prompts_sha256": digest,
    }


def parts_dir_for(out: str | Path) -> Path:
    """The folder of part files that belongs to a statistics output path."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def part_path(folder: Path, index: int) -> Path:
    """The part file of block ``index``."""
    return folder / f"block-{index:06d}.safetensors"


def save_block(folder: Path, header: dict[str, Any], index: int, stats: Stats) -> Path:
    """Write one block's statistics atomically (the job header travels in the metadata)."""
    from safetensors.torch import save_file

    doc, tensors = encode_stats(stats)
    tensors = tensors or {"none": torch.zeros(0)}
    meta = {"header": json.dumps(header, sort_keys=True), "index": str(index), "stats": json.dumps(doc)}
    target = part_path(folder, index)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


def load_block(path: Path) -> tuple[dict[str, Any], int, Stats]:
    """Read one part file: (job header, block index, statistics); raise InputError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            header, index, doc = json.loads(meta["header"]), int(meta["index"]), json.loads(meta["stats"])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        stats = decode_stats(doc, tensors)
    except Exception as exc:  # safetensors and the decoder raise several types for damaged or foreign files
        raise InputError(f"{path}: not a statistics part file ({str(exc)[:120]}); recompute it with `nemo-surgery stats`") from None
    if header.get("format") != PART_FORMAT or header.get("version") != PART_VERSION:
        raise InputError(f"{path}: not a version-{PART_VERSION} statistics part file")
    return header, index, stats


def stats_from_blocks(header: dict[str, Any], blocks: dict[int, Stats]) -> Stats:
    """Fold every block of one job; raise InputError when some block is missing."""
    expected = block_count(header["prompt_count"], header["block_size"])
    missing = [i for i in range(expected) if i not in blocks]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise InputError(f"statistics blocks missing: {shown} of {expected}; run the shards that own them "
                         "(stats --shard I/N --resume) and merge again")
    return fold([blocks[i] for i in range(expected)])


@dataclass
class StatsRun:
    """What one process of a statistics job did."""

    stats: Stats | None  # the merged statistics (main process of a complete job), else None
    computed: int
    resumed: int
    blocks: int
    parts: Path


def run_stats(
    model: LoadedModel,
    texts: Sequence[str],
    settings: ScoreSettings,
    out: str | Path,
    shard: Shard = Shard(),
    batch_size: int = 32,
    block_size: int = DEFAULT_BLOCK_SIZE,
    resume: bool = False,
    dtype_name: str = "fp32",
    advance: Callable[[int], None] | None = None,
    **compute_kwargs: Any,
) -> StatsRun:
    """Compute this shard's blocks (skipping finished ones with ``resume``), then merge and write ``out``.

    Each block is :func:`~nemo_surgery.engine.stats.compute_stats` over its
    prompts (``compute_kwargs`` are passed on). With a single shard or
    launched shards, the main process folds every block after a barrier,
    writes ``out`` atomically and removes the part folder. An explicit
    ``--shard I/N`` only writes its part files (``nemo-surgery merge`` folds them).
    """
    out = Path(out)
    folder = parts_dir_for(out)
    header = part_header(model, texts, settings, block_size, dtype_name)
    n_blocks = block_count(len(texts), block_size)
    computed = resumed = 0
    for index in range(n_blocks):
        if not shard.owns(index):
            continue
        block_prompts = block_texts(texts, index, block_size)
        path = part_path(folder, index)
        if resume and path.exists():
            _check_header(path, load_block(path)[0], header, "rerun without --resume to start over")
            resumed += 1
        else:
            block = compute_stats(model, block_prompts, settings, batch_size, None, dtype_name, **compute_kwargs)
            save_block(folder, header, index, block)
            computed += 1
        if advance is not None:
            advance(len(block_prompts))
    shard.wait()
    stats = None
    if shard.is_main and (shard.single or shard.launched):
        stats = stats_from_blocks(header, {i: load_block(part_path(folder, i))[2] for i in range(n_blocks)})
        stats.save(out)
        shutil.rmtree(folder, ignore_errors=True)
    shard.wait()
    return StatsRun(stats, computed, resumed, n_blocks, folder)


def _check_header(path: Path, got: dict[str, Any], want: dict[str, Any], hint: str) -> None:
    if got != want:
        changed = next((k for k in want if got.get(k) != want[k]), "header")
        raise InputError(f"{path}: made with a different {changed.replace('_', ' ')}; {hint}")


def merge_stats_parts(folders: Sequence[str | Path], out: str | Path) -> Stats:
    """Merge the part folders of one statistics job (from separate shards) into ``out``; inputs untouched.

    A block found in several folders must be byte-identical there.
    """
    header: dict[str, Any] | None = None
    blocks: dict[int, Stats] = {}
    seen: dict[int, Path] = {}
    for folder in map(Path, folders):
        files = sorted(folder.glob("block-*.safetensors")) if folder.is_dir() else []
        if not files:
            raise InputError(f"{folder}: no statistics part files (block-*.safetensors) in this folder")
        for path in files:
            head, index, block = load_block(path)
            if header is None:
                header = head
            _check_header(path, head, header, f"parts of one statistics job only (first: {next(iter(seen.values()), path)})")
            if index in seen:
                if path.read_bytes() != seen[index].read_bytes():
                    raise InputError(f"{path}: block {index} differs from {seen[index]}")
                continue
            blocks[index], seen[index] = block, path
    assert header is not None
    stats = stats_from_blocks(header, blocks)
    stats.save(out)
    return stats
