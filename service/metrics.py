"""Every Prometheus object of the service, in one registry per app (docs/serving.md "Metrics").

A fresh ``CollectorRegistry`` per ``Metrics`` keeps several apps in one process (tests) apart. Label values are
bounded: routes are the app's own paths (anything else is ``unmatched``), reasons are the error codes of
``service.errors``, outcomes are ``hit``/``miss``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.errors import ERROR_STATUS

LATENCY_BUCKETS_S = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 15, 30, 60)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
INSTANCE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# Every error type except routing misses and bugs: refusals and abandoned requests.
REJECTION_REASONS = tuple(code for code in ERROR_STATUS if code not in ("not_found", "method_not_allowed",
                                                                         "internal_error"))
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metric contract: counters, histograms and gauges named ``zutis_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("zutis_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.rejected = Counter("zutis_requests_rejected", "Requests refused or abandoned, by reason "
                                "(the error type of the answer)", ["reason"], registry=r)
        self.text_cache = Counter("zutis_text_embedding_cache", "Text-embedding cache lookups, one per concept",
                                  ["outcome"], registry=r)
        self.request_duration = Histogram("zutis_request_duration_seconds", "Time to answer POST /segment, "
                                          "from the start of the request to the end of the answer",
                                          buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("zutis_queue_wait_seconds", "Time an image waited for its forward pass",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.inference_duration = Histogram("zutis_inference_duration_seconds", "Duration of one batched "
                                            "forward pass", buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("zutis_batch_size", "Images per forward pass", buckets=BATCH_SIZE_BUCKETS,
                                    registry=r)
        self.batch_padding = Histogram("zutis_batch_padding_ratio", "Fraction of a forward pass's input that is "
                                       "padding: token slots of a ragged batch (native geometry), padded pixels "
                                       "of the squares (letterbox)", buckets=PADDING_BUCKETS, registry=r)
        self.instances_per_image = Histogram("zutis_instances_per_image", "Instances returned per image",
                                             buckets=INSTANCE_BUCKETS, registry=r)
        self.queue_depth = Gauge("zutis_queue_depth", "Images waiting for a forward pass", registry=r)
        self.inflight = Gauge("zutis_inflight_requests", "POST /segment requests being handled", registry=r)
        self.ready = Gauge("zutis_ready", "1 when the model is loaded, warmed up and not draining", registry=r)
        self.build_info = Gauge("zutis_build_info", "Constant 1; the labels say what is serving",
                                ["version", "model", "device", "dtype"], registry=r)
        # Known label values start at 0, so that rates and dashboards have a series before the first event.
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason=reason)
        for outcome in ("hit", "miss"):
            self.text_cache.labels(outcome=outcome)

    def watch(self, queue_depth: Callable[[], float], inflight: Callable[[], float],
              ready: Callable[[], float]) -> None:
        """Read the gauges from the engine at scrape time instead of keeping copies up to date."""
        self.queue_depth.set_function(queue_depth)
        self.inflight.set_function(inflight)
        self.ready.set_function(ready)

    def count_cache_lookup(self, outcome: str) -> None:
        self.text_cache.labels(outcome=outcome).inc()

    def count_rejection(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def set_build_info(self, version: str, model: str, device: str, dtype: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version=version, model=model, device=device, dtype=dtype).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)
