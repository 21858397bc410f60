"""apply refuses bad input with one line, a non-zero exit and nothing at the destination."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from nemo_surgery.errors import InputError, NemoError
from nemo_surgery.surgery import patch
from nemo_surgery.surgery.apply import ApplyFailed, run_apply
from tests.checkpoint_fixtures import DEFAULT_NEURONS, REAL_LAYER, layer_shapes, ldm_state, write_ldm_file, write_neuron_set, write_pipeline


def _nothing_written(tmp_path: Path, allowed: set[str]) -> None:
    assert {p.name for p in tmp_path.iterdir()} == allowed


def test_shape_mismatch_is_another_architecture(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    shapes = dict(layer_shapes())
    shapes[REAL_LAYER] = (320, 1024)  # SD 2.x set against an SD 1.x file
    ns = write_neuron_set(tmp_path / "set.json", {REAL_LAYER: [1]}, shapes)
    expected = r"another architecture: .*input_blocks\.1\.1.* has shape \[320, 768\] but the set says \[320, 1024\]"
    with pytest.raises(InputError, match=expected):
        run_apply(src, ns)
    _nothing_written(tmp_path, {"m.safetensors", "set.json"})


def test_index_out_of_range(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", {REAL_LAYER: [320]})
    with pytest.raises(InputError, match="out of range"):
        run_apply(src, ns)
    _nothing_written(tmp_path, {"m.safetensors", "set.json"})


def test_missing_key_and_missing_ema_copy(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = ldm_state("fp16")
    ema_key = "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_vweight"
    del state[ema_key]
    save_file(state, str(tmp_path / "m.safetensors"))
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match=f"missing key {ema_key}"):
        run_apply(tmp_path / "m.safetensors", ns)
    del state["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(InputError, match="missing key"):
        run_apply(tmp_path / "m.safetensors", ns)
    _nothing_written(tmp_path, {"m.safetensors", "set.json"})


@pytest.mark.parametrize("cut", [3, 100, -5])
def test_truncated_or_corrupt_file(tmp_path: Path, cut: int) -> None:
    good = write_ldm_file(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "good.safetensors").unlink()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good[:cut])
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match="corrupt or truncated"):
        run_apply(bad, ns)
    _nothing_written(tmp_path, {"bad.safetensors", "set.json"})


def test_output_exists_and_output_equals_input(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    (tmp_path / "m-nemo.safetensors").write_bytes(b"keep")
    with pytest.raises(InputError, match="exists; pass --force"):
        run_apply(src, ns)
    assert (tmp_path / "m-nemo.safetensors").read_bytes() == b"keep"
    with pytest.raises(InputError, match="equals the input; pass --in-place"):
        run_apply(src, ns, out=src)
    with pytest.raises(InputError, match="equals the input"):
        run_apply(src, ns, out=src, force=True)
    with pytest.raises(InputError, match="drop --out"):
        run_apply(src, ns, out=tmp_path / "other.safetensors", in_place=True)


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt"])
def test_pickle_refused_without_unpickling(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 this would be a pickle; it must never be loaded")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match="pickle checkpoints are refused.*convert to safetensors") as info:
        run_apply(path, ns)
    assert "\n" not in str(info.value)


def test_pickle_weights_inside_a_folder_are_refused(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe")
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match="pickle weights"):
        run_apply(src, ns)


def test_disk_full_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patch, "write_at", full)
    with pytest.raises(NemoError, match="disk full while writing .*; free space and rerun"):
        run_apply(src, ns)
    _nothing_written(tmp_path, {"m.safetensors", "set.json"})
    folder = write_pipeline(tmp_path / "pipe")
    with pytest.raises(NemoError, match="disk full"):
        run_apply(folder, ns)
    _nothing_written(tmp_path, {"m.safetensors", "set.json", "pipe"})


def test_failed_verification_marks_output_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    monkeypatch.setattr(patch, "with_zeros", lambda view, *a: bytes(view))  # a patch that silently zeroes nothing
    with pytest.raises(ApplyFailed, match="targeted rows all zero") as info:
        run_apply(src, ns)
    assert info.value.exit_code == 1
    assert not (tmp_path / "m-nemo.safetensors").exists()
    assert (tmp_path / "m-nemo.safetensors.FAILED").is_file()
    report = json.loads((tmp_path / "m-nemo.safetensors.FAILED.report.json").read_text())
    assert report["ok"] is False


def test_empty_neuron_set(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", {REAL_LAYER: []})
    with pytest.raises(InputError, match="no neurons"):
        run_apply(src, ns)


def test_not_a_unet_checkpoint(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"text_model.x": torch.ones(2)}, str(tmp_path / "te.safetensors"))
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match="not a Stable Diffusion UNet checkpoint"):
        run_apply(tmp_path / "te.safetensors", ns)


def test_folder_output_inside_input_and_broken_shard_index(tmp_path: Path) -> None:
    src = write_pipeline(tmp_path / "pipe", shards=2)
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match="inside the input folder"):
        run_apply(src, ns, out=src / "sub")
    index = src / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = "missing-shard.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="missing-shard.safetensors.*missing"):
        run_apply(src, ns)
    index.write_text("{not json")
    with pytest.raises(InputError, match="corrupt shard index"):
        run_apply(src, ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "set.json"]


def test_header_dtype_that_is_a_list(tmp_path: Path) -> None:
    from nemo_surgery.surgery.safetensors_file import read_header

    good = write_ldm_file(tmp_path / "good.safetensors")
    h = read_header(good)
    doc = json.loads(h.raw_json)
    doc[REAL_LAYER_LDM_KEY]["dtype"] = ["F32"]
    body = json.dumps(doc).encode()
    bad = tmp_path / "bad.safetensors"
    raw = good.read_bytes()
    bad.write_bytes(len(body).to_bytes(8, "little") + body + raw[h.data_start:])
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match=r"unknown dtype \['F32'\]") as info:
        run_apply(bad, ns)
    assert "\n" not in str(info.value)


REAL_LAYER_LDM_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"


@pytest.mark.parametrize("kind", ["devnull", "fifo"])
def test_device_or_fifo_as_checkpoint(tmp_path: Path, kind: str) -> None:
    import os

    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    path = Path("/dev/null")
    if kind == "fifo":
        path = tmp_path / "pipe.safetensors"
        os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file or folder") as info:
        run_apply(path, ns)
    assert "\n" not in str(info.value)


def test_output_path_under_a_regular_file(tmp_path: Path) -> None:
    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    with pytest.raises(InputError, match=r"is a file, not a folder"):
        run_apply(src, ns, out=tmp_path / "set.json" / "sub" / "x.safetensors")
    _nothing_written(tmp_path, {"m.safetensors", "set.json"})


def test_read_only_output_folder(tmp_path: Path) -> None:
    import subprocess

    from click.testing import CliRunner

    from nemo_surgery.cli.main import main

    src = write_ldm_file(tmp_path / "m.safetensors")
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs root on a filesystem with attributes)")
    try:
        with pytest.raises(NemoError, match="cannot write there") as info:
            run_apply(src, ns, out=locked / "x.safetensors")
        assert info.value.exit_code == 1
        run = CliRunner().invoke(main, ["apply", str(src), "--neurons", str(ns), "--out", str(locked / "x.safetensors"),
                                        "--no-verify"])
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.exit_code == 1 and len(lines) == 1 and "cannot write there" in lines[0], run.stderr
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert list(locked.iterdir()) == []
