"""Value-layer discovery and the diffusers <-> LDM key map, checked on real SD configs."""

import pytest
import torch

from nemo_surgery.engine.layers import discover_value_layers, select_layers
from nemo_surgery.errors import InputError
from nemo_surgery.keymap import diffusers_to_ldm, ldm_ema_weight_key, ldm_to_diffusers

# The table of shared/docs/checkpoint-layouts.md: (diffusers prefix, LDM prefix, rows)
SD15_TABLE = [
    ("down_blocks.0.attentions.0", "input_blocks.1.1", 320),
    ("down_blocks.0.attentions.1", "input_blocks.2.1", 320),
    ("down_blocks.1.attentions.0", "input_blocks.4.1", 640),
    ("down_blocks.1.attentions.1", "input_blocks.5.1", 640),
    ("down_blocks.2.attentions.0", "input_blocks.7.1", 1280),
    ("down_blocks.2.attentions.1", "input_blocks.8.1", 1280),
    ("mid_block.attentions.0", "middle_block.1", 1280),
    ("up_blocks.1.attentions.0", "output_blocks.3.1", 1280),
    ("up_blocks.1.attentions.1", "output_blocks.4.1", 1280),
    ("up_blocks.1.attentions.2", "output_blocks.5.1", 1280),
    ("up_blocks.2.attentions.0", "output_blocks.6.1", 640),
    ("up_blocks.2.attentions.1", "output_blocks.7.1", 640),
    ("up_blocks.2.attentions.2", "output_blocks.8.1", 640),
    ("up_blocks.3.attentions.0", "output_blocks.9.1", 320),
    ("up_blocks.3.attentions.1", "output_blocks.10.1", 320),
    ("up_blocks.3.attentions.2", "output_blocks.11.1", 320),
]
SUFFIX = ".transformer_blocks.0.attn2.to_v"


def _meta_unet(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.fixture(scope="module")
def sd15_unet():
    return _meta_unet(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def test_sd15_layers_match_the_documented_table(sd15_unet):
    layers = discover_value_layers(sd15_unet)
    assert [(lay.id, lay.ldm_id, lay.rows) for lay in layers] == [
        (d + SUFFIX, ldm + SUFFIX, rows) for d, ldm, rows in SD15_TABLE
    ]
    assert all(lay.cols == 768 for lay in layers)
    default = select_layers(layers, "default")
    assert [lay.rows for lay in default] == [320, 320, 640, 640, 1280, 1280, 1280]
    assert sum(lay.rows for lay in default) == 5760
    assert len(select_layers(layers, "all")) == 16


def test_sdxl_has_70_value_layers_with_the_documented_names():
    unet = _meta_unet(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    )
    layers = discover_value_layers(unet)
    assert len(layers) == 70
    by_id = {lay.id: lay for lay in layers}
    first = by_id["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"]
    assert first.ldm_id == "input_blocks.4.1.transformer_blocks.1.attn2.to_v" and first.rows == 640
    assert by_id["up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v"].ldm_id == (
        "output_blocks.2.1.transformer_blocks.9.attn2.to_v"
    )
    assert {lay.cols for lay in layers} == {2048}


def test_select_by_prefix_and_errors(sd15_unet):
    layers = discover_value_layers(sd15_unet)
    chosen = select_layers(layers, "mid_block, down_blocks.1.attentions.0")
    assert [lay.id for lay in chosen] == ["down_blocks.1.attentions.0" + SUFFIX, "mid_block.attentions.0" + SUFFIX]
    with pytest.raises(InputError, match="unknown value layer 'up_blocks.9'"):
        select_layers(layers, "up_blocks.9")


@pytest.mark.parametrize("d,ldm,_rows", SD15_TABLE)
def test_key_map_round_trips(d, ldm, _rows):
    assert diffusers_to_ldm(d + SUFFIX, 2) == ldm + SUFFIX
    assert ldm_to_diffusers(ldm + SUFFIX, 2) == d + SUFFIX


def test_ema_key_is_flattened():
    # the example of shared/docs/checkpoint-layouts.md
    assert ldm_ema_weight_key("input_blocks.1.1" + SUFFIX) == (
        "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_vweight"
    )
