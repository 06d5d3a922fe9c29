"""The HTTP side of ``opengemma serve``: a plain ASGI application (run by uvicorn) in OpenAI's shapes.

Part of the serving side. Routes: ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /openapi.json``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``; the last two answer JSON, or server-sent events ending in
``data: [DONE]`` with ``"stream": true``.

Every request is validated (:mod:`opengemma.serve.protocol`) before it reaches the engine; every
failure is an OpenAI error body with a 4xx status (5xx only for our own faults), and nothing a
client sends can reach the engine thread's state except through :meth:`Engine.submit` and
:meth:`Engine.cancel`. The body must arrive within ``body_timeout`` seconds (else 408 and the
connection is closed: a client trickling its body cannot hold a connection); it is parsed,
validated and tokenized in a worker thread, so a large prompt never stalls the event loop that
feeds every running stream. A watcher task listens for the client going away (ASGI
``http.disconnect``) and cancels the request's sequences at once, freeing their KV slots before
the next step.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid

from .engine import Engine, Event, QueueFull, ShuttingDown
from .metrics import Metrics
from .protocol import (
    ApiError,
    GenRequest,
    ServeInfo,
    chat_logprobs,
    completion_logprobs,
    openapi,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)

log = logging.getLogger("opengemma.serve")

MAX_BODY = 8 * 2**20  # bytes; far above any prompt that fits a context
_DISCONNECTED = object()  # queued by the watcher when the client goes away
CLOSE = {"connection": "close"}  # on errors before the body is read: the rest of it is not waited for

ROUTES = {  # path -> (method, endpoint name used in metrics)
    "/health": ("GET", "health"),
    "/openapi.json": ("GET", "openapi"),
    "/metrics": ("GET", "metrics"),
    "/v1/models": ("GET", "models"),
    "/v1/completions": ("POST", "completions"),
    "/v1/chat/completions": ("POST", "chat"),
}


class App:
    """The ASGI callable. ``loop`` must be the event loop uvicorn runs on (engine events are handed
    to it with ``call_soon_threadsafe``); :meth:`bind` sets it and the engine's ``deliver``."""

    def __init__(self, engine: Engine, info: ServeInfo, *, metrics: Metrics, api_key: str | None = None,
                 body_timeout: float | None = 30.0):
        self.engine = engine
        self.info = info
        self.metrics = metrics
        self.api_key = api_key
        self.body_timeout = body_timeout  # seconds for the whole request body; None: no limit
        self._openapi: bytes | None = None
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

        def deliver(batch):
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
                pass

        self.engine.deliver = deliver

    # -- ASGI entry ------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off (run_serve manages start and stop); websockets are not served
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        route = ROUTES.get(path)
        endpoint = route[1] if route else ("model" if path.startswith("/v1/models/") else "unknown")
        status = 500
        try:
            if route is None and endpoint == "unknown":
                raise ApiError(404, f"no route {method} {path}", code="not_found")
            want = route[0] if route else "GET"
            if method != want:
                raise ApiError(405, f"{path} only answers {want}, not {method}", code="method_not_allowed",
                               headers={"allow": want})
            if endpoint not in ("health", "openapi"):  # open to probes and API browsers
                self._authorize(scope)
            if endpoint == "health":
                status = await self._health(send)
            elif endpoint == "openapi":
                if self._openapi is None:
                    from .. import __version__

                    self._openapi = json.dumps(openapi(self.info, __version__)).encode()
                status = await _send_bytes(send, 200, self._openapi, "application/json")
            elif endpoint == "metrics":
                status = await _send_bytes(send, 200, self.metrics.render().encode(),
                                           "text/plain; version=0.0.4; charset=utf-8")
            elif endpoint == "models":
                status = await _send_json(send, 200, {"object": "list", "data": [self._model_card()]})
            elif endpoint == "model":
                name = path[len("/v1/models/"):]
                if name != self.info.model_id and name not in self.info.aliases:
                    raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
                status = await _send_json(send, 200, self._model_card())
            else:
                status = await self._generate(endpoint, receive, send)
        except ApiError as e:
            status = await _send_json(send, e.status, e.body(), e.headers)
        except Exception:  # a bug: log it, answer 500, keep serving
            log.exception("request failed: %s %s", method, path)
            err = ApiError(500, "internal server error", type="server_error", code="internal_error")
            status = await _send_json(send, 500, err.body())
        self.metrics.request(endpoint, status)

    def _authorize(self, scope) -> None:
        if self.api_key is None:
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})

    def _model_card(self) -> dict:
        return {"id": self.info.model_id, "object": "model", "created": self.created, "owned_by": "opengemma",
                "max_model_len": self.info.max_context}

    async def _health(self, send) -> int:
        body = {"status": "shutting down" if self.draining else "ok", "model": self.info.model_id,
                "running": self.engine.running, "waiting": self.engine.waiting}
        return await _send_json(send, 503 if self.draining else 200, body)

    # -- generation ------------------------------------------------------------------------------------
    async def _generate(self, endpoint: str, receive, send) -> int:
        try:
            raw = await asyncio.wait_for(_read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout", headers=CLOSE) from None
        if raw is None:
            return 499  # the client left before sending its body
        req = await asyncio.to_thread(_parse, endpoint, raw, self.info)
        total = len(req.prompts) * req.n
        if total > self.engine.max_batch + self.engine.max_queue:
            raise ApiError(400, f"{total} choices in one request exceed the server's capacity of "
                           f"{self.engine.max_batch + self.engine.max_queue}", param="n")
        events: asyncio.Queue = asyncio.Queue()
        seqs = [self.engine.new_seq(prompt, params, functools.partial(_put, events, i * req.n + j))
                for i, prompt in enumerate(req.prompts) for j, params in enumerate(req.params)]
        try:
            self.engine.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"retry-after": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error",
                           code="service_unavailable") from None
        watcher = asyncio.ensure_future(_watch_disconnect(receive, events))
        done = [False] * len(seqs)
        try:
            out = _Output(req, self.info, events, done, endpoint)
            return await (out.stream(send) if req.stream else out.collect(send))
        finally:
            watcher.cancel()
            for seq, finished in zip(seqs, done):
                if not finished:
                    self.engine.cancel(seq)  # client gone or error: free the slot now


def _parse(endpoint: str, raw: bytes, info: ServeInfo) -> GenRequest:
    return (parse_chat if endpoint == "chat" else parse_completion)(parse_json(raw), info)


def _dispatch(batch: list) -> None:
    for seq, event in batch:
        seq.sink(event)


def _put(queue: asyncio.Queue, index: int, event: Event) -> None:
    queue.put_nowait((index, event))


async def _watch_disconnect(receive, events: asyncio.Queue) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            events.put_nowait(_DISCONNECTED)
            return


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"request body is larger than {MAX_BODY // 2**20} MiB", code="request_too_large",
                           headers=CLOSE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_bytes(send, status: int, data: bytes, content_type: str, headers: dict | None = None) -> int:
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})
    return status


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> int:
    return await _send_bytes(send, status, json.dumps(body).encode(), "application/json", headers)


class _Output:
    """Turns one request's engine events into a JSON body or an event stream."""

    def __init__(self, req: GenRequest, info: ServeInfo, events: asyncio.Queue, done: list[bool], endpoint: str):
        self.req, self.info, self.events, self.done = req, info, events, done
        self.chat = endpoint == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        k = len(done)
        self.texts = [[] for _ in range(k)]
        self.logprobs = [[] for _ in range(k)]
        self.offsets = [0] * k
        self.finish: list[str | None] = [None] * k
        self.completion_tokens = [0] * k

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.req.prompts)

    def _usage(self) -> dict:
        return usage(self.prompt_tokens, sum(self.completion_tokens))

    async def _next(self):
        """(index, event) of the next event, or None when the client went away."""
        item = await self.events.get()
        if item is _DISCONNECTED:
            return None
        index, event = item
        if event.finish_reason is not None:
            self.done[index] = True
            self.finish[index] = event.finish_reason
            self.completion_tokens[index] = event.completion_tokens
        return index, event

    @staticmethod
    def _failure(event: Event) -> ApiError:
        if event.finish_reason == "abort":
            return ApiError(503, event.error or "request aborted", type="server_error", code="service_unavailable")
        return ApiError(500, event.error or "internal error", type="server_error", code="internal_error")

    async def collect(self, send) -> int:
        while not all(self.done):
            item = await self._next()
            if item is None:
                return 499
            index, event = item
            if event.finish_reason in ("abort", "error"):
                raise self._failure(event)
            self.texts[index].append(event.text)
            if event.logprob is not None:
                self.logprobs[index].append(event.logprob)
        choices = []
        tok = self.info.tokenizer
        for i, parts in enumerate(self.texts):
            text = "".join(parts)
            lp = None
            if self.req.logprobs:
                lp = chat_logprobs(tok, self.logprobs[i]) if self.chat else completion_logprobs(tok, self.logprobs[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": choices,
                "usage": self._usage(), "system_fingerprint": None}
        return await _send_json(send, 200, body)

    def _chunk(self, index: int, text: str | None, finish: str | None, lp=None, role: bool = False) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "choices": [choice], "system_fingerprint": None}
        if self.req.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return _sse(body)

    async def stream(self, send) -> int:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if self.chat:
            for i in range(len(self.done)):
                await emit(self._chunk(i, None, None, role=True))
        tok = self.info.tokenizer
        while not all(self.done):
            item = await self._next()
            if item is None:
                return 499  # nobody to write to; the caller cancels the sequences
            index, event = item
            if event.finish_reason in ("abort", "error"):
                await emit(_sse(self._failure(event).body()))
                break
            lp = None
            if self.req.logprobs and event.logprob is not None:
                if self.chat:
                    lp = chat_logprobs(tok, [event.logprob])
                else:
                    lp = completion_logprobs(tok, [event.logprob], self.offsets[index])
            self.offsets[index] += len(event.text)
            if event.text or lp is not None:
                await emit(self._chunk(index, event.text, None, lp))
            if event.finish_reason is not None:
                await emit(self._chunk(index, None if self.chat else "", event.finish_reason))
        if self.req.include_usage and all(self.done):
            await emit(_sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                             "created": self.created, "model": self.req.model, "choices": [],
                             "usage": self._usage(), "system_fingerprint": None}))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return 200


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
