"""A bounded, thread-safe LRU of text embeddings, one entry per concept.

Keys are ``(checkpoint id, prompt templates, normalised concept)``, so "cat, dog" and "dog, horse" share work and
two checkpoints never share entries. Concurrent requests for the same new concept compute it once: the first
caller computes, the others wait for its result (single flight).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Sequence

import torch

CacheKey = tuple[str, tuple[str, ...], str]


class TextEmbeddingCache:
    """LRU of ``(E,)`` embeddings. ``on_lookup(outcome)`` is called with "hit" or "miss" per concept."""

    def __init__(self, max_entries: int = 10_000, on_lookup: Callable[[str], None] | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._inflight: dict[CacheKey, Future] = {}
        self._lock = threading.Lock()
        self._on_lookup = on_lookup
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_many(self, checkpoint_id: str, templates: Sequence[str] | None, concepts: Sequence[str],
                 compute: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings ``(N, E)`` for ``concepts`` (already normalised), computing the misses in one call.

        ``compute(list_of_concepts) -> (M, E)`` runs outside the lock. If it raises, waiting callers get the same
        exception and nothing is cached.
        """
        tmpl = tuple(templates or ())
        keys = [(checkpoint_id, tmpl, c) for c in concepts]
        found: dict[CacheKey, torch.Tensor] = {}
        waits: dict[CacheKey, Future] = {}
        mine: dict[CacheKey, Future] = {}
        with self._lock:
            for key in dict.fromkeys(keys):
                if key in self._entries:
                    self._entries.move_to_end(key)
                    found[key] = self._entries[key]
                    self._count("hit")
                elif key in self._inflight:
                    waits[key] = self._inflight[key]
                    self._count("hit")  # computed once, by someone else
                else:
                    fut: Future = Future()
                    self._inflight[key] = fut
                    mine[key] = fut
                    self._count("miss")
        if mine:
            todo = list(mine)
            try:
                values = compute([k[2] for k in todo])
                if values.shape[0] != len(todo):
                    raise RuntimeError(f"text encoder returned {values.shape[0]} rows for {len(todo)} concepts")
            except BaseException as exc:
                with self._lock:
                    for key in todo:
                        self._inflight.pop(key, None)
                for fut in mine.values():
                    fut.set_exception(exc)
                raise
            with self._lock:
                for key, value in zip(todo, values):
                    self._entries[key] = value
                    self._entries.move_to_end(key)
                    self._inflight.pop(key, None)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            for (key, fut), value in zip(mine.items(), values):
                found[key] = value
                fut.set_result(value)
        for key, fut in waits.items():
            found[key] = fut.result()
        return torch.stack([found[k] for k in keys])

    def _count(self, outcome: str) -> None:
        if outcome == "hit":
            self.hits += 1
        else:
            self.misses += 1
        if self._on_lookup is not None:
            self._on_lookup(outcome)
