"""Build SD 1.x-shaped safetensors checkpoints (real key names, small columns) for apply tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_surgery.keymap import SD_LAYERS_PER_BLOCK, diffusers_to_ldm, diffusers_weight_key, ldm_ema_weight_key, ldm_weight_key

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd1_layers() -> list[tuple[str, int]]:
    """The 16 SD 1.x cross-attention value layer ids with their row counts."""
    out: list[tuple[str, int]] = []
    down_rows, up_rows = (320, 640, 1280), (1280, 640, 320)
    for i, rows in enumerate(down_rows):
        for j in range(2):
            out.append((f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_v", rows))
    out.append(("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 1280))
    for i, rows in zip((1, 2, 3), up_rows):
        for j in range(3):
            out.append((f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_v", rows))
    return out


#: The first layer keeps SD 1.x's real shape [320, 768]; the others use few columns.
REAL_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
SMALL_COLS = 8


def layer_shapes() -> dict[str, tuple[int, int]]:
    """Layer id -> (rows, cols) used by the fixtures."""
    return {lid: (rows, 768 if lid == REAL_LAYER else SMALL_COLS) for lid, rows in sd1_layers()}


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # values away from zero so a zeroed row is unmistakable
    return (torch.rand(shape, generator=gen) + 0.5).to(dtype)


def unet_state(dtype: str = "fp32", seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-named UNet state: 16 value weights plus a few other real-looking keys."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    state: dict[str, torch.Tensor] = {
        "conv_in.weight": _rand((320, 4, 3, 3), dt, gen),
        "conv_in.bias": _rand((320,), dt, gen),
        "time_embedding.linear_1.weight": _rand((16, 8), dt, gen),
    }
    for lid, (rows, cols) in layer_shapes().items():
        prefix = lid.removesuffix(".to_v")
        state[f"{prefix}.to_k.weight"] = _rand((rows, cols), dt, gen)
        state[diffusers_weight_key(lid)] = _rand((rows, cols), dt, gen)
        state[f"{prefix}.to_out.0.bias"] = _rand((rows,), dt, gen)
    return state


def ldm_state(dtype: str = "fp32", ema: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file (LDM) state with model.diffusion_model.* keys and flattened model_ema.* copies."""
    gen = torch.Generator().manual_seed(seed + 1)
    dt = DTYPES[dtype]
    state: dict[str, torch.Tensor] = {
        "model.diffusion_model.input_blocks.0.0.weight": _rand((320, 4, 3, 3), dt, gen),
        "first_stage_model.decoder.conv_in.weight": _rand((8, 4, 3, 3), dt, gen),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77),
    }
    for lid, (rows, cols) in layer_shapes().items():
        ldm = diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK)
        state[ldm_weight_key(ldm)] = _rand((rows, cols), dt, gen)
        state[ldm_weight_key(ldm.replace("to_v", "to_k"))] = _rand((rows, cols), dt, gen)
        if ema:
            state[ldm_ema_weight_key(ldm)] = _rand((rows, cols), dt, gen)
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return state


def write_ldm_file(path: Path, dtype: str = "fp32", ema: bool = True, metadata: dict[str, str] | None = None) -> Path:
    """Write a single-file LDM checkpoint."""
    save_file(ldm_state(dtype, ema), str(path), metadata=metadata)
    return path


def write_unet_file(path: Path, dtype: str = "fp32", metadata: dict[str, str] | None = None) -> Path:
    """Write a diffusers UNet safetensors file."""
    save_file(unet_state(dtype), str(path), metadata=metadata)
    return path


def write_pipeline(
    root: Path, dtype: str = "fp32", variants: tuple[str | None, ...] = (None,), shards: int = 0
) -> Path:
    """Write a diffusers pipeline folder; the UNet as variants or as a sharded set."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_start": 0.00085}))
    (root / "text_encoder").mkdir()
    save_file({"text_model.embeddings.token_embedding.weight": torch.ones(10, 4)}, str(root / "text_encoder" / "model.safetensors"))
    state = unet_state(dtype)
    if shards:
        keys = list(state)
        per = -(-len(keys) // shards)
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
            save_file(part, str(root / "unet" / name))
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        return root
    for variant in variants:
        name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
        save_file(state, str(root / "unet" / name))
    return root


def write_neuron_set(path: Path, neurons: dict[str, list[int]], shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write a version-1 neuron set JSON for the given layer -> rows."""
    shapes = shapes or layer_shapes()
    doc = {
        "format": "nemo-surgery.neuron-set",
        "version": 1,
        "tool_version": "test",
        "layers": [
            {"id": lid, "rows": shapes[lid][0], "cols": shapes[lid][1], "neurons": sorted(rows)}
            for lid, rows in neurons.items()
        ],
    }
    path.write_text(json.dumps(doc))
    return path


#: A neuron choice touching the real-shape layer, runs of adjacent rows, first/last rows.
DEFAULT_NEURONS: dict[str, list[int]] = {
    REAL_LAYER: [0, 1, 2, 17, 319],
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": [5, 1279],
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v": [100, 101, 102, 103],
}


def raw(t: torch.Tensor) -> bytes:
    """The tensor's raw little-endian bytes."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_patched(src: Path, out: Path, zeroed: dict[str, list[int]]) -> None:
    """Every key of out equals src byte for byte, except the given rows, which are all zero."""
    with safe_open(str(src), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            ta, tb = a.get_tensor(key), b.get_tensor(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            rows = zeroed.get(key, [])
            if rows:
                assert not any(raw(tb[rows])), f"{key}: rows not zero"
                keep = [r for r in range(ta.shape[0]) if r not in set(rows)]
                assert raw(ta[keep]) == raw(tb[keep]), f"{key}: other rows changed"
                assert any(raw(ta[rows])), "fixture rows were already zero"
            else:
                assert raw(ta) == raw(tb), f"{key}: changed"


def expected_zeroed(neurons: dict[str, list[int]], layout: str, ema: bool = False) -> dict[str, list[int]]:
    """Key -> rows expected zero for a neuron choice in the given layout."""
    out: dict[str, list[int]] = {}
    for lid, rows in neurons.items():
        if layout == "diffusers":
            out[diffusers_weight_key(lid)] = rows
        else:
            out[ldm_weight_key(diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK))] = rows
            if ema:
                out[ldm_ema_weight_key(diffusers_to_ldm(lid, SD_LAYERS_PER_BLOCK))] = rows
    return out
