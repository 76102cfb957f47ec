"""The ``concepts`` form field(s) -> the request's concept list, with the service's limits applied."""

from __future__ import annotations

from typing import Sequence

from model.text import distinct_concepts
from service.errors import ServiceError


def parse_concepts(values: Sequence[str], max_concepts: int, max_length: int) -> list[str]:
    """Repeated ``concepts`` fields and/or comma-separated values -> the request's concepts: distinct, normalised,
    in order (``model.text.distinct_concepts``, the one normalisation of the request: whitespace collapsed, lower
    case, blanks and duplicates dropped, "background" dropped since it is always concept 0 of the answer).
    ``max_concepts`` counts the distinct concepts left, ``max_length`` the characters of each (after
    normalisation); the parse stops at the first concept over either limit.

    Raises:
        ServiceError ``invalid_request`` (422): nothing left, too many concepts, or one too long.
    """
    concepts: list[str] = []
    for name in distinct_concepts(part for value in values for part in str(value).split(",")):
        if len(name) > max_length:
            shown = name[:40] + "..." if len(name) > 40 else name
            raise ServiceError("invalid_request", f"concept {shown!r} is {len(name)} characters long; the limit is "
                               f"{max_length}")
        concepts.append(name)
        if len(concepts) > max_concepts:
            raise ServiceError("invalid_request", f"more than {max_concepts} distinct concepts; send at most "
                               f"{max_concepts}")
    if not concepts:
        raise ServiceError("invalid_request", "no concepts given: send at least one non-blank concept other than "
                           "'background' in the 'concepts' field (repeated, or comma-separated)")
    return concepts
