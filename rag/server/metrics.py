"""Prometheus metrics of one app: requests, TTFT, chunk-cache hits per tier, recompute ratio.

Each app has its own registry (several apps in one process, as in tests, must
not collide in the global one). Cache counters are read from the store at
scrape time instead of being mirrored, so they can never drift from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag.engine.request import Request

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class _Live:
    """Collects values computed at scrape time (store counters, queue depth)."""

    def __init__(
        self,
        store_stats: Callable[[], dict | None],
        queue_depth: Callable[[], int],
        tokens: Callable[[], tuple[float, float]],
    ):
        self.store_stats, self.queue_depth, self.tokens = store_stats, queue_depth, tokens

    def collect(self) -> Iterable[Metric]:
        stats = self.store_stats() or {"tiers": {}}
        hits = CounterMetricFamily(
            "kvrag_cache_hits", "Chunk-KV lookups served by a tier", labels=["tier"]
        )
        misses = CounterMetricFamily(
            "kvrag_cache_misses", "Chunk-KV lookups a tier missed", labels=["tier"]
        )
        corrupt = CounterMetricFamily(
            "kvrag_cache_corrupt",
            "Values that failed verification (deleted, served as misses)",
            labels=["tier"],
        )
        errors = CounterMetricFamily(
            "kvrag_cache_errors", "Tier backend failures served as misses", labels=["tier"]
        )
        for tier, c in stats["tiers"].items():
            hits.add_metric([tier], c["hits"])
            misses.add_metric([tier], c["misses"])
            corrupt.add_metric([tier], c.get("corrupt", 0))
            errors.add_metric([tier], c.get("errors", 0))
        yield from (hits, misses, corrupt, errors)
        reused, recomputed = self.tokens()
        total = reused + recomputed
        yield GaugeMetricFamily(
            "kvrag_recomputed_token_ratio",
            "Recomputed / (reused + recomputed) context tokens, blend and reuse modes",
            value=recomputed / total if total else 0.0,
        )
        yield GaugeMetricFamily(
            "kvrag_queue_depth", "Generation jobs queued or running", value=self.queue_depth()
        )


class Metrics:
    def __init__(self, store_stats: Callable[[], dict | None], queue_depth: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "kvrag_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.ttft = Histogram(
            "kvrag_ttft_seconds",
            "Time to first token, queueing included",
            ["mode"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "kvrag_chat_seconds",
            "Chat completion latency, queueing included",
            ["mode"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "kvrag_context_tokens",
            "Context tokens by how their K/V was obtained (repaired: recomputed while decoding)",
            ["kind"],
            registry=r,
        )
        self.completion_tokens = Counter("kvrag_completion_tokens", "Generated tokens", registry=r)
        self._split = [0, 0]  # reused, recomputed: the ratio's inputs, kept in plain ints
        r.register(_Live(store_stats, queue_depth, lambda: (self._split[0], self._split[1])))

    def observe_answer(self, request: Request, queued_ms: float) -> None:
        """One answered request; its latencies count the time it waited in the queue."""
        t = request.timings_ms
        self.ttft.labels(request.mode).observe((queued_ms + t["ttft"]) / 1000)
        self.latency.labels(request.mode).observe((queued_ms + t["total"]) / 1000)
        self.completion_tokens.inc(len(request.output_ids))
        if request.mode != "full":  # a full prefill recomputes everything: not the ratio's subject
            self.tokens.labels("reused").inc(request.reused_tokens)
            self.tokens.labels("recomputed").inc(request.recomputed_tokens)
            self.tokens.labels("repaired").inc(request.repaired_tokens)
            self._split[0] += request.reused_tokens
            self._split[1] += request.recomputed_tokens

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCounter:
    """ASGI middleware counting requests by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
