"""Byte-level patching: copy a safetensors file with a new header and zeroed rows, or zero in place.

Tensor bytes are never decoded. A copy is one pass over the input, mapped a
few chunks at a time (``streaming.map_chunks``): the planned ranges are zeroed
in a copy of the chunks that hold them, and the buffer written is the one
hashed into the output SHA-256 (the input's too when asked; digests and writes
on worker threads, write-back started early by ``Flusher``); chunks holding
zeroed ranges are checked against the input as written (``copypass.PassCheck``).
Why this pass and not ``copy_file_range``: docs/apply.md. In place, only the
ranges (and the header, when the new one fits) are written, after one pass that
hashes the input and predicts the output's SHA-256. Memory is a few bounded
chunks, independent of the checkpoint size.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nemo_surgery import __version__
from nemo_surgery.errors import NemoError
from nemo_surgery.surgery.copypass import PassCheck, try_clone, write_at, write_pieces
from nemo_surgery.surgery.plan import FilePlan
from nemo_surgery.surgery.safetensors_file import encode_header
from nemo_surgery.surgery.streaming import (
    CHUNK,
    Hasher,
    advise_sequential,
    inside_pieces,
    map_chunks,
    read_bytes,
    scan_file,
    with_zeros,
)
from nemo_surgery.surgery.testhooks import pause_at
from nemo_surgery.surgery.writeback import Flusher

MODELSPEC_HASH = "modelspec.hash_sha256"


def disk_full(path: Path) -> NemoError:
    """The one-line error for ENOSPC while writing path."""
    return NemoError(f"disk full while writing {path}; free space and rerun (nothing was written)")


def zero_ranges(fd: int, base: int, ranges: list[tuple[int, int]]) -> None:
    """Write zeros over each (offset, length) range, offsets relative to base."""
    if not ranges:
        return
    zeros = bytes(min(CHUNK, max(length for _, length in ranges)))
    for i, (off, length) in enumerate(ranges):
        pos = 0
        while pos < length:
            n = min(len(zeros), length - pos)
            write_at(fd, memoryview(zeros)[:n], base + off + pos)
            pos += n
        if i == 0:
            pause_at("in-place-zeroing")


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


@dataclass
class WrittenCopy:
    """What ``write_patched_copy`` wrote: metadata, header bytes, the digests taken while streaming, the read-back check."""

    metadata: dict[str, str]
    head: bytes
    sha256_in: str | None  # None when the input digest was not asked for (apply --input-sha256)
    sha256_out: str | None  # None when the header was rewritten after streaming (modelspec hash)
    data_sha256_out: str | None  # SHA-256 of the data buffer written, computed only for a modelspec hash
    check: PassCheck | None = None  # what the pass checked in the buffers it wrote
    cloned_from: int | None = None  # data byte from which the data buffer was cloned from the input (reflink)


def _write_chunk(dst_fd: int, out: memoryview | bytearray, at: int, keep: int, pieces: list[tuple[int, int]]) -> None:
    """Write one output chunk at file offset ``at``: its first ``keep`` bytes, then the zeroed pieces beyond keep."""
    write_pieces(dst_fd, memoryview(out)[:keep], at)
    for a, b in pieces:
        if b > keep:
            write_at(dst_fd, memoryview(out)[max(a, keep) : b], at + max(a, keep))


def _stream_copy(
    src_fd: int, dst_fd: int, fp: FilePlan, head: bytes, hash_head: bool, cloned_from: int | None = None,
    hash_input: bool = True,
) -> tuple[str | None, str, PassCheck]:
    """Copy fp's data buffer behind head with zeroed ranges; return (SHA-256 in, SHA-256 out, check of the written bytes).

    The output digest covers head + data when ``hash_head``, else the data buffer
    only. Each input chunk is mapped once (``map_chunks``); the very buffer
    written (the chunk itself, or its copy with the ranges zeroed) is the one
    hashed into the output digest, so the digest is that of the bytes written.
    Writes run in order on a worker thread beside the digests' threads, so on
    two cores the writes and the digest overlap. Chunks that hold zeroed ranges
    are checked against the input (``PassCheck``). With ``cloned_from`` the data
    from that byte on is already in the output (cloned): only the zeroed pieces
    are written there, the rest is still read and hashed. Without ``hash_input``
    the input digest is not taken (None): one SHA-256 pass instead of two, the
    larger part of the pass's CPU (docs/apply.md).
    """
    header, ranges = fp.header, fp.ranges
    base = len(head)
    h_in, h_out = Hasher() if hash_input else None, Hasher()
    writer = ThreadPoolExecutor(max_workers=1)
    flusher = Flusher(dst_fd)
    check = PassCheck()
    try:
        if h_in is not None:
            h_in.submit(read_bytes(src_fd, 0, header.data_start))
        if hash_head:
            h_out.submit(head)
        write_at(dst_fd, head, 0)
        for pos, view, busy in map_chunks(src_fd, header.data_start, header.data_len):
            out = with_zeros(view, pos, ranges)
            if h_in is not None:
                busy.append(h_in.submit(view))
            busy.append(h_out.submit(out))
            keep = len(out) if cloned_from is None else min(max(cloned_from - pos, 0), len(out))
            pieces = inside_pieces(pos, len(out), ranges) if keep < len(out) else []
            written = writer.submit(_write_chunk, dst_fd, out, base + pos, keep, pieces)
            busy.append(written)
            flusher.wrote(len(out))
            if pos == 0:
                written.result()
                pause_at("copy-streaming")
            check.chunk(view, out, pos, ranges)
        writer.shutdown(wait=True)
        check.size_ok = os.fstat(dst_fd).st_size == base + header.data_len
        return h_in.hexdigest() if h_in is not None else None, h_out.hexdigest(), check
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        flusher.finish()
        if h_in is not None:
            h_in.close()
        h_out.close()


def write_patched_copy(
    fp: FilePlan, dst: Path, neuron_set_sha256: str, fsync: bool = True, clone: bool = True, hash_input: bool = True
) -> WrittenCopy:
    """Write fp.src to dst (a fresh temp path) with new metadata and zeroed rows in one pass; fsync unless told not to.

    The output's SHA-256 (and the input's, with ``hash_input``) is computed from
    the very chunks mapped and written, and each buffer holding zeroed rows is
    compared with the input chunk zeroed independently (``WrittenCopy.check``). With a ``modelspec.hash_sha256`` key the header is
    written with a placeholder and rewritten after the pass (same length), so the
    output file's digest is left to verification. Where the filesystem can share
    blocks (reflink) and ``clone`` holds, the data buffer is cloned from the input
    and the header padded to keep the data's block alignment (``copypass.try_clone``);
    only the header and the zeroed rows are then written. dst is removed on any failure;
    ENOSPC becomes one actionable NemoError. Callers that verify before renaming
    pass ``fsync=False`` and fsync while verifying; ``hash_input=False`` skips the
    input's digest (``sha256_in`` is then None).
    """
    header = fp.header
    has_spec = MODELSPEC_HASH in (header.metadata or {})
    meta = provenance_metadata(header.metadata, fp, neuron_set_sha256)
    head = encode_header(header, meta)
    done: list[WrittenCopy] = []

    def body() -> None:
        src_fd = os.open(fp.src, os.O_RDONLY)
        try:
            advise_sequential(src_fd)
            dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                used, cloned_from = try_clone(src_fd, dst_fd, header, meta, head) if clone else (head, None)
                sha_in, sha_out, check = _stream_copy(src_fd, dst_fd, fp, used, not has_spec, cloned_from, hash_input)
                final_meta, final_head, data_sha = meta, used, None
                if has_spec:
                    data_sha, sha_out = sha_out, None
                    final_meta = provenance_metadata(header.metadata, fp, neuron_set_sha256, data_sha)
                    final_head = encode_header(header, final_meta)
                    if len(final_head) < len(used):  # the clone's padding: same length, the spaces kept
                        final_head = encode_header(header, final_meta, pad_to=len(used) - 8)
                    if len(final_head) != len(used):  # a runtime check: must hold under python -O too
                        raise NemoError(f"{fp.src}: internal error: the modelspec hash changed the header length")
                    write_at(dst_fd, final_head, 0)
                if fsync:
                    os.fsync(dst_fd)
                done.append(WrittenCopy(final_meta, final_head, sha_in, sha_out, data_sha, check, cloned_from))
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    try:
        guard_write(dst, body)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return done[0]


@dataclass
class PrePatch:
    """Taken before an in-place patch: the input digest and what verification must find afterwards."""

    sha256_in: str
    predicted_sha256: str  # of the whole patched file, or of its data buffer (see predicts_file)
    predicts_file: bool  # False when the header carries the data digest (modelspec hash)
    head: bytes  # the prefix + header bytes the file holds after patching


@dataclass
class InPlacePlan:
    """An in-place patch decided before any byte is written: digests, header bytes and what they carry."""

    before: PrePatch
    metadata: dict[str, str] | None  # the metadata the file holds afterwards
    write_head: bool  # False: the header bytes stay as they are
    metadata_updated: bool  # provenance keys written
    modelspec_updated: bool | None  # None when the file has no modelspec hash


def _in_place_head(fp: FilePlan, meta: dict[str, str]) -> bytes | None:
    try:
        return encode_header(fp.header, meta, pad_to=fp.header.header_len)
    except ValueError:
        return None


def replace_hash_in_header(fp: FilePlan, old_head: bytes, new_value: str) -> bytes | None:
    """The old header bytes with only the modelspec hash value replaced (same length), or None.

    The value is replaced byte for byte where it occurs exactly once as a JSON
    string; the result is re-parsed and must hold the same tensors and the old
    metadata with only that value changed.
    """
    from nemo_surgery.surgery.safetensors_file import parse_header

    meta = fp.header.metadata or {}
    old_value = meta.get(MODELSPEC_HASH)
    if old_value is None or len(old_value) != len(new_value):
        return None
    old_raw = json.dumps(old_value).encode()
    if old_head.count(old_raw) != 1:
        return None
    head = old_head.replace(old_raw, json.dumps(new_value).encode())
    try:
        parsed = parse_header(head[:8], head[8:], fp.header.file_size)
    except NemoError:
        return None
    same_tensors = parsed.tensors == fp.header.tensors
    if not same_tensors or parsed.metadata != {**meta, MODELSPEC_HASH: new_value}:
        return None
    return head


def plan_in_place(fp: FilePlan, neuron_set_sha256: str) -> InPlacePlan:
    """Hash the file once and decide the header: full provenance if it fits, else the modelspec hash alone.

    One pass hashes the input and predicts the patched digest (of the whole
    file, or of the data buffer when the header must carry that digest). The
    header is rewritten with provenance when it fits the old padded length;
    otherwise, if the file has a ``modelspec.hash_sha256`` of the usual length,
    only that value is rewritten in place (fixed length); otherwise the header
    stays and the modelspec hash, if any, is stale (reported as such).
    """
    header, ranges = fp.header, fp.ranges
    has_spec = MODELSPEC_HASH in (header.metadata or {})
    with open(fp.src, "rb") as fh:
        old_head = fh.read(header.data_start)
    if not has_spec:
        meta = provenance_metadata(header.metadata, fp, neuron_set_sha256)
        head = _in_place_head(fp, meta)
        scan = scan_file(fp.src, header.data_start, ranges, prefix=head if head is not None else old_head)
        before = PrePatch(scan.file_sha256, scan.patched_sha256 or "", True, head if head is not None else old_head)
        if head is None:
            return InPlacePlan(before, header.metadata, False, False, None)
        return InPlacePlan(before, meta, True, True, None)
    scan = scan_file(fp.src, header.data_start, ranges, prefix=b"")
    data_sha = scan.patched_sha256 or ""
    meta = provenance_metadata(header.metadata, fp, neuron_set_sha256, data_sha)
    head = _in_place_head(fp, meta)
    if head is not None:
        return InPlacePlan(PrePatch(scan.file_sha256, data_sha, False, head), meta, True, True, True)
    new_value = meta[MODELSPEC_HASH]
    head = replace_hash_in_header(fp, old_head, new_value)
    if head is not None:
        spec_only = {**(header.metadata or {}), MODELSPEC_HASH: new_value}
        return InPlacePlan(PrePatch(scan.file_sha256, data_sha, False, head), spec_only, True, False, True)
    return InPlacePlan(PrePatch(scan.file_sha256, data_sha, False, old_head), header.metadata, False, False, False)


def write_in_place(fp: FilePlan, plan: InPlacePlan) -> None:
    """Zero the planned rows inside fp.src (and write the planned header); fsync.

    Not atomic: a kill leaves some ranges zeroed and others not. The caller
    journals the edit first (``surgery.journal``); re-running finishes it.
    """
    header = fp.header

    def body() -> None:
        fd = os.open(fp.src, os.O_RDWR)
        try:
            zero_ranges(fd, header.data_start, fp.ranges)
            if plan.write_head:
                write_at(fd, plan.before.head, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    guard_write(fp.src, body)
