"""The category lists of the official ZUTIS releases (reference §2), shipped as text files next to this module.

Each ``<name>.txt`` holds one category a line, in the order of the official config
(github.com/NoelShin/zutis ``configs/*.yaml``, commit 064f988), with the literal ``"background"`` first: row ``k``
of a checkpoint's text embeddings is label id ``k``. The official checkpoints only reproduce their numbers with
exactly these lists, strings included ("Yellow duck", "Cardigan Welsh corgi" keep their capitals).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

VOCABULARIES = ("coco", "coca", "imagenet_s919")

# COCO category ids 1..90 that the 2017 annotations never use (street sign, hat, shoe, eye glasses, plate, mirror,
# window, desk, door, blender); 91 (hair brush) lies past the range and is the eleventh.
_COCO_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})

COCO_CONTIGUOUS_TO_OFFICIAL_ID: dict[int, int] = {
    0: 0,
    **{k + 1: cid for k, cid in enumerate(i for i in range(1, 91) if i not in _COCO_UNUSED_IDS)},
}
"""Our COCO label id (0 = background, 1..80 in the order of ``coco.txt``) -> COCO annotation ``category_id``
(the official ``new_label_id_to_old_label_id``; 12 -> 13, 80 -> 90)."""


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[str, ...]:
    if name not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    path = Path(__file__).with_name(f"{name}.txt")
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file missing from the package: {path}")
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)


def load_vocabulary(name: str) -> list[str]:
    """The official ordered category list ``name`` (one of ``VOCABULARIES``), ``"background"`` at index 0.

    Lengths: coco 81, coca 81, imagenet_s919 920. Returns a fresh list the caller may modify.
    """
    return list(_read(name))


__all__ = ["VOCABULARIES", "COCO_CONTIGUOUS_TO_OFFICIAL_ID", "load_vocabulary"]
