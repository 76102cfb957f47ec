"""Drawing primitives of the shapes world: the eight shapes as polygons and their masks (``draw_shape``), and
textured backgrounds (``render_background``).

Shapes are polygons in unit coordinates (x right, y down, radius about 1), a second polygon being a hole (the
ring); ``SHAPE_REACH`` is each one's farthest vertex from its centre, so that a placed shape can be kept inside the
image. The diamond is a rhombus (aspect 0.6), which no rotation of a square can produce. Masks are drawn by PIL
without anti-aliasing. A background is a two-colour pattern (smooth noise, stripes, checkers or a gradient; random
colours, sometimes of low contrast) or a blend of two, with grain and optional thin clutter lines and dots.

Everything random is drawn from the ``numpy.random.Generator`` passed in. This module knows nothing of concepts,
colours or scenes: ``model.training.shapes.world`` composes scenes from these pieces.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw


# -- shapes as polygons in unit coordinates (x right, y down, radius about 1) -----------------------------------

def _regular(n: int, r: float, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.15), _regular(5, 0.47, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x / 15.0, -(y / 15.0 + 0.17)], axis=1)


_W = 0.33  # half-width of the cross's arms
_POLYGONS: dict[str, tuple[np.ndarray, ...]] = {  # outer polygon, optional hole
    "circle": (_regular(40, 1.0),),
    "square": (np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),),
    "triangle": (_regular(3, 1.2, -math.pi / 2) + np.array([0.0, 0.2]),),
    "star": (_star(),),
    "ring": (_regular(40, 1.0), _regular(40, 0.55)),
    "cross": (np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1], [-_W, 1],
                        [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]], dtype=float),),
    "heart": (_heart(),),
    "diamond": (np.array([[0.0, -1.15], [0.69, 0.0], [0.0, 1.15], [-0.69, 0.0]]),),
}
# each shape's farthest vertex from its centre, in radii: a shape of radius r fits in a circle of radius r * reach
SHAPE_REACH: dict[str, float] = {k: float(np.hypot(*v[0].T).max()) for k, v in _POLYGONS.items()}


def draw_shape(shape: str, size_hw: tuple[int, int], center_xy: tuple[float, float], radius: float,
               angle: float) -> np.ndarray:
    """The (H, W) bool mask of ``shape`` centred at ``center_xy`` (pixels), ``radius`` in pixels, ``angle`` radians."""
    if shape not in _POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; shapes are {list(_POLYGONS)}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    canvas = Image.new("L", (size_hw[1], size_hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for fill, poly in zip((1, 0), _POLYGONS[shape]):
        pts = poly @ rot.T * radius + np.asarray(center_xy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


# -- backgrounds -------------------------------------------------------------------------------------------------

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _field(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A (size, size) float32 pattern in [0, 1]."""
    xx, yy = _grid(size)
    if kind == "noise":
        k = int(rng.integers(2, 9))
        low = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8))
        return np.asarray(low.resize((size, size), Image.BICUBIC), dtype=np.float32) * np.float32(1 / 255)
    angle = rng.uniform(0, math.pi)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = xx * cos + yy * sin
    if kind == "stripes":
        period = rng.uniform(3, size / 3)
        wave = np.sin(u * np.float32(2 * math.pi / period) + np.float32(rng.uniform(0, 2 * math.pi)))
        return (wave > 0).astype(np.float32) if rng.random() < 0.5 else 0.5 + 0.5 * wave
    if kind == "checkers":
        cell = np.float32(1 / rng.uniform(3, size / 4))
        v = yy * cos - xx * sin
        return ((np.floor(u * cell) + np.floor(v * cell)) % 2).astype(np.float32)
    if kind == "gradient":
        if rng.random() < 0.5:
            return (u - u.min()) / max(float(np.ptp(u)), 1e-6)
        c = rng.uniform(0, size, size=2).astype(np.float32)
        r = np.hypot(xx - c[0], yy - c[1])
        return r / max(float(r.max()), 1e-6)
    raise ValueError(f"unknown background pattern {kind!r}")


_PATTERNS = ("noise", "stripes", "checkers", "gradient")


def render_background(rng: np.random.Generator, size: int, clutter: bool = True) -> np.ndarray:
    """A (size, size, 3) uint8 textured background: a two-colour pattern or a blend of two, grain, clutter."""

    def layer() -> np.ndarray:
        c1 = _random_colour(rng)
        # sometimes low contrast
        c2 = c1 + rng.normal(0, 25, 3).astype(np.float32) if rng.random() < 0.3 else _random_colour(rng)
        t = _field(rng, size, _PATTERNS[int(rng.integers(len(_PATTERNS)))])[..., None]
        return c1 + t * (c2 - c1)

    bg = layer()
    if rng.random() < 0.3:
        alpha = np.float32(rng.uniform(0.3, 0.7))
        bg = alpha * bg + (1 - alpha) * layer()
    grain = rng.standard_normal((size, size, 1 if rng.random() < 0.5 else 3), dtype=np.float32)
    bg += grain * np.float32(rng.uniform(0, 20))
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    if clutter and rng.random() < 0.5:
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 7))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(0, size, 2)
            if rng.random() < 0.5:
                x1, y1 = rng.uniform(0, size, 2)
                draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
            else:
                r = rng.uniform(0.5, max(1.0, size / 40))
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    return np.asarray(image)


__all__ = ["SHAPE_REACH", "draw_shape", "render_background"]
