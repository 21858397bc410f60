"""Structural verification of a patched file: header, tensor table, zero rows, untouched bytes.

Re-opens the output and compares it with the input by streaming both in
bounded chunks (memcmp); SHA-256 digests run on worker threads while the main
thread compares. Failures are returned as checks, not raised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NemoError
from .patch import MODELSPEC_HASH
from .streaming import CHUNK, DataScan, HashStream, is_zero, scan_file, segments
from .plan import FilePlan
from .safetensors_file import Header, cross_check, read_header


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
    """Outcome of streaming an input and an output data buffer side by side."""

    sha256_in: str
    sha256_out: str
    out_data_sha256: str | None
    targets_zero: bool
    others_identical: bool
    first_difference: int | None


def compare_files(
    src: Path,
    src_header: Header,
    out: Path,
    out_header: Header,
    ranges: list[tuple[int, int]],
    want_data_sha: bool = False,
    hash_input: bool = True,
) -> CompareResult:
    """Stream both files: full SHA-256s, ranges all zero in out, all other data bytes equal.

    Comparison is memcmp on bounded chunks; the digests run on worker threads.
    With ``hash_input=False`` the input digest is left empty (the caller has it).
    """
    h_in, h_out = (HashStream() if hash_input else _NoHash()), HashStream()
    h_data = HashStream() if want_data_sha else None
    targets_zero, first_diff = True, None
    with open(src, "rb") as fin, open(out, "rb") as fout:
        h_in.update(fin.read(src_header.data_start))
        h_out.update(fout.read(out_header.data_start))
        pos = 0
        while True:
            c_in, c_out = fin.read(CHUNK), fout.read(CHUNK)
            if len(c_in) != len(c_out):
                first_diff = pos + min(len(c_in), len(c_out)) if first_diff is None else first_diff
            if not c_in or not c_out:
                break
            h_in.update(c_in)
            h_out.update(c_out)
            if h_data is not None:
                h_data.update(c_out)
            pieces = list(segments(pos, len(c_in), ranges))
            if len(pieces) == 1 and not pieces[0][2]:
                if first_diff is None and c_in != c_out:
                    first_diff = pos
            else:
                for a, b, inside in pieces:
                    if inside:
                        targets_zero = targets_zero and is_zero(c_out[a:b])
                    elif first_diff is None and c_in[a:b] != c_out[a:b]:
                        first_diff = pos + a
            pos += len(c_in)
    return CompareResult(
        h_in.hexdigest(),
        h_out.hexdigest(),
        h_data.hexdigest() if h_data else None,
        targets_zero,
        first_diff is None,
        first_diff,
    )


class _NoHash:
    """A stand-in HashStream that hashes nothing."""

    def update(self, data: bytes) -> None:
        """Ignore data."""

    def hexdigest(self) -> str:
        """No digest."""
        return ""


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


def verify_copy(
    fp: FilePlan, out: Path, metadata: dict[str, str], rel: str | None = None, sha256_in: str | None = None
) -> FileVerification:
    """Verify a patched copy ``out`` of ``fp.src`` against the plan and the metadata written.

    ``sha256_in`` may carry the input's digest when the caller computed it already.
    """
    result = FileVerification(rel=rel or str(fp.rel), output=out)
    out_header = _header_checks(result, fp, out, metadata)
    if out_header is None:
        return result
    want = bool(metadata and MODELSPEC_HASH in metadata)
    cmp = compare_files(
        fp.src, fp.header, out, out_header, fp.ranges, want_data_sha=want, hash_input=not sha256_in
    )
    result.sha256_in, result.sha256_out = sha256_in or cmp.sha256_in, cmp.sha256_out
    result.add("targeted rows all zero", cmp.targets_zero, f"{fp.bytes_zeroed} bytes in {len(fp.ranges)} ranges")
    result.add(
        "all other bytes identical",
        cmp.others_identical,
        "streamed byte comparison of the data buffers"
        if cmp.others_identical
        else f"first difference at data byte {cmp.first_difference}",
    )
    _modelspec_check(result, metadata, cmp.out_data_sha256 or "")
    return result


def verify_in_place(fp: FilePlan, before: DataScan, metadata: dict[str, str] | None) -> FileVerification:
    """Verify an in-place patch of ``fp.src`` using the digests taken before patching."""
    result = FileVerification(rel=str(fp.rel), output=fp.src, sha256_in=before.file_sha256)
    out_header = _header_checks(result, fp, fp.src, metadata)
    if out_header is None:
        return result
    has_spec = bool(metadata and MODELSPEC_HASH in metadata)
    after = scan_file(fp.src, out_header.data_start, fp.ranges, want_zeroed=has_spec)
    result.sha256_out = after.file_sha256
    result.add("targeted rows all zero", after.targets_zero, f"{fp.bytes_zeroed} bytes in {len(fp.ranges)} ranges")
    result.add(
        "all other bytes identical",
        after.kept_sha256 == before.kept_sha256,
        "SHA-256 of every byte outside the rows, before vs after",
    )
    _modelspec_check(result, metadata, after.zeroed_data_sha256 or "")
    return result


def verify_mirrored(rel: str, src: Path, dst: Path) -> FileVerification:
    """Check that an unpatched file of a folder reached the output unchanged (same inode or same bytes)."""
    result = FileVerification(rel=rel, output=dst)
    try:
        s, d = src.stat(), dst.stat()
    except OSError as exc:
        result.add("file present", False, str(exc))
        return result
    if (s.st_dev, s.st_ino) == (d.st_dev, d.st_ino):
        result.add("mirrored", True, "hard link to the input")
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
