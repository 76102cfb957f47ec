"""The ``concepts`` form field(s) -> the request's concept list, with the service's limits applied."""

from __future__ import annotations

from typing import Sequence

from model.text import BACKGROUND, normalise_concept
from service.errors import ServiceError


def parse_concepts(values: Sequence[str], max_concepts: int, max_length: int) -> list[str]:
    """Repeated ``concepts`` fields and/or comma-separated values -> distinct normalised concepts, in order.

    Each value is split on commas; names are normalised as the text encoder's vocabulary does (whitespace
    collapsed, lower case); blanks are dropped, duplicates merged (the first kept) and "background" dropped (it is
    always concept 0 of the answer). ``max_concepts`` counts the distinct concepts left, ``max_length`` the
    characters of each (after normalisation).

    Raises:
        ServiceError ``invalid_request`` (422): nothing left, too many concepts, or one too long.
    """
    concepts: list[str] = []
    seen = {BACKGROUND}
    for value in values:
        for raw in str(value).split(","):
            name = normalise_concept(raw)
            if not name or name in seen:
                continue
            if len(name) > max_length:
                shown = name[:40] + "..." if len(name) > 40 else name
                raise ServiceError("invalid_request", f"concept {shown!r} is {len(name)} characters long; the limit "
                                   f"is {max_length}")
            seen.add(name)
            concepts.append(name)
            if len(concepts) > max_concepts:
                raise ServiceError("invalid_request", f"more than {max_concepts} distinct concepts; send at most "
                                   f"{max_concepts}")
    if not concepts:
        raise ServiceError("invalid_request", "no concepts given: send at least one non-blank concept other than "
                           "'background' in the 'concepts' field (repeated, or comma-separated)")
    return concepts
