"""Tests of the server's request validation and response shapes (opengemma.serve.protocol) and of
its Prometheus text (opengemma.serve.metrics): no model, no HTTP, only the real tokenizer."""

from __future__ import annotations

import pytest

from opengemma.chat import format_chat
from opengemma.serve.cli import build_parser, model_id
from opengemma.serve.metrics import Metrics
from opengemma.serve.protocol import (
    ApiError,
    ServeInfo,
    parse_chat,
    parse_completion,
    parse_json,
)


@pytest.fixture(scope="module")
def info(tokenizer):
    return ServeInfo(tokenizer, 262144, 256, "gemma3-270m", frozenset({"alias"}))


def test_completion_defaults_follow_openai(info, tokenizer):
    req = parse_completion({"prompt": "Hello there"}, info)
    (p,) = req.params
    assert req.prompts == [tokenizer.encode("Hello there", bos=True)]
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.logprobs) == (16, 1.0, None, None,
                                                                                            None, (), None)
    assert not req.stream and req.model == "gemma3-270m"


def test_completion_options(info):
    req = parse_completion({"prompt": [[2, 5, 6], [2, 7]], "model": "alias", "n": 3, "seed": 2**64 - 1, "top_k": -1,
                            "top_p": 0.5, "temperature": 0, "stop": "\n", "max_tokens": 8.0, "logprobs": 2,
                            "stream": True, "stream_options": {"include_usage": True}}, info)
    assert req.prompts == [[2, 5, 6], [2, 7]] and req.model == "gemma3-270m"
    assert [p.seed for p in req.params] == [2**64 - 1, 0, 1]  # distinct per choice, wrapped like torch
    p = req.params[0]
    assert (p.max_new_tokens, p.top_k, p.top_p, p.temperature, p.stop, p.logprobs) == (8, None, 0.5, 0.0, ("\n",), 2)
    assert req.stream and req.include_usage and req.logprobs
    assert not p.ignore_eos and parse_completion({"prompt": "x", "ignore_eos": True}, info).params[0].ignore_eos


def test_chat_uses_the_formatter_and_fills_the_context(info, tokenizer):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    req = parse_chat({"messages": messages}, info)
    want = format_chat(tokenizer, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi there"}]).ids
    assert req.prompts == [want]
    assert req.params[0].max_new_tokens == 256 - len(want)  # chat default: the rest of the context
    assert parse_chat({"messages": messages, "max_completion_tokens": 7}, info).params[0].max_new_tokens == 7


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "x", "max_tokens": 300}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "x", "max_tokens": 255}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "x " * 300}, "prompt", "context_length_exceeded"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", None),
    ({"prompt": "x", "echo": True}, "echo", None),
    ({"prompt": "x", "best_of": 3}, "best_of", None),
    ({"prompt": "x", "stream_options": []}, "stream_options", None),
    ({"prompt": ["a", 3]}, "prompt", None),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", None),
    ({"prompt": "x", "temperature": True}, "temperature", None),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos", None),
])
def test_completion_rejections(info, body, param, code):
    with pytest.raises(ApiError) as e:
        parse_completion(body, info)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code


def test_parse_json():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"\xff", b"", b"   ", b"[]", b'"x"', b"{", b'{"a": Infinity}', b"[" * 100000):
        with pytest.raises(ApiError) as e:
            parse_json(raw)
        assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"},
                   ServeInfo(None, 10, 10, "m"))
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.request("chat", 200)
    m.step(batch_size=3, tokens=3)
    m.latencies([0.2], [0.01, 0.02])
    m.sequence_done("stop", prompt_tokens=5, seconds=1.5)
    m.gauge("queue_depth", "Waiting.", lambda: 2)
    text = m.render()
    assert 'opengemma_requests_total{endpoint="chat",status="200"} 1' in text
    assert 'opengemma_inter_token_latency_seconds_bucket{le="0.01"} 1' in text
    assert 'opengemma_inter_token_latency_seconds_bucket{le="+Inf"} 2' in text
    assert "opengemma_batch_size_sum 3" in text and "opengemma_queue_depth 2" in text
    assert "# TYPE opengemma_time_to_first_token_seconds histogram" in text


def test_cli_defaults_are_safe():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.max_batch, args.quantize) == ("127.0.0.1", 8000, 16, "auto")
    assert model_id("gemma3-270m (embedded, Q4_K_M GGUF)") == "gemma3-270m" and model_id("x.gguf") == "x"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-batch", "0"])


@pytest.mark.parametrize("top_k,want", [(2**63, None), (1e30, None), (262144, None), (10**400, None), (0, None),
                                        (-1, None), (40, 40), (262143, 262143), (40.0, 40)])
def test_top_k_never_reaches_the_engine_unbounded(info, top_k, want):
    # The reported crash: 2**63 and 1e30 overflowed the engine step. Any k >= the vocabulary keeps
    # every token, which is what "off" means.
    (p,) = parse_completion({"prompt": "x", "top_k": top_k, "temperature": 1}, info).params
    assert p.top_k == want


class NoTokenizer:
    """A tokenizer that must not be called: the check before it has to answer."""

    vocab_size = 262144

    def id_to_piece(self, i: int) -> str:
        return "x" * 31 if i == 0 else "x"

    def encode(self, text, bos=True):
        raise AssertionError("tokenized a text that cannot fit the context")


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "x", "temperature": 1e400}, "temperature", None),  # json.loads gives inf
    ({"prompt": "x", "top_p": -1e400}, "top_p", None),
    ({"prompt": "x", "temperature": 10**400}, "temperature", None),
    ({"prompt": "x", "seed": 2**64}, "seed", None),
    ({"prompt": "x", "seed": 1e30}, "seed", None),
    ({"prompt": "x", "n": True}, "n", None),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 16.5}, "max_tokens", None),
    ({"prompt": "x", "top_k": -2}, "top_k", None),
    ({"prompt": "x", "top_k": "all"}, "top_k", None),
    ({"prompt": "x", "stop": "a" * 1001}, "stop", None),
    ({"prompt": [[2, 3]] * 17}, "prompt", None),
    ({"prompt": [2, -1]}, "prompt", None),
    ({"prompt": "x", "model": "m" * 300}, "model", None),
    ({"prompt": "x", "logit_bias": {"5": 1e400}}, "logit_bias", None),
    ({"prompt": "x", "tools": [{}] * 200}, "tools", None),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options", None),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format", None),
    ({"prompt": [[[3]]]}, "prompt", None),
    ({"prompt": "x" * (256 * 31 + 1)}, "prompt", "context_length_exceeded"),
    ({"prompt": [7] * 100_000}, "prompt", "context_length_exceeded"),
])
def test_every_field_is_bounded(body, param, code):
    info = ServeInfo(NoTokenizer(), 262144, 256, "gemma3-270m")
    with pytest.raises(ApiError) as e:
        parse_completion(body, info)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code, e.value.message
    assert len(e.value.message) < 400  # a huge value is never echoed back whole


@pytest.mark.parametrize("messages,code", [
    ([{"role": "user", "content": "x" * (256 * 31 + 1)}], "context_length_exceeded"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 40, "context_length_exceeded"),
    ([{"role": "tool", "content": "42"}], None),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], None),
    ([{"role": "user", "content": "hi", "extra": [[[[]]]]}, "x"], None),
])
def test_chat_messages_are_bounded(messages, code):
    info = ServeInfo(NoTokenizer(), 262144, 256, "gemma3-270m")
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": messages}, info)
    assert e.value.status == 400 and e.value.param == "messages" and e.value.code == code, e.value.message


def test_schema_errors_name_the_field_and_the_bound(info):
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "x", "seed": 2**64}, info)
    assert e.value.message == "seed: must be <= 18446744073709551615 (got 18446744073709551616)"
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": [{"role": "wizard", "content": "hi"}]}, info)
    assert e.value.message.startswith("messages.0.role: Input should be 'system'")
    with pytest.raises(ApiError) as e:
        parse_completion({"max_tokens": 3}, info)
    assert e.value.message == "prompt is required"


def test_openapi_describes_the_bounds(info):
    from opengemma.serve.protocol import openapi

    doc = openapi(info, "0.1.0")
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    n = next(s for s in completion["n"]["anyOf"] if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 16)
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"] and "Message" in schemas
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    json_roundtrip = __import__("json").loads(__import__("json").dumps(doc))
    assert json_roundtrip == doc


def test_cli_rejects_empty_api_keys_and_documents_the_limits():
    from opengemma.errors import OpenGemmaError
    from opengemma.serve.cli import _check_api_key

    for key in ("", "   ", " padded"):
        with pytest.raises(OpenGemmaError):
            _check_api_key(key)
    _check_api_key(None)
    _check_api_key("sk-1")
    text = build_parser().format_help()
    for flag in ("--timeout-header", "--timeout-body", "--timeout-keep-alive", "--max-connections"):
        assert flag in text
    args = build_parser().parse_args([])
    assert (args.timeout_header, args.timeout_body, args.max_connections) == (10.0, 30.0, 512)
    for bad_value in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--timeout-body", bad_value])
