"""The OpenAI API shapes: request schemas, validation and response bodies for ``opengemma serve``.

Part of the serving side. A request body (already parsed JSON) is validated against a pydantic v2
model of OpenAI's request (:class:`CompletionRequest`, :class:`ChatCompletionRequest`), which
declares every field's type and bounds in one place (ints in ranges, floats finite, strings and
lists sized) and gives the OpenAPI description (``GET /openapi.json``, :func:`openapi`) for free.
What depends on the served model (the context, the vocabulary, the chat format) is checked next,
and the request becomes a :class:`GenRequest`: token ids per prompt (completion prompts through
:meth:`Tokenizer.encode`, conversations through the one chat formatter,
:func:`opengemma.chat.format_chat`) and one :class:`~opengemma.generate.GenerationConfig` per choice. Anything wrong
raises :class:`ApiError`, which the app turns into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. Nothing here touches the
model, so every check runs before a request takes a place in the queue, and nothing a client sends
reaches torch unbounded (``top_k`` of 2**63 or 1e30 means "every token", as does any k >= the
vocabulary).

Defaults follow OpenAI: temperature 1, top_p 1, n 1, ``max_tokens`` 16 for completions and "the
rest of the context" for chat. Extensions: ``top_k`` (0 or -1: off), ``ignore_eos`` and token-id
prompts. Unknown fields are ignored (OpenAI clients send fields such as ``user`` or ``metadata``
that change nothing here); options that would change the answer and are not implemented (penalties, logit
bias, tools, JSON mode, echo, suffix) are refused rather than ignored.

Cost, measured on the shared 2-core CPU box that runs the tests (Python 3.11, pydantic 2.13, so
with noise from other load): once per server start, importing pydantic takes 90-290 ms and
building these models 100-200 ms (next to a model load of seconds). Per request, the schema
validation itself takes ~9 us (a streaming completion) to ~12 us (a chat of four messages); the
whole parse (JSON, schema, tokenization, context checks) takes 30-55 us and 110-145 us, against
35-75 us and 70-110 us for the hand-written checks it replaced: at most some 30 us more, next to
a decode step of tens of milliseconds. Small, so it stays. The app runs the parse in a worker
thread, so even a long prompt's tokenization never stalls the event loop.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError, PydanticKnownError

from ..chat import format_chat
from ..errors import OpenGemmaError
from ..generate import GenerationConfig
from .engine import TokenLogprob

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per completion request
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 1000  # per stop string: the text held back while a stop string may be forming
MAX_LOGPROBS_COMPLETION = 5  # OpenAI's limits
MAX_TOP_LOGPROBS_CHAT = 20
MAX_NAME = 256  # characters of a model id
MAX_LOGIT_BIAS = 300  # OpenAI's limit (refused anyway: only sized here)
MAX_TOOLS = 128  # OpenAI's limit (refused anyway: only sized here)
SEED_RANGE = (-(2**63), 2**64)


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status`` (and extra ``headers``)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ServeInfo:
    """What validation needs to know about the served model."""

    tokenizer: object
    vocab_size: int
    max_context: int
    model_id: str
    aliases: frozenset[str] = frozenset()

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text cannot fit the context, checked before tokenizing (which
        costs ~0.8 s per million characters): each token spells at most the longest vocabulary
        piece (31 characters for Gemma 3), and the tokenizer does not normalize text."""
        size = getattr(self.tokenizer, "vocab_size", 0)
        longest = max((len(self.tokenizer.id_to_piece(i)) for i in range(size)), default=64)
        return self.max_context * longest


@dataclass
class GenRequest:
    """A validated completion or chat request: ``prompts`` (token ids) x ``n`` choices, choice
    ``i * n + j`` generated with ``params[j]`` from ``prompts[i]``."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    params: list[GenerationConfig]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.params)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; invalid UTF-8, invalid JSON and non-objects are 400s."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    if not text.strip():
        raise bad("request body is empty: send a JSON object", code="invalid_json")

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise bad(f"request body is not valid JSON: {str(e).splitlines()[0][:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# -- the request schemas -------------------------------------------------------------------------------

def _whole_number(v: Any) -> Any:
    """JSON integers, and floats with an integral value (16.0: some clients write every number as a
    float); never booleans or strings. 1e30 becomes an int: the field's bounds then apply."""
    if isinstance(v, float):
        if not math.isfinite(v):
            raise PydanticKnownError("finite_number")
        if not v.is_integer():
            raise PydanticKnownError("int_from_float")
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PydanticKnownError("int_type")
    return v


def _one_error(message: str) -> WrapValidator:
    """Replace a union's errors (pydantic reports each member's) by one ``message``."""
    def wrap(value: Any, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_value", message) from None

    return WrapValidator(wrap)


WHOLE = BeforeValidator(_whole_number)  # last in an Annotated int: runs first, the bounds before it then apply
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # strict: true is not 1.0; ints are fine
Penalty = Annotated[Number, Field(ge=-2.0, le=2.0, description="Only 0 is supported.")]
TokenIds = list[StrictInt]
Prompt = Annotated[
    StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_PROMPTS)] | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)],
    Field(union_mode="left_to_right"),
    _one_error(f"must be a string, a list of at most {MAX_PROMPTS} strings, a list of token ids or a list of at "
               f"most {MAX_PROMPTS} lists of token ids"),
]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[
    StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)],
    _one_error(f"must be a string or a list of at most {MAX_STOP} strings, each of 1 to {MAX_STOP_CHARS} "
               "characters"),
]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Schema):
    include_usage: StrictBool | None = None


class ResponseFormat(_Schema):
    type: Annotated[StrictStr, Field(max_length=64, description='Only "text" is supported.')] = "text"


class TextPart(_Schema):
    type: Literal["text"]
    text: StrictStr


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: Annotated[StrictStr | list[TextPart],
                       _one_error("must be a string or a list of text parts (only text is supported)")]


TOP_K = "Extension: sample among the k most likely tokens; 0 or -1 (and any k >= the vocabulary) keep every token."
IGNORE_EOS = "Extension (as vLLM): generate past end-of-sequence tokens, for load tests."


class _GenerationRequest(_Schema):
    """The fields both generation endpoints share."""

    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, description=TOP_K), WHOLE] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1] - 1), WHOLE] | None = None
    stop: Stop | None = None
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: Annotated[StrictBool, Field(description=IGNORE_EOS)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[StrictStr, Number], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=MAX_TOOLS)] | None = None
    functions: Annotated[list[Any], Field(max_length=MAX_TOOLS)] | None = None


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS_COMPLETION), WHOLE] | None = None
    echo: StrictBool | None = None
    suffix: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    best_of: Annotated[int, Field(ge=1), WHOLE] | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS_CHAT), WHOLE] | None = None


def _validate(schema: type[_Schema], body: dict) -> Any:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(part) for part in err["loc"]]
        where, param = ".".join(loc) or "request body", (loc[0] if loc else None)
        if err["type"] == "missing":
            raise bad(f"{where} is required", param) from None
        bound = _BOUNDS.get(err["type"])  # pydantic prints bounds as floats: 2**64 - 1 would read 1.8e19
        message = f"must be {bound[1]} {err['ctx'][bound[0]]}" if bound else err["msg"]
        raise bad(f"{where}: {message} (got {_show(err['input'])})", param) from None


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def _show(v) -> str:
    """A short, safe rendering of a client's value for an error message."""
    if isinstance(v, str):
        text = json.dumps(v[:60]) + ("..." if len(v) > 60 else "")
    elif isinstance(v, list):
        text = f"a list of {len(v)} item{'s' * (len(v) != 1)}"
    elif isinstance(v, dict):
        text = f"an object with {len(v)} field{'s' * (len(v) != 1)}"
    elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        text = f"an integer of {v.bit_length()} bits"
    else:
        text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 70 else text[:67] + "..."


# -- checks that need the served model ---------------------------------------------------------------

def _unsupported(req: _GenerationRequest) -> None:
    """Reject options we would otherwise silently ignore and answer wrongly."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise bad(f"{name} is not supported (only 0)", name)
    if req.logit_bias:
        raise bad("logit_bias is not supported", "logit_bias")
    if req.tools or req.functions:
        raise bad("tools and functions are not supported by this server", "tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise bad("response_format other than text is not supported", "response_format")


def _model(req: _GenerationRequest, info: ServeInfo) -> str:
    if req.model is None:
        return info.model_id
    if req.model != info.model_id and req.model not in info.aliases:
        raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{info.model_id}`",
                       param="model", code="model_not_found")
    return info.model_id


def _sampling(req: _GenerationRequest, info: ServeInfo, max_tokens: int, n: int,
              logprobs: int | None) -> list[GenerationConfig]:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = None if req.top_p is None or req.top_p >= 1.0 else req.top_p
    top_k = req.top_k
    if top_k is not None and not 0 < top_k < info.vocab_size:
        top_k = None  # 0 and -1 mean off (OpenAI-style servers use either); k >= vocabulary keeps every token
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    seeds = [None if req.seed is None else (req.seed + j) % SEED_RANGE[1] for j in range(n)]  # distinct per choice
    return [GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             stop=stop, logprobs=logprobs, ignore_eos=bool(req.ignore_eos))
            for s in seeds]


def _budget(req: _GenerationRequest, names: tuple[str, ...], default: int | None, prompts: list[list[int]],
            info: ServeInfo) -> int:
    """max_tokens (the first of ``names`` given), checked against the context for every prompt."""
    ctx = info.max_context
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise _too_long(f"the prompt has {longest} tokens", ctx,
                        "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
    name = next((k for k in names if getattr(req, k) is not None), names[0])
    value = getattr(req, name)
    if value is None:
        value = default if default is not None else ctx - longest
    if value > ctx:
        raise bad(f"{name} is {value}, the context is {ctx} tokens", name, "context_length_exceeded")
    if longest + value > ctx:
        raise bad(f"the prompt ({longest} tokens) plus {name} ({value}) exceeds the context of {ctx} tokens",
                  name, "context_length_exceeded")
    return min(value, ctx - longest)


def _too_long(what: str, ctx: int, param: str) -> ApiError:
    return bad(f"{what}, the context is {ctx} tokens: no room to generate", param, "context_length_exceeded")


def _common(req: _GenerationRequest) -> tuple[int, bool, bool]:
    n = req.n or 1
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (it must equal n)", "best_of")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return n, bool(req.stream), include_usage


# -- the two generation endpoints -------------------------------------------------------------------

def parse_completion(body: dict, info: ServeInfo) -> GenRequest:
    """``POST /v1/completions``: prompt is a string, a list of strings, a list of token ids or a
    list of such lists (each a prompt of its own). Text prompts get BOS, as in ``Gemma.generate``."""
    req = _validate(CompletionRequest, body)
    model = _model(req, info)
    _unsupported(req)
    if req.echo:
        raise bad("echo is not supported", "echo")
    if req.suffix:
        raise bad("suffix is not supported", "suffix")
    prompts = _prompts(req.prompt, info)
    n, stream, include_usage = _common(req)
    max_tokens = _budget(req, ("max_tokens",), 16, prompts, info)
    params = _sampling(req, info, max_tokens, n, req.logprobs)
    return GenRequest("completion", model, prompts, params, stream, include_usage, req.logprobs is not None)


def _prompts(prompt: str | list, info: ServeInfo) -> list[list[int]]:
    items: list = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not items:
        raise bad("prompt must not be empty", "prompt")
    out = []
    for item in items:
        if not item:
            raise bad("prompt must not be empty", "prompt")
        if isinstance(item, str):
            if len(item) > info.max_prompt_chars:  # cannot fit: no need to tokenize megabytes
                raise _too_long(f"a prompt has {len(item):,} characters", info.max_context, "prompt")
            try:
                out.append(info.tokenizer.encode(item, bos=True))
            except OpenGemmaError as e:
                raise bad(f"prompt: {e}", "prompt") from None
        else:
            if len(item) >= info.max_context:
                raise _too_long(f"a prompt has {len(item)} tokens", info.max_context, "prompt")
            if any(not 0 <= t < info.vocab_size for t in item):
                raise bad(f"prompt token ids must be in [0, {info.vocab_size})", "prompt")
            out.append(list(item))
    return out


def parse_chat(body: dict, info: ServeInfo) -> GenRequest:
    """``POST /v1/chat/completions``: messages through the chat formatter; the reply ends at
    ``<end_of_turn>`` (one of the tokenizer's stop ids)."""
    req = _validate(ChatCompletionRequest, body)
    model = _model(req, info)
    _unsupported(req)
    messages = _messages(req.messages, info)
    try:
        ids = format_chat(info.tokenizer, messages, add_generation_prompt=True).ids
    except OpenGemmaError as e:
        raise bad(str(e), "messages") from None
    n, stream, include_usage = _common(req)
    top = req.top_logprobs
    if top is not None and not req.logprobs:
        raise bad("top_logprobs needs logprobs to be true", "top_logprobs")
    max_tokens = _budget(req, ("max_completion_tokens", "max_tokens"), None, [ids], info)
    params = _sampling(req, info, max_tokens, n, (top or 0) if req.logprobs else None)
    return GenRequest("chat", model, [ids], params, stream, include_usage, bool(req.logprobs))


def _messages(messages: list[Message], info: ServeInfo) -> list[dict]:
    """Validated messages -> the formatter's {"role", "content": str}; text content parts are
    joined, "developer" is the newer name of "system". A conversation that cannot fit the context
    (each turn takes at least four tokens) is refused before it is tokenized."""
    ctx = info.max_context
    if len(messages) > ctx // 4 + 1:
        raise _too_long(f"{len(messages)} messages take more than {ctx} tokens", ctx, "messages")
    out, chars = [], 0
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        chars += len(content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if chars > info.max_prompt_chars:
        raise _too_long(f"the messages have {chars:,} characters", ctx, "messages")
    return out


# -- the OpenAPI description -------------------------------------------------------------------------

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def openapi(info: ServeInfo, version: str) -> dict:
    """The server's OpenAPI 3.1 description: request bodies from the schemas above; responses in
    OpenAI's shapes (JSON, or server-sent events with ``"stream": true``); errors as ``Error``."""
    _, top = models_json_schema([(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
                                ref_template="#/components/schemas/{model}")
    schemas = {**top["$defs"], "Error": _ERROR_SCHEMA}
    error = {"description": "OpenAI error body", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}

    def get(summary: str, auth: bool = True) -> dict:
        op = {"summary": summary, "responses": {"200": {"description": "OK"}}}
        return {"get": op if not auth else {**op, "security": [{"bearer": []}],
                                            "responses": {**op["responses"], "401": error}}}

    def post(summary: str, schema: str, returns: str) -> dict:
        ok = {"description": f"{returns}, or with \"stream\": true server-sent events of its chunks ending in "
                             "'data: [DONE]'",
              "content": {"application/json": {}, "text/event-stream": {}}}
        responses = {"200": ok, **{s: error for s in ("400", "401", "404", "408", "413", "429", "500", "503")}}
        return {"post": {"summary": summary, "security": [{"bearer": []}], "responses": responses, "requestBody": {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "opengemma serve", "version": version,
                 "description": f"OpenAI-compatible API serving `{info.model_id}` "
                                f"(context {info.max_context} tokens)."},
        "paths": {
            "/v1/completions": post("Text completion", "CompletionRequest", "an OpenAI text_completion object"),
            "/v1/chat/completions": post("Chat completion", "ChatCompletionRequest",
                                         "an OpenAI chat.completion object"),
            "/v1/models": get("The served model, as a list"),
            "/v1/models/{model}": get("The served model"),
            "/health": get("Liveness and load; 503 while shutting down", auth=False),
            "/metrics": get("Prometheus metrics"),
            "/openapi.json": get("This description", auth=False),
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


# -- response bodies ---------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token: int) -> str:
    """A token as a string for logprobs: its text, or ``bytes:\\xNN..`` for a partial UTF-8 piece."""
    raw = tokenizer.id_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer, items: list[TokenLogprob], offset: int = 0) -> dict:
    """The completions API's logprobs object for ``items`` (``offset``: text offset of the first)."""
    tokens = [token_text(tokenizer, t.token) for t in items]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in t.top} for t in items],
            "text_offset": offsets}


def chat_logprobs(tokenizer, items: list[TokenLogprob]) -> dict:
    def entry(token: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": lp, "bytes": list(tokenizer.id_bytes(token))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in items], "refusal": None}
