"""Data-parallel sharding: which process am I, which share of the work is mine, wait for the others.

Three ways to run:

* plain (``python -m nemo_surgery ...``): one shard, nothing to wait for;
* under a launcher (``accelerate launch --num_processes N -m nemo_surgery ...``,
  or any launcher that sets ``WORLD_SIZE``/``RANK``): Hugging Face accelerate's
  ``PartialState`` starts the process group (gloo on CPUs, NCCL on GPUs), every
  process takes a disjoint share and the main process merges after a barrier;
* explicit (``--shard I/N``, e.g. one job per machine with no launcher between
  them): this process does share I of N and stops; ``nemo-surgery merge``
  combines the outputs later.

Work is dealt round-robin by position, so shares are disjoint, cover
everything, and do not depend on how long each item takes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nemo_surgery.errors import InputError

T = TypeVar("T")
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass
class Shard:
    """This process's place among the processes sharing one job."""

    index: int = 0
    count: int = 1
    launched: bool = False  # started by a launcher: the processes can meet at a barrier
    state: Any = None  # accelerate.PartialState when launched

    @property
    def is_main(self) -> bool:
        """True for the process that merges and reports (index 0)."""
        return self.index == 0

    @property
    def single(self) -> bool:
        """True when this process does all the work."""
        return self.count == 1

    @property
    def label(self) -> str:
        """'shard-I-of-N', used in file names."""
        return f"shard-{self.index}-of-{self.count}"

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's items: positions index, index + count, index + 2 count, ..."""
        return [item for pos, item in enumerate(items) if pos % self.count == self.index]

    def owns(self, position: int) -> bool:
        """True when the item at ``position`` belongs to this shard."""
        return position % self.count == self.index

    def wait(self) -> None:
        """Barrier: return when every launched process got here (no-op otherwise)."""
        if self.launched and self.count > 1:
            self.state.wait_for_everyone()

    def device(self, requested: str) -> str:
        """The device this process should use: its own GPU under a launcher when --device is auto/cuda."""
        if self.launched and self.state is not None and requested in ("auto", "cuda"):
            dev = self.state.device
            if getattr(dev, "type", "cpu") != "cpu":
                return str(dev)
        return requested


def parse_shard(text: str) -> Shard:
    """Parse ``--shard I/N`` (0 <= I < N)."""
    m = _SHARD_RE.match(text or "")
    if not m:
        raise InputError(f"--shard {text!r}: write it as I/N, e.g. 0/4 for the first of four shards")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise InputError(f"--shard {text}: the index must be between 0 and {count - 1} (N = {count})")
    return Shard(index=index, count=count)


def launched_world_size() -> int:
    """WORLD_SIZE set by a launcher (accelerate launch, torchrun), else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current_shard(explicit: str | None = None) -> Shard:
    """The shard of this process: ``--shard`` if given, else from the launcher, else a single shard."""
    world = launched_world_size()
    if explicit:
        if world > 1:
            raise InputError("--shard is for separate jobs without a launcher; under accelerate launch leave it out")
        return parse_shard(explicit)
    if world <= 1:
        return Shard()
    try:
        import torch
        from accelerate import PartialState
    except ImportError:
        raise InputError(
            f"started by a launcher with WORLD_SIZE={world}, but accelerate is not installed; `pip install accelerate`"
        ) from None
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo over the launcher's env
    return Shard(index=state.process_index, count=state.num_processes, launched=True, state=state)


def shard_path(out: str | Path, shard: Shard) -> Path:
    """``out`` with the shard label before its suffix: set.json -> set.shard-0-of-2.json."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{shard.label}{out.suffix}")
