"""apply on single files, diffusers folders and sharded sets: exact bytes, provenance, reports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from nemo_surgery.provenance import sha256_file
from nemo_surgery.surgery.apply import run_apply
from nemo_surgery.surgery.safetensors_file import read_header
from tests.checkpoint_fixtures import (
    DEFAULT_NEURONS,
    REAL_LAYER,
    assert_patched,
    expected_zeroed,
    write_ldm_file,
    write_neuron_set,
    write_pipeline,
    write_unet_file,
)


def _data_sha(path: Path) -> str:
    h = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(h.data_start)
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_single_file_with_ema_copies(tmp_path: Path, dtype: str) -> None:
    src = write_ldm_file(tmp_path / "model.safetensors", dtype, metadata={"modelspec.hash_sha256": "0x00", "a": "b"})
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    before = sha256_file(src)
    result = run_apply(src, ns)
    out = tmp_path / "model-nemo.safetensors"
    assert result.ok and result.output == out and result.layout == "ldm-single-file"
    assert sha256_file(src) == before, "input must not change"
    assert_patched(src, out, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    assert {t.role for t in result.files[0].plan.tensors} == {"value", "ema"}
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["a"] == "b"
    assert meta["nemo_surgery.neuron_set_sha256"] == sha256_file(ns)
    assert json.loads(meta["nemo_surgery.rows_zeroed"])[
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    ] == 5
    assert meta["modelspec.hash_sha256"] == "0x" + _data_sha(out)
    report = json.loads((tmp_path / "model-nemo.safetensors.report.json").read_text())
    assert report["format"] == "nemo-surgery.apply-report" and report["version"] == 1 and report["ok"]
    assert report["files"][0]["sha256_out"] == sha256_file(out)
    assert report["files"][0]["sha256_in"] is None and report["input_sha256"] is False  # a copy takes one digest
    assert "SHA-256 in: not computed" in (tmp_path / "model-nemo.safetensors.report.md").read_text()
    assert all(c["ok"] for c in report["files"][0]["checks"])
    assert "PASSED" in (tmp_path / "model-nemo.safetensors.report.md").read_text()


def test_single_file_without_ema(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", ema=False)
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, out=tmp_path / "o" / "x.safetensors")
    assert_patched(src, tmp_path / "o" / "x.safetensors", expected_zeroed(DEFAULT_NEURONS, "ldm"))
    assert {t.role for t in result.files[0].plan.tensors} == {"value"}


def test_diffusers_unet_file(tmp_path: Path) -> None:
    src = write_unet_file(tmp_path / "diffusion_pytorch_model.safetensors", "bf16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns)
    assert result.layout == "diffusers-unet"
    assert_patched(src, result.output, expected_zeroed(DEFAULT_NEURONS, "diffusers"))


def test_pipeline_folder_with_fp16_variant(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "fp16", variants=(None, "fp16"))
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns)
    out = tmp_path / "pipe-nemo"
    assert result.ok and result.output == out and result.layout == "diffusers-pipeline"
    expected = expected_zeroed(DEFAULT_NEURONS, "diffusers")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        assert_patched(src / "unet" / name, out / "unet" / name, expected)
        assert (out / "unet" / name).stat().st_ino != (src / "unet" / name).stat().st_ino
    for rel in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
        assert (out / rel).stat().st_ino != (src / rel).stat().st_ino, "unchanged files are copies, never hard links"
    # issue 13: save_pretrained into the pruned folder rewrote the ORIGINAL's configs through hard links
    original = (src / "model_index.json").read_bytes()
    (out / "model_index.json").write_text('{"edited": "in the output only"}')
    assert (src / "model_index.json").read_bytes() == original
    assert len(result.mirrored) == 4 and all(m.ok for m in result.mirrored)
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and len(report["files"]) == 2
    assert not list(tmp_path.glob(".pipe-nemo*")), "no temp folder left"


def test_unet_folder(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "fp32") / "unet"
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, out=tmp_path / "unet-out")
    assert result.layout == "diffusers-unet-folder"
    assert_patched(src / "diffusion_pytorch_model.safetensors", tmp_path / "unet-out" / "diffusion_pytorch_model.safetensors",
                   expected_zeroed(DEFAULT_NEURONS, "diffusers"))


def test_sharded_folder_patches_only_shards_with_targets(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "bf16", shards=3)
    index = json.loads((src / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key = f"{REAL_LAYER}.weight"
    shard = index["weight_map"][key]
    neurons = {REAL_LAYER: [3, 4, 200]}
    ns = write_neuron_set(tmp_path / "set.json", neurons)
    result = run_apply(src, ns)
    out = result.output
    assert [str(f.plan.rel) for f in result.files] == [f"unet/{shard}"]
    assert_patched(src / "unet" / shard, out / "unet" / shard, {key: [3, 4, 200]})
    for other in set(index["weight_map"].values()) - {shard}:
        assert (out / "unet" / other).stat().st_ino != (src / "unet" / other).stat().st_ino
    idx = "unet/diffusion_pytorch_model.safetensors.index.json"
    assert (out / idx).read_bytes() == (src / idx).read_bytes()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "fp32")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_apply(src, ns, dry_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert result.dry_run and result.files[0].plan.bytes_zeroed == 5 * 768 * 4 + 2 * 8 * 4 + 4 * 8 * 4
    doc = result.to_json()
    assert doc["files"][0]["tensors"][0]["byte_ranges"] == 3  # rows 0-2 coalesced, 17, 319


def test_force_replaces_existing_output(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "fp16")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_apply(src, ns, out=out, force=True)
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()
    single = write_ldm_file(tmp_path / "m.safetensors", "fp16")
    target = tmp_path / "m2.safetensors"
    target.write_bytes(b"old")
    run_apply(single, ns, out=target, force=True)
    assert_patched(single, target, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))


def test_in_place_single_file(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", metadata={"keep": "me"})
    pristine = tmp_path / "pristine.safetensors"
    pristine.write_bytes(src.read_bytes())
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, in_place=True)
    assert result.ok and result.output == src
    assert_patched(pristine, src, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    assert src.stat().st_size == pristine.stat().st_size
    # save_file pads its header to 8 bytes only: provenance does not fit, metadata left as it was
    assert not result.files[0].metadata_updated and result.notes
    with safe_open(str(src), framework="pt") as f:
        assert f.metadata() == {"keep": "me"}
    assert (tmp_path / "m.safetensors.report.json").is_file()


def test_in_place_updates_metadata_when_header_has_room(tmp_path: Path) -> None:
    plain = write_ldm_file(tmp_path / "plain.safetensors", "bf16", metadata={"modelspec.hash_sha256": "abc"})
    h = read_header(plain)
    body = h.raw_json.rstrip() + b" " * 4096
    src = tmp_path / "roomy.safetensors"
    with open(plain, "rb") as fh:
        fh.seek(h.data_start)
        src.write_bytes(len(body).to_bytes(8, "little") + body + fh.read())
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, in_place=True)
    assert result.ok and result.files[0].metadata_updated
    assert_patched(plain, src, expected_zeroed(DEFAULT_NEURONS, "ldm", ema=True))
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.hash_sha256"] == _data_sha(src)  # no 0x: the existing style is kept
    assert "nemo_surgery.rows_zeroed" in meta
    assert read_header(src).header_len == len(body)


def test_in_place_pipeline_folder(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", "bf16", variants=(None, "fp16"))
    pristine = tmp_path / "pristine.safetensors"
    pristine.write_bytes((src / "unet" / "diffusion_pytorch_model.fp16.safetensors").read_bytes())
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    result = run_apply(src, ns, in_place=True)
    assert result.ok and len(result.files) == 2
    assert_patched(pristine, src / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                   expected_zeroed(DEFAULT_NEURONS, "diffusers"))
    assert json.loads((src / "report.json").read_text())["in_place"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "pristine.safetensors", "set.json"]


# --- streaming copy / in-place internals: chunk borders inside row ranges, tampering detected ---


def _plan_for(src: Path, tmp_path: Path):
    from nemo_surgery.neuron_set import load_neuron_set
    from nemo_surgery.surgery.discover import discover
    from nemo_surgery.surgery.plan import build_plan

    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    return build_plan(discover(src), load_neuron_set(ns)).files[0]


def _expected_data(fp) -> bytes:
    with open(fp.src, "rb") as fh:
        data = bytearray(fh.read()[fp.header.data_start :])
    for off, length in fp.ranges:
        data[off : off + length] = bytes(length)
    return bytes(data)


# 100: a 1536-byte zeroed row spans 16 chunks (chunk 7 took minutes on 2 busy cores and covered nothing more)
@pytest.mark.parametrize("chunk", [100, 777, 1 << 20])
def test_streamed_copy_with_chunk_borders_inside_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    from nemo_surgery.surgery import streaming
    from nemo_surgery.surgery.patch import write_patched_copy
    from nemo_surgery.surgery.verify_struct import verify_copy

    monkeypatch.setattr(streaming, "CHUNK", chunk)
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16")
    fp = _plan_for(src, tmp_path)
    # some chunk border falls strictly inside some zeroed range for the small chunk sizes
    assert chunk > 1000 or any(off // chunk != (off + length - 1) // chunk for off, length in fp.ranges)
    out = tmp_path / "out.safetensors"
    written = write_patched_copy(fp, out, "x" * 64)
    data = out.read_bytes()
    assert data[: len(written.head)] == written.head
    assert data[len(written.head) :] == _expected_data(fp)
    assert written.sha256_in == hashlib.sha256(src.read_bytes()).hexdigest()
    assert written.sha256_out == hashlib.sha256(data).hexdigest()
    v = verify_copy(fp, out, written)
    assert v.ok, v.checks
    assert v.sha256_out == written.sha256_out


def test_streamed_copy_with_modelspec_hashes_output_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nemo_surgery.surgery import streaming
    from nemo_surgery.surgery.patch import write_patched_copy
    from nemo_surgery.surgery.verify_struct import verify_copy

    monkeypatch.setattr(streaming, "CHUNK", 333)
    src = write_ldm_file(tmp_path / "m.safetensors", "bf16", metadata={"modelspec.hash_sha256": "0x00"})
    fp = _plan_for(src, tmp_path)
    out = tmp_path / "out.safetensors"
    written = write_patched_copy(fp, out, "x" * 64)
    assert written.sha256_out is None
    assert written.data_sha256_out == hashlib.sha256(_expected_data(fp)).hexdigest()
    v = verify_copy(fp, out, written)
    assert v.ok, v.checks
    assert v.sha256_out == hashlib.sha256(out.read_bytes()).hexdigest()


def _flip(path: Path, offset: int, value: int | None = None) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value if value is not None else old ^ 0xFF]))


def test_verify_copy_detects_tampered_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nemo_surgery.surgery import streaming
    from nemo_surgery.surgery.patch import write_patched_copy
    from nemo_surgery.surgery.verify_struct import verify_copy

    monkeypatch.setattr(streaming, "CHUNK", 500)
    src = write_ldm_file(tmp_path / "m.safetensors", "fp32")
    fp = _plan_for(src, tmp_path)
    out = tmp_path / "out.safetensors"
    written = write_patched_copy(fp, out, "x" * 64)
    base = len(written.head)
    (first_off, first_len), last = fp.ranges[0], fp.ranges[-1]

    def failed() -> set[str]:
        return {c.name for c in verify_copy(fp, out, written).checks if not c.ok}

    _flip(out, base + first_off + first_len // 2, 1)  # inside a zeroed row
    assert failed() == {"targeted rows all zero"}
    _flip(out, base + first_off + first_len // 2, 0)
    outside = last[0] + last[1]  # first byte after the last range
    _flip(out, base + outside)
    bad = verify_copy(fp, out, written)
    assert {c.name for c in bad.checks if not c.ok} == {"all other bytes identical"}
    assert f"data byte {outside}" in next(c.detail for c in bad.checks if not c.ok)
    _flip(out, base + outside)
    assert failed() == set()
    with open(out, "ab") as fh:  # trailing garbage
        fh.write(b"\0")
    assert "all other bytes identical" in failed() or "header valid" in failed()


@pytest.mark.parametrize("metadata", [None, {"modelspec.hash_sha256": "abc"}])
def test_in_place_small_chunks_and_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metadata) -> None:
    from nemo_surgery.surgery import streaming
    from nemo_surgery.surgery.patch import plan_in_place, write_in_place
    from nemo_surgery.surgery.verify_struct import verify_in_place

    monkeypatch.setattr(streaming, "CHUNK", 611)
    src = write_ldm_file(tmp_path / "m.safetensors", "fp16", metadata=metadata)
    original = src.read_bytes()
    fp = _plan_for(src, tmp_path)
    expected = _expected_data(fp)
    done = plan_in_place(fp, "x" * 64)
    write_in_place(fp, done)
    assert done.before.sha256_in == hashlib.sha256(original).hexdigest()
    v = verify_in_place(fp, done.before, done.metadata)
    assert v.ok, v.checks
    assert src.read_bytes()[fp.header.data_start :] == expected
    assert v.sha256_out == hashlib.sha256(src.read_bytes()).hexdigest()
    outside = fp.ranges[0][0] + fp.ranges[0][1]
    _flip(src, fp.header.data_start + outside)
    bad = verify_in_place(fp, done.before, done.metadata)
    assert [c.name for c in bad.checks if not c.ok][:1] == ["all other bytes identical"]
    _flip(src, fp.header.data_start + outside)
    _flip(src, fp.header.data_start + fp.ranges[0][0], 7)
    bad = verify_in_place(fp, done.before, done.metadata)
    assert "targeted rows all zero" in {c.name for c in bad.checks if not c.ok}


def test_with_zeros_splits_chunks_at_range_borders() -> None:
    from nemo_surgery.surgery.streaming import with_zeros

    data = bytes(range(1, 21))
    ranges = [(3, 4), (9, 5)]  # bytes 3..6 and 9..13
    expected = bytearray(data)
    for off, length in ranges:
        expected[off : off + length] = bytes(length)
    for chunk in range(1, 21):
        pieces = b"".join(
            bytes(with_zeros(memoryview(bytearray(data[pos : pos + chunk])), pos, ranges)) for pos in range(0, 20, chunk)
        )
        assert pieces == bytes(expected), chunk


def test_segments_match_a_byte_by_byte_reading_for_many_ranges() -> None:
    """Bisection finds the first range of each chunk: pieces tile the chunk and match each byte's inside/outside."""
    import random

    from nemo_surgery.surgery.streaming import segments

    rng = random.Random(3)
    for _ in range(200):
        ranges, pos = [], rng.randrange(0, 5)
        while pos < 300:
            length = rng.randrange(1, 9)
            ranges.append((pos, length))
            pos += length + rng.randrange(1, 12)
        inside = {i for off, length in ranges for i in range(off, off + length)}
        chunk_off, chunk_len = rng.randrange(0, 320), rng.randrange(1, 60)
        pieces = list(segments(chunk_off, chunk_len, ranges))
        assert [p[0] for p in pieces] == [0] + [p[1] for p in pieces[:-1]] and pieces[-1][1] == chunk_len
        for a, b, flag in pieces:
            assert all(((chunk_off + i) in inside) == flag for i in range(a, b)), (chunk_off, chunk_len, a, b)
