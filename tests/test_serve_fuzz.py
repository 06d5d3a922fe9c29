"""Hostile clients against ``opengemma serve``, on a loopback port with the embedded model.

A seeded fuzzer sends random and hostile bodies (huge ints, NaN/Infinity literals, wrong types,
deep nesting, huge strings, invalid UTF-8) while greedy streams run: every request is answered
(4xx with an OpenAI error body, or 200 when the mutation happens to be valid; never a 5xx), the
ones no schema could accept get a 400, and every stream still ends with exactly the text it gets
alone. Then the reported defects: ``top_k`` of 2**63 or 1e30 beside running streams, and slow
clients (half-sent headers, half-sent or trickled bodies) closed with 408 after the server's
timeout while it keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("pydantic")

from test_serve_http import ServerProcess
from test_serve_lifecycle import sse_lines

TIMEOUT = 2  # the server's --timeout-header and --timeout-body, seconds
CONTEXT = 512


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-batch", "6", "--max-queue", "32", "--max-context", str(CONTEXT),
                      "--timeout-header", str(TIMEOUT), "--timeout-body", str(TIMEOUT))
    yield s
    assert s.stop() == 0, s.log


# -- greedy streams that must not notice anything ----------------------------------------------------

VICTIMS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
BUDGET = 24  # tokens per stream


@pytest.fixture(scope="module")
def solo(served_gemma) -> dict[str, str]:
    """Each victim's text when generated alone."""
    return {p: served_gemma.generate(p, max_new_tokens=BUDGET) for p in VICTIMS}


class Victims:
    """Greedy streams started before the attack; :meth:`check` compares each with its solo text."""

    def __init__(self, url: str):
        self.pool = concurrent.futures.ThreadPoolExecutor(len(VICTIMS))
        self.started = [threading.Event() for _ in VICTIMS]
        self.futures = [self.pool.submit(self._stream, url, p, e) for p, e in zip(VICTIMS, self.started)]
        for event, future in zip(self.started, self.futures):
            while not event.wait(0.5):
                if future.done():  # failed before its first token: raise that error
                    future.result()
                    raise AssertionError("a stream ended before its first token")

    def _stream(self, url: str, prompt: str, started: threading.Event) -> tuple[str, list[str]]:
        body = {"prompt": prompt, "max_tokens": BUDGET, "temperature": 0, "stream": True}
        text, data = [], []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in sse_lines(r):
                data.append(line)
                if line != "[DONE]":
                    text.append(json.loads(line)["choices"][0]["text"])
                    started.set()
        return "".join(text), data

    def running(self) -> bool:
        return not all(f.done() for f in self.futures)

    def check(self, solo: dict[str, str]) -> None:
        for prompt, future in zip(VICTIMS, self.futures):
            text, data = future.result(timeout=300)
            assert data[-1] == "[DONE]" and not any('"error"' in d for d in data), data[-3:]
            assert text == solo[prompt], prompt
        self.pool.shutdown()


# -- the fuzzer ---------------------------------------------------------------------------------------

HOSTILE = [2**63, -(2**63) - 1, 2**64, 10**30, 1e30, -1e30, 1e308, -1, 0, 1.5, True, False, None, "", "x", "\0",
           "\ud800", "9" * 5000, "x" * 200_000, [], {}, [[[[1]]]], {"a": [1, {"b": None}]}, [1] * 5000, ["x"] * 100,
           [""], [None], [{"role": "user"}], [{"role": "user", "content": [{"type": "text", "text": 7}]}],
           1, 2, 0.5, "ab", ["ab"]]  # and a few fine values, so that some mutants are valid requests
FIELDS = {
    "completions": ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
                    "logprobs", "stream_options", "model", "presence_penalty", "logit_bias", "echo", "suffix",
                    "best_of", "ignore_eos", "response_format", "tools"],
    "chat": ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed",
             "stop", "stream", "logprobs", "top_logprobs", "stream_options", "model", "frequency_penalty",
             "ignore_eos", "tools"],
}
NUMERIC = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "seed", "presence_penalty",
           "frequency_penalty", "best_of", "top_logprobs"}
BOOLEAN = {"stream", "echo", "ignore_eos"}
BASE = {"completions": {"prompt": "Hi", "max_tokens": 1, "temperature": 0},
        "chat": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}}
RAW = [  # bodies no JSON parser should accept
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
    b'{"prompt": "x", "top_k": -Infinity}', b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "\xff\xfe"}', b"\xc3\x28", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", b'{"prompt": "x"', b"null", b'"x"', b"[]", b"",
    b'{"prompt": "x"}{"prompt": "y"}', b'{"messages": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
]


def surely_bad(endpoint: str, name: str, value) -> bool:
    """A value of a JSON type the field never accepts."""
    if value is None:
        return False
    if name in NUMERIC or (name == "logprobs" and endpoint == "completions"):
        return isinstance(value, (str, list, dict, bool))
    if name in BOOLEAN or (name == "logprobs" and endpoint == "chat"):
        return not isinstance(value, bool)
    return name in ("prompt", "messages") and isinstance(value, (bool, int, float, dict))


GOOD = [("top_k", [1, 40, 262144, 2**63, 1e30, -1, 0]), ("seed", [0, 2**64 - 1, -(2**63), 1e3]), ("stream", [True]),
        ("n", [2, 3.0]), ("stop", ["\n", ["\n", "."]]), ("temperature", [0.7, 2]), ("user", [[[[{}]]]])]


def cases(seed: int, count: int) -> list[tuple[str, bytes, bool | None]]:
    """(endpoint, raw body, verdict) for ``count`` seeded random requests; the verdict is True
    for a request that no schema could accept, False for a valid one, None when unsure."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        endpoint = rng.choice(["completions", "chat"])
        if rng.random() < 0.2:
            out.append((endpoint, rng.choice(RAW), True))
            continue
        if rng.random() < 0.1:  # a valid request with unusual but legal values
            body = dict(BASE[endpoint])
            for name, values in rng.sample(GOOD, 2):
                body[name] = rng.choice(values)
            out.append((endpoint, json.dumps(body).encode(), False))
            continue
        body, bad = dict(BASE[endpoint]), False
        for name in rng.sample(FIELDS[endpoint], rng.choice([1, 1, 2, 3])):
            value = rng.choice(HOSTILE)
            if value is None and name in ("max_tokens", "max_completion_tokens"):
                value = "none"  # a null budget is valid and means "the rest of the context": too slow here
            if rng.random() < 0.2 and name in ("prompt", "stop"):
                value = [value]  # one level down: a list member
            elif rng.random() < 0.2 and name == "messages":
                value = [{"role": "user", "content": value}]
            body[name] = value
            bad = bad or surely_bad(endpoint, name, value)
        out.append((endpoint, json.dumps(body).encode(), True if bad else None))
    return out


def check_answer(endpoint: str, data: bytes, bad: bool | None, r) -> None:
    where = f"{endpoint} {data[:120]!r} -> {r.status_code} {r.text[:200]}"
    assert r.status_code in (200, 400, 404, 413), where
    assert bad is not False or r.status_code == 200, where
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], where
        assert len(r.content) < 2000, where  # a hostile value is never echoed back whole
        return
    assert bad is not True, where
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, where
    else:
        assert r.json()["choices"], where


def test_fuzzed_requests_never_hurt_running_streams(server, solo):
    todo = cases(seed=13, count=150)
    verdicts = [bad for *_, bad in todo]
    assert verdicts.count(True) > 60 and verdicts.count(False) > 5  # hostile, with valid requests among them
    victims = Victims(server.url)
    assert victims.running()

    def send(case):
        endpoint, data, bad = case
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        r = httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json"},
                       timeout=120)
        check_answer(endpoint, data, bad, r)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(send, todo))
    assert statuses.count(200) >= verdicts.count(False) and statuses.count(400) >= 100
    victims.check(solo)
    m = server.metrics()
    assert not any(k.startswith("opengemma_requests_total") and 'status="5' in k for k in m), m
    assert m["opengemma_running_sequences"] == 0


def test_huge_top_k_beside_running_streams(server, solo):
    # The reported crash: these overflowed the engine step and every running stream died with it.
    victims = Victims(server.url)
    answers = []
    for raw in (b'{"prompt": "x", "max_tokens": 4, "top_k": 9223372036854775808}',
                b'{"prompt": "x", "max_tokens": 4, "top_k": 9223372036854775808, "stream": true}',
                b'{"prompt": "x", "max_tokens": 4, "top_k": 1e30, "seed": 1}'):
        r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=120)
        assert r.status_code == 200 and '"error"' not in r.text, r.text
        answers.append(r)
    # top_k >= the vocabulary is no filter at all: the same draw as without top_k.
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 4, "seed": 1}, timeout=120)
    assert plain.json()["choices"][0]["text"] == answers[-1].json()["choices"][0]["text"]
    victims.check(solo)


# -- slow clients ---------------------------------------------------------------------------------------

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60\r\n\r\n")


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _read_to_end(sock: socket.socket, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(limit)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return b"".join(chunks)


def _trickle(sock: socket.socket, data: bytes, pause: float) -> bytes | None:
    """Send ``data`` a byte at a time, waiting up to ``pause`` s for an answer between bytes; what
    the server sent when it cut us off, or None if all of ``data`` went through."""
    sock.settimeout(pause)
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        return answer + _read_to_end(sock, 10)
    return None


def test_slow_headers_and_bodies_are_closed_after_the_timeout(server):
    opened = time.monotonic()
    stalled = []
    for _ in range(100):  # half a request head, then silence
        s = _connect(server.url)
        s.sendall(HEAD[:30])
        stalled.append(("headers", s))
    for _ in range(100):  # a whole head, half the body, then silence
        s = _connect(server.url)
        s.sendall(HEAD + b'{"prompt": "x')
        stalled.append(("body", s))
    stalled.append(("silent", _connect(server.url)))  # connects, sends nothing
    # Meanwhile the server serves as usual.
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200
    for kind, s in stalled:
        answer = _read_to_end(s, limit=10 * TIMEOUT)  # raises TimeoutError if the server never closes
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer, (kind, answer[:300])
    assert time.monotonic() - opened >= TIMEOUT  # closed by the timeout, not at once


def test_trickled_headers_and_bodies_are_cut_off(server):
    # Slowloris: a byte every 0.2 s keeps any per-read timeout happy; the deadlines are totals.
    started = time.monotonic()
    answer = _trickle(_connect(server.url), HEAD, pause=0.2)  # 100 bytes: 20 s if never cut off
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    s = _connect(server.url)
    s.sendall(HEAD)
    answer = _trickle(s, b'{"prompt": "' + b"x" * 45 + b'"}', pause=0.2)
    assert answer is not None and (answer == b"" or answer.startswith(b"HTTP/1.1 408 ")), answer
    assert time.monotonic() - started < 8 * TIMEOUT
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
