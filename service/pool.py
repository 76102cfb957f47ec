"""The CPU worker pool: the per-request work around the forward pass, off the event loop and beside the model thread.

Before the pass: reading and decoding the upload, letterboxing or resizing it, the concepts' text embeddings.
After it: each image's vocabulary head, post-processing and JSON encoding, while the model thread already runs the
next pass. ``workers`` threads (``ZUTIS_POSTPROCESS_WORKERS``, default the CPU cores this process may use).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def prepare_torch_thread(flush_denormal: bool) -> None:
    """The per-thread torch setting of every thread that runs model code: with ``flush_denormal``, denormal floats
    are flushed to zero (the CPU's FTZ/DAZ flags belong to the thread)."""
    if flush_denormal:
        torch.set_flush_denormal(True)


class WorkerPool:
    """``workers`` threads named ``zutis-pool-*``, each set up with ``prepare_torch_thread``."""

    def __init__(self, workers: int, flush_denormal: bool) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="zutis-pool",
                                            initializer=prepare_torch_thread, initargs=(flush_denormal,))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` in a pool thread, from any thread (the model thread hands finished passes over here)."""
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        """Take no more work: what is queued is cancelled, what runs ends on its own (nothing waits for it)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
