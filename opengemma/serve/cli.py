"""``opengemma serve``: argument parsing and the server's life cycle (load, listen, drain, exit).

Part of the serving side. :func:`add_serve_parser` adds the ``serve`` subcommand to the
``opengemma`` program; :func:`run_serve` runs it; :func:`main` is the same program on its own
(``python -m opengemma.serve``). Life cycle: load the model, check the KV cache fits in memory,
bind the socket (127.0.0.1 unless told otherwise), start the engine thread, then serve with
uvicorn until SIGTERM or SIGINT. The first signal drains: the listening socket closes, new
requests get 503, requests in flight run to their end (for at most ``--shutdown-timeout`` seconds,
after which they are cancelled with an error event), and the process exits 0. A second SIGINT
cancels what is in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import signal
import socket
import sys

from ..errors import OpenGemmaError

QUANTIZE = ("none", "int8", "int4")
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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, metavar="MODEL", help="model to serve (default: embedded 270M)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantize", "-q", choices=QUANTIZE, default="none",
                   help="weight-only quantization, as for `opengemma generate` (default none)")
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
    p.add_argument("--api-key", default=os.environ.get("OPENGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $OPENGEMMA_API_KEY, else no key)")
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
    from ..api import load

    kwargs = {}
    if args.quantize != "none":
        if "quantize" not in inspect.signature(load).parameters:
            raise OpenGemmaError("quantization not available: this opengemma's load() has no quantize option")
        kwargs["quantize"] = args.quantize
    return load(args.model, dtype=args.dtype, device=args.device, **kwargs)


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
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args) -> int:
    """Run the server until a signal; returns the exit status (0 after a graceful shutdown)."""
    try:
        import uvicorn
    except ImportError:
        raise OpenGemmaError("opengemma serve needs uvicorn: pip install 'opengemma[serve]'") from None
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
    print(f"opengemma serve: loading {args.model or 'the embedded model'} ...", file=sys.stderr, flush=True)
    g = _load(args)
    max_context = min(args.max_context, g.config.context_length)
    kv_bytes = _check_kv_budget(g, args.max_batch, max_context)
    sock = _bind(args.host, args.port)

    metrics = Metrics()
    engine = Engine(g.model, g.tokenizer, max_batch=args.max_batch, max_context=max_context,
                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, metrics=metrics)
    name = args.served_model_name or model_id(g.name)
    info = ServeInfo(g.tokenizer, g.config.vocab_size, max_context, name, frozenset({g.name, model_id(g.name)}))
    app = App(engine, info, metrics=metrics, api_key=args.api_key)
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

    config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_level=args.log_level,
                            access_log=not args.no_access_log, timeout_keep_alive=5)
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
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"opengemma serve: {name} on http://{shown}:{port} (max batch {args.max_batch}, context "
              f"{max_context}, queue {args.max_queue}, KV cache {kv_bytes / 2**20:,.0f} MiB)", file=sys.stderr,
              flush=True)
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
