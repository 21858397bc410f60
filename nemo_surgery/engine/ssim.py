"""Multi-scale SSIM, batched in torch, with a configuration fitted to the latent size.

Semantics follow the reference's metric (torchmetrics' MS-SSIM with ``relu``
normalisation): per scale a Gaussian-window SSIM with reflect padding cropped
to the valid region; contrast-sensitivity at every scale but the last, full
SSIM at the last, each passed through ReLU, combined as a weighted product;
2x2 average pooling between scales; channels averaged; data range 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

#: Smallest Gaussian window we accept when fitting a config to a small latent.
MIN_KERNEL = 5


@dataclass(frozen=True)
class SSIMConfig:
    """Parameters of the multi-scale SSIM (defaults: the reference's, for 64x64 latents)."""

    scales: int = 3
    kernel_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03

    @property
    def betas(self) -> tuple[float, ...]:
        """Equal weights per scale (1/3 each for three scales)."""
        return (1.0 / self.scales,) * self.scales

    def fits(self, height: int, width: int) -> bool:
        """Return True when every scale's image is at least one window wide."""
        smallest = min(height, width) // (2 ** (self.scales - 1))
        return smallest >= self.kernel_size

    @classmethod
    def fit(cls, height: int, width: int, scales: int = 3, kernel_size: int = 11) -> SSIMConfig:
        """Choose the most scales, then the largest odd window, that fit an image of this size.

        The reference's 3 scales with an 11-pixel window need at least 44x44;
        smaller latents drop scales first and shrink the window down to
        MIN_KERNEL (sigma scaled with the window).
        """
        for n in range(scales, 0, -1):
            smallest = min(height, width) // (2 ** (n - 1))
            k = min(kernel_size, smallest if smallest % 2 else smallest - 1)
            if k >= MIN_KERNEL or n == 1:
                k = max(k, 1)
                sigma = 1.5 if k == kernel_size else 1.5 * k / kernel_size
                return cls(scales=n, kernel_size=k, sigma=round(sigma, 6))
        raise AssertionError("unreachable")

    def to_json(self) -> dict:
        """Return the config as a JSON-ready dict."""
        return asdict(self)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim_components(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample (SSIM, contrast-sensitivity) of one scale, each of shape [B].

    x and y are [B, C, H, W] with values in [0, 1] (data range 1).
    """
    b, c, h, w = x.shape
    pad = (cfg.kernel_size - 1) // 2
    c1, c2 = cfg.k1**2, cfg.k2**2
    window = _gaussian_window(cfg.kernel_size, cfg.sigma, c, x.device, x.dtype)
    stack = torch.cat([x, y, x * x, y * y, x * y])
    if pad:
        stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    filtered = F.conv2d(stack, window, groups=c)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.split(b)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = (e_xx - mu_xx).clamp_min(0.0)
    var_y = (e_yy - mu_yy).clamp_min(0.0)
    cov = e_xy - mu_xy
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = ((2 * mu_xy + c1) / (mu_xx + mu_yy + c1)) * cs_map
    if pad:
        cs_map = cs_map[..., pad:-pad, pad:-pad]
        ssim_map = ssim_map[..., pad:-pad, pad:-pad]
    return ssim_map.reshape(b, -1).mean(-1), cs_map.reshape(b, -1).mean(-1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig) -> torch.Tensor:
    """Multi-scale SSIM of matching pairs: x[i] vs y[i]; returns a float32 tensor of shape [B]."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ms_ssim needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not cfg.fits(x.shape[-2], x.shape[-1]):
        raise ValueError(f"SSIM config {cfg} does not fit images of {x.shape[-2]}x{x.shape[-1]}")
    x, y = x.float(), y.float()
    factors = []
    for scale in range(cfg.scales):
        sim, cs = ssim_components(x, y, cfg)
        last = scale == cfg.scales - 1
        factors.append(torch.relu(sim if last else cs))
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(factors)
    betas = torch.tensor(cfg.betas, device=stacked.device).unsqueeze(1)
    return torch.prod(stacked**betas, dim=0)
