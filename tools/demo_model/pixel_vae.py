"""An AutoencoderKL whose weights are set by hand so that it is the identity on pixels.

The demo model is a pixel-space diffusion model: its "latents" are RGB images in
[-1, 1]. To run it through the standard StableDiffusionPipeline (which always
decodes with a VAE) we build a real one-level AutoencoderKL and set its weights
so that decode(z) == z and encode(x).mean == x up to float error (~1e-6).

How it survives GroupNorm and SiLU: each signal x travels in a norm group of
four channels (x, -x, C, -C) with a large constant C, so the group mean is
exactly 0 and the group variance (mean(x^2) + C^2) / 2 is C^2 / 2 to within
1e-6; the norm's affine weight undoes the scale. A bias of +20 before SiLU keeps
it in its linear range and the output conv subtracts it again. Residual branches
(ResNet conv2, attention out-projections) are zeroed so every block is identity.
"""

from __future__ import annotations

import math

import torch

_BIG = 1000.0
_SHIFT = 20.0
_WIDTH = 16  # block_out_channels of the VAE; 4 norm groups of 4 channels


def build_pixel_vae(channels: int = 3, sample_size: int = 16):
    """Return an AutoencoderKL (scale factor 1, scaling_factor 1.0) that is identity on pixels."""
    from diffusers import AutoencoderKL

    if 4 * channels > _WIDTH:
        raise ValueError("pixel VAE supports at most 4 channels")
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(_WIDTH,),
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        _make_identity(vae.encoder, channels, out_mult=2)
        _make_identity(vae.decoder, channels, out_mult=1)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is None:
                continue
            conv.weight.zero_()
            conv.bias.zero_()
            n = conv.weight.shape[0]
            conv.weight[torch.arange(n), torch.arange(n), 0, 0] = 1.0
    return vae.eval()


def _make_identity(coder, channels: int, out_mult: int) -> None:
    """Set an Encoder/Decoder's weights so it copies `channels` input channels through."""
    for module in coder.modules():
        name = type(module).__name__
        if name == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        elif name == "Attention":
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    conv_in = coder.conv_in
    conv_in.weight.zero_()
    conv_in.bias.zero_()
    mid = conv_in.kernel_size[0] // 2
    for c in range(channels):
        conv_in.weight[4 * c, c, mid, mid] = 1.0
        conv_in.weight[4 * c + 1, c, mid, mid] = -1.0
        conv_in.bias[4 * c + 2] = _BIG
        conv_in.bias[4 * c + 3] = -_BIG
    norm = coder.conv_norm_out
    norm.weight.zero_()
    norm.bias.zero_()
    for c in range(channels):
        norm.weight[4 * c] = _BIG / math.sqrt(2.0)
        norm.bias[4 * c] = _SHIFT
    conv_out = coder.conv_out
    conv_out.weight.zero_()
    conv_out.bias.zero_()
    k = conv_out.kernel_size[0] // 2
    for c in range(channels):
        conv_out.weight[c, 4 * c, k, k] = 1.0
        conv_out.bias[c] = -_SHIFT
    if out_mult == 2:  # encoder: second half is the log-variance, make it tiny
        for c in range(channels):
            conv_out.bias[channels + c] = -30.0
