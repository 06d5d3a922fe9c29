"""The OpenAI API shapes: request validation and response bodies for ``opengemma serve``.

Part of the serving side. A request body (already parsed JSON) becomes a :class:`GenRequest`:
token ids per prompt (completion prompts through :meth:`Tokenizer.encode`, conversations through
the one chat formatter, :func:`opengemma.chat.format_chat`) and one :class:`SamplingParams` per
choice. Anything wrong raises :class:`ApiError`, which the app turns into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. Nothing here touches the
model, so every check runs before a request takes a place in the queue.

Defaults follow OpenAI: temperature 1, top_p 1, n 1, ``max_tokens`` 16 for completions and "the
rest of the context" for chat. Extensions: ``top_k`` (0 or -1: off), and token-id prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..chat import format_chat
from ..errors import OpenGemmaError
from .engine import SamplingParams, TokenLogprob

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 16  # prompts per completion request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS_COMPLETION = 5  # OpenAI's limits
MAX_TOP_LOGPROBS_CHAT = 20
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


@dataclass
class GenRequest:
    """A validated completion or chat request: ``prompts`` (token ids) x ``n`` choices, choice
    ``i * n + j`` generated with ``params[j]`` from ``prompts[i]``."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
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


# -- field readers -----------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 16.0 is a fine 16 (some clients serialize every number as a float)
    if not _is_int(v):
        raise bad(f"{name} must be an integer, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise bad(f"{name} must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"{name} must be <= {hi}, got {v}", name)
    return v


def _num(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise bad(f"{name} must be a number, got {_show(v)}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {_show(v)}", name)
    return v


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"stop has {len(items)} strings, at most {MAX_STOP} are allowed", "stop")
    if any(not s for s in items):
        raise bad("stop strings must not be empty", "stop")
    return tuple(items)


def _unsupported(body: dict) -> None:
    """Reject options we would otherwise silently ignore and answer wrongly."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_num(v) or v != 0):
            raise bad(f"{name} is not supported (only 0)", name)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and functions are not supported by this server", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        raise bad("response_format other than text is not supported", "response_format")


def _model(body: dict, info: ServeInfo) -> str:
    model = body.get("model")
    if model is None:
        return info.model_id
    if not isinstance(model, str):
        raise bad(f"model must be a string, got {_show(model)}", "model")
    if model != info.model_id and model not in info.aliases:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{info.model_id}`",
                       param="model", code="model_not_found")
    return info.model_id


def _sampling(body: dict, max_tokens: int, n: int, logprobs: int | None) -> list[SamplingParams]:
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None:
        top_k = _int(body, "top_k", None, -1)
        top_k = None if top_k <= 0 else top_k  # 0 and -1 both mean off (OpenAI-style servers use either)
    seed = _int(body, "seed", None, SEED_RANGE[0], SEED_RANGE[1] - 1)
    stop = _stop(body)
    ignore_eos = _bool(body, "ignore_eos", False)  # vLLM's extension, for load tests
    seeds = [None if seed is None else (seed + j) % SEED_RANGE[1] for j in range(n)]  # distinct per choice
    return [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                           top_p=None if top_p >= 1.0 else top_p, seed=s, stop=stop, logprobs=logprobs,
                           ignore_eos=ignore_eos)
            for s in seeds]


def _budget(body: dict, names: tuple[str, ...], default: int | None, prompts: list[list[int]],
            info: ServeInfo) -> int:
    """max_tokens (the first of ``names`` given), checked against the context for every prompt."""
    ctx = info.max_context
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise bad(f"the prompt has {longest} tokens, the context is {ctx} tokens: no room to generate",
                  "messages" if "max_completion_tokens" in names else "prompt", "context_length_exceeded")
    name = next((k for k in names if body.get(k) is not None), names[0])
    value = _int(body, name, None, 1)
    if value is None:
        value = default if default is not None else ctx - longest
    if value > ctx:
        raise bad(f"{name} is {value}, the context is {ctx} tokens", name, "context_length_exceeded")
    if longest + value > ctx:
        raise bad(f"the prompt ({longest} tokens) plus {name} ({value}) exceeds the context of {ctx} tokens",
                  name, "context_length_exceeded")
    return min(value, ctx - longest)


def _common(body: dict) -> tuple[int, bool, bool]:
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (it must equal n)", "best_of")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options must be an object", "stream_options")
        include_usage = _bool(opts, "include_usage", False)
    return n, stream, include_usage


# -- the two generation endpoints -------------------------------------------------------------------

def parse_completion(body: dict, info: ServeInfo) -> GenRequest:
    """``POST /v1/completions``: prompt is a string, a list of strings, a list of token ids or a
    list of such lists (each a prompt of its own). Text prompts get BOS, as in ``Gemma.generate``."""
    model = _model(body, info)
    _unsupported(body)
    if body.get("echo"):
        raise bad("echo is not supported", "echo")
    if body.get("suffix"):
        raise bad("suffix is not supported", "suffix")
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt is required", "prompt")
    prompts = _prompts(body["prompt"], info)
    n, stream, include_usage = _common(body)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS_COMPLETION)
    max_tokens = _budget(body, ("max_tokens",), 16, prompts, info)
    params = _sampling(body, max_tokens, n, logprobs)
    return GenRequest("completion", model, prompts, params, stream, include_usage, logprobs is not None)


def _prompts(prompt, info: ServeInfo) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list):
        items = prompt
    else:
        raise bad(f"prompt must be a string, a list of strings or a list of token ids, got {_show(prompt)}",
                  "prompt")
    if not items:
        raise bad("prompt must not be empty", "prompt")
    if len(items) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad("prompt must not be empty", "prompt")
            try:
                out.append(info.tokenizer.encode(item, bos=True))
            except OpenGemmaError as e:
                raise bad(f"prompt: {e}", "prompt") from None
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            if any(not 0 <= t < info.vocab_size for t in item):
                raise bad(f"prompt token ids must be in [0, {info.vocab_size})", "prompt")
            out.append(list(item))
        elif isinstance(item, list) and not item:
            raise bad("prompt must not be empty", "prompt")
        else:
            raise bad("prompt must be a string, a list of strings or a list of token ids", "prompt")
    return out


def parse_chat(body: dict, info: ServeInfo) -> GenRequest:
    """``POST /v1/chat/completions``: messages through the chat formatter; the reply ends at
    ``<end_of_turn>`` (one of the tokenizer's stop ids)."""
    model = _model(body, info)
    _unsupported(body)
    if "messages" not in body or body["messages"] is None:
        raise bad("messages is required", "messages")
    messages = _messages(body["messages"])
    try:
        ids = format_chat(info.tokenizer, messages, add_generation_prompt=True).ids
    except OpenGemmaError as e:
        raise bad(str(e), "messages") from None
    n, stream, include_usage = _common(body)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS_CHAT)
    if top is not None and not want:
        raise bad("top_logprobs needs logprobs to be true", "top_logprobs")
    max_tokens = _budget(body, ("max_completion_tokens", "max_tokens"), None, [ids], info)
    params = _sampling(body, max_tokens, n, (top or 0) if want else None)
    return GenRequest("chat", model, [ids], params, stream, include_usage, want)


def _messages(messages) -> list[dict]:
    """OpenAI messages -> the formatter's {"role", "content": str}; text content parts are joined,
    "developer" is the newer name of "system"."""
    if not isinstance(messages, list):
        raise bad(f"messages must be a list of message objects, got {_show(messages)}", "messages")
    if not messages:
        raise bad("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"message {i} must be an object with role and content", "messages")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise bad(f"message {i} needs a string role", "messages")
        if role == "developer":
            role = "system"
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"message {i}: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"message {i} ({role}) needs string content, got {_show(content)}", "messages")
        out.append({"role": role, "content": content})
    return out


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
