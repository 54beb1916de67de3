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
`{"tests_at": int | null, "cpu_s": int}` with three fds (stdin, stdout, stderr)
and, in test mode (`tests_at` set), a fourth: a pipe holding the run's token,
after writing the program to SRC_DIR/prog.py; the zygote forks and the child
runs the program as `__main__` in JOB_DIR.  In test mode the child runs the
candidate's code (the program up to `tests_at`), then the tests in a namespace
of their own, and prints the token after them (see `_execute_tests`).  Neither
the zygote nor any frame of the child holds the token: the child reads the
pipe into an audit hook's closure before the candidate runs.  The zygote
replies
`{"status": wait_status, "clean": bool}` once the child has exited and every
process it left behind has been killed and reaped.
"""

# Beyond what the zygote uses, it imports the modules candidates import most
# (marked F401): importing them once here makes each fork's import free.
import atexit
import builtins
import collections
import collections.abc
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

# What the harness itself calls, taken before any candidate code can patch it.
_exec, _type, _isinstance, _issubclass, _compile = exec, type, isinstance, issubclass, compile
_os_write, _getattr, _callable, _vars = os.write, getattr, callable, vars
_audit = sys.audit
_FunctionType, _ModuleType, _modules = types.FunctionType, types.ModuleType, sys.modules
_Iterator = collections.abc.Iterator
_LIBRARY = (os.path.dirname(os.__file__) + "/", "/usr/lib/python3/")
# Attributes through which a comparison, or a test's arithmetic on a result, runs.
_COMPARING = frozenset(
    {
        *("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__"),
        *("__len__", "__index__", "__int__", "__float__", "__abs__", "__round__", "__class__"),
        *("__sub__", "__rsub__", "__add__", "__radd__", "__contains__", "__iter__"),
        *("__getitem__", "__getattr__", "__getattribute__", "__instancecheck__"),
    }
)
# Methods of the interpreter's own C types: their code is not the program's.
_C_METHODS = (
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)

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
            message, fds, _, _ = socket.recv_fds(control, 4096, 4)
        except OSError:
            return
        if not message:
            return
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            # The program may read its own /proc/self files; we stay non-dumpable.
            libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
            _run_child(fds, request["cpu_s"], request["tests_at"], source, job_dir)
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


def _run_child(fds: list[int], cpu_s: int, tests_at: int | None, source: str, job_dir: str) -> None:
    token_fd = fds.pop() if tests_at is not None else None
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
    sys.argv = [f"{job_dir}/prog.py"]
    sys.path[0:0] = [job_dir]
    if token_fd is not None:
        os._exit(_execute_tests(source, sys.argv[0], tests_at, token_fd))
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


def _execute_tests(source_path: str, program_path: str, tests_at: int, token_fd: int) -> int:
    """Run the candidate's code, then the tests against it; print the token if they finish.

    The tests run in a namespace of their own, with a private copy of the
    builtins as they were before the candidate ran, and see the candidate's
    functions only through wrappers that turn each result into plain data of
    exact builtin types (so a value whose `__eq__` always holds compares as
    what it really is).  A candidate that replaced a builtin or a module's
    attribute the tests use, shadowed a builtin the tests use, or returned an
    object of its own class that overrides comparison is reported as tampered
    (`rr-tampered:` on stderr, exit status 1).  The token is printed only after
    the tests and the interpreter's exit sequence returned normally.

    Tests that do not parse on their own were written to continue the
    candidate's code (they close a string it opened): only then does the
    program run as one, in one namespace.  A candidate whose code does not
    parse on its own while the tests do is a COMPILE_ERROR, whatever the whole
    would do: it could otherwise reach into the tests' text (a trailing
    decorator would wrap their `check`).
    """
    with open(source_path, "rb") as handle:
        text = handle.read().decode(errors="replace")
    code_text, tests_text = text[:tests_at], text[tests_at:]
    try:
        # Leading newlines keep the tests' line numbers those of the whole program.
        tests = _compile("\n" * code_text.count("\n") + tests_text, program_path, "exec")
    except (SyntaxError, ValueError):
        tests = None
    try:
        code = _compile(code_text if tests else text, program_path, "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        sys.stderr.flush()
        return COMPILE_ERROR_STATUS
    linecache.cache[program_path] = (len(text), None, text.splitlines(keepends=True), program_path)
    if tests is None:
        return _execute_joined(program_path, code, token_fd)
    traced = _arm_finish(token_fd, tests)
    pristine = dict(builtins.__dict__)
    used = _names(tests)
    modules = _watched_modules(tests_text, used)
    module_state = {name: dict(_vars(module)) for name, module in modules.items()}
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    status, tampered, finished = 0, [], False
    try:
        _exec(code, module.__dict__)
        tampered += _patched_builtins(pristine, used)
        builtins.__dict__.update(pristine)  # the candidate's functions see them too
        namespace = _tests_namespace(module.__dict__, pristine, used, tampered)
        tests_builtins = namespace["__builtins__"]
        if not tampered:
            _exec(tests, namespace)
            tampered += _patched_modules(modules, module_state)
            tampered += _patched_builtins(pristine, used)
            tampered += _patched_builtins(pristine, used, tests_builtins)
            finished = True
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except _Tampered as error:
        tampered.append(str(error))
    except BaseException as error:
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(_type(error), error, error.__traceback__)
        status = 1
    tampered += traced
    if tampered:
        sys.stderr.write(f"rr-tampered: {tampered[0]}\n")
        status = 1
    status = _shut_down(status)
    if finished and not tampered and status == 0:
        _audit("rr.tests-finished", tests)
    return status


def _execute_joined(program_path: str, program: types.CodeType, token_fd: int) -> int:
    """Run a program whose tests continue its code as one; print the token if it finishes."""
    traced = _arm_finish(token_fd, program)
    module = types.ModuleType("__main__")
    module.__file__ = program_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    status, finished = 0, False
    try:
        _exec(program, module.__dict__)
        finished = True
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException as error:
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(_type(error), error, error.__traceback__)
        status = 1
    if traced:
        sys.stderr.write(f"rr-tampered: {traced[0]}\n")
        status = 1
    status = _shut_down(status)
    if finished and not traced and status == 0:
        _audit("rr.tests-finished", program)
    return status


def _arm_finish(token_fd: int, tests: types.CodeType) -> list[str]:
    """Read the token into the closure of an audit hook that prints it when the tests finish.

    Audit hooks can be neither listed nor removed from Python, and this frame
    is gone before the candidate runs: no frame, global or argument holds the
    token.  The hook prints it once, for the event raised by `_execute_tests`
    itself with these tests' code object.  It also records a trace or profile
    function installed from then on (one could jump over the tests' asserts):
    the list it returns fills with those reasons.
    """
    with open(token_fd, "rb", closefd=True) as pipe:
        secret = pipe.read().strip()
    pending, traced = [secret], []
    finish_codes = (_execute_tests.__code__, _execute_joined.__code__)
    getframe = sys._getframe

    def finish(event: str, args: tuple) -> None:
        if event in ("sys.settrace", "sys.setprofile"):
            kind = "trace" if event == "sys.settrace" else "profile"
            traced.append(f"the program installed a {kind} function")
        if event != "rr.tests-finished" or not pending or traced:
            return
        caller = getframe(1)
        if any(caller.f_code is code for code in finish_codes) and args and args[0] is tests:
            _os_write(1, b"\n" + pending.pop() + b"\n")

    sys.addaudithook(finish)
    return traced


class _Tampered(BaseException):
    """Raised through the tests when a result is not plain data (BaseException: not caught)."""


def _names(code: types.CodeType) -> set[str]:
    """Every global name the tests' code (and the functions in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if _isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w.]*)", re.MULTILINE)


def _watched_modules(tests_text: str, used: set[str]) -> dict[str, types.ModuleType]:
    """The modules the tests import or name, imported now so their state can be checked."""
    modules = {name: _modules[name] for name in used if name in _modules}
    for name in set(_IMPORT.findall(tests_text)):
        try:
            modules[name] = __import__(name)
        except ImportError:
            continue  # the tests will fail on it themselves
    return modules


def _patched_builtins(pristine: dict, used: set[str], current: dict | None = None) -> list[str]:
    current = builtins.__dict__ if current is None else current
    changed = [
        name for name in used if name in pristine and current.get(name) is not pristine[name]
    ]
    return [f"the program replaced the builtin {name!r}, which the tests use" for name in changed]


def _patched_modules(modules: dict, state: dict) -> list[str]:
    for name, module in modules.items():
        now = _vars(module)
        for attribute, value in state[name].items():
            if now.get(attribute) is not value and not attribute.startswith("__"):
                return [f"the program replaced {name}.{attribute}, which the tests use"]
    return []


def _tests_namespace(candidate: dict, pristine: dict, used: set[str], tampered: list) -> dict:
    """The tests' globals: of the names they use, the candidate's functions (wrapped), modules,
    classes and plain data."""
    namespace = {"__name__": "__main__", "__builtins__": dict(pristine)}
    for name in used:
        if name.startswith("__") or name not in candidate:
            continue
        value = candidate[name]
        if name in pristine:
            if name in used and value is not pristine[name]:
                tampered.append(f"the program's {name!r} shadows the builtin the tests use")
            continue
        if _isinstance(value, type):
            if not _fakes_comparison(value):
                namespace[name] = value
        elif _type(value) is _ModuleType:
            if _modules.get(value.__name__) is value:
                namespace[name] = value
        elif _callable(value):
            namespace[name] = _plain_results(value)
        else:
            try:
                namespace[name] = _plain(value, 0)
            except _Tampered:
                continue  # a value of a kind of its own: the tests do not get it
    return namespace


def _plain_results(function):
    def entry(*args, **kwargs):
        return _plain(function(*args, **kwargs), 0)

    entry.__name__ = entry.__qualname__ = _getattr(function, "__name__", "candidate")
    entry.__doc__ = _getattr(function, "__doc__", None)
    return entry


# Types whose values (or items) cannot run the program's code in a comparison.
_SCALARS = (bool, int, float, complex, str, bytes, type(None), bytearray, range)
# How each builtin type's real value is read without running a subclass's code.
_EXACT = (
    (bool, bool.__bool__),
    (int, int.__index__),
    (float, float.__float__),
    (str, str.__str__),
    (bytes, lambda value: bytes(memoryview(value))),
    (complex, lambda value: complex(complex.real.__get__(value), complex.imag.__get__(value))),
)


def _plain(value: object, depth: int) -> object:
    """`value` as plain data of exact builtin types; _Tampered for a class that fakes comparison."""
    kind = _type(value)
    if kind in _SCALARS:
        return value
    if depth > 200:
        raise _Tampered("the result is nested over 200 deep")
    if kind is list or kind is tuple:
        return kind([_plain(item, depth + 1) for item in value])
    if kind is dict:
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in dict.items(value)}
    if kind is set or kind is frozenset:
        return kind(_plain(item, depth + 1) for item in kind.__iter__(value))
    if _fakes_comparison(kind):
        raise _Tampered(f"the result's class {kind.__qualname__} overrides comparison")
    for base, exact in _EXACT:
        if _issubclass(kind, base):
            return exact(value)
    for base in (list, tuple, set, frozenset):
        if _issubclass(kind, base):
            return base(_plain(item, depth + 1) for item in base.__iter__(value))
    if _issubclass(kind, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in dict.items(value)}
    # A library object (Fraction, deque, a generator) compares by its own rules,
    # but the items it yields are the program's: an iterator yields plain data,
    # and a finite container's items are checked.
    if _isinstance(value, _Iterator):
        return (_plain(item, depth + 1) for item in value)
    if kind is not range and _getattr(kind, "__iter__", None) and _getattr(kind, "__len__", None):
        for item in value:
            _plain(item, depth + 1)
    return value


def _fakes_comparison(kind: type) -> bool:
    """Whether a class on `kind`'s MRO compares (or converts) through code of the program's.

    Functions count as the library's when their code lives in the interpreter's
    library folders; methods of C types are the interpreter's.  Anything else
    there (a lambda, a function of the program, a builtin function that is not
    a method) means the program decides what the comparison says.
    """
    for klass in kind.__mro__:
        if klass is object or klass.__module__ == "builtins":
            continue
        for name, attribute in _vars(klass).items():
            if name not in _COMPARING or attribute is None:
                continue
            if _isinstance(attribute, (staticmethod, classmethod)):
                attribute = attribute.__func__
            if _isinstance(attribute, _C_METHODS):
                continue
            if _type(attribute) is _FunctionType and _in_library(attribute.__code__.co_filename):
                continue
            return True
    return False


def _in_library(path: str) -> bool:
    return path.startswith(_LIBRARY)


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
