"""Life-cycle tests of ``opengemma serve``: a client killed mid-stream frees its slot at once and the
server stays healthy; a full queue answers 429 with Retry-After; SIGTERM during streams drains
(in-flight requests finish or are cancelled cleanly, new ones are refused) and exits 0; an empty
API key and a port in use are one-line errors before the model loads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from test_serve_http import ServerProcess


def sse_lines(response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-batch", "2", "--max-queue", "1", "--max-context", "1024")
    yield s
    assert s.stop() == 0, s.log


CLIENT = """
import httpx, sys
body = {"prompt": "Tell me a long story.", "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=120) as r:
    for line in r.iter_lines():
        if line.startswith("data: "):
            print("chunk", flush=True)
"""


def test_killed_client_frees_its_slot(server):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert client.stdout.readline().strip() == "chunk"
        assert server.metrics()["opengemma_running_sequences"] == 1
    finally:
        client.kill()  # SIGKILL: the socket just closes, mid-stream
        client.wait()
    wait_for(lambda: server.metrics()["opengemma_running_sequences"] == 0, 10, "the slot to be freed")
    m = server.metrics()
    assert m['opengemma_sequences_finished_total{reason="cancelled"}'] >= 1
    assert m["opengemma_generation_tokens_total"] < 900
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_client_giving_up_on_a_plain_request_frees_its_slot(server):
    # ignore_eos: the reply cannot end early, so the 2 s read timeout always comes first.
    body = {"prompt": "Write an essay.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes its connection
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=2))
    wait_for(lambda: server.metrics()["opengemma_running_sequences"] == 0, 10, "the slot to be freed")
    assert server.metrics()["opengemma_generation_tokens_total"] < 1500


def test_full_queue_answers_429(server):
    # Capacity: 2 slots + 1 waiting. Three long sequences fill it; the next request is refused.
    body = {"prompt": ["Story one:", "Story two:", "Story three:"], "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as held:
        # keep the reader: a discarded generator is closed, which closes the stream, and the server
        # would cancel the three sequences (a race this test lost once the server got faster)
        lines = sse_lines(held)
        next(lines)
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "One more", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # Closing the stream cancels all three sequences; the server is free again.
    wait_for(lambda: server.metrics()["opengemma_running_sequences"] == 0
             and server.metrics()["opengemma_queue_depth"] == 0, 10, "the slots to be freed")
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "One more", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_sigterm_drains_streams_and_exits_0(served_gemma):
    s = ServerProcess("--max-batch", "2", "--max-context", "1024", "--shutdown-timeout", "6")
    results: dict[str, list[str]] = {}

    def stream(name: str, body: dict, started: threading.Event):
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
            results[name] = []
            for data in sse_lines(r):
                results[name].append(data)
                started.set()

    short_started, long_started = threading.Event(), threading.Event()
    long = threading.Thread(target=stream, args=("long", {"prompt": "A long tale:", "max_tokens": 900,
                                                           "temperature": 0, "stream": True, "ignore_eos": True}, long_started))
    short = threading.Thread(target=stream, args=("short", {"prompt": "Once upon a time", "max_tokens": 5,
                                                             "temperature": 0, "stream": True}, short_started))
    try:
        long.start()
        assert long_started.wait(120)
        short.start()
        assert short_started.wait(120)
        s.proc.send_signal(signal.SIGTERM)
        # Admission stops at once: the listening socket is closed (connections refused).
        wait_for(lambda: _refused(s.url), 10, "new connections to be refused")
        short.join(60)
        long.join(60)
        assert s.proc.wait(60) == 0, s.log
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    # The short stream was in flight at SIGTERM and finished normally.
    assert results["short"][-1] == "[DONE]"
    chunks = [json.loads(d) for d in results["short"][:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == served_gemma.generate("Once upon a time",
                                                                                   max_new_tokens=5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The long one outlived --shutdown-timeout: cancelled cleanly with an error event, then [DONE].
    assert results["long"][-1] == "[DONE]"
    error = json.loads(results["long"][-2])["error"]
    assert error["code"] == "service_unavailable" and "shutting down" in error["message"]
    assert "draining" in s.log and "stopped" in s.log


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _serve_fails(*args: str, env: dict | None = None) -> str:
    """Run ``python -m opengemma.serve ARGS``; it must fail with one line on stderr. Returns it."""
    proc = subprocess.run([sys.executable, "-m", "opengemma.serve", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback, and no "loading ...": it failed before the load
    return lines[0]


def test_empty_api_key_is_an_error():
    for args, env in ((["--api-key", ""], None), ([], {"OPENGEMMA_API_KEY": ""}), (["--api-key", "  "], None)):
        line = _serve_fails("--port", "0", *args, env=env)
        assert line.startswith("opengemma: error: the API key is empty"), line


def test_port_in_use_is_reported_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_fails("--port", str(port))
    assert line.startswith(f"opengemma: error: cannot listen on 127.0.0.1:{port}") and "in use" in line, line
