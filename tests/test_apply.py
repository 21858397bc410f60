"""apply on single files, diffusers folders and sharded sets: exact bytes, provenance, reports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from checkpoint_fixtures import (
    DEFAULT_NEURONS,
    REAL_LAYER,
    assert_patched,
    expected_zeroed,
    write_ldm_file,
    write_neuron_set,
    write_pipeline,
    write_unet_file,
)
from nemo_surgery.apply import run_apply
from nemo_surgery.checkpoint.safetensors_file import read_header
from nemo_surgery.neuron_set import sha256_file


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
    assert report["files"][0]["sha256_in"] == before
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
        assert (out / rel).stat().st_ino == (src / rel).stat().st_ino, "unchanged files are hard-linked"
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
        assert (out / "unet" / other).stat().st_ino == (src / "unet" / other).stat().st_ino
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
