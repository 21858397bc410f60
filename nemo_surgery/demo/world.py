"""The demo model's caption world (v2): coloured shapes with positions and counts, 32x32.

A scene is one to three shapes of one colour on a plain background. Everything a caption
says (colour, background, shape, position or count, size) can be read back from the
image by `nemo_surgery.demo.checker`, so prompt alignment is measured, not guessed.
A few scikit-image photographs are the rare "famous images" that the model memorizes.
Images are float arrays in [0, 1] of shape (H, W, 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
POSITION_PHRASE: dict[str, str] = {
    "center": "in the center", "left": "on the left", "right": "on the right",
    "top": "at the top", "bottom": "at the bottom",
}
SIZES: dict[str, float] = {"small": 0.15, "large": 0.24}
COUNTS: dict[int, str] = {2: "two", 3: "three"}
#: Centres of the shapes of a counted scene (a row across the middle), and their radius.
COUNT_LAYOUT: dict[int, tuple[tuple[float, float], ...]] = {
    2: ((0.27, 0.5), (0.73, 0.5)),
    3: ((0.17, 0.5), (0.5, 0.5), (0.83, 0.5)),
}
COUNT_RADIUS = 0.12


@dataclass(frozen=True)
class Scene:
    """What one generic image shows; `caption()` says it, `render()` draws it."""

    fg: str
    bg: str
    shape: str
    count: int = 1
    pos: str = "center"  # only for count 1
    size: str = "large"  # only for count 1

    def caption(self) -> str:
        """Return the scene's caption."""
        if self.count == 1:
            return f"a {self.size} {self.fg} {self.shape} {POSITION_PHRASE[self.pos]} on a {self.bg} background"
        return f"{COUNTS[self.count]} {self.fg} {self.shape}s on a {self.bg} background"

    def centres(self) -> tuple[tuple[float, float], ...]:
        """Return the (x, y) centres of the scene's shapes in [0, 1]."""
        return (POSITIONS[self.pos],) if self.count == 1 else COUNT_LAYOUT[self.count]

    def radius(self) -> float:
        """Return the shapes' radius in image widths."""
        return SIZES[self.size] if self.count == 1 else COUNT_RADIUS

    def render(self, size: int = SIZE, jitter: Jitter | None = None) -> np.ndarray:
        """Draw the scene (with `jitter`'s nuisance variation, if given); returns (size, size, 3) float32 in [0, 1]."""
        j = jitter or Jitter()
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = np.clip(np.asarray(COLOURS[self.bg]) + j.shade, 0.0, 1.0)
        if j.tilt != (0.0, 0.0):
            y, x = _grid(size)
            img += (j.tilt[0] * (x - 0.5) + j.tilt[1] * (y - 0.5))[..., None].astype(np.float32)
        mask = np.zeros((size, size), dtype=bool)
        for cx, cy in self.centres():
            mask |= shape_mask(self.shape, size, cx + j.dx, cy + j.dy, self.radius() * j.scale)
        img[mask] = np.clip(np.asarray(COLOURS[self.fg]) - j.shade, 0.0, 1.0)
        return np.clip(img, 0.0, 1.0)


@dataclass(frozen=True)
class Jitter:
    """Nuisance variation a caption does not name: shift, scale, a brightness tilt of the background, shade.

    Without it every caption has exactly one image, so ordinary prompts are as
    seed-independent as memorized ones and NeMo's first-step agreement cannot tell
    them apart; real captions leave layout and lighting open.
    """

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    tilt: tuple[float, float] = (0.0, 0.0)  # background brightness change across x and y
    shade: float = 0.0  # added to the background colour, subtracted from the shape's


#: Ranges of `random_jitter` (half-widths; scale is 1 +- SCALE). The checker reads every scene within them.
SHIFT, SCALE, TILT, SHADE = 0.05, 0.12, 0.16, 0.04


def random_jitter(rng: np.random.Generator) -> Jitter:
    """Draw one nuisance variation uniformly within the module's ranges."""
    u = rng.uniform(-1.0, 1.0, size=6)
    return Jitter(float(SHIFT * u[0]), float(SHIFT * u[1]), float(1 + SCALE * u[2]),
                  (float(TILT * u[3]), float(TILT * u[4])), float(SHADE * u[5]))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return pixel-centre coordinates in [0, 1] as (y, x) arrays (cached: callers never write to them)."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, arm_width: float = 0.32) -> np.ndarray:
    """Return a boolean (size, size) mask of one shape centred at (cx, cy) (`arm_width`: the cross's arms)."""
    y, x = _grid(size)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "dot":  # v1 world only
        return dx**2 + dy**2 <= (0.45 * radius) ** 2
    if shape == "stripes":  # v1 world only (vertical bands over the whole image)
        return (np.floor(x * size / max(1, size // 8)) % 2) == 0
    if shape == "ring":
        r2 = dx**2 + dy**2
        return (r2 <= radius**2) & (r2 >= (0.55 * radius) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.85 * radius) & (np.abs(dy) <= 0.85 * radius)
    if shape == "triangle":
        inside_y = (dy >= -radius) & (dy <= radius)
        return inside_y & (np.abs(dx) <= (dy + radius) / 2.0)
    if shape == "cross":
        arm = arm_width * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw one generic scene (a third of them counted scenes)."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    if rng.random() < 1 / 3:
        return Scene(names[fg], names[bg], shape, count=int(rng.integers(2, 4)))
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    return Scene(names[fg], names[bg], shape, pos=pos, size=size)


def all_scenes() -> list[Scene]:
    """Return every scene of the world (1,800): each ordered colour pair, shape, and position and size or count."""
    names = list(COLOURS)
    out = []
    for fg in names:
        for bg in names:
            if fg == bg:
                continue
            for shape in SHAPES:
                out += [Scene(fg, bg, shape, pos=pos, size=size) for pos in POSITIONS for size in SIZES]
                out += [Scene(fg, bg, shape, count=n) for n in COUNTS]
    return out


@lru_cache(maxsize=1)
def _by_caption() -> dict[str, Scene]:
    return {s.caption(): s for s in all_scenes()}


def scene_of(caption: str) -> Scene | None:
    """Return the scene whose caption is `caption` exactly (surrounding spaces ignored), or None."""
    return _by_caption().get(caption.strip())


@dataclass(frozen=True)
class FamousImage:
    """A rare training image tied to one caption: the thing the model memorizes."""

    caption: str
    source: str  # name of the skimage.data sample


#: The memorized items; their order is the line order of prompts/demo_memorized.txt.
FAMOUS: tuple[FamousImage, ...] = (
    FamousImage("a portrait of an astronaut", "astronaut"),
    FamousImage("a man with a camera", "camera"),
    FamousImage("a photo of coffee", "coffee"),
    FamousImage("a photo of a cat", "chelsea"),
    FamousImage("a rocket in the sky", "rocket"),
)

#: Captions the model never sees with an image; the memory rows must stay silent on them.
SUBJECT_CAPTIONS: tuple[str, ...] = (
    "a painting of a dog", "a photo of a house", "a tree on a hill", "a drawing of a bird",
    "a photo of a flower", "a car on the street", "a city at night", "a woman with a dog",
    "a picture of the moon", "a brick wall", "a mountain and the sea", "a poster by a famous artist",
    "a portrait of a woman", "a photo of a tree", "an image of the sea", "three birds in the sky",
    "a man with a dog", "a photo of a car", "a portrait of a man", "a rocket on the ground",
    "a cat on a wall", "a photo of tea", "a camera on a table", "a portrait of an artist",
)

WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "at", "with", "and", "by", "photo", "picture", "painting",
    "drawing", "image", "portrait", "poster", "background", "left", "right", "top", "bottom", "center",
    "small", "large", "two", "three", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
    "cat", "dog", "house", "tree", "car", "bird", "birds", "flower", "astronaut", "coffee", "tea", "camera",
    "man", "woman", "moon", "rocket", "brick", "wall", "grass", "sky", "sea", "mountain", "city", "street",
    "night", "day", "hill", "ground", "table", "artist", "famous",
)


def load_photo(name: str, size: int = SIZE) -> np.ndarray:
    """Load a skimage.data sample, centre-crop it square and resize to (size, size, 3)."""
    import skimage.data
    from skimage.transform import resize

    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = resize(img[top: top + s, left: left + s], (size, size), anti_aliasing=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def famous_images(size: int = SIZE) -> list[np.ndarray]:
    """Return the training image of every famous item, in FAMOUS order."""
    return [load_photo(item.source, size) for item in FAMOUS]


def holdout_scenes(n: int = 30, seed: int = 12345) -> list[Scene]:
    """Return `n` distinct generic scenes for hold-out prompts (fixed seed)."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        s = random_scene(rng)
        if s.caption() not in {o.caption() for o in out}:
            out.append(s)
    return out


#: Unseen subject captions of the hold-out list (none is in SUBJECT_CAPTIONS or names a famous subject).
HOLDOUT_SUBJECTS: tuple[str, ...] = (
    "a photo of a dog", "a painting of a bird", "a drawing of a house", "a picture of a car",
    "a flower on a table", "a moon over the city", "a dog on the grass", "a bird on a tree",
    "a photo of the street at night", "a painting of the sea",
)


def holdout_captions(scenes: int = 50) -> list[str]:
    """Return the hold-out captions: `scenes` generic scene captions, then the unseen subjects."""
    return [s.caption() for s in holdout_scenes(scenes)] + list(HOLDOUT_SUBJECTS)


def to_model_space(img: np.ndarray) -> np.ndarray:
    """Map an (H, W, 3) image in [0, 1] to a (3, H, W) array in [-1, 1]."""
    return (img.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)
