"""opengemma.process: the process-wide settings the command line applies before loading a model,
and that the library's load() does not; in fresh interpreters (they change process state, so never
in the test process itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import gc, json, sys
import opengemma.process as p
before = (list(p.APPLIED), gc.get_freeze_count())
p.tune()
p.tune()  # once per process
print(json.dumps({"before": before, "applied": p.APPLIED, "frozen": gc.get_freeze_count(),
                  "loaded": "torch" in sys.modules}))
"""


def _probe(**env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _glibc() -> bool:
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


def test_tune_freezes_once_and_sets_malloc_on_glibc():
    out = _probe(OPENGEMMA_NO_PROCESS_TUNING="")
    assert out["before"] == [[], 0]  # importing changes nothing
    assert not out["loaded"]  # nor imports torch
    assert out["applied"] == (["gc.freeze", "mallopt"] if _glibc() else ["gc.freeze"])
    assert out["frozen"] > 0


def test_tune_can_be_turned_off():
    out = _probe(OPENGEMMA_NO_PROCESS_TUNING="1")
    assert out["applied"] == [] and out["frozen"] == 0


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OPENGEMMA_NO_PROCESS_TUNING": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_leaves_the_process_as_it_was():
    # A library call must not freeze the collector or change malloc (a trainer's workers would inherit it).
    pytest.importorskip("torch")
    out = _run("import gc, json, opengemma, opengemma.process as p; opengemma.load('tiny-gemma3'); "
               "print(json.dumps({'applied': p.APPLIED, 'frozen': gc.get_freeze_count()}))")
    assert out == {"applied": [], "frozen": 0}


def test_the_command_line_applies_it():
    pytest.importorskip("torch")
    out = _run("import contextlib, gc, io, json, opengemma.cli, opengemma.process as p\n"
               "with contextlib.redirect_stdout(io.StringIO()):\n"
               "    rc = opengemma.cli.main(['generate', 'Hi', '-m', 'tiny-gemma3', '-n', '2'])\n"
               "print(json.dumps({'rc': rc, 'applied': p.APPLIED, 'frozen': gc.get_freeze_count() > 0}))")
    assert out["rc"] == 0 and "gc.freeze" in out["applied"] and out["frozen"]
