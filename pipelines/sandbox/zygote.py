"""A warm Python interpreter inside the sandbox that forks once per candidate.

This file runs *inside* bwrap under the system /usr/bin/python3 and imports
only the standard library: the repository is not visible there.  A cold
sandboxed interpreter costs ~14 ms more than the run itself; forking this
already-started one costs ~1 ms, which is what lets the sandbox keep pace with
the unisolated reference harness.

Usage: zygote.py CONTROL_FD pidns|shared SRC_DIR JOB_DIR [DIR_TO_EMPTY ...].
`pidns` says the zygote has a pid namespace of its own (under bwrap), so
everything else in it may be killed after a run; `shared` (insecure mode,
no bwrap) limits the sweep to the candidate's session.  On the
control fd (a SOCK_SEQPACKET socket) the zygote first says `ready`; then the
runner sends one JSON request
`{"token": str, "cpu_s": int}` with three fds (stdin, stdout, stderr) after
writing the program to SRC_DIR/prog.py; the zygote forks, the child runs the
program as `__main__` in JOB_DIR with the token as its last argument, and
the zygote replies
`{"status": wait_status, "clean": bool}` once the child has exited and every
process it left behind has been killed and reaped.
"""

# Beyond what the zygote uses, it imports the modules candidates import most
# (marked F401): importing them once here makes each fork's import free.
import atexit
import builtins
import collections  # noqa: F401
import contextlib
import ctypes
import functools  # noqa: F401
import heapq  # noqa: F401
import io
import itertools  # noqa: F401
import json
import linecache
import math  # noqa: F401
import os
import re  # noqa: F401
import resource
import shutil
import signal
import socket
import string  # noqa: F401
import sys
import traceback
import types
import typing  # noqa: F401

COMPILE_ERROR_STATUS = 97  # the runner maps this exit status to COMPILE_ERROR
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Non-dumpable: a candidate (same uid) cannot open our /proc/pid/fd or mem.
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    # Orphans of a candidate re-parent to us, so we can reap them after the run.
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    control = socket.socket(fileno=int(sys.argv[1]))
    own_pid_namespace = sys.argv[2] == "pidns"
    source, job_dir, work_dirs = f"{sys.argv[3]}/prog.py", sys.argv[4], sys.argv[4:]
    control.send(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 3)
        except OSError:
            return
        if not message:
            return
        request = json.loads(message)
        token = request["token"]
        pid = os.fork()
        if pid == 0:
            control.close()
            # The program may read its own /proc/self files; we stay non-dumpable.
            libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
            _run_child(fds, token, request["cpu_s"], source, job_dir)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        _kill_leftovers(pid, own_pid_namespace)
        clean = _empty_work_dirs(work_dirs)
        control.send(json.dumps({"status": status, "clean": clean}).encode())


def _kill_leftovers(child: int, own_pid_namespace: bool) -> None:
    # kill(-1) reaches every process of this pid namespace except us and its init.
    # Without a namespace of our own it would hit every process of our uid on the
    # host, other sandboxes included: then only the candidate's session is killed.
    with contextlib.suppress(ProcessLookupError):
        if own_pid_namespace:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(child, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _empty_work_dirs(work_dirs: list[str]) -> bool:
    def make_writable(func, path, _exc):  # a candidate may chmod 000 its own folders
        os.chmod(os.path.dirname(path), 0o700)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        func(path)

    for folder in work_dirs:
        os.chmod(folder, 0o755)
        for entry in os.scandir(folder):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, onerror=make_writable)
                else:
                    os.unlink(entry.path)
            except OSError:
                return False
    return True


def _run_child(fds: list[int], token: str, cpu_s: int, source: str, job_dir: str) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        errors="backslashreplace",
        line_buffering=True,
    )
    os.chdir(job_dir)
    sys.argv = [f"{job_dir}/prog.py", token]
    sys.path[0:0] = [job_dir]
    os._exit(_execute(source, sys.argv[0]))


def _execute(source_path: str, program_path: str) -> int:
    """Run the program as `python3 prog.py` would and return its exit status."""
    with open(source_path, "rb") as handle:
        source = handle.read()
    try:
        code = compile(source, program_path, "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        sys.stderr.flush()
        return COMPILE_ERROR_STATUS
    # Tracebacks quote source lines through linecache, which cannot find our path.
    linecache.cache[program_path] = (
        len(source),
        None,
        source.decode(errors="replace").splitlines(keepends=True),
        program_path,
    )
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    status = 0
    try:
        exec(code, module.__dict__)
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException as error:
        # Drop our own frame so the traceback starts in the program, as it would.
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(type(error), error, error.__traceback__)
        status = 1
    return _shut_down(status)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _shut_down(status: int) -> int:
    # The interpreter's own exit sequence: wait for threads, run atexit, flush.
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as stop:
        status = _exit_status(stop.code)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        status = status or 120
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    return status


if __name__ == "__main__":
    main()
