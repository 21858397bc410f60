"""Image similarity for verification: SSIM (scikit-image) and optional SSCD/CLIP from local files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: scikit-image's default SSIM window; smaller images get the largest odd window that fits.
DEFAULT_WIN = 7


def fit_win_size(height: int, width: int, default: int = DEFAULT_WIN) -> int:
    """Largest odd SSIM window <= ``default`` that fits an image of this size (at least 3)."""
    side = min(height, width, default)
    win = side if side % 2 else side - 1
    if win < 3:
        raise ValueError(f"images of {height}x{width} are too small for SSIM (need at least 3x3)")
    return win


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two float images [H, W, 3] in [0, 1] (channels averaged, window fitted to the size)."""
    from skimage.metrics import structural_similarity

    win = fit_win_size(a.shape[0], a.shape[1])
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, win_size=win))


def paired_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of corresponding images of two stacks [N, H, W, 3]: [N]."""
    return np.array([ssim(x, y) for x, y in zip(a, b)], dtype=np.float64)


def pairwise_ssim(images: np.ndarray) -> np.ndarray:
    """SSIM of every pair (i < j) of a stack [N, H, W, 3]: [N(N-1)/2]."""
    n = images.shape[0]
    i, j = np.triu_indices(n, k=1)
    return np.array([ssim(images[a], images[b]) for a, b in zip(i, j)], dtype=np.float64)


def to_reference(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """SSIM of each image of a stack [N, H, W, 3] to one reference image [H, W, 3]: [N]."""
    return np.array([ssim(x, reference) for x in images], dtype=np.float64)


def load_image(path: str | Path, height: int, width: int) -> np.ndarray:
    """Read an image file as float32 RGB [H, W, 3] in [0, 1], resized (bicubic) to the sample size."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.BICUBIC)
        return np.asarray(rgb, dtype=np.float32) / 255.0


# -- optional embedding metrics, from local files only ------------------------------------------


@dataclass
class EmbeddingMetric:
    """A loaded optional metric: ``embed(images [N,H,W,3]) -> [N, D]`` unit vectors."""

    name: str
    source: str
    embed: Callable[[np.ndarray], torch.Tensor]
    embed_text: Callable[[list[str]], torch.Tensor] | None = None


def _to_batch(images: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...], device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(device)


def load_sscd(path: str | Path, device: torch.device) -> EmbeddingMetric:
    """Load a TorchScript SSCD copy-detection model (e.g. sscd_disc_mixup.torchscript.pt).

    Inputs are resized to 288x288 and ImageNet-normalized as in SSCD's README;
    embeddings are L2-normalized so a dot product is the cosine similarity.
    """
    model = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def embed(images: np.ndarray) -> torch.Tensor:
        x = _to_batch(images, 288, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device)
        return torch.nn.functional.normalize(model(x).float(), dim=-1).cpu()

    return EmbeddingMetric("sscd", str(path), embed)


def load_clip(folder: str | Path, device: torch.device) -> EmbeddingMetric:
    """Load a local CLIP model folder (transformers format, no download) for prompt alignment."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    size = int(getattr(model.config.vision_config, "image_size", 224))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    @torch.no_grad()
    def embed(images: np.ndarray) -> torch.Tensor:
        out = model.get_image_features(pixel_values=_to_batch(images, size, mean, std, device))
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_text(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        out = model.get_text_features(**tok)
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    return EmbeddingMetric("clip", str(folder), embed, embed_text)
