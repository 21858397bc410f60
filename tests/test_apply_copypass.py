"""The copy pass at copy speed: one read of the input, the written buffers hashed and checked, no full re-read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from nemo_surgery.neuron_set import load_neuron_set
from nemo_surgery.provenance import sha256_file
from nemo_surgery.surgery import verify_struct
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.surgery.copypass import PassCheck, write_pieces
from nemo_surgery.surgery.discover import discover
from nemo_surgery.surgery.patch import write_patched_copy
from nemo_surgery.surgery.plan import build_plan
from tests.checkpoint_fixtures import DEFAULT_NEURONS, write_ldm_file, write_neuron_set


def _zeroed(data: bytes, ranges: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for off, length in ranges:
        out[off : off + length] = bytes(length)
    return out


def test_pass_check_accepts_exact_buffers_and_locates_what_is_wrong() -> None:
    data = bytes(range(1, 201))
    ranges = [(10, 5), (100, 20)]
    src = memoryview(bytearray(data))
    check = PassCheck()
    check.chunk(src, src, 0, ranges)  # a chunk written as read is the input's own view
    check.chunk(src, _zeroed(data, ranges), 0, ranges)
    assert check.targets_zero and check.others_identical
    bad_row = _zeroed(data, ranges)
    bad_row[105] = 9  # inside the second range
    check.chunk(src, bad_row, 0, ranges)
    assert not check.targets_zero and check.others_identical
    check = PassCheck()
    bad_other = _zeroed(data, ranges)
    bad_other[150] ^= 0xFF  # outside the ranges, at data byte 1000 + 150
    check.chunk(src, bad_other, 1000, [(1010, 5), (1100, 20)])  # the same rows, chunk at data byte 1000
    assert check.targets_zero and check.first_difference == 1150 and not check.others_identical
    check = PassCheck()
    check.chunk(src, bytes(src), 0, ranges)  # rows left unzeroed: only the targets are wrong
    assert not check.targets_zero and check.first_difference is None


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_write_pieces_writes_every_byte_in_place(tmp_path: Path, piece: int) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "f.bin"
    path.write_bytes(b"H" * 13)
    fd = os.open(path, os.O_RDWR)
    try:
        write_pieces(fd, memoryview(data), 13, piece)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"H" * 13 + data


def _plan(tmp_path: Path, **kwargs):
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", **kwargs)
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    return src, ns, build_plan(discover(src), load_neuron_set(ns)).files[0]


def test_verify_written_reads_rows_and_header_back(tmp_path: Path) -> None:
    _src, _ns, fp = _plan(tmp_path)
    out = tmp_path / "out.safetensors"
    written = write_patched_copy(fp, out, "x" * 64)
    assert written.check is not None and written.check.targets_zero and written.check.others_identical
    assert written.sha256_out == sha256_file(out)
    good = verify_struct.verify_written(fp, out, written)
    assert good.ok, good.checks
    base = len(written.head)
    off = fp.ranges[0][0]
    with open(out, "r+b") as fh:  # a row changed on disk after the pass: the read-back sees it
        fh.seek(base + off)
        fh.write(b"\x01")
    assert {c.name for c in verify_struct.verify_written(fp, out, written).checks if not c.ok} == {
        "targeted rows all zero"
    }
    with open(out, "r+b") as fh:
        fh.seek(base + off)
        fh.write(b"\x00")
        fh.seek(20)
        fh.write(b"X")  # inside the JSON header
    failed = {c.name for c in verify_struct.verify_written(fp, out, written).checks if not c.ok}
    assert failed & {"header valid", "header bytes as written"}


def test_verify_written_reports_a_failed_pass(tmp_path: Path) -> None:
    _src, _ns, fp = _plan(tmp_path)
    out = tmp_path / "out.safetensors"
    written = write_patched_copy(fp, out, "x" * 64)
    written.check = PassCheck(first_difference=123)
    bad = verify_struct.verify_written(fp, out, written)
    assert [(c.name, c.detail) for c in bad.checks if not c.ok] == [
        ("all other bytes identical", "first difference at data byte 123")
    ]
    written.check = PassCheck(size_ok=False)
    assert not verify_struct.verify_written(fp, out, written).ok


def test_apply_does_not_reread_the_output_except_for_a_modelspec_hash(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    real = verify_struct.compare_files

    def counting(src, header, out, *args, **kwargs):
        calls.append(Path(out))
        return real(src, header, out, *args, **kwargs)

    monkeypatch.setattr(verify_struct, "compare_files", counting)
    src, ns, fp = _plan(tmp_path)
    result = run_apply(src, ns, input_sha256=True)
    assert result.ok and calls == []
    f = result.files[0]
    assert f.verification.sha256_out == sha256_file(result.output)
    assert f.verification.sha256_in == sha256_file(src)
    with open(result.output, "rb") as fh:
        data = fh.read()
    head_len = len(data) - fp.header.data_len
    with open(src, "rb") as fh:
        assert data[head_len:] == _zeroed(fh.read()[fp.header.data_start :], fp.ranges)
    # with a modelspec hash the header carries the data digest, so the file's digest needs a second pass
    spec = tmp_path / "spec"
    spec.mkdir()
    src2 = write_ldm_file(spec / "m.safetensors", "fp16", metadata={"modelspec.hash_sha256": "0x00"})
    result = run_apply(src2, ns)
    assert result.ok and len(calls) == 1
    assert result.files[0].verification.sha256_out == hashlib.sha256(result.output.read_bytes()).hexdigest()


def _heavy_modules_after(call: str) -> str:
    """Run `call` (which sets `done`) in a fresh interpreter; return the heavy modules it imported, as printed."""
    import subprocess
    import sys

    code = ("import sys; from nemo_surgery.workflow import apply_and_verify;"
            f"{call}; assert done.applied.ok;"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_apply_without_verify_never_imports_torch(tmp_path: Path) -> None:
    """`apply --no-verify` stays small: importing torch alone costs about 200 MB of RSS and seconds."""
    src, ns, _fp = _plan(tmp_path)
    assert _heavy_modules_after(f"done = apply_and_verify({str(src)!r}, {str(ns)!r}, verify=None)") == "[]"


def test_cli_start_imports_neither_numpy_nor_torch() -> None:
    """The CLI's start (every command's flags, apply --no-verify's whole path) imports no numpy: about 0.15 s saved."""
    import subprocess
    import sys

    code = ("import sys, nemo_surgery.cli.main;"
            "print(sorted(m for m in ('numpy', 'torch', 'diffusers', 'transformers') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_apply_of_an_unsamplable_file_never_imports_torch(tmp_path: Path) -> None:
    """A UNet-only file cannot be verified: apply with verification on decides that from the header, without torch."""
    from tests.checkpoint_fixtures import write_unet_file

    src = write_unet_file(tmp_path / "unet.safetensors", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    call = ("from nemo_surgery.verify.options import VerifyOptions;"
            f"done = apply_and_verify({str(src)!r}, {str(ns)!r}, verify=VerifyOptions());"
            "assert done.verified is None")
    assert _heavy_modules_after(call) == "[]"


def test_aligned_json_length_keeps_the_data_offset_modulo_the_block() -> None:
    from nemo_surgery.surgery.copypass import aligned_json_length

    for data_start in (88, 4104, 5008, 8208, 1 << 20):
        for needed in (80, 4088, 4096, 9000):
            for block in (512, 4096, 65536):
                length = aligned_json_length(needed, data_start, block)
                assert needed <= length < needed + block
                assert (8 + length - data_start) % block == 0


def _can_clone(folder: Path) -> bool:
    from nemo_surgery.surgery.copypass import clone_tail

    a, b = folder / ".probe-a", folder / ".probe-b"
    a.write_bytes(bytes(8192))
    try:
        with open(a, "rb") as fa, open(b, "wb") as fb:
            return clone_tail(fa.fileno(), fb.fileno(), 0, 0)
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


def test_without_reflink_nothing_is_cloned_and_the_header_is_not_padded(tmp_path: Path) -> None:
    from nemo_surgery.surgery.safetensors_file import encode_header

    if _can_clone(tmp_path):
        pytest.skip("tmp_path is on a filesystem with reflink: see test_reflink_clones_the_data_and_keeps_the_input")
    _src, _ns, fp = _plan(tmp_path)
    written = write_patched_copy(fp, tmp_path / "out.safetensors", "x" * 64)
    assert written.cloned_from is None
    assert written.head == encode_header(fp.header, written.metadata)


REFLINK_DIR = os.environ.get("NEMO_SURGERY_REFLINK_DIR")


@pytest.mark.skipif(not REFLINK_DIR, reason="set NEMO_SURGERY_REFLINK_DIR to a folder on btrfs or XFS with reflink")
@pytest.mark.parametrize("metadata", [None, {"modelspec.hash_sha256": "0x00"}])
def test_reflink_clones_the_data_and_keeps_the_input(tmp_path: Path, metadata) -> None:
    """On a copy-on-write filesystem the data is cloned: rows written over the clone must not reach the input."""
    import shutil
    import tempfile

    from nemo_surgery.surgery.copypass import clone_block

    folder = Path(tempfile.mkdtemp(dir=REFLINK_DIR))
    try:
        assert _can_clone(folder), f"{REFLINK_DIR}: cannot clone here"
        src, ns, fp = _plan(folder, metadata=metadata)
        original = src.read_bytes()
        out = folder / "out.safetensors"
        written = write_patched_copy(fp, out, "x" * 64)
        with open(out, "rb") as fh:
            block = clone_block(fh.fileno())
        assert written.cloned_from is not None and block is not None
        assert (len(written.head) - fp.header.data_start) % block == 0
        data = out.read_bytes()
        assert data[: len(written.head)] == written.head
        assert data[len(written.head) :] == _zeroed(original[fp.header.data_start :], fp.ranges)
        assert src.read_bytes() == original, "the rows written over the clone changed the input"
        checked = verify_struct.verify_written(fp, out, written)
        assert checked.ok, checked.checks
        assert checked.sha256_out == hashlib.sha256(data).hexdigest()
        result = run_apply(src, ns)
        assert result.ok and result.files[0].verification.sha256_out == sha256_file(result.output)
        assert src.read_bytes() == original
        if metadata is None:
            assert any("cloned from the input's blocks" in c.detail for c in result.files[0].verification.checks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _small_chunks(monkeypatch, mappable: bool) -> None:
    """10 kB chunks; with ``mappable`` false every mmap fails as on a filesystem that cannot map (ENODEV)."""
    from nemo_surgery.surgery import streaming

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(streaming, "CHUNK", 10_000)
    if not mappable:
        monkeypatch.setattr(streaming.mmap, "mmap", refuse)


@pytest.mark.parametrize("mappable", [True, False])
def test_map_chunks_yields_the_file_and_keeps_few_chunks_mapped(tmp_path: Path, monkeypatch, mappable: bool) -> None:
    """Chunks (unaligned size and start) are the file's bytes; at most `depth` stay mapped; unmappable files are read."""
    import mmap as mmap_module

    from nemo_surgery.surgery import streaming

    data = os.urandom(100_003)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    _small_chunks(monkeypatch, mappable)
    fd = os.open(path, os.O_RDONLY)
    try:
        got, views, kinds = bytearray(), [], set()
        for pos, view, _busy in streaming.map_chunks(fd, 77, len(data) - 77, depth=2):
            assert pos == len(got)
            got += view
            views.append(view)
            kinds.add(type(view.obj))
            if mappable and len(views) > 2:
                with pytest.raises(ValueError):  # released: the chunk two before this one is unmapped
                    bytes(views[-3])
        assert bytes(got) == data[77:]
        assert len(views) == 10 and kinds == {mmap_module.mmap if mappable else bytearray}
    finally:
        os.close(fd)


@pytest.mark.parametrize("mappable", [True, False])
def test_map_chunks_raises_the_error_of_a_job_on_its_last_chunk(tmp_path: Path, monkeypatch, mappable: bool) -> None:
    """A failed job (a write, a digest) queued on the last chunk surfaces when the iteration ends, mapped or read."""
    from concurrent.futures import Future

    from nemo_surgery.surgery import streaming

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(50_000))
    _small_chunks(monkeypatch, mappable)
    failed: Future = Future()
    failed.set_exception(OSError(28, "No space left on device"))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="No space left"):
            for pos, _view, busy in streaming.map_chunks(fd, 0, 50_000):
                if pos == 40_000:
                    busy.append(failed)
    finally:
        os.close(fd)


def test_map_chunks_fails_like_a_read_when_the_file_shrinks(tmp_path: Path, monkeypatch) -> None:
    """A file truncated between chunks raises OSError (EIO) before the next mapping, never SIGBUS."""
    from nemo_surgery.surgery import streaming

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(50_000))
    monkeypatch.setattr(streaming, "CHUNK", 10_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ended before its header says"):
            for pos, _view, _busy in streaming.map_chunks(fd, 0, 50_000):
                if pos == 10_000:
                    os.truncate(path, 25_000)
    finally:
        os.close(fd)
