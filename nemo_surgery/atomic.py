"""Atomic file writes: write to a temp file beside the target, fsync, rename.

New files get the mode ``cp`` or a shell redirection would give them
(``0666 & ~umask``); replacing an existing file keeps that file's mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: str | Path, like: str | Path | None = None) -> None:
    """Give a freshly written file the mode ``cp`` would: like's mode if like exists, else 0666 & ~umask."""
    mode = 0o666 & ~current_umask()
    if like is not None:
        with contextlib.suppress(OSError):
            mode = os.stat(like).st_mode & 0o7777
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto target on success.

    On any exception the temp file is removed and the target is left untouched.
    The temp is named ``.<target>.nemo-tmp-<pid>-<random><suffix>``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.nemo-tmp-{os.getpid()}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        public_mode(tmp_path, like=target if target.exists() else None)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces target atomically when closed cleanly."""
    with atomic_path(target) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json(target: str | Path, data: Any) -> Path:
    """Write data as indented JSON, atomically."""
    with atomic_open(target) as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return Path(target)
