"""Concepts -> text embeddings with the checkpoint's own CLIP text tower (reference §2).

Two names for two lists: a request's ``concepts`` are its distinct normalised names, background excluded (what the
service's limits count); a ``vocabulary`` is the class list of the model's head, ``["background", *concepts]``
(class ``i`` is ``vocabulary[i]``; background is class 0, embedded like any other name). ``distinct_concepts`` is
the one normalisation; the service applies it to the form field, ``build_vocabulary`` to the raw names of
``Predictor.predict``. By default the raw names are embedded, as the official models were trained; prompt
templates (each containing ``{}``) can be ensembled instead.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from model.backbone import build_text_tower, build_tokenizer
from model.config import ModelConfig

BACKGROUND = "background"


def normalise_concept(name: str) -> str:
    """Canonical form of one concept: whitespace collapsed, lower case (CLIP's tokenizer lower-cases anyway)."""
    return " ".join(str(name).split()).lower()


def distinct_concepts(names: Iterable[str]) -> Iterator[str]:
    """A concept list normalised: each name through ``normalise_concept``, blanks, duplicates (the first kept) and
    "background" dropped, order kept. Lazy, so that a caller applying limits stops at the first name over them."""
    seen = {BACKGROUND}
    for raw in names:
        name = normalise_concept(raw)
        if name and name not in seen:
            seen.add(name)
            yield name


def with_background(concepts: Sequence[str]) -> list[str]:
    """The vocabulary of concepts already normalised and distinct (``distinct_concepts``): background first."""
    return [BACKGROUND, *concepts]


def build_vocabulary(concepts: Iterable[str]) -> list[str]:
    """Raw names -> the vocabulary ``["background", *distinct_concepts(concepts)]``.

    Raises ``ValueError`` when no concept is left.
    """
    vocabulary = with_background(list(distinct_concepts(concepts)))
    if len(vocabulary) == 1:
        raise ValueError("no concepts given: need at least one non-blank concept other than 'background'")
    return vocabulary


class TextEncoder(nn.Module):
    """The CLIP text tower and its tokenizer. ``tower`` is an open_clip ``TextTransformer``."""

    def __init__(self, config: ModelConfig, tower: nn.Module | None = None) -> None:
        super().__init__()
        self.tower = tower if tower is not None else build_text_tower(config)
        self.tokenizer = build_tokenizer(config)

    @torch.no_grad()
    def encode(self, concepts: Sequence[str], templates: Sequence[str] | None = None,
               chunk_size: int = 256) -> torch.Tensor:
        """Unit-norm text embeddings ``(N, E)`` float32 for ``concepts`` (used verbatim, not normalised).

        With ``templates``, each concept's embedding is the re-normalised mean of its L2-normalised template
        embeddings (``template.format(concept)``).
        """
        if not concepts:
            raise ValueError("encode needs at least one concept")
        prompts = list(concepts) if not templates else [t.format(c) for c in concepts for t in templates]
        device = next(self.tower.parameters()).device
        feats = []
        for start in range(0, len(prompts), chunk_size):
            tokens = self.tokenizer(prompts[start:start + chunk_size]).to(device)
            feats.append(self.tower(tokens).float())
        emb = torch.cat(feats)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        if templates:
            emb = emb.reshape(len(concepts), len(templates), -1).mean(dim=1)
            emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb
