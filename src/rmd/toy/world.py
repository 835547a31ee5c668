"""The toy text-to-image world: procedural scenes, prompts, and an anti-aliased renderer.

A scene is a tuple of attributes (shape, colour, texture, position, background,
count) plus a layout seed for small jitters. Images are rendered analytically at
any resolution by supersampling and box filtering, so a scene rendered at 8 px is
the area average of the same scene rendered at 32 px (up to the supersampling
error): resolutions are consistent views of one continuous image.

Textures are fine periodic patterns fixed on the canvas (period 4 px at 32 px),
each dark band or dot centred in its 4-px cell: visible at the target resolution,
and averaged to a flat tone at 16 px (every 16-px pixel covers one half of a cell,
and the two halves are mirror images) and at 8 px. So the final, high-resolution
steps of a cascade have real work to do. The period equals the toy teacher's patch
size, so every patch carries the same pattern; with the earlier 3-px period a patch's
pattern depended on its position modulo 3, and the small teacher never learned to
draw a texture from the prompt (texture read back 0.49, chance 0.25).

Resolution-dependent quality (the gap RMD closes): :func:`degrade` corrupts a
share of the *low-resolution* training images (clutter, a colour cast, or the
wrong object colour), the way real models are pre-trained on large low-resolution
sets of mixed quality and fine-tuned on curated high-resolution data.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
TEXTURES = ("plain", "striped", "checkered", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = {"black": (0.04, 0.04, 0.04), "gray": (0.50, 0.50, 0.50), "white": (0.96, 0.96, 0.96)}
COUNTS = (1, 2)
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
    "count": COUNTS,
}
DEGRADATIONS = ("clutter", "cast", "wrong_colour")

# (shape, colour) pairs never shown in training: evaluation probes compositional generalisation.
HELD_OUT_PAIRS = frozenset({("circle", "blue"), ("square", "yellow"), ("triangle", "magenta"), ("cross", "green")})

TEXTURE_PERIOD = 4.0 / 32.0  # canvas units: 4 px at the 32 px target
PATTERN_DARKNESS = 0.25  # pattern pixels are the object colour times this

_REGION_CENTRES = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    position: str
    background: str
    count: int

    def __post_init__(self):
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(values)}")

    @property
    def held_out(self) -> bool:
        return (self.shape, self.colour) in HELD_OUT_PAIRS

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (what the evaluator predicts)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """Draw n scenes uniformly from a split: "train" (held-out pairs excluded), "heldout", or "all"."""
    pool = all_scenes()
    if split == "train":
        pool = [s for s in pool if not s.held_out]
    elif split == "heldout":
        pool = [s for s in pool if s.held_out]
    elif split != "all":
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


# --- prompts -------------------------------------------------------------------------------

_POSITION_PHRASES = {
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_TEXTURE_ADJ = {"plain": ("plain", "solid"), "striped": ("striped",), "checkered": ("checkered",), "dotted": ("dotted", "spotted")}
_TEXTURE_WITH = {
    "plain": ("with no pattern",),
    "striped": ("with stripes", "with thin stripes"),
    "checkered": ("with a checker pattern", "with checks"),
    "dotted": ("with dots", "with small dots"),
}
_TEMPLATES = (
    "{det} {tex} {col} {shp} {pos} on a {bg} background",
    "{det} {col} {shp} {texw} {pos} , {bg} background",
    "a {bg} background with {det} {tex} {col} {shp} {pos}",
    "{pos} : {det} {col} {tex} {shp} on {bg}",
    "picture of {det} {col} {shp} {texw} , {pos} , {bg} backdrop",
)


def prompt_for(scene: Scene, variant: int) -> str:
    """A prompt describing the scene; ``variant`` picks the template and synonyms."""
    rng = random.Random(variant)
    plural = scene.count == 2
    det = "two" if plural else rng.choice(("a", "one"))
    shp = PLURALS[scene.shape] if plural else scene.shape
    template = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    text = template.format(
        det=det,
        tex=rng.choice(_TEXTURE_ADJ[scene.texture]),
        texw=rng.choice(_TEXTURE_WITH[scene.texture]),
        col=scene.colour,
        shp=shp,
        pos=rng.choice(_POSITION_PHRASES[scene.position]),
        bg=scene.background,
    )
    return " ".join(text.split())


def vocabulary() -> list[str]:
    """Every word any prompt can contain, sorted (the toy tokenizer's vocabulary)."""
    words: set[str] = set()
    for t in _TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    for table in (_POSITION_PHRASES, _TEXTURE_ADJ, _TEXTURE_WITH):
        for phrases in table.values():
            for p in phrases:
                words.update(p.split())
    words.update(("a", "one", "two"))
    words.update(COLOURS)
    words.update(BACKGROUNDS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    return sorted(words)


# --- rendering -----------------------------------------------------------------------------


def _layout(scene: Scene, seed: int) -> list[tuple[float, float, float]]:
    """Object centres and half-sizes (canvas units, y down), jittered by the layout seed."""
    rng = random.Random(seed * 7919 + 17)
    cx, cy = _REGION_CENTRES[scene.position]
    cx += rng.uniform(-0.035, 0.035)
    cy += rng.uniform(-0.035, 0.035)
    if scene.count == 1:
        return [(cx, cy, rng.uniform(0.19, 0.23))]
    h = rng.uniform(0.12, 0.14)
    gap = 0.19
    if scene.position in ("left", "right"):  # stack along the free axis
        return [(cx, cy - gap, h), (cx, cy + gap, h)]
    return [(cx - gap, cy, h), (cx + gap, cy, h)]


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test in local coordinates normalised by the half-size (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.86
    if shape == "cross":  # an upright plus sign: two bars of half-width 0.4
        a, b = u.abs(), v.abs()
        return ((a <= 0.4) & (b <= 1.05)) | ((b <= 0.4) & (a <= 1.05))
    # triangle, apex up, base at v = 0.85
    return (v <= 0.85) & (u.abs() <= (v + 1.0) / 1.85 * 1.0)


def _texture_mask(texture: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Where the dark pattern is, on the canvas grid (x, y in canvas units).

    Every pattern is mirror-symmetric about the centre of its cell, which lies on a
    16-px pixel boundary: that is what makes it average out exactly at 16 px.
    """
    p = TEXTURE_PERIOD
    if texture == "plain":
        return torch.zeros_like(x, dtype=torch.bool)
    dx = torch.remainder(x, p) - p / 2  # offset from the cell centre
    dy = torch.remainder(y, p) - p / 2
    if texture == "striped":  # horizontal bands, half a period wide
        return dy.abs() < p / 4
    if texture == "checkered":
        return (dx.abs() < p / 4) ^ (dy.abs() < p / 4)
    # dotted: one disc of radius 0.3 p per cell
    return dx * dx + dy * dy <= (0.3 * p) ** 2


@functools.lru_cache(maxsize=8)
def _grid(size: int, supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = size * supersample
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def render_one(
    scene: Scene,
    size: int,
    seed: int = 0,
    degradation: Optional[str] = None,
    supersample: Optional[int] = None,
) -> torch.Tensor:
    """Render one scene as a (3, size, size) float32 image in [-1, 1].

    Anti-aliasing: evaluate at ``supersample`` x the resolution and box-filter,
    with at least 128 samples per side so that every resolution averages the
    same continuous image.
    """
    if degradation is not None and degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; choose one of {DEGRADATIONS}")
    ss = supersample or max(2, math.ceil(128 / size))
    x, y = _grid(size, ss)
    rng = random.Random(seed * 104729 + 3)
    colour = scene.colour
    if degradation == "wrong_colour":
        colour = rng.choice([c for c in COLOURS if c != scene.colour])
    f32 = torch.float32
    img = torch.tensor(BACKGROUNDS[scene.background], dtype=f32)[:, None, None].expand(3, *x.shape)
    if degradation == "clutter":  # small blobs of random colours behind the object
        for _ in range(rng.randint(3, 5)):
            bx, by, br = rng.random(), rng.random(), rng.uniform(0.05, 0.09)
            blob = (x - bx) ** 2 + (y - by) ** 2 <= br * br
            col = torch.tensor([rng.random() for _ in range(3)], dtype=f32)
            img = torch.where(blob, col[:, None, None], img)
    base = torch.tensor(COLOURS[colour], dtype=f32)[:, None, None]
    pattern = _texture_mask(scene.texture, x, y)
    for cx, cy, h in _layout(scene, seed):
        # test only the object's bounding box: most of the canvas is background
        inside = torch.zeros_like(pattern)
        n = x.shape[0]
        lo_x, hi_x = max(0, int((cx - 1.2 * h) * n)), min(n, int((cx + 1.2 * h) * n) + 1)
        lo_y, hi_y = max(0, int((cy - 1.2 * h) * n)), min(n, int((cy + 1.2 * h) * n) + 1)
        xs, ys = x[lo_y:hi_y, lo_x:hi_x], y[lo_y:hi_y, lo_x:hi_x]
        inside[lo_y:hi_y, lo_x:hi_x] = _shape_mask(scene.shape, (xs - cx) / h, (ys - cy) / h)
        img = torch.where(inside, torch.where(pattern, base * PATTERN_DARKNESS, base), img)
    if degradation == "cast":  # washed-out colour cast over the whole image
        tint = torch.tensor([rng.random() for _ in range(3)], dtype=f32)
        img = 0.45 * img + 0.55 * tint[:, None, None]
    img = torch.nn.functional.avg_pool2d(img[None], ss)[0]
    return (img * 2.0 - 1.0).float()


def render(
    scenes: Sequence[Scene],
    size: int,
    seeds: Sequence[int],
    degradations: Optional[Sequence[Optional[str]]] = None,
) -> torch.Tensor:
    """Render a batch: (B, 3, size, size) in [-1, 1]; image i depends only on (scenes[i], seeds[i])."""
    if len(seeds) != len(scenes):
        raise ValueError(f"{len(scenes)} scenes but {len(seeds)} seeds; give one seed per scene")
    degradations = degradations if degradations is not None else [None] * len(scenes)
    # the renderer is many small tensor ops: thread start-up costs more than it saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.stack([render_one(s, size, int(sd), d) for s, sd, d in zip(scenes, seeds, degradations)])
    finally:
        torch.set_num_threads(threads)


@dataclass
class Batch:
    images: torch.Tensor
    prompts: list[str]
    scenes: list[Scene]
    degradations: list[Optional[str]]


def training_batch(
    batch_size: int,
    size: int,
    seed: int,
    degrade_share: float = 0.0,
    split: str = "train",
) -> Batch:
    """A reproducible batch of (image, prompt) pairs at one resolution.

    ``degrade_share`` of the images get one degradation each (the caller passes
    a non-zero share only for low-resolution data).
    """
    rng = random.Random(seed)
    scenes = sample_scenes(batch_size, rng.randrange(2**31), split)
    seeds = [rng.randrange(2**31) for _ in scenes]
    prompts = [prompt_for(s, rng.randrange(2**31)) for s in scenes]
    degr = [rng.choice(DEGRADATIONS) if rng.random() < degrade_share else None for _ in scenes]
    return Batch(render(scenes, size, seeds, degr), prompts, scenes, degr)
