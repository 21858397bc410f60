"""Multi-scale SSIM, batched in torch: the NeMo reference's metric, exactly, fitted to the latent size.

The reference scores noise differences with torchmetrics'
``multiscale_structural_similarity_index_measure(a, b, reduction="none",
kernel_size=11, betas=(0.33, 0.33, 0.33))`` and its defaults (Gaussian window,
sigma 1.5, k1 0.01, k2 0.03, ``relu`` normalisation, data range taken from the
data). This module computes the same numbers (tested against torchmetrics to
1e-6) without depending on it at run time:

* per scale: reflect padding by half the window, a valid Gaussian filter, so
  the maps keep the image size; contrast-sensitivity (cs) is averaged over the
  map cropped by half a window on each side, SSIM over the whole map;
* every scale contributes ReLU(cs), except the last, which contributes
  ReLU(SSIM); the factors are combined as prod(factor ** beta);
* 2x2 average pooling between scales; channels averaged with the pixels;
* data range ``None`` (the reference's): at every scale, per pair, the larger
  of max - min of the two images. torchmetrics takes that range over the whole
  batch; we take it per pair so a score never depends on which other pairs
  share a call (identical to torchmetrics called one pair at a time).

The Gaussian window's width follows from sigma as in torchmetrics
(``2 * int(3.5 * sigma + 0.5) + 1``); :class:`SSIMConfig` keeps ``kernel_size``
and ``sigma`` consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

#: Smallest Gaussian window we accept when fitting a config to a small latent.
MIN_KERNEL = 5
#: The reference's per-scale exponent with three scales (not exactly 1/3).
REFERENCE_BETA = 0.33


def window_for_sigma(sigma: float) -> int:
    """Width of the Gaussian window torchmetrics uses for ``sigma``."""
    return 2 * int(3.5 * sigma + 0.5) + 1


def default_betas(scales: int) -> tuple[float, ...]:
    """The reference's (0.33, 0.33, 0.33) for three scales; equal weights 1/scales otherwise."""
    if scales == 3:
        return (REFERENCE_BETA,) * 3
    return (round(1.0 / scales, 6),) * scales


@dataclass(frozen=True)
class SSIMConfig:
    """Parameters of the multi-scale SSIM (defaults: the reference's, for 64x64 latents).

    ``data_range`` None means "from the data, per pair and scale" (the
    reference's); a number fixes it (1.0 for images scaled to [0, 1]).
    """

    scales: int = 3
    kernel_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    betas: tuple[float, ...] = field(default=(REFERENCE_BETA,) * 3)
    data_range: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != self.scales:
            raise ValueError(f"SSIM config has {self.scales} scales but {len(self.betas)} betas")
        if window_for_sigma(self.sigma) != self.kernel_size:
            raise ValueError(f"SSIM window {self.kernel_size} does not match sigma {self.sigma} "
                             f"(a Gaussian of that sigma is {window_for_sigma(self.sigma)} wide)")

    def fits(self, height: int, width: int) -> bool:
        """Return True when every scale's image is at least one window wide."""
        smallest = min(height, width) // (2 ** (self.scales - 1))
        return smallest >= self.kernel_size

    @classmethod
    def fit(cls, height: int, width: int, scales: int = 3, kernel_size: int = 11) -> SSIMConfig:
        """Choose the most scales, then the largest odd window, that fit an image of this size.

        The reference's 3 scales with an 11-pixel window need at least 44x44;
        smaller latents drop scales first and shrink the window down to
        MIN_KERNEL (sigma scaled with the window, 1.5 * k / 11, which keeps
        torchmetrics' window width equal to k).
        """
        for n in range(scales, 0, -1):
            smallest = min(height, width) // (2 ** (n - 1))
            k = min(kernel_size, smallest if smallest % 2 else smallest - 1)
            if k >= MIN_KERNEL or n == 1:
                k = max(k, 3)
                sigma = 1.5 if k == kernel_size else round(1.5 * k / kernel_size, 6)
                return cls(scales=n, kernel_size=k, sigma=sigma, betas=default_betas(n))
        raise AssertionError("unreachable")

    def to_json(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict."""
        return {"scales": self.scales, "kernel_size": self.kernel_size, "sigma": self.sigma, "k1": self.k1,
                "k2": self.k2, "betas": list(self.betas), "data_range": self.data_range}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SSIMConfig:
        """Rebuild a config from :meth:`to_json` output."""
        doc = dict(doc)
        doc["betas"] = tuple(doc["betas"]) if "betas" in doc else default_betas(doc.get("scales", 3))
        return cls(**doc)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange((1 - size) / 2, (1 + size) / 2, 1, device=device, dtype=dtype)
    g = torch.exp(-torch.pow(coords / sigma, 2) / 2)
    g = (g / g.sum()).unsqueeze(0)
    window = g.t() @ g
    return window.expand(channels, 1, size, size)


def _pair_range(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per pair: the larger of the two images' max - min, shaped [B, 1, 1, 1]."""
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    rx = flat_x.amax(1) - flat_x.amin(1)
    ry = flat_y.amax(1) - flat_y.amin(1)
    return torch.maximum(rx, ry).view(-1, 1, 1, 1)


def ssim_components(x: torch.Tensor, y: torch.Tensor, cfg: SSIMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-sample (SSIM, contrast-sensitivity) of one scale, each of shape [B].

    x and y are [B, C, H, W]; SSIM is averaged over the whole map, cs over the
    map cropped by half a window (torchmetrics' semantics).
    """
    b, c = x.shape[:2]
    pad = (cfg.kernel_size - 1) // 2
    rng = _pair_range(x, y) if cfg.data_range is None else torch.tensor(cfg.data_range, dtype=x.dtype)
    c1, c2 = torch.pow(cfg.k1 * rng, 2), torch.pow(cfg.k2 * rng, 2)
    window = _gaussian_window(cfg.kernel_size, cfg.sigma, c, x.device, x.dtype)
    stack = torch.cat([x, y, x * x, y * y, x * y])
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, e_xx, e_yy, e_xy = F.conv2d(stack, window, groups=c).split(b)
    mu_xx, mu_yy, mu_xy = mu_x.pow(2), mu_y.pow(2), mu_x * mu_y
    var_x = torch.clamp(e_xx - mu_xx, min=0.0)
    var_y = torch.clamp(e_yy - mu_yy, min=0.0)
    upper = 2 * (e_xy - mu_xy) + c2
    lower = (var_x + var_y) + c2
    ssim_map = ((2 * mu_xy + c1) * upper) / ((mu_xx + mu_yy + c1) * lower)
    cs_map = upper / lower
    if pad:
        cs_map = cs_map[..., pad:-pad, pad:-pad]
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
        factors.append(torch.relu(sim if scale == cfg.scales - 1 else cs))
        if scale < cfg.scales - 1:
            x, y = F.avg_pool2d(x, (2, 2)), F.avg_pool2d(y, (2, 2))
    stacked = torch.stack(factors)
    betas = torch.tensor(cfg.betas, device=stacked.device).view(-1, 1)
    return torch.prod(stacked**betas, dim=0)
