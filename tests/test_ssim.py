"""MS-SSIM: equality with torchmetrics (the NeMo reference's metric), configuration fitting, batching."""

import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

from nemo_surgery.engine.score import min_max_scale
from nemo_surgery.engine.ssim import SSIMConfig, ms_ssim, ssim_components

#: The issue's bar: our score equals torchmetrics' within this.
TOLERANCE = 1e-6


def _deltas(seed=0, shape=(6, 4, 64, 64), mix=0.5):
    """Pairs shaped like NeMo's inputs: min-max scaled noise, partly shared between the two sides."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    y = mix * x + torch.randn(shape, generator=gen)
    return min_max_scale(x), min_max_scale(y)


def _torchmetrics(x, y, cfg, data_range=None):
    """torchmetrics' MS-SSIM with the reference's call, one pair at a time ([B] scores)."""
    return torch.cat([
        tm_ms_ssim(x[i : i + 1], y[i : i + 1], reduction="none", kernel_size=cfg.kernel_size, sigma=cfg.sigma,
                   betas=cfg.betas, data_range=data_range)
        for i in range(x.shape[0])
    ])


def test_reference_settings_match_torchmetrics_on_sd_latents():
    """4x64x64 (SD 1.x/2.x): 3 scales, window 11, sigma 1.5, betas 0.33, relu, data range from the data."""
    cfg = SSIMConfig.fit(64, 64)
    assert (cfg.scales, cfg.kernel_size, cfg.sigma, cfg.betas) == (3, 11, 1.5, (0.33, 0.33, 0.33))
    for mix in (0.0, 0.5, 3.0):
        x, y = _deltas(seed=1, mix=mix)
        diff = (ms_ssim(x, y, cfg) - _torchmetrics(x, y, cfg)).abs().max()
        assert diff <= TOLERANCE, f"mix {mix}: max difference {float(diff):.2e}"


@pytest.mark.parametrize("size", [32, 16, 8, 4])
def test_small_latent_fits_match_torchmetrics(size):
    """The fitted configs of small latents (fewer scales, smaller window) are torchmetrics' too."""
    cfg = SSIMConfig.fit(size, size)
    x, y = _deltas(seed=size, shape=(5, 4, size, size))
    assert (ms_ssim(x, y, cfg) - _torchmetrics(x, y, cfg)).abs().max() <= TOLERANCE


def test_fixed_data_range_matches_torchmetrics_batched():
    cfg = SSIMConfig(data_range=1.0)
    x, y = _deltas(seed=3)
    ref = tm_ms_ssim(x, y, reduction="none", kernel_size=11, sigma=1.5, betas=cfg.betas, data_range=1.0)
    assert (ms_ssim(x, y, cfg) - ref).abs().max() <= TOLERANCE


def test_last_scale_averages_the_uncropped_ssim_map():
    """The final factor is the SSIM map's mean over the whole image, the others the cropped cs mean."""
    x, y = _deltas(seed=4, shape=(2, 4, 64, 64))
    cfg = SSIMConfig()
    expected = torch.ones(2)
    xs, ys = x, y
    for scale in range(3):
        sim, cs = ssim_components(xs, ys, cfg)
        expected *= torch.relu(sim if scale == 2 else cs) ** 0.33
        xs, ys = torch.nn.functional.avg_pool2d(xs, 2), torch.nn.functional.avg_pool2d(ys, 2)
    torch.testing.assert_close(ms_ssim(x, y, cfg), expected)


def test_identical_images_score_one_and_batch_equals_singles():
    x, y = _deltas(seed=2, shape=(4, 4, 16, 16))
    cfg = SSIMConfig.fit(16, 16)
    torch.testing.assert_close(ms_ssim(x, x, cfg), torch.ones(4))
    singles = torch.cat([ms_ssim(x[i : i + 1], y[i : i + 1], cfg) for i in range(4)])
    torch.testing.assert_close(ms_ssim(x, y, cfg), singles)
    torch.testing.assert_close(ms_ssim(x, y, cfg), ms_ssim(y, x, cfg))


@pytest.mark.parametrize(
    "size,scales,kernel",
    [(64, 3, 11), (128, 3, 11), (44, 3, 11), (32, 3, 7), (16, 2, 7), (8, 1, 7), (4, 1, 3)],
)
def test_config_fits_small_latents(size, scales, kernel):
    cfg = SSIMConfig.fit(size, size)
    assert (cfg.scales, cfg.kernel_size) == (scales, kernel)
    assert cfg.fits(size, size)
    assert len(cfg.betas) == scales
    assert SSIMConfig.from_json(cfg.to_json()) == cfg


def test_config_that_does_not_fit_is_refused():
    x = torch.rand(1, 4, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        ms_ssim(x, x, SSIMConfig())
    with pytest.raises(ValueError, match="does not match sigma"):
        SSIMConfig(kernel_size=9, sigma=1.5)
