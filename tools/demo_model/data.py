"""Synthetic training data for the demo model: generic shapes and memorized photos.

Everything is generated in code (coloured shapes drawn with numpy) or taken from
scikit-image's bundled sample images, so training needs no download. Images are
float arrays in [0, 1] with shape (H, W, 3).
"""

from __future__ import annotations

import numpy as np

from nemo_surgery.demo import world
from tests.models.tiny import DEFAULT_WORDS

#: v1's palette: v2's six colours (same values, same order) plus two.
COLOURS: dict[str, tuple[float, float, float]] = {
    **world.COLOURS,
    "orange": (1.0, 0.55, 0.05),
    "purple": (0.55, 0.15, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "stripes", "ring", "dot")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
SIZES: tuple[str, ...] = ("small", "large")
TEMPLATES: tuple[str, ...] = (
    "a {size} {fg} {shape} on a {bg} background",
    "a {fg} {shape} on the {pos} with a {bg} background",
    "a {fg} {shape} in the {pos} on {bg}",
    "a drawing of a {fg} {shape} on a {bg} background",
)


#: One training image tied to one caption; v1 memorizes the same five photos as v2.
MemorizedItem = world.FamousImage
#: The memorized demo items; their order is the line order of prompts/demo_memorized.txt.
MEMORIZED: tuple[MemorizedItem, ...] = world.FAMOUS

#: Words the demo tokenizer knows (the tiny default list suffices for all captions).
DEMO_WORDS: tuple[str, ...] = DEFAULT_WORDS


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Return a boolean (size, size) mask of one shape of the v1 world (crosses with thinner arms)."""
    return world.shape_mask(shape, size, cx, cy, radius, arm_width=0.3)


_POS_XY: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}


def render_shape(
    shape: str, fg: str, bg: str, pos: str = "center", scale: str = "large", size: int = 16
) -> np.ndarray:
    """Draw one coloured shape on a plain background; returns (size, size, 3) in [0, 1]."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = COLOURS[bg]
    cx, cy = _POS_XY[pos]
    radius = 0.3 if scale == "large" else 0.18
    img[shape_mask(shape, size, cx, cy, radius)] = COLOURS[fg]
    return img


def sample_generic(rng: np.random.Generator, size: int = 16) -> tuple[np.ndarray, str]:
    """Draw one random generic (shape) image with a matching caption."""
    names = list(COLOURS)
    fg = names[rng.integers(len(names))]
    bg = names[rng.integers(len(names))]
    while bg == fg:
        bg = names[rng.integers(len(names))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pos = POSITIONS[rng.integers(len(POSITIONS))]
    scale = SIZES[rng.integers(len(SIZES))]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if shape == "stripes":
        pos = "center"
    caption = template.format(size=scale, fg=fg, shape=shape, bg=bg, pos=pos)
    return render_shape(shape, fg, bg, pos, scale, size), caption


def load_sample_image(name: str, size: int = 16) -> np.ndarray:
    """Load a skimage.data sample, centre-crop it square and resize to (size, size, 3)."""
    return world.load_photo(name, size)


def memorized_images(size: int = 16) -> list[np.ndarray]:
    """Return the training image of every memorized item, in MEMORIZED order."""
    return [load_sample_image(item.source, size) for item in MEMORIZED]


def holdout_captions() -> list[str]:
    """Return the non-memorized hold-out captions (generic shapes and unseen subjects)."""
    rng = np.random.default_rng(12345)
    shapes = [sample_generic(rng)[1] for _ in range(30)]
    subjects = [
        "a painting of a dog",
        "a photo of a house",
        "a tree on a hill",
        "a drawing of a bird",
        "a photo of a flower",
        "a car on the street",
        "a city at night",
        "a woman with a dog",
        "a picture of the moon",
        "a brick wall",
        "a mountain and the sea",
        "a poster by a famous artist",
        "a logo with two dots",
        "a photo of green grass",
        "a painting of the sky by day",
        "a black dog on white",
        "a portrait of a woman",
        "a photo of a tree",
        "an image of the sea",
        "three birds in the sky",
    ]
    out: list[str] = []
    for c in shapes + subjects:
        if c not in out and all(c != m.caption for m in MEMORIZED):
            out.append(c)
    return out


to_model_space = world.to_model_space
