"""Bounded-memory streaming helpers: mapped or buffered chunks, range splitting, SHA-256 on worker threads.

A file is streamed as a few mapped chunks at a time (``map_chunks``: no copy of
the bytes) or through a small ring of preallocated buffers (``BufferRing``,
``stream_chunks``); each ``Hasher`` digests on its own worker thread (hashlib
releases the GIL on large buffers), so hashing runs on the second core while the
main thread compares and writes. A chunk is unmapped, or its buffer handed out
again, only after every hash queued on it finished, which bounds memory to a
few chunks whatever the file size.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

#: Streaming chunk size in bytes.
CHUNK = 8 << 20
#: Buffers in a ring (memory per stream = CHUNK * RING_DEPTH).
RING_DEPTH = 3


class Hasher:
    """A SHA-256 fed in order on a private worker thread; ``submit`` returns the chunk's future."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, data: bytes | bytearray | memoryview) -> Future:
        """Queue data for hashing; it must stay unchanged until the returned future is done."""
        return self._pool.submit(self._h.update, data)

    def hexdigest(self) -> str:
        """Wait for queued data and return the hex digest."""
        self._pool.shutdown(wait=True)
        return self._h.hexdigest()

    def close(self) -> None:
        """Stop the worker, dropping queued chunks (used on errors)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class BufferRing:
    """A few reusable chunk buffers; ``take`` waits until the work queued on the next one is done."""

    size: int = field(default_factory=lambda: CHUNK)  # read at creation, so tests can shrink CHUNK
    depth: int = RING_DEPTH
    _bufs: list[bytearray] = field(init=False, repr=False)
    _busy: list[list[Future]] = field(init=False, repr=False)
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._bufs = [bytearray(self.size) for _ in range(self.depth)]
        self._busy = [[] for _ in range(self.depth)]

    def take(self) -> tuple[bytearray, list[Future]]:
        """Return a free buffer and the list to append the futures that still read it."""
        k = self._next % self.depth
        self._next += 1
        for fut in self._busy[k]:
            fut.result()
        self._busy[k] = []
        return self._bufs[k], self._busy[k]

    def drain(self) -> None:
        """Wait for all queued work (raising its first error)."""
        for busy in self._busy:
            for fut in busy:
                fut.result()
            busy.clear()


#: The message of a file found shorter than its header says while it is streamed (another program changed it).
ENDED_EARLY = "the file ended before its header says it does (was it changed while being read?)"


def read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill view from fd at offset; OSError(EIO) when the file ends early."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, ENDED_EARLY)
        done += n


def read_bytes(fd: int, offset: int, length: int) -> bytes:
    """Return exactly length bytes of fd at offset."""
    buf = bytearray(length)
    read_exact(fd, memoryview(buf), offset)
    return bytes(buf)


def advise_sequential(fd: int) -> None:
    """Tell the kernel fd is read front to back (no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


def stream_chunks(fd: int, start: int, length: int, ring: BufferRing) -> Iterator[tuple[int, memoryview, list[Future]]]:
    """Yield (offset relative to start, chunk view, futures list) over length bytes of fd from start.

    The view lives in a ring buffer: append to the futures list every pending
    job that reads it, so the buffer is not refilled before that job ends.
    """
    pos = 0
    while pos < length:
        buf, busy = ring.take()
        view = memoryview(buf)[: min(len(buf), length - pos)]
        read_exact(fd, view, start + pos)
        yield pos, view, busy
        pos += len(view)


def map_chunks(fd: int, start: int, length: int, depth: int = RING_DEPTH) -> Iterator[tuple[int, memoryview, list[Future]]]:
    """Yield (offset relative to start, chunk view, futures list) like ``stream_chunks``, without copying the bytes.

    Each chunk is a read-only mapping of the file (``mmap``): hashing and writing
    read the page cache directly, which saves the copy into a buffer (about 0.5
    CPU-s per GB on this project's machine, and as much again in the writes that
    follow). At most ``depth`` chunks are mapped at a time, each unmapped once the
    jobs appended to its futures list ended, so the resident memory stays bounded
    like the ring's. Where the file cannot be mapped (some FUSE or special
    files), the chunks are read into a ring instead (``stream_chunks``). A file
    found shorter than planned before a chunk is mapped raises OSError(EIO) like
    a read; one truncated by another program in the milliseconds a chunk is in
    use ends the process with SIGBUS (the input is never written, and a temp
    output is swept by the next run).
    """
    try:
        probe = mmap.mmap(fd, min(length, mmap.ALLOCATIONGRANULARITY) or 1, prot=mmap.PROT_READ,
                          offset=start - start % mmap.ALLOCATIONGRANULARITY)
        probe.close()
    except (OSError, ValueError):
        ring = BufferRing()
        yield from stream_chunks(fd, start, length, ring)
        ring.drain()  # like the mapped path: the first error of a queued job is raised
        return
    live: deque[tuple[mmap.mmap, memoryview, memoryview, list[Future]]] = deque()
    try:
        pos = 0
        while pos < length:
            if len(live) == depth:
                _unmap(live.popleft(), wait_raising=True)
            n = min(CHUNK, length - pos)
            offset = start + pos
            if os.fstat(fd).st_size < offset + n:  # shrunk under us: fail like a read, not by SIGBUS on the mapping
                raise OSError(errno.EIO, ENDED_EARLY)
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, n + offset - base, prot=mmap.PROT_READ, offset=base, flags=_MAP_FLAGS)
            whole = memoryview(mapped)
            view, busy = whole[offset - base :], []
            live.append((mapped, whole, view, busy))
            yield pos, view, busy
            pos += n
        for chunk in live:  # like BufferRing.drain: the first error of a queued job is raised
            for fut in chunk[3]:
                fut.result()
    finally:
        while live:
            _unmap(live.popleft(), wait_raising=False)


#: mmap flags of map_chunks: shared, and the page tables filled at once where the kernel can (fewer faults).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _unmap(chunk: tuple[mmap.mmap, memoryview, memoryview, list[Future]], wait_raising: bool) -> None:
    """Wait for the jobs on a mapped chunk, then release its views and unmap it."""
    mapped, whole, view, busy = chunk
    if wait_raising:
        for fut in busy:
            fut.result()
    else:
        wait(busy)
    view.release()
    whole.release()
    try:
        mapped.close()
    except BufferError:  # a caller still holds a slice: the mapping goes when that does
        pass


def segments(chunk_off: int, chunk_len: int, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, bool]]:
    """Yield (start, end, inside) pieces of a chunk split at range borders (chunk-relative).

    ``ranges`` are sorted, merged (offset, length) pairs in the same coordinates as chunk_off.
    The first range that reaches into the chunk is found by bisection: a pass over
    a file makes one call per chunk, so a scan of every range each time would be
    quadratic (0.26 s of the main thread for 669 rows in 257 chunks).
    """
    pos = 0
    first = bisect.bisect_right(ranges, chunk_off, key=lambda r: r[0] + r[1])
    for off, length in ranges[first:]:
        if off >= chunk_off + chunk_len:
            break
        a, b = max(off - chunk_off, 0), min(off + length - chunk_off, chunk_len)
        if b <= 0:
            continue
        if a > pos:
            yield pos, a, False
        yield a, b, True
        pos = b
    if pos < chunk_len:
        yield pos, chunk_len, False


def inside_pieces(chunk_off: int, chunk_len: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunk-relative (start, end) pieces of a chunk that lie inside ranges."""
    return [(a, b) for a, b, inside in segments(chunk_off, chunk_len, ranges) if inside]


def zero_in_buffer(buf: bytearray, pieces: list[tuple[int, int]]) -> None:
    """Set buf[a:b] to zero bytes for each (a, b) piece."""
    for a, b in pieces:
        buf[a:b] = bytes(b - a)


def comparable(data: memoryview | bytes | bytearray) -> bytes | bytearray:
    """The chunk as an object whose ``==`` is a memcmp (memoryview ``==`` compares item by item)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    obj = data.obj
    if isinstance(obj, bytearray) and len(obj) == len(data) and data.contiguous:
        return obj
    return bytes(data)


def with_zeros(view: memoryview, chunk_off: int, ranges: list[tuple[int, int]]) -> memoryview | bytearray:
    """The chunk as it must be once the ranges are zero: the view itself, or a zeroed copy when a range touches it."""
    pieces = inside_pieces(chunk_off, len(view), ranges)
    if not pieces:
        return view
    out = bytearray(view)
    zero_in_buffer(out, pieces)
    return out


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte is zero."""
    data = bytes(data) if isinstance(data, memoryview) else data
    return not data or (data[0] == 0 and data == bytes(len(data)))


@dataclass
class DataScan:
    """Digests of one streamed pass over a safetensors file."""

    file_sha256: str
    patched_sha256: str | None


def scan_file(path: Path, data_start: int, ranges: list[tuple[int, int]], prefix: bytes | None) -> DataScan:
    """Stream a file once: its SHA-256 and, unless prefix is None, SHA-256 of prefix + data with ranges zeroed.

    ``ranges`` are data-buffer-relative. Both digests run on worker threads.
    """
    h_file = Hasher()
    h_patched = Hasher() if prefix is not None else None
    fd = os.open(path, os.O_RDONLY)
    try:
        advise_sequential(fd)
        size = os.fstat(fd).st_size
        h_file.submit(read_bytes(fd, 0, data_start))
        if h_patched is not None:
            h_patched.submit(prefix)
        for pos, view, busy in map_chunks(fd, data_start, size - data_start):
            busy.append(h_file.submit(view))
            if h_patched is not None:
                busy.append(h_patched.submit(with_zeros(view, pos, ranges)))
        return DataScan(h_file.hexdigest(), h_patched.hexdigest() if h_patched is not None else None)
    finally:
        os.close(fd)
        h_file.close()
        if h_patched is not None:
            h_patched.close()
