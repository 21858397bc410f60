"""MS-SSIM: agreement with scikit-image, configuration fitting, batching."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from nemo_surgery.engine.ssim import SSIMConfig, ms_ssim, ssim_components


def _pair(seed=0, shape=(3, 4, 32, 32), noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    y = (x + noise * torch.rand(shape, generator=gen)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("kernel,sigma", [(11, 1.5), (7, 1.5 * 7 / 11)])
def test_single_scale_matches_scikit_image(kernel, sigma):
    x, y = _pair()
    cfg = SSIMConfig(scales=1, kernel_size=kernel, sigma=sigma)
    ours = ms_ssim(x, y, cfg).numpy()
    ref = [
        structural_similarity(
            x[i].numpy(), y[i].numpy(), channel_axis=0, data_range=1.0, gaussian_weights=True,
            sigma=sigma, use_sample_covariance=False, win_size=kernel,
        )
        for i in range(x.shape[0])
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_multi_scale_is_the_weighted_product_of_scales():
    x, y = _pair(seed=1, shape=(2, 4, 64, 64))
    cfg = SSIMConfig()
    expected = torch.ones(2)
    xs, ys = x, y
    for scale in range(3):
        sim, cs = ssim_components(xs, ys, cfg)
        expected *= torch.relu(sim if scale == 2 else cs) ** (1 / 3)
        xs, ys = torch.nn.functional.avg_pool2d(xs, 2), torch.nn.functional.avg_pool2d(ys, 2)
    torch.testing.assert_close(ms_ssim(x, y, cfg), expected)


def test_identical_images_score_one_and_batch_equals_singles():
    x, y = _pair(seed=2, shape=(4, 4, 16, 16))
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
    assert cfg.betas == pytest.approx((1 / scales,) * scales)


def test_config_that_does_not_fit_is_refused():
    x = torch.rand(1, 4, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        ms_ssim(x, x, SSIMConfig())
