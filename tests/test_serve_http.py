"""End-to-end tests of ``opengemma serve``: the real server, on a loopback port, with the embedded model.

Driven by the official ``openai`` client (completions, chat, streaming, stop strings, usage, n,
seed, logprobs) and by ``httpx`` for raw bad input. Greedy results must equal ``Gemma.generate``
alone, for one request and for parallel streams. The server's life cycle (a client killed
mid-stream, a full queue, SIGTERM during streams) is in ``test_serve_lifecycle.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

KEY = "test-key"
CONTEXT = 1024


class ServerProcess:
    """``python -m opengemma.serve`` on a free loopback port; stderr is collected by a thread."""

    def __init__(self, *args: str, timeout: float = 240.0):
        cmd = [sys.executable, "-m", "opengemma.serve", "--port", "0", "--no-access-log", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if self.url is None and " on http://" in line:
                    self.url = line.split(" on ")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self, headers=None) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-batch", "8", "--max-queue", "8", "--max-context", str(CONTEXT), "--prefill-chunk", "64",
                      "--api-key", KEY)
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["gemma3-270m"]
    assert client.models.retrieve("gemma3-270m").id == "gemma3-270m"
    r = httpx.get(f"{server.url}/health", timeout=10)  # no key needed: for probes
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_banner_and_openapi(server):
    banner = next(line for line in server.lines if " on http://" in line)
    assert banner.startswith(f"opengemma serve: gemma3-270m on {server.url} (auth: on;"), banner
    r = httpx.get(f"{server.url}/openapi.json", timeout=10)  # no key needed: a description, as /health
    assert r.status_code == 200
    doc = r.json()
    assert doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"}
    assert {"CompletionRequest", "ChatCompletionRequest", "Error"} <= set(doc["components"]["schemas"])


def test_completion_equals_generate(client, served_gemma):
    prompts = ["The capital of France is", "1 + 1 ="]
    r = client.completions.create(model="gemma3-270m", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices):
        assert choice.text == served_gemma.generate(prompt, max_new_tokens=12)
        assert choice.finish_reason == "length"
    n_prompt = sum(len(served_gemma.tokenizer.encode(p)) for p in prompts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)


def test_streaming_completion_equals_non_streaming(client, served_gemma):
    prompt = "Once upon a time"
    stream = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served_gemma.generate(prompt, max_new_tokens=16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(served_gemma.tokenizer.encode(prompt))


def test_chat_goes_through_the_formatter(client, served_gemma):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Knock knock."},
                {"role": "assistant", "content": "Who's there?"}, {"role": "user", "content": "Lettuce."}]
    want = served_gemma.chat(messages, max_new_tokens=12)
    r = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    from opengemma.chat import format_chat

    assert r.usage.prompt_tokens == len(format_chat(served_gemma.tokenizer, messages).ids)
    stream = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings(client, served_gemma):
    prompt = "Once upon a time"
    # stops taken from the model's own text (which depends on the kernels this CPU runs): words 5 and 8
    words = served_gemma.generate(prompt, max_new_tokens=30).split(" ")
    for stop in (" " + words[5], [" " + words[8], "\n"]):
        r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=30, temperature=0, stop=stop)
        want = served_gemma.generate(prompt, max_new_tokens=30, stop=stop)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="gemma3-270m", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True))
        assert streamed == want


def test_n_seed_and_logprobs(client, served_gemma):
    prompt = "My favourite animal is"
    kw = {"model": "gemma3-270m", "prompt": prompt, "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 11,
          "n": 3}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.choices[0].text == served_gemma.generate(prompt, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    assert 3 <= a.usage.completion_tokens <= 24 and len(a.choices) == 3
    r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"top_k": 5})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_parallel_streams_each_get_their_own_text(client, served_gemma):
    prompts = [f"Fact number {i}: the" for i in range(6)] + ["The capital of Italy is", "def add(a, b):"]
    budgets = [5 + (i % 4) for i in range(len(prompts))]

    def one(i: int):
        stream = client.completions.create(model="gemma3-270m", prompt=prompts[i], max_tokens=budgets[i],
                                           temperature=0, stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks), {c.id for c in chunks}

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, range(len(prompts))))
    ids = set()
    for prompt, budget, (text, chunk_ids) in zip(prompts, budgets, results):
        assert text == served_gemma.generate(prompt, max_new_tokens=budget), prompt
        assert len(chunk_ids) == 1 and not (chunk_ids & ids)  # one stream per request, none mixed
        ids |= chunk_ids


BAD = [  # (endpoint, raw body or JSON object, status, param)
    ("completions", b"{bad", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b"", 400, None),
    ("completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [1, 999999999]}, 400, "prompt"),
    ("completions", {"prompt": "\ud800"}, 400, "prompt"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("completions", {"prompt": "word " * (CONTEXT + 10)}, 400, "prompt"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_k": 1.5}, 400, "top_k"),
    ("completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("completions", {"prompt": "x", "seed": "s"}, 400, "seed"),
    ("completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("completions", {"prompt": "x", "model": 7}, 400, "model"),
    ("chat", {"model": "gemma3-270m"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": "hello"}, 400, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "assistant", "content": "I start?"}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
]


@pytest.mark.parametrize("endpoint,body,status,param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_clean_error(server, endpoint, body, status, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=data, headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_http_errors_and_auth(server):
    url = server.url
    assert httpx.get(f"{url}/v1/completions", headers=AUTH).status_code == 405
    assert httpx.get(f"{url}/v2/nothing", headers=AUTH).status_code == 404
    assert httpx.get(f"{url}/v1/models/nope", headers=AUTH).status_code == 404
    big = httpx.post(f"{url}/v1/completions", content=b" " * (9 * 2**20), headers=AUTH, timeout=60)
    assert big.status_code == 413
    body = {"prompt": "hi", "max_tokens": 1}
    missing = httpx.post(f"{url}/v1/completions", json=body)
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics").status_code == 401
    bad_client = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_openai_client_sees_api_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=CONTEXT * 2)
    assert e.value.code == "context_length_exceeded"


def test_still_serving_after_bad_input_and_metrics(server, client, served_gemma):
    r = client.completions.create(model="gemma3-270m", prompt="Water boils at", max_tokens=5, temperature=0)
    assert r.choices[0].text == served_gemma.generate("Water boils at", max_new_tokens=5)
    m = server.metrics(AUTH)
    assert m['opengemma_requests_total{endpoint="completions",status="200"}'] >= 5
    assert m['opengemma_requests_total{endpoint="completions",status="400"}'] >= 20
    for name in ("opengemma_time_to_first_token_seconds_count", "opengemma_inter_token_latency_seconds_count",
                 "opengemma_batch_size_count", "opengemma_generation_tokens_total", "opengemma_queue_depth",
                 "opengemma_running_sequences"):
        assert name in m
    assert m["opengemma_time_to_first_token_seconds_count"] >= 5 and m["opengemma_running_sequences"] == 0
    assert m["opengemma_kv_slots"] == 8


def test_a_lone_greedy_request_speculates(server, client, served_gemma):
    # `serve` speculates by default (--speculate auto): a greedy request decoding alone verifies
    # prompt-lookup guesses, keeps some, and still gets exactly the plain text.
    prompt = "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday,"
    before = server.metrics(AUTH)
    r = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == served_gemma.generate(prompt, max_new_tokens=24)
    after = server.metrics(AUTH)
    kept = after["opengemma_speculative_accepted_tokens_total"] - before["opengemma_speculative_accepted_tokens_total"]
    drafted = after["opengemma_speculative_draft_tokens_total"] - before["opengemma_speculative_draft_tokens_total"]
    assert 0 < kept <= drafted
    steps = after["opengemma_decode_steps_total"] - before["opengemma_decode_steps_total"]
    assert r.choices[0].finish_reason == "length"  # 24 tokens: the first from the prefill, the rest
    assert steps == 23 - kept  # from forwards that each gave one token plus the guesses they kept
