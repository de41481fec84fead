"""``GET /metrics``: what the batch engine does, in Prometheus' text format (``prometheus-client``).

One :class:`ServerMetrics` per server (its own registry), fed by the engine as its
:class:`~qnext_mlx.engine.batch.EngineObserver`:

| metric | kind | what |
| --- | --- | --- |
| ``qnext_requests_running`` | gauge | sequences decoding |
| ``qnext_requests_waiting`` | gauge | requests waiting or being prefilled |
| ``qnext_batch_size`` | histogram | sequences per decode step |
| ``qnext_prompt_tokens_total`` | counter | prompt tokens of the requests received |
| ``qnext_generation_tokens_total`` | counter | tokens generated |
| ``qnext_requests_finished_total`` | counter | finished replies, by ``finish_reason`` |
| ``qnext_prefix_cache_hits_total`` | counter | prompts that reused a cached prefix |
| ``qnext_prefix_cache_reused_tokens_total`` | counter | prompt tokens reused instead of prefilled |
| ``qnext_time_to_first_token_seconds`` | histogram | from the request's arrival to its first token |
| ``qnext_inter_token_latency_seconds`` | histogram | between a reply's consecutive tokens |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..engine.batch import EngineObserver, SequenceStats

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics(EngineObserver):
    """The server's metrics (see the module docstring); :meth:`render` gives the text."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("qnext_requests_running", "Sequences decoding", registry=r)
        self.waiting = Gauge("qnext_requests_waiting", "Requests waiting or being prefilled", registry=r)
        self.batch_size = Histogram("qnext_batch_size", "Sequences per engine step", buckets=_BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.prompt_tokens = Counter("qnext_prompt_tokens", "Prompt tokens of the requests received", registry=r)
        self.generation_tokens = Counter("qnext_generation_tokens", "Tokens generated", registry=r)
        self.finished_requests = Counter("qnext_requests_finished", "Finished replies", ["finish_reason"], registry=r)
        self.prefix_hits = Counter("qnext_prefix_cache_hits", "Prompts that reused a cached prefix", registry=r)
        self.reused_tokens = Counter("qnext_prefix_cache_reused_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=r)  # fmt: skip
        self.ttft = Histogram("qnext_time_to_first_token_seconds", "Time to the first token", buckets=_LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("qnext_inter_token_latency_seconds", "Time between a reply's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip

    def request_queued(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def prefix_reused(self, tokens: int) -> None:
        self.prefix_hits.inc()
        self.reused_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.itl.observe(seconds)

    def finished(self, stats: SequenceStats, reason: str) -> None:
        self.finished_requests.labels(finish_reason=reason).inc()

    def step(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        if running:
            self.batch_size.observe(running)

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)
