"""Parse, validate and re-encode safetensors headers; compute row byte ranges.

Layout of a file: 8-byte little-endian header length N, N bytes of UTF-8 JSON
(possibly space-padded), then the data buffer. Tensor offsets in the header are
relative to the data buffer. Everything here is pure except ``read_header`` and
``cross_check``, which read a file's first bytes (never its tensor data).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError

#: Bytes per element of every dtype safetensors defines with a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Float dtypes whose all-zero bit pattern is +0.0 (the only ones we zero rows in).
ZEROABLE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

#: Largest header we accept (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions a tensor may have (real checkpoints use at most 5).
MAX_DIMS = 32
#: Largest shape dimension, tensor count or offset (beyond anything a file can hold).
MAX_INT = 1 << 62

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a header: dtype, shape and buffer-relative byte span."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first axis) of the tensor."""
        if not self.shape or self.shape[0] == 0:
            return 0
        return self.nbytes // self.shape[0]


@dataclass
class Header:
    """A validated safetensors header and where the data buffer lies in the file."""

    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int
    raw_json: bytes = field(repr=False, default=b"")

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer."""
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        """Length of the data buffer in bytes."""
        return self.file_size - self.data_start


class HeaderError(InputError):
    """A safetensors file whose header is truncated, corrupt or inconsistent."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes a tensor of this shape needs, or None as soon as the product exceeds limit (bounded work)."""
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return None if 0 not in shape else 0
    return total


def parse_header(prefix: bytes, header_json: bytes, file_size: int, name: str = "<file>") -> Header:
    """Validate a header given its 8-byte prefix, its JSON bytes and the file size.

    Checks: size limits, UTF-8 JSON object without duplicate keys, string-to-string
    metadata, known dtypes, shape x itemsize = span, offsets inside the data buffer,
    no overlaps and no gaps (the buffer is exactly covered, as the format requires).
    """

    def bad(what: str) -> HeaderError:
        return HeaderError(f"{name}: corrupt or truncated safetensors file ({what})")

    if len(prefix) != 8:
        raise bad(f"file is only {file_size} bytes")
    n = int.from_bytes(prefix, "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} outside 2..{MAX_HEADER_BYTES}")
    if 8 + n > file_size:
        raise bad(f"header length {n} runs past the end of the {file_size}-byte file")
    if len(header_json) != n:
        raise bad("header shorter than declared")
    if not header_json.startswith(b"{"):
        raise bad("header does not start with '{'")
    try:
        doc = json.loads(header_json.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise bad("__metadata__ must map strings to strings")
        if not all(_utf8(k) and _utf8(v) for k, v in metadata.items()):
            raise bad("__metadata__ holds a string that is not valid Unicode (lone surrogate)")
    data_len = file_size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        shown = key[:80] if _utf8(key) else repr(key[:80])
        if not _utf8(key):
            raise bad(f"tensor name {shown} is not valid Unicode (lone surrogate)")
        if not isinstance(entry, dict):
            raise bad(f"entry {shown!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"{shown}: unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_small_int(d) for d in shape):
            raise bad(f"{shown}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_small_int(o) for o in offsets):
            raise bad(f"{shown}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise bad(f"{shown}: data_offsets [{begin}, {end}] outside the {data_len}-byte data buffer")
        expected = _nbytes(shape, DTYPE_SIZES[dtype], MAX_INT)
        if expected is None or end - begin != expected:
            need = f"{expected}" if expected is not None else f"over {MAX_INT} bytes"
            raise bad(f"{shown}: span {end - begin} bytes but shape {_short(shape)} x {dtype} needs {need}")
        tensors[key] = TensorInfo(key, dtype, tuple(shape), begin, end)
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < cursor:
            raise bad(f"{info.name}: bytes overlap the previous tensor")
        if info.begin > cursor:
            raise bad(f"gap in the data buffer before {info.name}")
        cursor = info.end
    if cursor != data_len:
        raise bad(f"tensors cover {cursor} bytes but the data buffer holds {data_len}")
    return Header(n, tensors, metadata, file_size, header_json)


def read_header(path: str | Path) -> Header:
    """Read and validate the header of a safetensors file (reads only the header bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            body = fh.read(n) if 2 <= n <= MAX_HEADER_BYTES else b""
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(prefix, body, size, str(path))


def cross_check(path: str | Path, header: Header) -> None:
    """Confirm with ``safetensors.safe_open`` that the library sees the same header.

    Opens the file memory-mapped without reading tensor data; raises HeaderError
    when the library rejects the file or disagrees on keys, dtypes, shapes or metadata.
    """
    from safetensors import safe_open

    name = str(path)
    try:
        with safe_open(name, framework="numpy") as f:
            keys = set(f.keys())
            meta = f.metadata()
            seen = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
    except Exception as exc:  # the library raises its own error types
        raise HeaderError(f"{name}: safetensors library rejects the file ({exc})") from None
    ours = {k: (t.dtype, t.shape) for k, t in header.tensors.items()}
    if seen != ours:
        raise HeaderError(f"{name}: safetensors library disagrees with the parsed header")
    if (meta or None) != (header.metadata or None):
        raise HeaderError(f"{name}: safetensors library disagrees on __metadata__")


def encode_header(header: Header, metadata: dict[str, str] | None, pad_to: int | None = None) -> bytes:
    """Return prefix + JSON for header's tensors (same offsets) with new metadata.

    The JSON is space-padded to a multiple of 8 bytes, or to exactly ``pad_to``
    bytes when given (ValueError when it does not fit).
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc[METADATA_KEY] = metadata
    for t in header.tensors.values():
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if pad_to is not None:
        if len(body) > pad_to:
            raise ValueError(f"header needs {len(body)} bytes, only {pad_to} available")
        length = pad_to
    else:
        length = len(body) + (-len(body) % 8)
    body = body.ljust(length, b" ")
    return len(body).to_bytes(8, "little") + body


def coalesce_rows(rows: list[int]) -> list[tuple[int, int]]:
    """Group sorted row indices into (first_row, count) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in sorted(set(rows)):
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def row_ranges(tensor: TensorInfo, rows: list[int]) -> list[tuple[int, int]]:
    """Buffer-relative (offset, length) byte ranges of the given rows, adjacent rows coalesced."""
    rb = tensor.row_bytes
    return [(tensor.begin + first * rb, count * rb) for first, count in coalesce_rows(rows)]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (offset, length) ranges and merge touching or overlapping ones."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            prev_off, prev_len = out[-1]
            out[-1] = (prev_off, max(prev_len, off + length - prev_off))
        else:
            out.append((off, length))
    return out
