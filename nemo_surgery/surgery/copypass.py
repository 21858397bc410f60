"""Writing helpers of the copy pass and the check of what it wrote.

``write_pieces`` writes a chunk with pwrite calls of ``WRITE_PIECE`` bytes:
measured on this project's machine (ext4, kernel 6.18 in a VM, 2 GiB written,
fsync included), 256 KiB calls cost about 1.0 s of system time, the same as the
kernel's own ``copy_file_range``, while 1 MiB calls cost about 6 s and 8 MiB
calls 6-8.5 s (why was not established).
``copy_range`` copies byte ranges between files in the kernel (used for the
unchanged files of a folder). ``PassCheck`` checks, as the pass goes, that each
buffer written equals the input chunk with exactly the planned ranges zeroed.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from nemo_surgery.surgery.streaming import CHUNK, is_zero, segments, zero_in_buffer

#: Bytes per pwrite call of the copy pass (see the module docstring for why not more).
WRITE_PIECE = 256 << 10
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def write_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of data at offset (pwrite until done)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_pieces(fd: int, data: bytes | bytearray | memoryview, offset: int, piece: int = WRITE_PIECE) -> None:
    """Write all of data at offset in pwrite calls of at most ``piece`` bytes."""
    view = memoryview(data)
    for start in range(0, len(view), piece):
        write_at(fd, view[start : start + piece], offset + start)


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Copy length bytes between file offsets, in the kernel where possible."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), src_off + done, dst_off + done)
            if n == 0:
                raise OSError(errno.EIO, "source ended early")
            done += n
        return
    except OSError as exc:
        if exc.errno not in _FALLBACK_ERRNOS:
            raise
    buf = bytearray(min(CHUNK, max(length - done, 1)))
    while done < length:
        view = memoryview(buf)[: min(len(buf), length - done)]
        n = os.preadv(src_fd, [view], src_off + done)
        if n == 0:
            raise OSError(errno.EIO, "source ended early")
        write_pieces(dst_fd, view[:n], dst_off + done)
        done += n


@dataclass
class PassCheck:
    """What checking each written buffer against its input chunk found, over a pass (data-buffer offsets)."""

    targets_zero: bool = True  # every byte written inside the ranges is zero
    first_difference: int | None = None  # first data byte outside the ranges written unlike the input
    size_ok: bool = True  # the output holds exactly header + data buffer

    @property
    def others_identical(self) -> bool:
        """True when no byte outside the ranges was written unlike the input, and the size is right."""
        return self.first_difference is None and self.size_ok

    def chunk(self, src: memoryview, written: bytes | bytearray, pos: int, ranges: list[tuple[int, int]]) -> None:
        """Check the buffer ``written`` for the input chunk ``src`` at data offset ``pos``.

        A buffer that is the input chunk's own ring buffer was written as read:
        nothing to compare. Otherwise (a zeroed copy, or the file's last, short
        chunk) it must equal the input chunk with the ranges zeroed, rebuilt here
        independently (one memcmp); on a mismatch the segments are classified.
        """
        if written is src.obj and len(written) == len(src):
            return
        pieces = [(a, b) for a, b, inside in segments(pos, len(src), ranges) if inside]
        expected = bytearray(src)
        zero_in_buffer(expected, pieces)
        if written == expected:
            return
        got = memoryview(written)
        if len(got) != len(src):
            self.first_difference = pos if self.first_difference is None else self.first_difference
            return
        for a, b, inside in segments(pos, len(src), ranges):
            if inside:
                self.targets_zero = self.targets_zero and is_zero(got[a:b])
            elif self.first_difference is None and bytes(src[a:b]) != bytes(got[a:b]):
                self.first_difference = pos + next(i for i in range(a, b) if src[i] != got[i])
