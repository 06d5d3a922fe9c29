"""The `opengemma` command line, run as a real subprocess: output, exit codes, and bad input.

Every bad input must end with exactly one line on stderr, a non-zero exit status and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opengemma.config import PRESETS


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "opengemma", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
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
])
def test_bad_arguments_are_one_line(args, fragment):
    proc = run(*args)
    if args[-1] == "cuda:0" and proc.returncode == 0:
        pytest.skip("a CUDA device is present")
    assert_one_line_error(proc, fragment)


def test_absurd_max_new_tokens():
    assert_one_line_error(run("generate", "hi", "-n", "10000000"), "context")


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
    texts = [run("generate", "The capital of France is", "-n", "8", "--model", m).stdout
             for m in (str(_embedded()), str(native), str(hf_dir))]
    assert texts[0].strip() and texts[0] == texts[1] == texts[2]
    info = json.loads(run("info", str(native), "--json").stdout)
    assert info["source"] == "native" and info["config"]["d_model"] == 640


def _embedded():
    from opengemma.embedded import embedded_path

    return embedded_path(progress=False)
