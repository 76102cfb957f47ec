"""The data stream of shapes-world CLIP pre-training: caption-paired batches and their tokens.

``caption_batches`` renders the batch of step ``s`` from ``numpy.random.default_rng([seed, TRAIN_STREAM, s])``
(``world.render_caption_batch``) in one background thread, a few steps ahead of the training loop, so the stream
is a pure function of the recipe and the step. ``CachedTokenizer`` is open_clip's tokenizer with a per-string
cache.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from model.backbone import build_tokenizer
from model.config import ModelConfig
from model.training.shapes.clip_recipe import ClipRecipe
from model.training.shapes.world import ShapesWorld, render_caption_batch

TRAIN_STREAM = 0


def caption_batches(recipe: ClipRecipe, world: ShapesWorld, start: int = 0,
                    prefetch: int = 3) -> Iterator[tuple[np.ndarray, list[str], list[tuple[int, ...]]]]:
    """Batches for steps ``start, start + 1, ...`` rendered by one background thread (deterministic per step).

    Each is ``world.render_caption_batch``'s (images (B, S, S, 3) uint8, B captions, B sorted content tuples) with
    B the recipe's ``batch_size``, S its ``image_size``, concepts from its ``train_split``; at most ``prefetch``
    batches wait. Closing the generator stops the thread.
    """
    pool = world.split_ids(recipe.train_split)
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work() -> None:
        step = start
        while not stop.is_set():
            rng = np.random.default_rng([recipe.seed, TRAIN_STREAM, step])
            item = render_caption_batch(rng, recipe.batch_size, recipe.image_size, pool, recipe.objects_p,
                                        recipe.empty_p, world)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += 1

    thread = threading.Thread(target=work, name="shapes-render", daemon=True)
    thread.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()


class CachedTokenizer:
    """open_clip's tokenizer with a per-string cache (the shapes world has a few thousand distinct captions)."""

    def __init__(self, config: ModelConfig) -> None:
        self._tokenize = build_tokenizer(config)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, context_length) int64 tokens, as open_clip's tokenizer gives them."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, row in zip(missing, self._tokenize(missing)):
                self._cache[t] = row
        return torch.stack([self._cache[t] for t in texts])


__all__ = ["TRAIN_STREAM", "caption_batches", "CachedTokenizer"]
