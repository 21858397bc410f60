"""Early write-back of a file being streamed out, so the closing fsync has little left to do.

Every ``every`` bytes written, ``Flusher`` starts ``os.fdatasync`` on a worker
thread (unless the previous one still runs): the disk writes earlier chunks while
the main thread reads, hashes and writes later ones. Errors surface on ``finish``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

#: Bytes written between two background flushes.
FLUSH_EVERY = 256 << 20


class Flusher:
    """Background fdatasync of fd every ``every`` bytes written (0 disables it)."""

    def __init__(self, fd: int, every: int = FLUSH_EVERY) -> None:
        self._fd = fd
        self._every = every
        self._pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1) if every > 0 else None
        self._running: Future | None = None

    def wrote(self, n: int) -> None:
        """Account for n bytes written; start a flush when enough piled up and none runs."""
        if self._pool is None:
            return
        self._pending += n
        if self._pending >= self._every and (self._running is None or self._running.done()):
            if self._running is not None:
                self._running.result()
            self._running = self._pool.submit(os.fdatasync, self._fd)
            self._pending = 0

    def finish(self) -> None:
        """Wait for the running flush (raising its error) and stop the worker; call before closing fd."""
        try:
            if self._running is not None:
                self._running.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
