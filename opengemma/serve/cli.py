"""``opengemma serve``: argument parsing and the server's life cycle (load, listen, drain, exit).

Part of the serving side. :func:`add_serve_parser` adds the ``serve`` subcommand to the
``opengemma`` program; :func:`run_serve` runs it; :func:`main` is the same program on its own
(``python -m opengemma.serve``). Life cycle: check the options (an empty API key is an error),
bind and listen on the socket (127.0.0.1 unless told otherwise) so that a port in use is reported
at once, load the model, check the KV cache fits in memory, start the engine thread, then serve
with uvicorn until SIGTERM or SIGINT. The first signal drains: the listening socket closes, new
requests get 503, requests in flight run to their end (for at most ``--shutdown-timeout`` seconds,
after which they are cancelled with an error event), and the process exits 0. A second SIGINT
cancels what is in flight at once.

Slow or stalled clients are bounded with what uvicorn offers: ``--max-connections`` (uvicorn's
``limit_concurrency``: 503 beyond it), ``--timeout-keep-alive`` for idle connections, its 16 KiB
limit on a request head, and its backlog. uvicorn has no deadline for a request head, so
:func:`_protocol` adds one to its h11 protocol class (``--timeout-header``: a connection that has
not sent a whole head in time gets 408 and is closed); the body's deadline (``--timeout-body``)
is the app's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys

from ..cli import AUTO_SPECULATE, speculate_type
from ..errors import OpenGemmaError

QUANTIZE = ("auto", "none", "int8", "int4", "mixed")
BACKLOG = 2048  # uvicorn's default
DEFAULT_CONTEXT = 4096

DESCRIPTION = ("Serve MODEL over HTTP with an OpenAI-compatible API: GET /v1/models, POST /v1/completions, "
               "POST /v1/chat/completions (streaming with \"stream\": true), GET /health and GET /metrics "
               "(Prometheus). Requests are batched continuously: new ones join the running batch between "
               "decode steps. SIGTERM drains in-flight requests and exits 0.")


def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {'in ' + str(lo) + '..' + str(hi) if hi else '>= ' + str(lo)}, "
                                             f"got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 86400:  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than a day, got {text}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, metavar="MODEL", help="model to serve (default: embedded 270M)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 where --quantize "
                   "auto picks mixed, else float32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantize", "-q", choices=QUANTIZE, default="auto",
                   help="weight-only quantization, as for `opengemma generate` (default auto: mixed with bf16 "
                        "activations for a quantized GGUF file on the CPU, the embedded model: 2-3.7x the "
                        "throughput of none; none for anything else)")
    p.add_argument("--kernels", choices=("auto", "native", "torch"), default="auto",
                   help="CPU kernels of a quantized model, as for `opengemma generate`: native (opengemma's int8 "
                        "x int8 ones, for decode steps of at most 16 rows), torch, or auto (default: native "
                        "where the CPU and a compiler allow)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter merged into MODEL at load time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=_int_in(1, 4096), default=16,
                   help="sequences decoded together = KV cache slots (default 16)")
    p.add_argument("--max-context", type=_int_in(2), default=DEFAULT_CONTEXT,
                   help=f"positions per slot, prompt + completion (default {DEFAULT_CONTEXT}, at most the model's)")
    p.add_argument("--max-queue", type=_int_in(0), default=64,
                   help="sequences that may wait for a slot; beyond that: HTTP 429 (default 64)")
    p.add_argument("--prefill-chunk", type=_int_in(1), default=256,
                   help="prompt tokens prefilled per step, so long prompts do not stall streams (default 256)")
    p.add_argument("--speculate", type=speculate_type, default=None, metavar="K",
                   help="speculative decoding, as for `opengemma generate`: up to K prompt-lookup guesses "
                        "checked in one forward, for a greedy request (temperature 0, no logprobs) while it "
                        "decodes alone; batches and sampled requests decode plainly, so a request's text never "
                        "depends on what runs beside it. Lossless: the same greedy text (up to float near-ties). "
                        f"Default auto = {AUTO_SPECULATE}; 0 = off")
    p.add_argument("--api-key", default=os.environ.get("OPENGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $OPENGEMMA_API_KEY, else no key; an empty "
                        "key is an error)")
    p.add_argument("--max-connections", type=_int_in(1), default=512,
                   help="open connections (or requests) at once; beyond that: HTTP 503 (default 512)")
    p.add_argument("--timeout-header", type=_seconds, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers, then 408 and closed "
                        "(default 10)")
    p.add_argument("--timeout-body", type=_seconds, default=30.0, metavar="S",
                   help="seconds a request may take to send its body, then 408 and closed (default 30)")
    p.add_argument("--timeout-keep-alive", type=_seconds, default=5.0, metavar="S",
                   help="seconds an idle keep-alive connection is kept open (default 5)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: from the model)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM (default 30)")
    p.add_argument("--threads", type=_int_in(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


def add_serve_parser(subparsers, **kwargs) -> argparse.ArgumentParser:
    """Add ``serve`` to an ``add_subparsers()`` object (the ``opengemma`` program's); ``kwargs``
    go to ``add_parser`` (e.g. ``epilog``)."""
    p = subparsers.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible API)",
                              description=DESCRIPTION, **kwargs)
    add_serve_arguments(p)
    return p


def model_id(name: str) -> str:
    """A clean API id from a load name: "gemma3-270m (embedded, ...)" -> "gemma3-270m"."""
    base = name.split(" (")[0].strip()
    return base.removesuffix(".gguf")


def _load(args):
    from ..process import load_for_command

    return load_for_command(args.model, adapter=getattr(args, "adapter", None), dtype=args.dtype, device=args.device,
                            quantize=args.quantize, kernels=args.kernels)


def _available_bytes(device) -> int | None:
    """Memory the KV cache may take: free accelerator memory, or MemAvailable on the host."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_kv_budget(g, max_batch: int, max_context: int) -> int:
    from ..model import KVCache

    need = KVCache(g.config, max_batch, max_context, dtype=g.dtype, device="meta").nbytes()
    have = _available_bytes(g.device)
    if have is not None and need > 0.8 * have:
        raise OpenGemmaError(f"the KV cache for --max-batch {max_batch} x --max-context {max_context} needs "
                             f"{need / 2**20:,.0f} MiB but only {have / 2**20:,.0f} MiB are free; lower one of them")
    return need


def _check_api_key(key: str | None) -> None:
    if key is None:
        return
    if not key.strip():
        raise OpenGemmaError("the API key is empty (--api-key '' or OPENGEMMA_API_KEY=): give a key, or unset "
                             "OPENGEMMA_API_KEY and drop --api-key to serve without one")
    if key != key.strip():
        raise OpenGemmaError("the API key starts or ends with whitespace, which no client can send: remove it")


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request head: from the connection's start,
    or from the first byte of a later request on a kept-alive connection, to the end of the head.
    Past it the connection gets 408 and is closed (a slowloris client holds nothing for long)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .protocol import ApiError

    body = json.dumps(ApiError(408, f"the request headers did not arrive within {header_timeout:g} s",
                               code="request_timeout").body()).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a head has begun and is not complete
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return Protocol


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OpenGemmaError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OpenGemmaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(BACKLOG)  # the port is ours from now on; connections wait in the backlog until serving starts
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args) -> int:
    """Run the server until a signal; returns the exit status (0 after a graceful shutdown)."""
    _check_api_key(args.api_key)
    try:
        import prometheus_client  # noqa: F401
        import pydantic
        import uvicorn
    except ImportError as e:
        raise OpenGemmaError(f"opengemma serve needs {e.name}: pip install 'opengemma[serve]'") from None
    if int(pydantic.VERSION.split(".")[0]) < 2:
        raise OpenGemmaError(f"opengemma serve needs pydantic 2, found {pydantic.VERSION}: "
                             "pip install 'opengemma[serve]'")
    import torch

    from .app import App
    from .engine import Engine
    from .metrics import Metrics
    from .protocol import ServeInfo

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shutdown_timeout < 0:
        raise OpenGemmaError("--shutdown-timeout must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s", stream=sys.stderr)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    try:
        print(f"opengemma serve: bound {shown}:{port}; loading {args.model or 'the embedded model'} ...",
              file=sys.stderr, flush=True)
        g = _load(args)
        max_context = min(args.max_context, g.config.context_length)
        kv_bytes = _check_kv_budget(g, args.max_batch, max_context)
    except BaseException:
        sock.close()
        raise

    metrics = Metrics()
    engine = Engine(g.model, g.tokenizer, max_batch=args.max_batch, max_context=max_context,
                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                    speculate=AUTO_SPECULATE if args.speculate is None else args.speculate, metrics=metrics)
    name = args.served_model_name or model_id(g.name)
    info = ServeInfo(g.tokenizer, g.config.vocab_size, max_context, name, frozenset({g.name, model_id(g.name)}))
    assert info.max_prompt_chars > 0  # computed now (a vocabulary scan), not during the first request
    app = App(engine, info, metrics=metrics, api_key=args.api_key, body_timeout=args.timeout_body)
    metrics.gauge("queue_depth", "Sequences waiting for a KV slot.", lambda: engine.waiting)
    metrics.gauge("running_sequences", "Sequences holding a KV slot (the decode batch).", lambda: engine.running)
    metrics.gauge("kv_slots", "KV cache slots (--max-batch).", lambda: engine.max_batch)
    metrics.gauge("kv_cache_bytes", "Bytes of the preallocated KV cache.", lambda: kv_bytes)

    class Server(uvicorn.Server):
        # Our handlers drain the engine first; uvicorn's would re-raise the signal at exit
        # (status 143 for SIGTERM) instead of exiting 0 after a clean shutdown.
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        def install_signal_handlers(self) -> None:  # the same hook in uvicorn < 0.29
            pass

    config = uvicorn.Config(app, http=_protocol(args.timeout_header), loop="asyncio", lifespan="off",
                            log_level=args.log_level, access_log=not args.no_access_log,
                            timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.max_connections,
                            backlog=BACKLOG)
    server = Server(config)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        app.bind(loop)
        engine.start()
        signals = {"count": 0}

        def on_signal(sig: int) -> None:
            signals["count"] += 1
            if signals["count"] == 1:
                print(f"opengemma serve: {signal.Signals(sig).name}: draining {engine.live} request(s), "
                      f"then exiting", file=sys.stderr, flush=True)
                app.draining = True
                engine.drain()
                server.should_exit = True
                loop.call_later(args.shutdown_timeout, engine.abort_all, "the server is shutting down")
            else:
                engine.abort_all("the server is shutting down")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        auth = "on" if args.api_key else "off"
        print(f"opengemma serve: {name} on http://{shown}:{port} (auth: {auth}; max batch {args.max_batch}, "
              f"context {max_context}, queue {args.max_queue}, KV cache {kv_bytes / 2**20:,.0f} MiB; at most "
              f"{args.max_connections} connections; timeouts: headers {args.timeout_header:g} s, body "
              f"{args.timeout_body:g} s)", file=sys.stderr, flush=True)
        if not _is_loopback(args.host) and not args.api_key:
            print(f"opengemma serve: warning: listening on {args.host} without --api-key", file=sys.stderr, flush=True)
        try:
            await server.serve(sockets=[sock])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(serve())
    finally:
        engine.stop()
        sock.close()
    print("opengemma serve: stopped", file=sys.stderr, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opengemma serve", description=DESCRIPTION)
    add_serve_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m opengemma.serve``: the ``serve`` subcommand as a program of its own."""
    args = build_parser().parse_args(argv)
    try:
        return run_serve(args)
    except OpenGemmaError as e:
        print(f"opengemma: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
