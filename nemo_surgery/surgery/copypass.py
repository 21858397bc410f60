"""Writing helpers of the copy pass and the check of what it wrote.

``write_pieces`` writes a chunk with pwrite calls of ``WRITE_PIECE`` bytes:
measured on this project's machine (ext4, kernel 6.18 in a VM, 2 GiB written,
fsync included), 256 KiB calls cost about 1.0 s of system time, the same as the
kernel's own ``copy_file_range``, while 1 MiB calls cost about 6 s and 8 MiB
calls 6-8.5 s (why was not established).
``copy_range`` copies byte ranges between files in the kernel (used for the
unchanged files of a folder). ``clone_tail`` shares the input's data blocks with
the output where the filesystem can (reflink: btrfs, XFS; ``FICLONERANGE``, never a
silent copy), for which ``aligned_json_length`` pads the new header so the data
keeps its offset modulo the block size. ``PassCheck`` checks, as the pass goes,
that each buffer written equals the input chunk with exactly the planned ranges
zeroed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from nemo_surgery.surgery.safetensors_file import Header, encode_header
from nemo_surgery.surgery.streaming import CHUNK, is_zero, segments, zero_in_buffer

#: Bytes per pwrite call of the copy pass (see the module docstring for why not more).
WRITE_PIECE = 256 << 10
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_FICLONERANGE = 0x4020940D  # linux/fs.h: struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset}
#: Block sizes a clone is attempted for (a power of two in this range).
CLONE_BLOCKS = (512, 1 << 20)


def clone_block(fd: int) -> int | None:
    """The block size a clone into fd must align to, or None when it is not a sensible one."""
    try:
        block = os.fstatvfs(fd).f_bsize
    except OSError:
        return None
    low, high = CLONE_BLOCKS
    return block if low <= block <= high and block & (block - 1) == 0 else None


def aligned_json_length(min_length: int, data_start: int, block: int) -> int:
    """The smallest JSON length >= min_length whose header (8 + length bytes) keeps data_start's offset modulo block."""
    return min_length + (data_start - 8 - min_length) % block


def clone_tail(src_fd: int, dst_fd: int, src_off: int, dst_off: int) -> bool:
    """Share src's blocks from src_off to its end with dst at dst_off (reflink); False where the filesystem cannot.

    Both offsets must be block-aligned. FICLONERANGE either clones or fails: it
    never falls back to copying, so the output's bytes there are the input's
    blocks, by the filesystem's own bookkeeping.
    """
    try:
        fcntl.ioctl(dst_fd, _FICLONERANGE, struct.pack("qQQQ", src_fd, src_off, 0, dst_off))
    except OSError:
        return False
    return True


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


def try_clone(src_fd: int, dst_fd: int, header: Header, meta: dict[str, str], head: bytes) -> tuple[bytes, int | None]:
    """Clone the input's data blocks into the empty dst where the filesystem can; return (header to use, cloned_from).

    ``cloned_from`` is the data-buffer offset from which the output holds the
    input's blocks (None: nothing cloned). The header is padded with spaces (less
    than a block) so the data keeps its offset modulo the block size, which a
    clone needs. Where the filesystem cannot clone (ext4, tmpfs, another device),
    dst stays empty and the plain header is used.
    """
    block = clone_block(dst_fd)
    if block is None:
        return head, None
    start = -(-header.data_start // block) * block  # first block boundary inside the data buffer
    if start >= header.file_size:
        return head, None
    padded = encode_header(header, meta, pad_to=aligned_json_length(len(head) - 8, header.data_start, block))
    if not clone_tail(src_fd, dst_fd, start, start + len(padded) - header.data_start):
        os.ftruncate(dst_fd, 0)
        return head, None
    return padded, start - header.data_start


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

    def chunk(
        self, src: memoryview, written: memoryview | bytes | bytearray, pos: int, ranges: list[tuple[int, int]]
    ) -> None:
        """Check the buffer ``written`` for the input chunk ``src`` at data offset ``pos``.

        The input chunk's own view was written as read: nothing to compare.
        Anything else (a zeroed copy) must equal the input chunk with the ranges
        zeroed, rebuilt here independently (one memcmp); on a mismatch the
        segments are classified.
        """
        if written is src:
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
