"""The shapes world: 64 concepts ("<colour> <shape>"), a seen/unseen split, captions and the scene renderer.

Concept ids are 1..64 everywhere (0 is background): id = 1 + 8 * colour_index + shape_index, so the ids equal the
COCO category ids and label-PNG values written by ``shapes.dataset`` and the row of a concept in a ZUTIS
vocabulary ``["background", *world.concepts]``.

A scene is a textured background (smooth noise, stripes, checkers, gradients or a blend of two; random colours;
grain; optional thin clutter lines and dots) with flat-coloured objects painted back to front. Each object has a
palette colour plus a per-object jitter of at most ``COLOUR_JITTER`` per channel, a random size, position and
rotation (within +-45 degrees, so hearts and triangles stay roughly upright as photographed objects do), and
later objects occlude earlier ones (at most ``max_occlusion`` of an earlier object's area may be hidden). Finally
every pixel gets uniform sensor noise of at most ``PIXEL_NOISE`` per channel. There is no anti-aliasing, so every
pixel of an object's visible mask is within ``PIXEL_NOISE`` of that object's drawn colour.

The drawing primitives (shape polygons and masks, backgrounds) are ``model.training.shapes.drawing``; this module
gives them meaning: concepts, colours, placement, occlusion, captions.

Rendering is numpy + PIL and deterministic given the ``numpy.random.Generator`` passed in (about 0.3 ms for a
64 px scene). Colours and backgrounds are chosen so that neither colour thresholding nor a position prior finds
the objects: background colours are uniform over RGB and may match an object's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from model.training.shapes.drawing import SHAPE_REACH, draw_shape, render_background

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
        """64: every colour with every shape."""
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
        """The index (0..7) into ``COLOURS`` of concept ``concept_id`` (1..64)."""
        self.concept_name(concept_id)
        return (int(concept_id) - 1) // len(SHAPES)

    def shape_index(self, concept_id: int) -> int:
        """The index (0..7) into ``SHAPES`` of concept ``concept_id`` (1..64)."""
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

    def split_names(self, split: str) -> list[str]:
        """Concept names of ``split`` ("seen", "unseen" or "all"), in concept-id order."""
        return [self.concept_name(i) for i in self.split_ids(split)]


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
        reach = min(radius * SHAPE_REACH[shape], size / 2)  # keep the whole shape inside the image
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
