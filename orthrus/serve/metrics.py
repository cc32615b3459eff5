"""``GET /metrics``: the server's Prometheus metrics, through ``prometheus_client``.

Each server has its own :class:`~prometheus_client.CollectorRegistry` (not the process-wide
default), so several apps in one process (tests, a benchmark) never clash.

* Counters and gauges are read from the scheduler's own counters at scrape time (a collector), so
  they cost nothing while decoding; their sample names are the ones the hand-written text used
  (``orthrus_requests_total``, ``orthrus_tpf``, ...).
* Histograms are observed by the scheduler thread as events happen (:class:`Latencies`):

  - ``orthrus_queue_wait_seconds``: from a request's arrival to its getting a decoding slot;
  - ``orthrus_time_to_first_token_seconds``: arrival to its first token;
  - ``orthrus_inter_token_latency_seconds``: the time between two of a request's token deliveries,
    divided by the tokens the later one brought, observed once per token (a parallel cycle that
    delivers 3 tokens after 60 ms counts three tokens at 20 ms);
  - ``orthrus_request_latency_seconds``: arrival to the last token (requests that ran to the end:
    ``stop`` or ``length``);
  - ``orthrus_tokens_per_verify_pass``: tokens a request kept from one verify pass (its acceptance
    length in that cycle, the bonus token included; 1 in AR mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from orthrus.serve.app import Server

# seconds; the latency buckets follow vLLM's, the token buckets cover block sizes up to 64
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                         0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0)
TOKENS_PER_PASS_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Latencies:
    """The histograms the scheduler thread observes (see the module docstring); each method is
    one observation and thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=registry)

        self.queue = hist("orthrus_queue_wait_seconds", "time from arrival to a decoding slot", LATENCY_BUCKETS)
        self.ttft = hist("orthrus_time_to_first_token_seconds", "time from arrival to the first token",
                         LATENCY_BUCKETS)
        self.itl = hist("orthrus_inter_token_latency_seconds",
                        "time between a request's token deliveries per token they brought", TOKEN_LATENCY_BUCKETS)
        self.e2e = hist("orthrus_request_latency_seconds",
                        "time from arrival to the last token (requests that ran to the end)", REQUEST_BUCKETS)
        self.per_pass = hist("orthrus_tokens_per_verify_pass",
                             "tokens a request kept from one verify pass (bonus token included)",
                             TOKENS_PER_PASS_BUCKETS)

    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, gap: float, n: int) -> None:
        """``n`` tokens delivered ``gap`` seconds after the request's previous delivery."""
        for _ in range(n):
            self.itl.observe(gap / n)

    def verify_pass(self, tokens: int) -> None:
        self.per_pass.observe(tokens)

    def finished(self, seconds: float) -> None:
        self.e2e.observe(seconds)


class _Counters(Collector):
    """Counters and gauges read from the server's state at scrape time."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        srv = self.server
        s = srv.scheduler
        m = s.metrics
        counters = [
            ("orthrus_requests_total", "generation requests accepted", m.requests),
            ("orthrus_requests_finished_total", "requests that ran to completion", m.finished),
            ("orthrus_requests_cancelled_total", "requests whose client disconnected", m.cancelled),
            ("orthrus_requests_failed_total", "requests dropped by a decoder failure", m.failed),
            ("orthrus_requests_rejected_total", "requests answered with a 4xx error",
             m.rejected + srv.gate.rejected),
            ("orthrus_prompt_tokens_total", "prompt tokens of accepted requests", m.prompt_tokens),
            ("orthrus_generated_tokens_total", "tokens sent to clients", m.generated_tokens),
            ("orthrus_prefill_passes_total", "prefill passes (per request)", m.decode.prefill_passes),
            ("orthrus_forward_passes_total", "draft + verify passes, counted per sequence (prefill apart)",
             m.decode.forward_passes),
            ("orthrus_verify_passes_total", "verify passes, counted per sequence", m.decode.verify_passes),
            ("orthrus_decode_steps_total", "batched decode cycles", m.decode_steps),
        ]
        gauges = [
            ("orthrus_tpf", "tokens per forward pass since start (decode tokens / forward passes)", m.decode.tpf),
            ("orthrus_acceptance_length", "mean tokens per verify pass since start", m.decode.acceptance_length),
            ("orthrus_queue_depth", "requests waiting for a slot", s.queue_depth),
            ("orthrus_active_requests", "requests holding a decoding slot", s.active),
            ("orthrus_requests_in_flight", "/v1 HTTP requests not yet fully answered", srv.gate.in_flight),
            ("orthrus_draining", "1 while the server drains after SIGTERM", int(srv.gate.draining)),
            ("orthrus_batch_slots", "decoding slots (--max-batch-size)", s.max_batch),
            ("orthrus_block_size", "tokens per draft block (1 in ar mode)", srv.block_size),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    """One server's registry: its counters and gauges, and the :class:`Latencies` histograms."""

    def __init__(self, server: "Server") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Counters(server))
        self.latencies = Latencies(self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
