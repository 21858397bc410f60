"""Journals that make an interrupted apply detectable and finishable.

In-place journal, ``.<name>.nemo-journal.json`` beside the checkpoint: written
(and fsynced) before the first byte of an ``--in-place`` edit, removed only after
the edit and its report are on disk. While it exists the checkpoint may hold a
half-done edit: some rows zeroed, others not, header old or new. The next apply
on that checkpoint reports it and finishes it by re-running the same set (zeroing
is idempotent); ``pending_edit`` lets verify (or anything else) refuse such a file.

Commit journal, ``.<name>.nemo-commit.json`` beside an output: the list of renames
that publish a verified output together with its report. It is written after
both are complete in temps and removed once every rename is done, so a run killed
between two renames is rolled forward by the next run on that output
(``roll_forward``): the output and its report appear together or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.surgery.locking import remove_path, tmp_path
from nemo_surgery.surgery.testhooks import pause_at

JOURNAL_FORMAT = "nemo-surgery.in-place-journal"
COMMIT_FORMAT = "nemo-surgery.commit-journal"


def journal_path(ckpt: Path) -> Path:
    """The in-place journal of a checkpoint file or folder."""
    return ckpt.with_name(f".{ckpt.name}.nemo-journal.json")


def commit_path(target: Path) -> Path:
    """The commit journal of an output path."""
    return target.with_name(f".{target.name}.nemo-commit.json")


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in folder durable (best effort where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, doc: dict[str, Any], owner: Path) -> None:
    """Write doc to path through a temp named after ``owner`` (so ``sweep(owner)`` removes a leftover)."""
    tmp = tmp_path(owner, ".journal")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class PendingEdit:
    """An in-place edit that started and did not finish (its journal is still there)."""

    ckpt: Path
    journal: Path
    neuron_set: str | None = None
    neuron_set_sha256: str | None = None
    started: str | None = None
    pid: int | None = None
    sha256_before: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for messages: which set, when."""
        what = "an unknown neuron set"
        if self.neuron_set_sha256:
            what = f"neuron set {self.neuron_set} (SHA-256 {self.neuron_set_sha256[:12]})"
        return f"an interrupted --in-place apply of {what} started {self.started or 'at an unknown time'}"


def pending_edit(ckpt: str | Path) -> PendingEdit | None:
    """The unfinished in-place edit of a checkpoint, or None when its journal is absent.

    An unreadable journal still means an unfinished edit (fields left unknown).
    """
    ckpt = Path(ckpt)
    path = journal_path(ckpt)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return PendingEdit(ckpt, path)
    try:
        doc = json.loads(raw)
        return PendingEdit(
            ckpt, path, str(doc["neuron_set"]), str(doc["neuron_set_sha256"]), str(doc["started"]),
            int(doc["pid"]), {str(k): str(v) for k, v in dict(doc["sha256_before"]).items()},
        )
    except (ValueError, KeyError, TypeError):
        return PendingEdit(ckpt, path)


def begin_edit(ckpt: Path, neuron_set: Path, neuron_set_sha256: str, sha256_before: dict[str, str]) -> Path:
    """Write the in-place journal durably before the first byte of the edit; return its path."""
    path = journal_path(ckpt)
    _write_durably(path, {
        "format": JOURNAL_FORMAT, "version": 1, "checkpoint": str(ckpt), "neuron_set": str(neuron_set),
        "neuron_set_sha256": neuron_set_sha256, "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256_before": sha256_before,
    }, ckpt)
    return path


def end_edit(ckpt: Path) -> None:
    """Remove the in-place journal durably (the edit and its report are on disk)."""
    with contextlib.suppress(FileNotFoundError):
        journal_path(ckpt).unlink()
    fsync_dir(ckpt.parent)


@dataclass
class Commit:
    """Renames that publish an output and its report as one step.

    ``payload`` (temp, final) is the output; ``aside`` is where an existing final
    folder is moved first (replaced with --force); ``stale`` (old reports) is
    removed before the payload moves; ``extras`` are the report renames;
    ``cleanup`` is removed at the end.
    """

    payload: tuple[Path, Path]
    aside: Path | None = None
    extras: list[tuple[Path, Path]] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The journal document."""
        return {
            "format": COMMIT_FORMAT, "version": 1,
            "payload": [str(p) for p in self.payload], "aside": str(self.aside) if self.aside else None,
            "extras": [[str(a), str(b)] for a, b in self.extras], "cleanup": [str(p) for p in self.cleanup],
            "stale": [str(p) for p in self.stale],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Commit:
        """Read a journal document back."""
        return cls(
            payload=(Path(doc["payload"][0]), Path(doc["payload"][1])),
            aside=Path(doc["aside"]) if doc.get("aside") else None,
            extras=[(Path(a), Path(b)) for a, b in doc.get("extras", [])],
            cleanup=[Path(p) for p in doc.get("cleanup", [])],
            stale=[Path(p) for p in doc.get("stale", [])],
        )


def _replay(commit: Commit) -> None:
    tmp, final = commit.payload
    if tmp.exists():
        for path in commit.stale:
            remove_path(path)
        if commit.aside is not None and (final.exists() or final.is_symlink()):
            os.replace(final, commit.aside)
        os.replace(tmp, final)
        pause_at("commit-payload-renamed")
    for src, dst in commit.extras:
        if src.exists():
            os.replace(src, dst)
    fsync_dir(final.parent)
    for path in commit.cleanup:
        remove_path(path)


def publish(target: Path, commit: Commit) -> None:
    """Journal the renames durably, then do them; a kill in between is finished by ``roll_forward``."""
    journal = commit_path(target)
    _write_durably(journal, commit.to_json(), target)
    pause_at("commit-journaled")
    _replay(commit)
    journal.unlink()
    fsync_dir(target.parent)


def roll_forward(target: Path) -> bool:
    """Finish the renames of an interrupted publish of target (its lock held); True when there was one.

    A journal that cannot be read (cut before its rename, which cannot happen
    with ``_write_durably``, or edited by hand) is removed without replay.
    """
    journal = commit_path(target)
    try:
        doc = json.loads(journal.read_text(encoding="utf-8"))
        commit = Commit.from_json(doc)
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        journal.unlink(missing_ok=True)
        return False
    _replay(commit)
    journal.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return True
