"""The shapes world: 64 concepts ("<colour> <shape>"), a seen/unseen split, a scene renderer and captions.

Concept ids are 1..64 everywhere (0 is background): id = 1 + 8 * colour_index + shape_index, so the ids equal the
COCO category ids and label-PNG values written by ``model.shapes.dataset`` and the row of a concept in a ZUTIS
vocabulary ``["background", *world.concepts]``.

A scene is a textured background (smooth noise, stripes, checkers, gradients or a blend of two; random colours;
grain; optional thin clutter lines and dots) with flat-coloured objects painted back to front. Each object has a
palette colour plus a per-object jitter of at most ``COLOUR_JITTER`` per channel, a random size, position and
rotation (within +-45 degrees, so hearts and triangles stay roughly upright as photographed objects do), and
later objects occlude earlier ones (at most ``max_occlusion`` of an earlier object's area may be hidden). Finally
every pixel gets uniform sensor noise of at most ``PIXEL_NOISE`` per channel. There is no anti-aliasing, so every
pixel of an object's visible mask is within ``PIXEL_NOISE`` of that object's drawn colour. The diamond is a
rhombus (aspect 0.6), which no rotation of a square can produce.

Rendering is numpy + PIL and deterministic given the ``numpy.random.Generator`` passed in (about 0.3 ms for a
64 px scene). Colours and backgrounds are chosen so that neither colour thresholding nor a position prior finds
the objects: background colours are uniform over RGB and may match an object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 220, 40),
    "orange": (245, 130, 20),
    "purple": (135, 45, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
COLOUR_JITTER = 12  # max per-channel offset of an object's colour from its palette colour
PIXEL_NOISE = 6  # max per-channel uniform sensor noise added to every pixel

# The 16 unseen concepts: colour i is paired with shapes P1[i] and P2[i], where P1 = [7, 6, 2, 3, 1, 5, 0, 4] and
# P2 = [6, 1, 4, 0, 5, 3, 2, 7] are two permutations with P1[i] != P2[i] for all i (drawn once with
# numpy.random.default_rng(2023) and frozen here). Every colour and every shape is therefore unseen in exactly 2
# and seen in exactly 6 concepts.
UNSEEN_CONCEPTS: tuple[str, ...] = (
    "red diamond", "red heart", "green heart", "green square", "blue triangle", "blue ring",
    "yellow star", "yellow circle", "orange square", "orange cross", "purple cross", "purple star",
    "white circle", "white triangle", "black ring", "black diamond",
)


_CONCEPTS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


class Scene(NamedTuple):
    """One rendered scene; unpacks as ``image, masks, concept_ids`` plus the extra fields.

    ``image``: (H, W, 3) uint8 RGB. ``masks``: (n, H, W) bool visible masks after occlusion, back to front,
    pairwise disjoint. ``concept_ids``: (n,) int64 in 1..64. ``amodal_masks``: (n, H, W) bool full shapes
    before occlusion. ``colours``: (n, 3) uint8, each object's drawn colour (palette + jitter).
    """

    image: np.ndarray
    masks: np.ndarray
    concept_ids: np.ndarray
    amodal_masks: np.ndarray
    colours: np.ndarray


@dataclass(frozen=True)
class ShapesWorld:
    """The concept list of the shapes world and its fixed seen/unseen split (48/16, see ``UNSEEN_CONCEPTS``)."""

    @property
    def concepts(self) -> tuple[str, ...]:
        """All 64 concept names; ``concepts[i]`` has id ``i + 1``."""
        return _CONCEPTS

    @property
    def num_concepts(self) -> int:
        return len(COLOURS) * len(SHAPES)

    def concept_name(self, concept_id: int) -> str:
        """The name of concept ``concept_id`` (1..64), e.g. ``concept_name(1) == "red circle"``."""
        if not 1 <= int(concept_id) <= self.num_concepts:
            raise ValueError(f"concept id must be in 1..{self.num_concepts}, got {concept_id}")
        return self.concepts[int(concept_id) - 1]

    def concept_id(self, name: str) -> int:
        """The id (1..64) of a concept name such as ``"blue star"``."""
        try:
            return self.concepts.index(" ".join(name.lower().split())) + 1
        except ValueError:
            raise ValueError(f"unknown concept {name!r}; concepts are '<colour> <shape>' with colours "
                             f"{list(COLOURS)} and shapes {list(SHAPES)}") from None

    def colour_index(self, concept_id: int) -> int:
        self.concept_name(concept_id)
        return (int(concept_id) - 1) // len(SHAPES)

    def shape_index(self, concept_id: int) -> int:
        self.concept_name(concept_id)
        return (int(concept_id) - 1) % len(SHAPES)

    @property
    def unseen_ids(self) -> tuple[int, ...]:
        """The 16 concept ids held out from ZUTIS training, ascending."""
        return tuple(sorted(self.concept_id(n) for n in UNSEEN_CONCEPTS))

    @property
    def seen_ids(self) -> tuple[int, ...]:
        """The 48 concept ids ZUTIS may train on, ascending."""
        unseen = set(self.unseen_ids)
        return tuple(i for i in range(1, self.num_concepts + 1) if i not in unseen)

    def split_ids(self, split: str) -> tuple[int, ...]:
        """Concept ids of ``split``: "seen", "unseen" or "all"."""
        if split == "seen":
            return self.seen_ids
        if split == "unseen":
            return self.unseen_ids
        if split == "all":
            return tuple(range(1, self.num_concepts + 1))
        raise ValueError(f"unknown split {split!r}; expected 'seen', 'unseen' or 'all'")


# -- captions ----------------------------------------------------------------------------------------------------

CAPTION_TEMPLATES: tuple[str, ...] = ("{}", "{}", "a photo of {}", "an image of {}")
EMPTY_CAPTION = "background"


def with_article(name: str) -> str:
    """``"orange star" -> "an orange star"``, ``"red circle" -> "a red circle"``."""
    return ("an " if name[:1] in "aeiou" else "a ") + name


def prompt(name: str) -> str:
    """The zero-shot prompt of a concept: ``"a {colour} {shape}"`` (``"an"`` before orange)."""
    return with_article(name)


def caption(names: Sequence[str], template: str = "{}", articles: bool = True) -> str:
    """A caption listing objects: ``["red circle", "blue star"] -> "a red circle and a blue star"``.

    Three objects read ``"a, b and c"``; ``articles=False`` gives the bare names (``"red circle and blue star"``);
    no objects give ``EMPTY_CAPTION``. ``template`` wraps the list, e.g. ``"a photo of {}"``.
    """
    if not names:
        return EMPTY_CAPTION
    parts = [with_article(n) if articles else n for n in names]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return template.format(listed)


def sample_caption(rng: np.random.Generator, names: Sequence[str]) -> str:
    """A random caption of ``names`` (object order shuffled, one of ``CAPTION_TEMPLATES``, articles or not)."""
    if not names:
        return EMPTY_CAPTION
    order = [names[i] for i in rng.permutation(len(names))]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    # bare names ("red circle") are how ZUTIS embeds categories, so they must mean something to the CLIP
    articles = template != "{}" or bool(rng.random() < 0.5)
    return caption(order, template, articles)


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
_REACH = {k: float(np.hypot(*v[0].T).max()) for k, v in _POLYGONS.items()}  # farthest vertex from the centre


def draw_shape(shape: str, size_hw: tuple[int, int], center_xy: tuple[float, float], radius: float,
               angle: float) -> np.ndarray:
    """The (H, W) bool mask of ``shape`` centred at ``center_xy`` (pixels), ``radius`` in pixels, ``angle`` radians."""
    if shape not in _POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; shapes are {list(SHAPES)}")
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


# -- scenes ------------------------------------------------------------------------------------------------------

def default_radius_range(n_objects: int) -> tuple[float, float]:
    """Object radius as a fraction of the image side: larger for single objects, smaller in crowded scenes."""
    hi = 0.36 / math.sqrt(max(1, n_objects))
    return (0.16, 0.36) if n_objects <= 1 else (0.55 * hi, hi)


def render_scene(rng: np.random.Generator, size: int, objects: Sequence[int | str] | int,
                 world: ShapesWorld | None = None, *, concept_pool: Sequence[int] | None = None,
                 radius_range: tuple[float, float] | None = None, max_occlusion: float = 0.5,
                 min_visible_px: int = 16, clutter: bool = True, max_tries: int = 20) -> Scene:
    """Render one ``size x size`` scene.

    ``objects``: either the concepts to draw (ids 1..64 or names), back to front, or a number of objects whose
    concepts are drawn uniformly with replacement from ``concept_pool`` (default all 64). ``radius_range`` is the
    object radius as a fraction of ``size`` (default ``default_radius_range(n)``). An object is placed where it
    hides at most ``max_occlusion`` of any earlier object's own area; if ``max_tries`` positions fail it is
    skipped, as is a drawing with fewer than ``min_visible_px`` pixels, so the scene may hold fewer objects than
    asked. Returns a ``Scene`` (see its docstring); ``masks`` are the visible masks after occlusion.
    """
    world = world or ShapesWorld()
    if size < 8:
        raise ValueError(f"scene size must be at least 8 px, got {size}")
    if not 0.0 <= max_occlusion <= 1.0:
        raise ValueError(f"max_occlusion must be in [0, 1], got {max_occlusion}")
    if isinstance(objects, (int, np.integer)):
        if objects < 0:
            raise ValueError(f"number of objects must be >= 0, got {objects}")
        pool = np.asarray(concept_pool if concept_pool is not None else world.split_ids("all"))
        ids = [int(pool[i]) for i in rng.integers(0, len(pool), size=int(objects))] if len(pool) else []
    else:
        ids = [world.concept_id(o) if isinstance(o, str) else int(o) for o in objects]
        for i in ids:
            world.concept_name(i)  # validates
    lo, hi = radius_range or default_radius_range(len(ids))
    if not 0 < lo <= hi:
        raise ValueError(f"radius_range must satisfy 0 < lo <= hi, got {(lo, hi)}")

    image = render_background(rng, size, clutter).astype(np.int16)
    amodal: list[np.ndarray] = []
    kept_ids: list[int] = []
    colours: list[np.ndarray] = []
    for cid in ids:
        shape = SHAPES[world.shape_index(cid)]
        colour = np.asarray(COLOURS[world.concept_name(cid).split()[0]], dtype=np.int16)
        colour = np.clip(colour + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
        mask = _place(rng, shape, size, (lo, hi), amodal, max_occlusion, max_tries)
        if mask is None or mask.sum() < min_visible_px:
            continue
        amodal.append(mask)
        kept_ids.append(cid)
        colours.append(colour)
        image[mask] = colour
    image = np.clip(image + rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, image.shape), 0, 255).astype(np.uint8)
    amodal_masks = np.stack(amodal) if amodal else np.zeros((0, size, size), dtype=bool)
    return Scene(image, visible_masks(amodal_masks), np.asarray(kept_ids, dtype=np.int64), amodal_masks,
                 np.asarray(colours, dtype=np.uint8).reshape(-1, 3))


def visible_masks(amodal_masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool full shapes, back to front -> (n, H, W) bool visible parts (later objects occlude earlier)."""
    visible = amodal_masks.copy()
    covered = np.zeros(amodal_masks.shape[1:], dtype=bool)
    for i in range(len(amodal_masks) - 1, -1, -1):
        visible[i] &= ~covered
        covered |= amodal_masks[i]
    return visible


def _place(rng: np.random.Generator, shape: str, size: int, radius_range: tuple[float, float],
           earlier: list[np.ndarray], max_occlusion: float, max_tries: int) -> np.ndarray | None:
    """A full mask for a new object that keeps every earlier object at least ``1 - max_occlusion`` visible."""
    if earlier:
        visible = visible_masks(np.stack(earlier))
        budget = visible.sum(axis=(1, 2)) - (1.0 - max_occlusion) * np.stack(earlier).sum(axis=(1, 2))
    for _ in range(max_tries):
        radius = rng.uniform(*radius_range) * size
        angle = rng.uniform(-math.pi / 4, math.pi / 4)
        reach = min(radius * _REACH[shape], size / 2)  # keep the whole shape inside the image
        cx, cy = rng.uniform(reach, size - reach, size=2)
        mask = draw_shape(shape, (size, size), (cx, cy), radius, angle)
        if not earlier or np.all((visible & mask).sum(axis=(1, 2)) <= budget):
            return mask
    return None


# -- caption pairs for CLIP pre-training ------------------------------------------------------------------------

def render_caption_batch(rng: np.random.Generator, batch_size: int, size: int,
                         concept_pool: Sequence[int] | None = None,
                         objects_p: Sequence[float] = (0.8, 0.12, 0.08), empty_p: float = 0.0,
                         world: ShapesWorld | None = None) -> tuple[np.ndarray, list[str], list[tuple[int, ...]]]:
    """Render ``batch_size`` caption-paired scenes for contrastive pre-training.

    Each image holds 0 objects with probability ``empty_p`` (caption ``EMPTY_CAPTION``), otherwise ``k`` objects
    with probability ``objects_p[k - 1]`` (distinct concepts from ``concept_pool``). Returns images
    (B, size, size, 3) uint8, captions (of what is visible: skipped objects are not mentioned) and each image's
    content as the sorted tuple of its visible concept ids (``()`` for an empty image).
    """
    world = world or ShapesWorld()
    pool = np.asarray(concept_pool if concept_pool is not None else world.split_ids("all"))
    probs = np.asarray(objects_p, dtype=float)
    if probs.ndim != 1 or len(probs) == 0 or np.any(probs < 0) or not math.isclose(probs.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"objects_p must be probabilities summing to 1, got {list(objects_p)}")
    if len(probs) > len(pool):
        raise ValueError(f"objects_p allows {len(probs)} distinct objects but the pool has {len(pool)} concepts")
    if not 0.0 <= empty_p <= 1.0:
        raise ValueError(f"empty_p must be in [0, 1], got {empty_p}")
    images = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    contents: list[tuple[int, ...]] = []
    for b in range(batch_size):
        n = 0 if rng.random() < empty_p else 1 + int(rng.choice(len(probs), p=probs))
        ids = rng.choice(pool, size=n, replace=False).tolist()
        scene = render_scene(rng, size, ids, world)
        images[b] = scene.image
        captions.append(sample_caption(rng, [world.concept_name(i) for i in scene.concept_ids]))
        contents.append(tuple(sorted(int(i) for i in scene.concept_ids)))
    return images, captions, contents
