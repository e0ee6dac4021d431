"""Prometheus metrics and per-request accounting; one registry per app, so tests can build many apps."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from backends.base import Backend, Delta, Event, Finished

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class RequestStats:
    """What one request did, for its log line and the metrics."""

    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the prefix cache served
    completion_tokens: int = 0
    ttft: float | None = None


class Metrics:
    """The server's metrics, exported in Prometheus text format at /metrics."""

    def __init__(self, backend: Backend) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chat_requests", "HTTP requests by route and status", ["route", "status"], registry=r)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = histogram("chat_time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("chat_inter_token_latency_seconds", "Time between streamed deltas")
        self.e2e = histogram("chat_e2e_latency_seconds", "Request duration, end to end")
        self.queue = histogram("chat_queue_time_seconds", "Time waiting for a batch slot")
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("chat_generation_tokens", "Tokens generated", registry=r)
        self.prefix_hits = Counter(
            "chat_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache, not prefilled", registry=r
        )
        self.prefix_queries = Counter(
            "chat_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        running = Gauge("chat_requests_running", "Requests generating now", registry=r)
        waiting = Gauge("chat_requests_waiting", "Requests waiting for a slot", registry=r)
        running.set_function(lambda: backend.counts[0])
        waiting.set_function(lambda: backend.counts[1])

    def export(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, events: AsyncIterator[Event], stats: RequestStats) -> AsyncIterator[Event]:
        """Pass a generation's events through, timing its first token, the gaps between deltas and its queue wait."""
        last: float | None = None
        async for event in events:
            now = time.perf_counter()
            if isinstance(event, Delta):
                if last is None:
                    stats.ttft = now - stats.started
                    self.ttft.observe(stats.ttft)
                else:
                    self.itl.observe(now - last)
                last = now
            elif isinstance(event, Finished):
                self.queue.observe(event.queue_s)
                self.prompt_tokens.inc(event.prompt_tokens)
                self.generated_tokens.inc(event.completion_tokens)
                self.prefix_queries.inc(event.prompt_tokens)
                self.prefix_hits.inc(event.cached_tokens or 0)
                stats.prompt_tokens = event.prompt_tokens
                stats.cached_tokens = event.cached_tokens or 0
                stats.completion_tokens += event.completion_tokens
            yield event
