"""One writer per output: advisory lock files, our temp names, the sweep of stale temps, SIGTERM as Ctrl-C.

Every path apply writes has a lock file beside it, ``.<name>.nemo-lock``, held
with ``flock`` for the whole run: exclusively by the run that writes the path
(an output, or the checkpoint of an ``--in-place`` edit), shared by runs that
only read it (the input of a copy). The kernel drops the lock when its process
dies, however it dies, so a lock is held exactly while a live process owns it.

Every temp file or folder apply creates for an output is named
``.<name>.nemo-tmp-<pid>-<random>[suffix]``. Only the holder of the output's
exclusive lock creates such temps, so once a run holds the lock, every temp of
that name left in the folder belongs to a dead run and is removed (``sweep``).
Lock files are removed on release when no other process holds them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from nemo_surgery.errors import InputError, NemoError

TMP_MARK = ".nemo-tmp-"


def lock_path(path: Path) -> Path:
    """The lock file of a path: ``.<name>.nemo-lock`` beside it."""
    return path.with_name(f".{path.name}.nemo-lock")


def tmp_prefix(target: Path) -> str:
    """The name prefix shared by every temp apply creates for target."""
    return f".{target.name}{TMP_MARK}"


def tmp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temp path for target in its folder (pid and randomness in the name; nothing created)."""
    return target.with_name(f"{tmp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def stale_temps(target: Path) -> list[Path]:
    """Temps of target left in its folder (call with target's exclusive lock held: they are all stale)."""
    prefix = tmp_prefix(target)
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep(target: Path) -> list[Path]:
    """Remove the stale temps of target (exclusive lock held); return what was removed."""
    found = stale_temps(target)
    for path in found:
        remove_path(path)
    return found


def writable_folder(path: Path) -> None:
    """Raise a one-line error unless path's folder exists (or can be created) and takes new files.

    A regular file on the way is bad input (exit 2); a folder that refuses
    writes (permissions, read-only mount, immutable flag) is an environment
    failure (exit 1). Creates missing parent folders.
    """
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{path}: {probe} is a file, not a folder; choose an output path in a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NemoError(f"{folder}: cannot create the output folder ({exc.strerror}); choose a writable --out") from None


class PathLock:
    """An advisory ``flock`` on ``.<name>.nemo-lock`` beside a path; exclusive for writers, shared for readers."""

    def __init__(self, path: Path, shared: bool = False, what: str = "output") -> None:
        self.path = path
        self.file = lock_path(path)
        self.shared = shared
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> PathLock:
        """Take the lock without waiting; raise a one-line NemoError when another run holds it."""
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                if self.shared and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return self  # a read-only input folder: no writer can lock it either
                hint = "choose a writable --out" if self.what == "output" else "apply without --in-place"
                raise NemoError(f"{self.path.parent}: cannot write there ({exc.strerror}); {hint}") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise NemoError(self._busy_message(owner)) from None
            if not _same_file(fd, self.file):
                os.close(fd)  # removed by its last holder between our open and flock: retry
                continue
            if not self.shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self

    def _busy_message(self, owner: str) -> str:
        who = f" (pid {owner})" if owner else ""
        if self.what == "input":
            return (f"{self.path}: another apply is editing it in place{who}; wait for it to finish, "
                    "then rerun")
        if self.what == "checkpoint":
            return (f"{self.path}: another nemo-surgery apply is reading or editing it{who}; wait for it "
                    "to finish, then rerun")
        return (f"{self.path}: another nemo-surgery apply is writing it{who}; wait for it to finish "
                "or choose another --out")

    def held(self) -> bool:
        """True while our lock file is still the one at the lock path (nobody removed or replaced it)."""
        return self.fd is None or _same_file(self.fd, self.file)

    def release(self) -> None:
        """Drop the lock; remove the lock file when no other process holds it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, self.file):
                with contextlib.suppress(OSError):
                    self.file.unlink()
        except OSError:
            pass  # another reader still holds it; it removes the file
        finally:
            os.close(fd)

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt (cleanup runs as for Ctrl-C); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (a few renames that must not be cut); main thread only.

    The signals are caught by Python handlers that only take note (signal masks
    would not do: the kernel may deliver to another thread); on leaving the
    block the old handlers return and a noted signal raises KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, _frame: object) -> None:
        noted.append(signum)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if noted:
        raise KeyboardInterrupt
