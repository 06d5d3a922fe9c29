"""Server metrics in the Prometheus text format (``GET /metrics``), without a client library.

Part of the serving side (``opengemma serve``): counters for requests and tokens, gauges for the
queue and the running batch, and histograms for time to first token, inter-token latency, request
duration and decode batch size. The engine thread and the HTTP event loop both record into one
:class:`Metrics`, so every update takes its lock; rendering copies the values under that lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

# Latency buckets (seconds): from one fast decode step on an accelerator to a slow CPU prefill.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Histogram:
    """Cumulative-bucket histogram, as Prometheus expects (``le`` upper bounds, plus ``+Inf``)."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Every figure the server exports. Gauges that the engine owns are read through callbacks at
    render time (``gauges``), so they are never stale."""

    PREFIX = "opengemma_"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, HTTP status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefill_tokens = 0
        self.decode_steps = 0
        self.finished: dict[str, int] = {}  # finish reason -> sequences
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    # -- recording (any thread) --------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def step(self, batch_size: int, tokens: int) -> None:
        """One decode step over ``batch_size`` sequences that produced ``tokens`` tokens."""
        with self._lock:
            self.decode_steps += 1
            self.batch.observe(batch_size)
            self.generation_tokens += tokens

    def first_tokens(self, tokens: int) -> None:
        """Tokens sampled from prefill logits (each sequence's first one)."""
        with self._lock:
            self.generation_tokens += tokens

    def prefilled(self, tokens: int) -> None:
        with self._lock:
            self.prefill_tokens += tokens

    def latencies(self, ttft: Sequence[float], itl: Sequence[float]) -> None:
        with self._lock:
            for v in ttft:
                self.ttft.observe(v)
            for v in itl:
                self.itl.observe(v)

    def sequence_done(self, reason: str, prompt_tokens: int, seconds: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.duration.observe(seconds)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    # -- rendering ---------------------------------------------------------------------------------
    def render(self) -> str:
        out: list[str] = []

        def head(name: str, kind: str, help_text: str) -> str:
            full = self.PREFIX + name
            out.append(f"# HELP {full} {help_text}")
            out.append(f"# TYPE {full} {kind}")
            return full

        def hist(name: str, help_text: str, h: Histogram) -> None:
            full = head(name, "histogram", help_text)
            total = 0
            for bound, count in zip(h.bounds, h.counts):
                total += count
                out.append(f'{full}_bucket{{le="{_num(bound)}"}} {total}')
            out.append(f'{full}_bucket{{le="+Inf"}} {h.count}')
            out.append(f"{full}_sum {_num(h.sum)}")
            out.append(f"{full}_count {h.count}")

        with self._lock:
            full = head("requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f"{full}{_labels({'endpoint': endpoint, 'status': str(status)})} {n}")
            full = head("sequences_finished_total", "counter", "Generated sequences (choices) ended, by finish reason.")
            for reason, n in sorted(self.finished.items()):
                out.append(f"{full}{_labels({'reason': reason})} {n}")
            full = head("prompt_tokens_total", "counter", "Prompt tokens of finished sequences.")
            out.append(f"{full} {self.prompt_tokens}")
            full = head("generation_tokens_total", "counter", "Tokens generated (sampled), stop tokens included.")
            out.append(f"{full} {self.generation_tokens}")
            full = head("prefill_tokens_total", "counter", "Prompt tokens written into the KV cache.")
            out.append(f"{full} {self.prefill_tokens}")
            full = head("decode_steps_total", "counter", "Batched decode steps run.")
            out.append(f"{full} {self.decode_steps}")
            hist("time_to_first_token_seconds", "From arrival to the first generated token.", self.ttft)
            hist("inter_token_latency_seconds", "Between consecutive tokens of one sequence.", self.itl)
            hist("request_duration_seconds", "From arrival to the end of a sequence.", self.duration)
            hist("batch_size", "Sequences in each decode step.", self.batch)
        for name, (help_text, read) in self.gauges.items():
            full = head(name, "gauge", help_text)
            out.append(f"{full} {_num(read())}")
        return "\n".join(out) + "\n"
