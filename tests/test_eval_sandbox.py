"""Sandboxed code execution for HumanEval / MBPP (report Table 6, pass@1): hostile programs must not
hurt the harness (infinite loops, fork bombs, huge allocations, writing files, reading secrets,
killing the parent, the network)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from opengemma.eval.sandbox import check_program, run_program

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX resource limits")


def test_a_correct_program_passes_and_a_wrong_one_fails():
    assert run_program("assert 1 + 1 == 2").passed
    r = run_program("assert 1 + 1 == 3")
    assert r.status == "failed" and "AssertionError" in r.output


def test_humaneval_style_check():
    prompt = "def add(a, b):\n"
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
    assert check_program(prompt + "    return a + b\n", test).passed
    assert not check_program(prompt + "    return a - b\n", test).passed


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run_program("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and time.monotonic() - t < 10


def test_fork_bomb_is_contained():
    code = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()"
    r = run_program(code, timeout=1.0, max_procs=16)
    assert not r.passed
    time.sleep(0.2)
    assert run_program("print('still fine')").passed  # the harness can still start processes


def test_huge_allocation_fails_inside_the_sandbox():
    r = run_program("x = bytearray(16 * 2**30)", memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.output


def test_files_only_inside_a_fresh_temporary_directory(tmp_path):
    outside = tmp_path / "evil.txt"
    r = run_program(f"open({str(outside)!r}, 'w').write('x')")
    assert not r.passed and not outside.exists()
    r = run_program("import os\nopen('inside.txt', 'w').write('x')\nprint(os.getcwd())")
    assert r.passed
    workdir = r.output.strip().splitlines()[-1]
    assert "opengemma-sandbox-" in workdir and not Path(workdir).exists()  # removed afterwards
    assert not (Path.cwd() / "inside.txt").exists()


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("OPENGEMMA_TEST_SECRET", "hunter2")
    r = run_program("import os\nprint(sorted(os.environ.items()))\n"
                    "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\nexcept Exception as e:\n"
                    "    print(type(e).__name__)")
    assert "hunter2" not in r.output


def test_killing_the_parent_does_not_hurt_the_harness():
    pid = os.getpid()
    r = run_program(f"import os, signal\ntry:\n    os.kill({pid}, signal.SIGKILL)\nexcept Exception as e:\n"
                    f"    print(type(e).__name__)\nimport ctypes\nprint(ctypes.CDLL(None).kill({pid}, 9))")
    assert r.status in ("passed", "failed")  # and we are still here to check it
    assert os.getpid() == pid


def test_no_network():
    r = run_program("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))", timeout=5)
    assert not r.passed
