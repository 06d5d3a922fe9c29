"""Server metrics for ``GET /metrics``, through ``prometheus_client``.

Part of the serving side (``opengemma serve``): counters for requests and tokens, gauges for the
queue and the running batch (read through callbacks at scrape time, so never stale), and
histograms for time to first token, inter-token latency, request duration and decode batch
size; with speculative decoding, the drafts verified and kept. The engine thread and the HTTP
event loop both record into one :class:`Metrics`; prometheus_client's metrics are thread-safe.
Each :class:`Metrics` has a registry of its own (not the library's process-wide default), so two
servers or tests in one process never share counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds): from one fast decode step on an accelerator to a slow CPU prefill.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
PREFIX = "opengemma_"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every figure the server exports, in one registry."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry(auto_describe=True)

        def counter(name, help_text, labels=()):
            return Counter(PREFIX + name, help_text, labels, registry=reg)

        def hist(name, help_text, buckets):
            return Histogram(PREFIX + name, help_text, buckets=buckets, registry=reg)

        self._requests = counter("requests", "HTTP requests answered, by endpoint and status code.",
                                 ("endpoint", "status"))
        self._finished = counter("sequences_finished", "Generated sequences (choices) ended, by finish reason.",
                                 ("reason",))
        self._prompt = counter("prompt_tokens", "Prompt tokens of finished sequences.")
        self._generated = counter("generation_tokens", "Tokens generated (sampled), stop tokens included.")
        self._prefilled = counter("prefill_tokens", "Prompt tokens written into the KV cache.")
        self._steps = counter("decode_steps", "Batched decode steps run (speculative ones included).")
        self._drafted = counter("speculative_draft_tokens", "Drafted tokens verified by speculative steps.")
        self._accepted = counter("speculative_accepted_tokens", "Drafted tokens the model kept.")
        self._ttft = hist("time_to_first_token_seconds", "From arrival to the first generated token.", LATENCY_BUCKETS)
        self._itl = hist("inter_token_latency_seconds", "Between consecutive tokens of one sequence.", LATENCY_BUCKETS)
        self._duration = hist("request_duration_seconds", "From arrival to the end of a sequence.", DURATION_BUCKETS)
        self._batch = hist("batch_size", "Sequences in each decode step.", BATCH_BUCKETS)

    # -- recording (any thread) --------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()

    def step(self, batch_size: int, tokens: int) -> None:
        """One decode step over ``batch_size`` sequences that produced ``tokens`` tokens."""
        self._steps.inc()
        self._batch.observe(batch_size)
        self._generated.inc(tokens)

    def speculated(self, drafted: int, accepted: int) -> None:
        """One speculative step verified ``drafted`` drafts and kept ``accepted`` of them."""
        self._drafted.inc(drafted)
        self._accepted.inc(accepted)

    def first_tokens(self, tokens: int) -> None:
        """Tokens sampled from prefill logits (each sequence's first one)."""
        self._generated.inc(tokens)

    def prefilled(self, tokens: int) -> None:
        self._prefilled.inc(tokens)

    def latencies(self, ttft: Sequence[float], itl: Sequence[float]) -> None:
        for v in ttft:
            self._ttft.observe(v)
        for v in itl:
            self._itl.observe(v)

    def sequence_done(self, reason: str, prompt_tokens: int, seconds: float) -> None:
        self._finished.labels(reason=reason).inc()
        self._prompt.inc(prompt_tokens)
        self._duration.observe(seconds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value ``read()`` gives at scrape time."""
        Gauge(PREFIX + name, help_text, registry=self.registry).set_function(read)

    # -- rendering ---------------------------------------------------------------------------------
    def render(self) -> str:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry).decode()
