"""The weights fingerprint: computed from stored bytes, equal for a diffusers UNet and a single file of the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from nemo_surgery.keymap import SD_LAYERS_PER_BLOCK, diffusers_to_ldm, diffusers_weight_key, ldm_ema_weight_key, ldm_weight_key
from nemo_surgery.surgery.discover import discover
from nemo_surgery.surgery.fingerprint import PREFIX, source_fingerprints, weights_fingerprint
from tests.checkpoint_fixtures import layer_shapes, unet_state, write_pipeline


def _as_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under single-file (LDM) names, plus tensors the fingerprint must ignore."""
    out = {"model.diffusion_model.input_blocks.0.0.weight": state["conv_in.weight"],
           "first_stage_model.decoder.conv_in.weight": torch.ones(2, 2)}
    for lid in layer_shapes():
        ldm = diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK)
        out[ldm_weight_key(ldm)] = state[diffusers_weight_key(lid)]
        out[ldm_ema_weight_key(ldm)] = torch.zeros_like(state[diffusers_weight_key(lid)])  # EMA copies are not covered
    return out


def test_single_file_and_diffusers_unet_agree(tmp_path: Path) -> None:
    state = unet_state("fp16")
    save_file(state, str(tmp_path / "unet.safetensors"))
    save_file(_as_ldm(state), str(tmp_path / "single.safetensors"))
    a = weights_fingerprint(tmp_path / "unet.safetensors")
    b = weights_fingerprint(tmp_path / "single.safetensors")
    assert a is not None and a.startswith(PREFIX) and a == b
    pipe = write_pipeline(tmp_path / "pipe", "fp16")
    assert weights_fingerprint(pipe) == a


def test_other_weights_or_dtype_change_it(tmp_path: Path) -> None:
    state = unet_state("fp32")
    save_file(state, str(tmp_path / "a.safetensors"))
    changed = dict(state)
    key = diffusers_weight_key(next(iter(layer_shapes())))
    changed[key] = changed[key].clone()
    changed[key][5, 0] += 1
    save_file(changed, str(tmp_path / "b.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "c.safetensors"))
    untouched = dict(state)
    untouched["time_embedding.linear_1.weight"] = untouched["time_embedding.linear_1.weight"] + 1  # not covered
    save_file(untouched, str(tmp_path / "d.safetensors"))
    fps = [weights_fingerprint(tmp_path / f"{n}.safetensors") for n in "abcd"]
    assert len({fps[0], fps[1], fps[2]}) == 3
    assert fps[3] == fps[0]


def test_variants_of_a_folder_each_have_one(tmp_path: Path) -> None:
    pipe = write_pipeline(tmp_path / "pipe", "fp32", variants=(None, "fp16"))
    fps = source_fingerprints(discover(pipe))
    assert len(fps) == 2 and len(set(fps)) == 1  # the fixture writes the same fp32 state under both names
    sharded = write_pipeline(tmp_path / "sharded", "fp32", shards=3)
    assert source_fingerprints(discover(sharded)) == fps[:1]


def test_apply_refuses_a_set_from_other_weights_before_writing(tmp_path: Path) -> None:
    import pytest

    from nemo_surgery.errors import InputError
    from nemo_surgery.neuron_set import load_neuron_set
    from nemo_surgery.surgery.apply import run_apply
    from tests.checkpoint_fixtures import DEFAULT_NEURONS, write_neuron_set

    state = unet_state("fp16")
    single = tmp_path / "single.safetensors"
    save_file(_as_ldm(state), str(single))
    pipe = write_pipeline(tmp_path / "pipe", "fp16")  # the same weights as a diffusers pipeline folder
    other = tmp_path / "other.safetensors"
    save_file(_as_ldm(unet_state("fp16", seed=1)), str(other))  # same shapes, other weights
    ns = write_neuron_set(tmp_path / "set.json", DEFAULT_NEURONS)
    scanned = load_neuron_set(ns)
    scanned.weights_fingerprint = weights_fingerprint(pipe)  # as scan records it for the weights it ran on
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="found on other weights") as info:
        run_apply(other, ns, neuron_set=scanned)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written before the check"
    result = run_apply(single, ns, neuron_set=scanned)  # a single file of the scanned weights is accepted
    assert result.ok and result.fingerprint == scanned.weights_fingerprint
    assert run_apply(pipe, ns, neuron_set=scanned).ok
    folder_other = write_pipeline(tmp_path / "pipe2", "fp32")
    with pytest.raises(InputError, match="found on other weights"):
        run_apply(folder_other, ns, neuron_set=scanned)
    assert not (tmp_path / "pipe2-nemo").exists()


def test_scanned_model_and_neuron_set_carry_it(planted, planted_model, tmp_path: Path) -> None:
    """What scan records (LoadedModel.weights_fingerprint) is what apply computes from the folder's bytes."""
    from nemo_surgery.neuron_set import NeuronSet, load_neuron_set

    folder, _ = planted
    assert planted_model.weights_fingerprint == weights_fingerprint(folder) is not None
    saved = NeuronSet(layers=[], weights_fingerprint=planted_model.weights_fingerprint).save(tmp_path / "set.json")
    assert load_neuron_set(saved).weights_fingerprint == planted_model.weights_fingerprint
