"""Byte-level patching: copy a safetensors file with a new header and zeroed rows, or zero in place.

Tensor bytes are never decoded: the data buffer is copied by the kernel
(``os.copy_file_range``, falling back to bounded pread/pwrite), zeros are
written at the planned byte ranges and the file is fsynced. Memory use is one
bounded chunk, independent of the checkpoint size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import NemoError
from .plan import FilePlan
from .safetensors_file import encode_header
from .streaming import CHUNK, DataScan, scan_file

MODELSPEC_HASH = "modelspec.hash_sha256"
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def disk_full(path: Path) -> NemoError:
    """The one-line error for ENOSPC while writing path."""
    return NemoError(f"disk full while writing {path}; free space and rerun (nothing was written)")


def write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of data at offset (pwrite until done)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


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
        write_at(dst_fd, view[:n], dst_off + done)
        done += n


def zero_ranges(fd: int, base: int, ranges: list[tuple[int, int]]) -> None:
    """Write zeros over each (offset, length) range, offsets relative to base."""
    if not ranges:
        return
    zeros = bytes(min(CHUNK, max(length for _, length in ranges)))
    for off, length in ranges:
        pos = 0
        while pos < length:
            n = min(len(zeros), length - pos)
            write_at(fd, memoryview(zeros)[:n], base + off + pos)
            pos += n


def provenance_metadata(
    old: dict[str, str] | None, fp: FilePlan, neuron_set_sha256: str, data_sha256: str | None = None
) -> dict[str, str]:
    """Return old metadata plus ``nemo_surgery.*`` keys; refresh modelspec.hash_sha256 if present.

    ``modelspec.hash_sha256`` follows the SAI ModelSpec convention: SHA-256 of the
    tensor data buffer (header excluded), keeping the existing value's ``0x`` style.
    """
    meta = dict(old or {})
    meta["nemo_surgery.tool_version"] = __version__
    meta["nemo_surgery.neuron_set_sha256"] = neuron_set_sha256
    meta["nemo_surgery.rows_zeroed"] = json.dumps({t.key: len(t.rows) for t in fp.tensors}, separators=(",", ":"))
    if MODELSPEC_HASH in meta:
        digest = data_sha256 or "0" * 64
        meta[MODELSPEC_HASH] = ("0x" if meta[MODELSPEC_HASH].startswith("0x") else "") + digest
    return meta


def _data_sha256(fd: int, start: int, length: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    pos = 0
    while pos < length:
        view = memoryview(buf)[: min(CHUNK, length - pos)]
        n = os.preadv(fd, [view], start + pos)
        if n == 0:
            raise OSError(errno.EIO, "file ended early")
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def guard_write(path: Path, body: Callable[[], None]) -> None:
    try:
        body()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise NemoError(f"cannot write {path}: {exc.strerror or exc}") from None


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (ENOSPC and other errors become one-line NemoErrors)."""

    def body() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    guard_write(path, body)


def write_patched_copy(fp: FilePlan, dst: Path, neuron_set_sha256: str, fsync: bool = True) -> dict[str, str]:
    """Write fp.src to dst (a fresh temp path) with new metadata and zeroed rows; fsync unless told not to.

    Returns the metadata written. dst is removed on any failure; ENOSPC becomes
    one actionable NemoError. Callers that verify before renaming pass
    ``fsync=False`` and call ``fsync_file`` after verification (reads are served
    from the page cache either way, and the kernel writes back meanwhile).
    """
    header = fp.header
    meta = provenance_metadata(header.metadata, fp, neuron_set_sha256)
    ranges = fp.ranges

    def body() -> None:
        nonlocal meta
        head = encode_header(header, meta)
        src_fd = os.open(fp.src, os.O_RDONLY)
        try:
            dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_at(dst_fd, head, 0)
                copy_range(src_fd, dst_fd, header.data_start, len(head), header.data_len)
                zero_ranges(dst_fd, len(head), ranges)
                if MODELSPEC_HASH in meta:
                    digest = _data_sha256(dst_fd, len(head), header.data_len)
                    meta = provenance_metadata(header.metadata, fp, neuron_set_sha256, digest)
                    final = encode_header(header, meta)
                    assert len(final) == len(head), "placeholder hash changed the header length"
                    write_at(dst_fd, final, 0)
                if fsync:
                    os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    try:
        guard_write(dst, body)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return meta


@dataclass
class InPlaceResult:
    """What an in-place patch changed."""

    before: DataScan
    metadata: dict[str, str] | None
    metadata_updated: bool


def patch_in_place(fp: FilePlan, neuron_set_sha256: str) -> InPlaceResult:
    """Zero the planned rows inside fp.src itself; update metadata only if it fits the old header.

    Scans the file first (digests used by verification), then writes only the
    row ranges (and the header when the new one fits its padded length), fsyncs.
    """
    header = fp.header
    ranges = fp.ranges
    has_spec = MODELSPEC_HASH in (header.metadata or {})
    before = scan_file(fp.src, header.data_start, ranges, want_zeroed=has_spec)
    meta = provenance_metadata(header.metadata, fp, neuron_set_sha256, before.zeroed_data_sha256)
    try:
        head = encode_header(header, meta, pad_to=header.header_len)
        fits = True
    except ValueError:
        head, fits = b"", False

    def body() -> None:
        fd = os.open(fp.src, os.O_RDWR)
        try:
            zero_ranges(fd, header.data_start, ranges)
            if fits:
                write_at(fd, head, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    guard_write(fp.src, body)
    return InPlaceResult(before=before, metadata=meta if fits else header.metadata, metadata_updated=fits)
