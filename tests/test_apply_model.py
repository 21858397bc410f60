"""A patched diffusers folder loads with from_pretrained and equals the original with channels zeroed by hook."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_surgery.surgery.apply import run_apply
from tests.models.tiny import TinySpec, build_pipeline, save_pipeline


def test_patched_folder_equals_hooked_original(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    spec = TinySpec()
    folder = save_pipeline(build_pipeline(spec), tmp_path / "tiny")
    original = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    layers = {
        name: module for name, module in original.named_modules() if name.endswith("attn2.to_v")
    }
    assert len(layers) >= 4
    chosen: dict[str, list[int]] = {}
    for i, (name, module) in enumerate(sorted(layers.items())):
        rows = module.weight.shape[0]
        chosen[name] = sorted({i % rows, (3 * i + 1) % rows, rows - 1})
    doc = {
        "format": "nemo-surgery.neuron-set",
        "version": 1,
        "layers": [
            {"id": name, "rows": layers[name].weight.shape[0], "cols": layers[name].weight.shape[1], "neurons": rows}
            for name, rows in chosen.items()
        ],
    }
    (tmp_path / "set.json").write_text(json.dumps(doc))
    result = run_apply(folder, tmp_path / "set.json")
    assert result.ok and result.layout == "diffusers-pipeline"

    patched = UNet2DConditionModel.from_pretrained(result.output / "unet").eval()
    for name, rows in chosen.items():
        weight = dict(patched.named_modules())[name].weight
        assert torch.count_nonzero(weight[rows]) == 0

    def zero_hook(rows: list[int]):
        def hook(_module, _inputs, output):
            output = output.clone()
            output[..., rows] = 0
            return output

        return hook

    for name, rows in chosen.items():
        layers[name].register_forward_hook(zero_hook(rows))
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, spec.in_channels, spec.sample_size, spec.sample_size, generator=gen)
    context = torch.randn(2, 77, spec.cross_attention_dim, generator=gen)
    with torch.no_grad():
        expected = original(sample, 10, encoder_hidden_states=context).sample
        got = patched(sample, 10, encoder_hidden_states=context).sample
    assert torch.equal(expected, got)
