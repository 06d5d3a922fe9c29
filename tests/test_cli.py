"""The `opengemma` command line, run as a real subprocess: output, exit codes, and bad input.

Every bad input must end with exactly one line on stderr, a non-zero exit status and no traceback.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from opengemma import cli
from opengemma.checkpoints import cache as weight_cache
from opengemma.config import PRESETS


def run(*args: str, stdin: str | None = None, timeout: float = 300, tiny: bool = False) -> subprocess.CompletedProcess:
    # tiny: a tiny preset, whose ops are too small to share out between threads (on a busy
    # 2-core machine two threads only wait for each other).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if tiny else {})}
    return subprocess.run([sys.executable, "-m", "opengemma", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    # A cold converted-weight cache adds its one "note:" line (see test_cache_notice_list_and_clear).
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("opengemma: note:")]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]


def test_info_preset_json_gives_table2_counts():
    proc = run("info", "gemma-7b", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["embedding_params"], info["non_embedding_params"]) == (786_825_216, 7_751_248_896)
    assert info["config"] == PRESETS["gemma-7b"].to_dict()


def test_info_embedded_reads_the_gguf():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["source"] == "gguf"
    assert info["config"]["d_model"] == 640 and info["config"]["n_layers"] == 18
    assert info["embedding_params"] == 262_144 * 640


def test_info_presets_lists_all():
    proc = run("info", "--presets")
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in PRESETS)


def test_generate_streams_real_text():
    proc = run("generate", "The capital of France is", "-n", "8")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0


def test_generate_reads_stdin_and_is_reproducible_with_a_seed():
    args = ("generate", "-", "-n", "8", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3")
    a = run(*args, stdin="Once upon a time")
    b = run(*args, stdin="Once upon a time")
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_chat_repl_keeps_history_and_resets():
    proc = run("chat", "-n", "6", stdin="Hello there\n/reset\nKnock knock.\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "(history cleared)" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 1


def test_chat_ends_on_eof():
    proc = run("chat", "-n", "4", stdin="Hi\n")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (("generate", "hi", "--model", "/no/such/model.gguf"), "no such model file"),
    (("generate", "hi", "--model", "gemma-9000b"), "no such model file, directory or preset"),
    (("info", "not-a-preset"), "no such model file, directory or preset"),
    (("generate", "hi", "-n", "0"), "must be at least 1"),
    (("generate", "hi", "-n", "-5"), "must be at least 1"),
    (("generate", "hi", "-n", "lots"), "expected a whole number"),
    (("generate", "hi", "--dtype", "float8"), "unknown dtype"),
    (("generate", "hi", "--device", "cuda:0"), ""),
    (("generate", "hi", "--speculate", "-1"), "must be in 0..64 (0 = off, or auto)"),
    (("chat", "--speculate", "lots"), "expected a whole number"),
])
def test_bad_arguments_are_one_line(args, fragment):
    proc = run(*args)
    if args[-1] == "cuda:0" and proc.returncode == 0:
        pytest.skip("a CUDA device is present")
    assert_one_line_error(proc, fragment)


def test_speculate_gives_the_same_text_and_stats_report_it():
    # Greedy text with --speculate equals the text without; --stats prints the speeds and, with
    # speculation, the acceptance rate and tokens per forward (stderr: stdout stays the text).
    # No flag is --speculate auto: prompt lookup with 4 drafts.
    args = ("generate", "one two three, one two three, one two", "--model", "tiny-gemma3", "-n", "24")
    plain = run(*args, "--speculate", "0", "--stats", tiny=True)
    spec = run(*args, "--speculate", "3", "--stats", tiny=True)
    auto = run(*args, "--stats", tiny=True)
    assert plain.returncode == spec.returncode == auto.returncode == 0, spec.stderr + auto.stderr
    assert spec.stdout == plain.stdout == auto.stdout and spec.stdout.strip()
    assert "decode: 23 tokens in" in plain.stderr and "tok/s" in plain.stderr and "speculation" not in plain.stderr
    assert "speculation (k=3): acceptance " in spec.stderr and "tokens per forward" in spec.stderr
    assert "speculation (k=4): acceptance " in auto.stderr
    assert "tokens: " in spec.stderr and "24 generated" in spec.stderr


def test_speculate_auto_resolves_per_command_line():
    from opengemma.cli import AUTO_SPECULATE, DRAFT_SPECULATE, resolve_speculate, speculate_type

    assert speculate_type("auto") is None and speculate_type(" AUTO ") is None and speculate_type("0") == 0
    assert resolve_speculate(None, draft=False, compile=False) == AUTO_SPECULATE == 4
    assert resolve_speculate(None, draft=False, compile=True) == 0  # the compiled step would be bypassed
    assert resolve_speculate(0, draft=False, compile=False) == 0 and resolve_speculate(7, draft=False, compile=True) == 7
    assert resolve_speculate(None, draft=True, compile=False) == resolve_speculate(0, draft=True, compile=False) \
        == DRAFT_SPECULATE
    assert resolve_speculate(2, draft=True, compile=False) == 2
    for argv in (["generate", "x"], ["chat"]):  # both default to auto
        assert cli.build_parser().parse_args(argv).speculate is None


def test_max_new_tokens_is_cut_to_the_context():
    # -n beyond the context is cut to what the prompt leaves, as --help says: tiny-gemma3 has 256
    # positions and the prompt takes about 250 of them, so only a few tokens are generated.
    import opengemma

    tok = opengemma.load("tiny-gemma3").tokenizer
    prompt = "hello " * max(k for k in range(1, 256) if len(tok.encode("hello " * k)) <= 250)
    proc = run("generate", "-", "--model", "tiny-gemma3", "-n", "10000000", stdin=prompt, tiny=True)
    assert proc.returncode == 0, proc.stderr
    assert "what the model's context leaves" in " ".join(run("generate", "--help").stdout.split())
    assert_one_line_error(run("generate", "-", "--model", "tiny-gemma3", stdin="hello " * 300, tiny=True),
                          "the model's context is 256")


def test_prompt_longer_than_the_context():
    # 33k tokens against the embedded model's 32,768-token context: refused before any compute.
    assert_one_line_error(run("generate", "-", stdin="hello " * 33_000), "context is 32768")


def test_corrupt_and_truncated_gguf(tmp_path, gguf_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 4096)
    assert_one_line_error(run("generate", "hi", "--model", str(garbage)), "garbage.gguf")
    data = gguf_path.read_bytes()
    for cut in (16, 200_000, len(data) // 2):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        assert_one_line_error(run("generate", "hi", "--model", str(truncated)), truncated.name)


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run("generate", "hi", "--model", str(path)), "llama")


def test_convert_gguf_to_native_and_hf_then_generate_the_same(tmp_path):
    native, hf_dir = tmp_path / "native", tmp_path / "hf"
    assert_one_line_error(run("convert", str(tmp_path / "missing.gguf"), str(native)), "no such model file")
    proc = run("convert", str(_embedded()), str(native))
    assert proc.returncode == 0, proc.stderr
    proc = run("convert", str(native), str(hf_dir), "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    again = run("convert", str(_embedded()), str(native))
    assert_one_line_error(again, "already exists")
    # fp32 for all three (the GGUF would otherwise run quantized, with its own numerics)
    texts = [run("generate", "The capital of France is", "-n", "8", "--model", m, "--quantize", "none").stdout
             for m in (str(_embedded()), str(native), str(hf_dir))]
    assert texts[0].strip() and texts[0] == texts[1] == texts[2]
    info = json.loads(run("info", str(native), "--json").stdout)
    assert info["source"] == "native" and info["config"]["d_model"] == 640


def _embedded():
    from opengemma.embedded import embedded_path

    return embedded_path(progress=False)


def test_a_preset_generates_with_the_embedded_tokenizer_cut_to_its_vocabulary(tokenizer):
    # Issue 13, item 9: tiny-gemma3 (512 ids) failed with "token id 10979 is outside the model's vocabulary".
    proc = run("generate", "The three primary colors are", "--model", "tiny-gemma3", "-n", "8", tiny=True)
    assert proc.returncode == 0, proc.stderr
    import opengemma
    from opengemma.chat import format_chat

    g = opengemma.load("tiny-gemma3")
    tok, full = g.tokenizer, tokenizer  # the embedded model's
    assert tok.vocab_size == g.config.vocab_size == 512 and full.vocab_size == 262_144
    text = "Hello wörld 🎉\n\n  tabs\tand a literal \u2581 too"
    ids = tok.encode(text)
    assert max(ids) < 512 and tok.decode(ids) == text  # byte fallback covers any text
    conversation = [{"role": "user", "content": "Hi"}]
    control = {tok.bos_id, tok.start_of_turn_id, tok.end_of_turn_id}
    chat_ids = format_chat(tok, conversation).ids
    assert [i for i in chat_ids if i in control] == [i for i in format_chat(full, conversation).ids if i in control]
    assert (tok.bos_id, tok.eos_id, tok.end_of_turn_id) == (full.bos_id, full.eos_id, full.end_of_turn_id)


def test_help_texts_match_the_flags():
    convert_help = run("convert", "--help").stdout
    assert "--model" not in convert_help and "SRC is" in convert_help
    eval_help = " ".join(run("eval", "--help").stdout.split())
    assert "--temperature TEMPERATURE, -t TEMPERATURE" in eval_help and "--tasks TASKS" in eval_help
    assert cli.MAX_TOP_K == __import__("opengemma.generate").generate.MAX_TOP_K
    from opengemma.generate import SEED_RANGE

    assert (cli.SEED_MIN, cli.SEED_MAX + 1) == SEED_RANGE
    torch.Generator().manual_seed(cli.SEED_MIN)  # both ends are seeds torch takes
    torch.Generator().manual_seed(cli.SEED_MAX)


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cache_notice_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENGEMMA_CACHE", str(tmp_path / "cache"))
    assert _main("cache")[1].strip().endswith("(empty)")
    config = PRESETS["tiny-gemma1"]
    state = {k: torch.zeros(v.shape) for k, v in __import__("opengemma.model").model.build_model(
        config, device="meta").state_dict().items()}
    sources = []
    for i, dtype in enumerate(("torch.float32", "torch.bfloat16")):
        src = tmp_path / f"model{i}.gguf"
        src.write_bytes(b"GGUF" + bytes([i]) * 64)
        entry = weight_cache.entry_dir(src, dtype=dtype)
        weight_cache.write(entry, config, state, None)
        sources.append((src, entry))
    notes = capsys.readouterr().err.splitlines()  # one line per written entry: where and how big
    assert len(notes) == 2
    assert all(n.startswith("opengemma: note: cached the converted weights of model") for n in notes)
    assert str(sources[0][1]) in notes[0] and "KB)" in notes[0] and "opengemma cache clear --all" in notes[0]
    code, listing, _ = _main("cache")
    assert code == 0 and "2 entries" in listing
    assert "model0.gguf [tiny-gemma1] dtype=float32" in listing
    assert "model1.gguf [tiny-gemma1] dtype=bfloat16" in listing
    data = json.loads(_main("cache", "--json")[1])
    assert [e["source"] for e in data["entries"]] == [str(s.resolve()) for s, _ in sources]
    assert all(e["bytes"] > 4 * sum(t.numel() for t in state.values()) for e in data["entries"])
    code, _, err = _main("cache", "clear", sources[0][1].name[:12])
    assert code == 0 and "removed" in err and not sources[0][1].exists() and sources[1][1].exists()
    assert _main("cache", "clear", "ffffffffffff")[0] == 1  # no such entry: one error line
    assert _main("cache", "clear")[0] == 1  # neither ENTRY nor --all
    code, _, err = _main("cache", "clear", "--all")
    assert code == 0 and "removed 1 entry" in err and not sources[1][1].exists()
    assert _main("cache")[1].strip().endswith("(empty)")


class _Terminal:
    """A child process on a pseudo-terminal, read by polling with a deadline."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once (no Python state of the test runs there)
            # As a shell does for a foreground job: pytest started in the background by a shell
            # without job control (`pytest &` in a script) ignores SIGINT, and the child would inherit
            # that and never see the Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 120.0) -> bytes:
        """Everything up to and including ``text``; raises on timeout or end of output."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {text!r} within {timeout} s; last output {self.seen[-300:]!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise EOFError(f"output ended before {text!r}: {self.seen[-300:]!r}")
            self.seen += data
        cut = self.seen.index(text) + len(text)
        out, self.seen = self.seen[:cut], self.seen[cut:]
        return out

    def interrupt_reply(self, answer: bytes) -> None:
        """Ctrl-C while a reply streams: one key must stop it (Python acts on the signal between
        two tokens)."""
        os.write(self.fd, b"\x03")
        self.expect(answer, timeout=60.0)

    def interrupt_at_prompt(self, answer: bytes | None) -> None:
        """Ctrl-C while readline waits for input. CPython's readline loses a SIGINT that lands
        between drawing the prompt and waiting for a key (it is seen at the next key), so a
        keystroke that gets no answer in a few seconds is sent again -- as a person would."""
        for _ in range(5):
            os.write(self.fd, b"\x03")
            try:
                if answer is None:
                    return self.wait(3.0)
                self.expect(answer, timeout=3.0)
                return None
            except TimeoutError:
                continue
        raise TimeoutError("Ctrl-C at the prompt got no answer")

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            select.select([self.fd], [], [], 0.05)  # poll; drain output so the child never blocks
            try:
                self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
        raise TimeoutError("the chat did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_session(tmp_path):
    # Issue 13, item 7, on a real terminal: the embedded (pretrained) model rambles for hundreds of
    # tokens, so Ctrl-C lands in the reply; the session goes on; readline recalls the last line with
    # the up arrow; Ctrl-C twice at the prompt quits with status 0; the history file keeps the lines.
    history = tmp_path / "history"
    # One torch thread: on a busy 2-core machine the first reply token came after 2.5 s with two
    # (threads waiting for each other), 0.2 s with one; the test only needs the reply to start.
    env = {**os.environ, "OPENGEMMA_CHAT_HISTORY": str(history), "TERM": "xterm", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    # -n 4000: a reply long enough that Ctrl-C lands in it even when this test process is starved
    # for seconds on a loaded machine (a 256-token reply once finished before the key arrived).
    term = _Terminal(["-m", "opengemma", "chat", "-n", "4000"], env)
    try:
        term.expect(b"you> ")
        os.write(term.fd, b"Tell me a story about a dragon.\r")
        term.expect(b"gemma> ")
        term.expect(b" ")  # the reply is streaming
        term.interrupt_reply(b"(reply stopped: kept in the history)")
        term.expect(b"you> ")
        os.write(term.fd, b"\x1b[A\r")  # up arrow: readline recalls the last line; Enter sends it
        echo = term.expect(b"gemma> ")
        assert b"Tell me a story about a dragon." in echo and b"^[[A" not in echo
        term.expect(b" ")
        term.interrupt_reply(b"(reply stopped")
        term.expect(b"you> ")
        term.interrupt_at_prompt(b"(Ctrl-C again, Ctrl-D or /exit quits)")
        term.expect(b"you> ")
        assert term.interrupt_at_prompt(None) == 0
        assert b"Traceback" not in term.seen
    finally:
        term.close()
    assert history.read_text().splitlines() == ["Tell me a story about a dragon."]  # recalled: not added twice
    assert history.stat().st_mode & 0o777 == 0o600
