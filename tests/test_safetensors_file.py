"""Header parsing, validation, re-encoding and row byte ranges of safetensors files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_surgery.surgery.safetensors_file import (
    HeaderError,
    TensorInfo,
    coalesce_rows,
    cross_check,
    encode_header,
    merge_ranges,
    read_header,
    row_ranges,
)


def _file(tmp_path: Path, header: dict, data: bytes, name: str = "x.safetensors") -> Path:
    body = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _valid(tmp_path: Path) -> Path:
    path = tmp_path / "ok.safetensors"
    save_file(
        {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, 2, dtype=torch.bfloat16)},
        str(path),
        metadata={"k": "v"},
    )
    return path


def test_read_valid_header_matches_library(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    h = read_header(path)
    assert set(h.tensors) == {"a", "b"}
    assert h.tensors["a"].shape == (3, 4) and h.tensors["a"].dtype == "F32"
    assert h.tensors["a"].row_bytes == 16
    assert h.metadata == {"k": "v"}
    assert h.data_start + h.data_len == path.stat().st_size
    cross_check(path, h)
    # the row byte range really holds that row
    t = h.tensors["a"]
    with open(path, "rb") as fh:
        fh.seek(h.data_start + t.begin + 2 * t.row_bytes)
        assert torch.frombuffer(bytearray(fh.read(t.row_bytes)), dtype=torch.float32).tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), "needs 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "outside"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            bytes(8),
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "cover"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "non-negative"),
        ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "strings"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_invalid_headers_are_refused(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _file(tmp_path, header, data)
    with pytest.raises(HeaderError, match=message):
        read_header(path)


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    good = _valid(tmp_path).read_bytes()
    cases = {
        "short.safetensors": good[:5],
        "cut_header.safetensors": good[:20],
        "cut_data.safetensors": good[:-3],
        "huge_len.safetensors": struct.pack("<Q", 10**12) + b"{}",
        "not_json.safetensors": struct.pack("<Q", 4) + b"{abc",
        "dup.safetensors": struct.pack("<Q", 17) + b'{"a":{},"a":{} } ',
        "empty.safetensors": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(HeaderError, match="corrupt or truncated"):
            read_header(path)


def test_encode_header_keeps_offsets_and_loads(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    h = read_header(path)
    new = encode_header(h, {"k": "v", "nemo_surgery.x": "1"})
    assert (len(new) - 8) % 8 == 0
    out = tmp_path / "re.safetensors"
    with open(path, "rb") as fh:
        fh.seek(h.data_start)
        out.write_bytes(new + fh.read())
    h2 = read_header(out)
    cross_check(out, h2)
    assert [(t.begin, t.end) for t in h2.tensors.values()] == [(t.begin, t.end) for t in h.tensors.values()]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["nemo_surgery.x"] == "1"
        assert torch.equal(f.get_tensor("a"), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    padded = encode_header(h, None, pad_to=h.header_len + 100)
    assert len(padded) - 8 == h.header_len + 100
    with pytest.raises(ValueError):
        encode_header(h, {"x" * 500: "y"}, pad_to=h.header_len)


def test_cross_check_detects_disagreement(tmp_path: Path) -> None:
    path = _valid(tmp_path)
    h = read_header(path)
    h.metadata = {"other": "value"}
    with pytest.raises(HeaderError, match="disagrees"):
        cross_check(path, h)


def test_row_ranges_coalesce_adjacent_rows() -> None:
    assert coalesce_rows([7, 1, 2, 3, 9, 8]) == [(1, 3), (7, 3)]
    t = TensorInfo("w", "F16", (10, 4), 100, 180)
    assert t.row_bytes == 8
    assert row_ranges(t, [0, 1, 5]) == [(100, 16), (140, 8)]
    assert merge_ranges([(10, 5), (0, 10), (30, 2), (31, 4)]) == [(0, 15), (30, 5)]
