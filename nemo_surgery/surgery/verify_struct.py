"""Structural verification of a patched file as on disk: header, tensor table, zero rows, untouched bytes.

A copy is checked from what its copy pass wrote, with its header and rows read
back (``verify_written``), or re-read in full and compared with the input in
bounded chunks (``verify_copy``: one memcmp per chunk against the input with the
rows zeroed); an in-place patch is re-hashed and matched against the digest
predicted before patching.
Failures are returned as checks, not raised.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import NemoError
from nemo_surgery.surgery.patch import MODELSPEC_HASH, PrePatch, WrittenCopy
from nemo_surgery.surgery.plan import FilePlan
from nemo_surgery.surgery.safetensors_file import Header, cross_check, read_header
from nemo_surgery.surgery.streaming import (
    CHUNK,
    BufferRing,
    Hasher,
    advise_sequential,
    comparable,
    is_zero,
    read_bytes,
    read_exact,
    scan_file,
    segments,
    with_zeros,
)


@dataclass
class Check:
    """One named verification check and its outcome."""

    name: str
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON form for reports."""
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class FileVerification:
    """The checks and digests of one patched output file."""

    rel: str
    output: Path
    sha256_in: str | None = None
    sha256_out: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a check; return ok."""
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)


@dataclass
class CompareResult:
    """Outcome of streaming a patched output against its input."""

    head_as_written: bool
    targets_zero: bool
    others_identical: bool
    first_difference: int | None
    sha256_out: str | None


def _classify(in_view: memoryview, out_view: memoryview, pos: int, ranges: list[tuple[int, int]]) -> tuple[bool, int | None]:
    """For a chunk that differs from expectations: (targets in it all zero, first differing byte outside them)."""
    zero, first = True, None
    for a, b, inside in segments(pos, len(in_view), ranges):
        if inside:
            zero = zero and is_zero(out_view[a:b])
        elif first is None and bytes(in_view[a:b]) != bytes(out_view[a:b]):
            first = pos + next(i for i in range(a, b) if in_view[i] != out_view[i])
    return zero, first


def compare_files(
    src: Path, src_header: Header, out: Path, head: bytes, ranges: list[tuple[int, int]], hash_out: bool = False
) -> CompareResult:
    """Re-read out and check it byte for byte: head as written, then the input's data with ranges zeroed.

    Both files are read in parallel into reused buffers (the input on a worker
    thread); each expected chunk (input chunk, with a zeroed copy where a range
    touches it) is compared to the output chunk with one memcmp. With
    ``hash_out`` the output's SHA-256 is computed from the bytes read, on a thread.
    """
    h_out = Hasher() if hash_out else None
    reader = ThreadPoolExecutor(max_workers=1)
    fd_in, fd_out = os.open(src, os.O_RDONLY), os.open(out, os.O_RDONLY)
    try:
        advise_sequential(fd_in)
        advise_sequential(fd_out)
        out_size = os.fstat(fd_out).st_size
        disk_head = read_bytes(fd_out, 0, min(len(head), out_size))
        if h_out is not None:
            h_out.submit(disk_head)
        data_len, out_len = src_header.data_len, out_size - len(disk_head)
        common = max(min(data_len, out_len), 0)
        diffs = [] if out_len == data_len else [common]  # a size mismatch differs right after the common part
        zero = True
        ring = BufferRing()
        in_buf = memoryview(bytearray(ring.size))
        pos = 0
        while pos < common:
            n = min(ring.size, common - pos)
            in_view = in_buf[:n]
            reading = reader.submit(read_exact, fd_in, in_view, src_header.data_start + pos)
            out_buf, busy = ring.take()
            out_view = memoryview(out_buf)[:n]
            read_exact(fd_out, out_view, len(head) + pos)
            if h_out is not None:
                busy.append(h_out.submit(out_view))
            reading.result()
            if comparable(with_zeros(in_view, pos, ranges)) != comparable(out_view):
                chunk_zero, chunk_first = _classify(in_view, out_view, pos, ranges)
                zero = zero and chunk_zero
                diffs += [chunk_first] if chunk_first is not None else []
            pos += n
        ring.drain()
        first = min(diffs) if diffs else None
        return CompareResult(disk_head == head, zero, first is None, first, h_out.hexdigest() if h_out else None)
    finally:
        os.close(fd_in)
        os.close(fd_out)
        reader.shutdown(wait=True)
        if h_out is not None:
            h_out.close()


def _header_checks(result: FileVerification, fp: FilePlan, path: Path, metadata: dict[str, str] | None) -> Header | None:
    try:
        out_header = read_header(path)
        cross_check(path, out_header)
    except NemoError as exc:
        result.add("header valid", False, str(exc))
        return None
    result.add("header valid", True, "parsed, validated and cross-checked with safetensors.safe_open")
    same = [(t.name, t.dtype, t.shape, t.begin, t.end) for t in out_header.tensors.values()] == [
        (t.name, t.dtype, t.shape, t.begin, t.end) for t in fp.header.tensors.values()
    ]
    result.add("tensor table unchanged", same, f"{len(out_header.tensors)} tensors, same dtypes, shapes and offsets")
    result.add(
        "metadata as planned",
        (out_header.metadata or None) == (metadata or None),
        "original keys kept, nemo_surgery.* provenance added" if metadata else "no metadata",
    )
    return out_header if same else None


def _modelspec_check(result: FileVerification, metadata: dict[str, str] | None, data_sha256: str) -> None:
    if metadata and MODELSPEC_HASH in metadata:
        value = metadata[MODELSPEC_HASH].removeprefix("0x")
        result.add("modelspec.hash_sha256 matches data buffer", value == data_sha256, data_sha256)


def verify_copy(fp: FilePlan, out: Path, written: WrittenCopy, rel: str | None = None) -> FileVerification:
    """Verify a patched copy ``out`` of ``fp.src`` as it is on disk, against the plan and what was written.

    One memcmp pass proves the output equals the header written plus the input's
    data with the ranges zeroed, i.e. exactly the bytes hashed while writing, so
    the SHA-256 recorded then is the digest of the file on disk. When the header
    was rewritten after the pass (modelspec hash) the output is hashed from disk.
    """
    result = FileVerification(rel=rel or str(fp.rel), output=out, sha256_in=written.sha256_in)
    metadata = written.metadata
    if _header_checks(result, fp, out, metadata) is None:
        return result
    cmp = compare_files(fp.src, fp.header, out, written.head, fp.ranges, hash_out=written.sha256_out is None)
    result.sha256_out = written.sha256_out or cmp.sha256_out
    how = (
        "sha256_out computed while writing; on-disk bytes verified equal by comparison"
        if written.sha256_out
        else "sha256_out computed from the on-disk bytes"
    )
    result.add("header bytes as written", cmp.head_as_written, how)
    result.add("targeted rows all zero", cmp.targets_zero, f"{fp.bytes_zeroed} bytes in {len(fp.ranges)} ranges")
    result.add(
        "all other bytes identical",
        cmp.others_identical,
        "output re-read after writing and compared byte for byte with the input (memcmp)"
        if cmp.others_identical
        else f"first difference at data byte {cmp.first_difference}",
    )
    # the data on disk equals the bytes hashed into data_sha256_out when both checks above pass
    _modelspec_check(result, metadata, written.data_sha256_out or "")
    return result


def verify_written(fp: FilePlan, out: Path, written: WrittenCopy, rel: str | None = None) -> FileVerification:
    """Verify a patched copy from what its copy pass wrote, without reading the whole output again.

    The pass hashed into ``sha256_out`` the very buffers it wrote and checked
    each buffer holding zeroed ranges against the input (``copypass.PassCheck``);
    here the header is re-read, validated and compared byte for byte, the rows are
    read back from the file and must be zero, and the file size must be header +
    data. Without a pass check, or when the header was rewritten after the pass
    (modelspec hash: the file's digest needs the final header), this is
    ``verify_copy``: the output is re-read, compared and hashed.
    """
    check = written.check
    if check is None or written.sha256_out is None:
        return verify_copy(fp, out, written, rel=rel)
    result = FileVerification(rel=rel or str(fp.rel), output=out, sha256_in=written.sha256_in)
    if _header_checks(result, fp, out, written.metadata) is None:
        return result
    with open(out, "rb") as fh:
        disk_head = fh.read(len(written.head))
    result.add("header bytes as written", disk_head == written.head, "prefix and JSON header read back")
    zero = check.targets_zero and ranges_all_zero(out, len(written.head), fp.ranges)
    result.add("targeted rows all zero", zero, f"{fp.bytes_zeroed} bytes in {len(fp.ranges)} ranges, zero as "
               "written and read back")
    if check.others_identical and written.cloned_from is not None:
        how = (f"data from byte {written.cloned_from} on cloned from the input's blocks (reflink, FICLONERANGE: shared "
               "by the filesystem, never copied), the rest written from the buffers read; rows written over the clone "
               "and read back; file size is header + data; sha256_out hashed from the input's bytes with the rows zeroed")
    elif check.others_identical:
        how = ("every byte written outside the rows is the input's, from the same buffer it was read into (chunks "
               "holding rows compared with the input, memcmp); file size is header + data; sha256_out hashed from "
               "the buffers written")
    elif check.first_difference is not None:
        how = f"first difference at data byte {check.first_difference}"
    else:
        how = "output size differs from header + data buffer"
    result.add("all other bytes identical", check.others_identical, how)
    result.sha256_out = written.sha256_out
    return result


def ranges_all_zero(path: Path, base: int, ranges: list[tuple[int, int]]) -> bool:
    """True when every (offset, length) range, offsets relative to base, reads back as zeros."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, length in ranges:
            pos = 0
            while pos < length:
                n = min(CHUNK, length - pos)
                if not is_zero(read_bytes(fd, base + off + pos, n)):
                    return False
                pos += n
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def verify_in_place(fp: FilePlan, before: PrePatch, metadata: dict[str, str] | None) -> FileVerification:
    """Verify an in-place patch of ``fp.src`` as it is on disk, against what was predicted before patching.

    The rows are read back and checked for zeros; one hashing pass of the file
    must reproduce the digest predicted from the input with the rows zeroed and
    the new header (or, with a modelspec hash, the data buffer's digest plus the
    header bytes), which proves every other byte unchanged.
    """
    result = FileVerification(rel=str(fp.rel), output=fp.src, sha256_in=before.sha256_in)
    out_header = _header_checks(result, fp, fp.src, metadata)
    if out_header is None:
        return result
    with open(fp.src, "rb") as fh:
        disk_head = fh.read(len(before.head))
    after = scan_file(fp.src, out_header.data_start, [], prefix=None if before.predicts_file else b"")
    result.sha256_out = after.file_sha256
    result.add("header bytes as written", disk_head == before.head, "prefix and JSON header read back")
    zero = ranges_all_zero(fp.src, out_header.data_start, fp.ranges)
    result.add("targeted rows all zero", zero, f"{fp.bytes_zeroed} bytes in {len(fp.ranges)} ranges, read back")
    if before.predicts_file:
        same = after.file_sha256 == before.predicted_sha256
        how = "SHA-256 of the file after patching equals the one predicted from the input with the rows zeroed"
    else:
        same = after.patched_sha256 == before.predicted_sha256
        how = "SHA-256 of the data buffer after patching equals the one predicted from the input with the rows zeroed"
    result.add("all other bytes identical", same, how)
    if metadata != fp.header.metadata:  # an unchanged header keeps the input's own (now stale) value
        _modelspec_check(result, metadata, after.patched_sha256 or "")
    return result


def verify_mirrored(rel: str, src: Path, dst: Path) -> FileVerification:
    """Check that an unpatched file of a folder reached the output as an independent copy with the same bytes.

    Sharing the input's inode (a hard link) fails: writing into the output would change the input.
    """
    result = FileVerification(rel=rel, output=dst)
    try:
        s, d = src.stat(), dst.stat()
    except OSError as exc:
        result.add("file present", False, str(exc))
        return result
    if (s.st_dev, s.st_ino) == (d.st_dev, d.st_ino):
        result.add("mirrored", False, "shares the input's inode (hard link): writing the output would change the input")
    else:
        same = s.st_size == d.st_size and _sha(src) == _sha(dst)
        result.add("mirrored", same, "copied, bytes identical" if same else "copy differs from the input")
    return result


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()
