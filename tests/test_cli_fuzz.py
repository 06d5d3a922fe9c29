"""Fuzzing the command line (issue 13): randomized bad flag values never give a traceback.

Each case takes a verb's valid, fast command line (tiny presets, one-item evaluations) and
replaces one flag's value with a bad one from a seeded generator: out-of-range and huge integers,
NaN / infinities / overflowing floats, wrong types, junk text with newlines and other scripts,
empty strings. ``opengemma.cli.main`` runs in-process; every case must end with a non-zero exit
status and exactly one stderr line holding ": error:" -- never a traceback, and never exit 0 (a
bad value that slipped through would run the valid command and succeed, failing the test).
``serve`` is stubbed after parsing (a value it accepted would start a server), so for it the test
checks that every bad value is refused by the parser.
"""

from __future__ import annotations

import contextlib
import io
import random
import string
from pathlib import Path

import pytest

from opengemma import cli

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
CASES_PER_VERB = 30
_JUNK_ALPHABET = string.ascii_letters + string.punctuation.replace("/", "") + " \t\n" + "éß数字🎉\u2581"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def junk(rng: random.Random) -> str:
    """Random text that is no number, no path with a slash (a hub id would reach the network)."""
    while True:
        text = "".join(rng.choice(_JUNK_ALPHABET) for _ in range(rng.randint(1, 40)))
        if not _is_number(text) and text.strip():
            return text


def bad_int(rng: random.Random, lo: int | None, hi: int | None) -> str:
    """A value no int flag with range lo..hi accepts."""
    options = [junk(rng), "", "1.5", "1e3", "nan", "inf", "0x10", "12 34"]
    if lo is not None:
        options += [str(lo - 1), str(lo - rng.randint(1, 10**30)), "-" + "9" * rng.randint(30, 4000)]
    if hi is not None:  # (without a bound above, huge numbers are valid: -n is cut to the context)
        options += [str(hi + 1), str(hi + rng.randint(1, 10**30)), "9" * rng.randint(30, 4000)]
    return rng.choice(options)


def bad_float(rng: random.Random, lo: float, hi: float | None, lo_open: bool = False) -> str:
    options = [junk(rng), "", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1,5"]
    options += [repr(lo - rng.uniform(1e-6, 1e6))] + ([repr(lo)] if lo_open else [])
    if hi is not None:
        options += [repr(hi + rng.uniform(1e-6, 1e6)), "1.0000001"]
    return rng.choice(options)


def bad_choice(rng: random.Random) -> str:
    return rng.choice([junk(rng), "", "INT8", "int2", "fp8", "float8", "none "])


SAMPLING = {
    "-n": lambda r: bad_int(r, 1, None), "--max-new-tokens": lambda r: bad_int(r, 1, None),
    "-t": lambda r: bad_float(r, 0.0, None), "--temperature": lambda r: bad_float(r, 0.0, None),
    "--top-k": lambda r: bad_int(r, 0, 2**31 - 1), "--top-p": lambda r: bad_float(r, 0.0, 1.0, lo_open=True),
    "--seed": lambda r: bad_int(r, -(2**63), 2**64 - 1), "--stop": lambda r: "",
    "--quantize": bad_choice, "-q": bad_choice, "--dtype": bad_choice, "--device": lambda r: junk(r),
    "--model": lambda r: junk(r),
}
INFO = {"--context": lambda r: bad_int(r, 1, None), "--batch-size": lambda r: bad_int(r, 1, 2**20),
        "--dtype": bad_choice, "MODEL": lambda r: junk(r)}
CONVERT = {"--dtype": bad_choice, "--to": bad_choice, "SRC": lambda r: junk(r)}
EVAL = {"--limit": lambda r: bad_int(r, 1, None), "--batch-size": lambda r: bad_int(r, 1, 1 << 16),
        "-b": lambda r: bad_int(r, 1, 1 << 16), "--samples": lambda r: bad_int(r, 1, 1 << 16),
        "--temperature": lambda r: bad_float(r, 0.0, None), "-t": lambda r: r.choice(["hellaswag", "piqa,boolq"]),
        "--seed": lambda r: bad_int(r, -(2**63), 2**64 - 1), "--max-new-tokens": lambda r: bad_int(r, 1, None),
        "--shots": lambda r: r.choice([junk(r), "-1", "piqa=-2", "piqa=x", "=3"]),
        "--quantize": bad_choice, "--dtype": bad_choice, "--tasks": lambda r: junk(r).replace(",", ""),
        "--data-dir": lambda r: junk(r)}
SERVE = {"--port": lambda r: bad_int(r, 0, 65535), "--max-batch": lambda r: bad_int(r, 1, 4096),
         "--max-context": lambda r: bad_int(r, 2, None), "--max-queue": lambda r: bad_int(r, 0, None),
         "--prefill-chunk": lambda r: bad_int(r, 1, None), "--threads": lambda r: bad_int(r, 1, None),
         "--log-level": bad_choice, "--quantize": bad_choice, "--shutdown-timeout": lambda r: junk(r),
         "--speculate": lambda r: bad_int(r, 0, 64)}


def _verbs(tmp_path: Path) -> dict:
    """verb -> (valid fast argv, {flag: bad-value generator}); MODEL/SRC name a positional."""
    return {
        "generate": (["generate", "Hi", "--model", "tiny-gemma3", "-n", "2"], SAMPLING),
        "chat": (["chat", "--model", "tiny-gemma3", "-n", "2"], {**SAMPLING, "--system": None}),
        "info": (["info", "tiny-gemma3", "--kv-memory"], INFO),
        "convert": (["convert", "tiny-gemma3", str(tmp_path / "out")], CONVERT),
        "eval": (["eval", "--model", "tiny-gemma1", "--tasks", "piqa", "--data-dir", str(FIXTURES), "--limit", "1"],
                 EVAL),
        "serve": (["serve", "--model", "tiny-gemma3", "--port", "0"], SERVE),
    }


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` (or the MODEL/SRC positional) set to ``value``."""
    argv = list(argv)
    if flag in ("MODEL", "SRC"):
        argv[1] = value
        return argv
    short = {"-n": "--max-new-tokens", "-t": "--temperature", "-q": "--quantize", "-b": "--batch-size"}
    spellings = {flag, short.get(flag, flag)} | {s for s, long in short.items() if long == flag}
    for i, a in enumerate(argv[:-1]):
        if a in spellings:
            del argv[i:i + 2]
            break
    # --flag=VALUE keeps a value that starts with "-" a value; short flags take it as the next word.
    return argv + ([f"{flag}={value}"] if flag.startswith("--") else [flag, value])


def _run(argv: list[str], monkeypatch) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))  # one chat turn
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def _cases(tmp_path: Path):
    rng = random.Random(13)
    for verb, (base, flags) in _verbs(tmp_path).items():
        names = [f for f, make in flags.items() if make is not None]
        for _ in range(CASES_PER_VERB):
            flag = rng.choice(names)
            yield verb, _with(base, flag, flags[flag](rng))


def test_bad_flag_values_give_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENGEMMA_NO_CACHE", "1")
    accepted = []
    monkeypatch.setitem(cli.COMMANDS, "serve", lambda args: accepted.append(args) or 0)
    failures = []
    count = 0
    for verb, argv in _cases(tmp_path):
        count += 1
        code, err = _run(argv, monkeypatch)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code in (0, None) or "Traceback" in err or len(lines) != 1 or ": error:" not in lines[0]:
            shown = [a if len(a) < 80 else a[:60] + f"...({len(a)} chars)" for a in argv]
            failures.append(f"{shown!r}: exit {code}, stderr {err[-300:]!r}")
    assert not accepted, f"serve accepted bad values: {accepted}"
    assert count == CASES_PER_VERB * 6
    assert not failures, "\n".join(failures[:10])


def test_the_valid_base_commands_succeed(tmp_path, monkeypatch):
    # The fuzz relies on every base command line succeeding as it is (else a refused bad value
    # would prove nothing); serve is stubbed as in the fuzz.
    monkeypatch.setenv("OPENGEMMA_NO_CACHE", "1")
    monkeypatch.setitem(cli.COMMANDS, "serve", lambda args: 0)
    for verb, (base, _) in _verbs(tmp_path).items():
        code, err = _run(base, monkeypatch)
        assert code == 0, (verb, err)


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "Hi", "-t", "1", "--top-k", "9223372036854775808"], "--top-k: must be in 0..2147483647"),
    (["generate", "Hi", "-t", "1", "--seed", "99999999999999999999999"], "--seed: must be in [-2**63, 2**64)"),
    (["generate", "Hi", "--temperature", "nan"], "must be a finite number"),
    (["generate", "Hi", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["eval", "-t", "hellaswag"], "-t is --temperature; tasks go after --tasks"),
    (["generate", "Hi", "--model", "tiny-gemma3", "--stop="], "--stop: must not be empty"),
    (["convert", "tiny-gemma3", "/proc/version/x"], "opengemma: error:"),
])
def test_reported_cases(argv, fragment, monkeypatch):
    code, err = _run(argv, monkeypatch)
    assert code not in (0, None) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
