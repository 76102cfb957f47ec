import threading
import time

import pytest
import torch

from model.embedding_cache import TextEmbeddingCache


def fake_encoder(calls):
    def compute(names):
        calls.append(list(names))
        return torch.stack([torch.full((4,), float(len(n))) for n in names])
    return compute


def test_embedding_cache_hits_misses_and_per_concept_sharing():
    calls, events = [], []
    cache = TextEmbeddingCache(10, on_lookup=events.append)
    a = cache.get_many("m", None, ["cat", "dog"], fake_encoder(calls))
    b = cache.get_many("m", None, ["dog", "horse"], fake_encoder(calls))
    assert calls == [["cat", "dog"], ["horse"]]
    assert torch.equal(a[1], b[0])
    assert (cache.hits, cache.misses) == (1, 3)
    assert events.count("hit") == 1 and events.count("miss") == 3


def test_embedding_cache_keyed_by_checkpoint_and_templates():
    calls = []
    cache = TextEmbeddingCache(10)
    cache.get_many("m1", None, ["cat"], fake_encoder(calls))
    cache.get_many("m2", None, ["cat"], fake_encoder(calls))
    cache.get_many("m1", ["a {}"], ["cat"], fake_encoder(calls))
    assert len(calls) == 3 and len(cache) == 3


def test_embedding_cache_lru_bound():
    calls = []
    cache = TextEmbeddingCache(2)
    for name in ["a", "b", "a", "c", "a", "b"]:
        cache.get_many("m", None, [name], fake_encoder(calls))
    assert len(cache) == 2
    assert calls == [["a"], ["b"], ["c"], ["b"]]  # "b" was evicted as least recently used


def test_embedding_cache_single_flight_under_concurrency():
    calls = []
    gate = threading.Event()

    def slow(names):
        calls.append(list(names))
        gate.wait(2)
        return torch.zeros(len(names), 4)

    cache = TextEmbeddingCache(10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_many("m", None, ["zebra"], slow)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == [["zebra"]]
    assert len(results) == 8


def test_embedding_cache_failure_propagates_and_is_not_cached():
    cache = TextEmbeddingCache(10)

    def boom(names):
        raise RuntimeError("encoder down")

    with pytest.raises(RuntimeError, match="encoder down"):
        cache.get_many("m", None, ["cat"], boom)
    calls = []
    cache.get_many("m", None, ["cat"], fake_encoder(calls))
    assert calls == [["cat"]]
