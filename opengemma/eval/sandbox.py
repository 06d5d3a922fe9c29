"""Sandboxed execution of generated programs for HumanEval and MBPP (report Table 6, pass@1).

Every program runs in its own process, in a fresh temporary directory that is deleted afterwards,
with layers of protection, each applied where the OS allows it:

* a wall-clock timeout; on expiry the whole process group is killed (SIGKILL);
* resource limits: CPU seconds, address space (memory), file size, open files, and the number of
  processes (a fork bomb hits the limit instead of the machine);
* a new network namespace with no interfaces (Linux ``unshare(CLONE_NEWNET)``), so no network;
* when the harness runs as root, the program runs as ``nobody``: it cannot signal the harness,
  read its ``/proc/<pid>/environ``, or write to the harness's files; the process limit applies;
* an empty environment (no inherited secrets), ``HOME``/``TMPDIR`` pointing into the temp dir;
* a guard prelude (after human-eval's ``reliability_guard``): no ``os.kill``/``fork``/``system``/
  ``subprocess``, no sockets, and ``open`` refuses writes outside the temp dir.

Python's isolated mode (``-I``) keeps the harness's site-packages and cwd out of ``sys.path``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000

GUARD = r'''
import builtins as _b, os as _os, sys as _sys
_root = _os.path.realpath(_os.getcwd())
_os.environ.clear()
_open = _b.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and isinstance(file, (str, bytes, _os.PathLike)):
        p = _os.path.realpath(_os.fsdecode(file))
        if not (p == _root or p.startswith(_root + _os.sep)):
            raise PermissionError("sandbox: writing outside the working directory is not allowed")
    return _open(file, mode, *a, **k)
_b.open = _guarded_open
import io as _io; _io.open = _guarded_open
for _name in ("kill", "killpg", "fork", "forkpty", "system", "execv", "execve", "execvp", "execvpe", "spawnv",
              "spawnve", "popen", "setsid", "setuid", "putenv", "unsetenv", "remove", "unlink", "rmdir",
              "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "symlink", "link"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
import shutil as _sh; _sh.rmtree = _sh.move = _sh.chown = None
import subprocess as _sp; _sp.Popen = _sp.run = _sp.call = _sp.check_output = _sp.check_call = None
try:
    import socket as _so; _so.socket = _so.create_connection = None
except Exception:
    pass
del _name, _sh, _sp
'''


@dataclass(frozen=True)
class ExecResult:
    """status: 'passed' (exit 0), 'failed' (non-zero exit), or 'timeout'."""

    status: str
    returncode: int | None
    output: str  # the last 2,000 characters of stdout+stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(timeout: float, memory_mb: int, max_procs: int, drop_to: tuple[int, int] | None, unshare_net: bool):
    """preexec_fn: runs in the child between fork and exec."""
    import resource

    def apply():
        os.setsid()
        if unshare_net:
            try:
                ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
            except Exception:
                pass  # no namespaces here: the guard's socket block still applies
        cpu = int(timeout) + 1
        for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_mb * 2**20),
                           (resource.RLIMIT_FSIZE, 16 * 2**20), (resource.RLIMIT_NOFILE, 64),
                           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, max_procs)):
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                pass
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to[1])
            os.setuid(drop_to[0])
    return apply


def _kill_group(pgid: int) -> None:
    """SIGKILL the program's process group until it is empty (a fork bomb keeps forking while the
    first signal is delivered, so one killpg is not always enough)."""
    import time

    for _ in range(200):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _nobody() -> tuple[int, int] | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        import pwd

        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except (ImportError, KeyError):
        return None


def _world_executable(path: str) -> bool:
    """Whether an unprivileged user can run ``path`` (every parent directory searchable by others)."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _interpreter(drop) -> tuple[str, tuple[int, int] | None]:
    """This Python, or (when running as nobody) one that nobody can execute; else do not drop."""
    if drop is None or _world_executable(sys.executable):
        return sys.executable, drop
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if cand and _world_executable(cand):
            return cand, drop
    return sys.executable, None


def run_program(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_procs: int = 32,
                guard: bool = True) -> ExecResult:
    """Run Python ``code`` in the sandbox; passed means it exited with status 0 within ``timeout``."""
    tmp = tempfile.mkdtemp(prefix="opengemma-sandbox-")
    python, drop = _interpreter(_nobody())
    try:
        if drop is not None:
            os.chown(tmp, *drop)
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write((GUARD if guard else "") + "\n" + code + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([python, "-I", "-B", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_limits(timeout, memory_mb, max_procs, drop, True), close_fds=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            out, status = b"", "timeout"
        finally:
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.kill()
            try:
                extra, _ = proc.communicate(timeout=5)
                out = (out or b"") + (extra or b"")
            except subprocess.TimeoutExpired:
                pass
        return ExecResult(status, proc.returncode, (out or b"").decode("utf-8", "replace")[-2000:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_program(program: str, test: str, **kwargs) -> ExecResult:
    """A candidate solution followed by its tests (HumanEval ``check(entry_point)``, MBPP asserts)."""
    return run_program(program + "\n\n" + test, **kwargs)
