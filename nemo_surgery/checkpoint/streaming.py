"""Bounded-memory streaming helpers: chunked reads, range splitting, background SHA-256.

Each ``HashStream`` hashes on its own worker thread (hashlib releases the GIL on
large buffers), so several digests of one pass run in parallel with the reads
and comparisons of the main thread. At most ``depth`` chunks wait per stream,
which bounds memory to a few chunks whatever the file size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

#: Streaming chunk size in bytes.
CHUNK = 8 << 20


class HashStream:
    """A SHA-256 fed in order on a private worker thread."""

    def __init__(self, depth: int = 2) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()
        self._depth = depth

    def update(self, data: bytes) -> None:
        """Queue immutable data for hashing; blocks while too many chunks are queued."""
        self._pending.append(self._pool.submit(self._h.update, data))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        """Wait for queued data and return the hex digest."""
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        return self._h.hexdigest()


def sha256_path(path: Path, stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of a file, streamed; returns "" early when ``stop`` gets set."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            if stop is not None and stop.is_set():
                return ""
            h.update(chunk)
    return h.hexdigest()


def segments(chunk_off: int, chunk_len: int, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """Yield (start, end, inside) pieces of a chunk split at range borders (chunk-relative).

    ``ranges`` are sorted, merged (offset, length) pairs in the same coordinates as chunk_off.
    """
    pos = 0
    for off, length in ranges:
        a, b = max(off - chunk_off, 0), min(off + length - chunk_off, chunk_len)
        if b <= 0 or a >= chunk_len:
            continue
        if a > pos:
            yield pos, a, False
        yield a, b, True
        pos = b
    if pos < chunk_len:
        yield pos, chunk_len, False


def is_zero(data: bytes) -> bool:
    """True when every byte is zero."""
    return not data or (data[0] == 0 and data == bytes(len(data)))


@dataclass
class DataScan:
    """Digests of one streamed pass over a safetensors file."""

    file_sha256: str
    kept_sha256: str
    zeroed_data_sha256: str | None
    targets_zero: bool


def scan_file(path: Path, data_start: int, ranges: list[tuple[int, int]], want_zeroed: bool = False) -> DataScan:
    """Stream a file once: full SHA-256, SHA-256 of data bytes outside ranges, zero check of ranges.

    ``ranges`` are data-buffer-relative. With ``want_zeroed`` also the SHA-256 of
    the data buffer as it is once the ranges are zero.
    """
    h_file, h_kept = HashStream(), HashStream()
    h_zeroed = HashStream() if want_zeroed else None
    all_zero = True
    with open(path, "rb") as fh:
        h_file.update(fh.read(data_start))
        pos = 0
        while chunk := fh.read(CHUNK):
            h_file.update(chunk)
            pieces = list(segments(pos, len(chunk), ranges))
            if len(pieces) == 1 and not pieces[0][2]:
                h_kept.update(chunk)
                if h_zeroed is not None:
                    h_zeroed.update(chunk)
            else:
                for a, b, inside in pieces:
                    piece = chunk[a:b]
                    if inside:
                        all_zero = all_zero and is_zero(piece)
                        if h_zeroed is not None:
                            h_zeroed.update(bytes(b - a))
                    else:
                        h_kept.update(piece)
                        if h_zeroed is not None:
                            h_zeroed.update(piece)
            pos += len(chunk)
    return DataScan(
        h_file.hexdigest(), h_kept.hexdigest(), h_zeroed.hexdigest() if h_zeroed else None, all_zero
    )
