"""Run candidates in the sandbox and turn what happened into a verdict.

Each worker slot owns a cgroup (made once), a host folder for sources and, for
Python, a warm zygote interpreter inside bwrap that forks per candidate.  Other
languages start one fresh bwrap per compile and per run.  Compiled artefacts
are cached by a hash of the compile command and the program text.
"""

import atexit
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from models.enums import Language, Verdict
from models.settings import get_settings
from pipelines.sandbox import isolation, tampering
from pipelines.sandbox.cgroup import SlotCgroup, remove_stale_groups
from pipelines.sandbox.isolation import Host, Launch
from pipelines.sandbox.job import ExecutionResult, Job, Limits
from pipelines.sandbox.languages import (
    BUILD,
    COMPILE_ERROR_STATUS,
    HARNESS,
    JOB,
    SRC,
    TAMPER_MARKER,
    TYPESCRIPT_DIR,
    Recipe,
    io_mode_recipe,
    program_text,
    recipe_for,
    test_mode_recipe,
)

RUNTIME_DIR = get_settings().sandbox_dir
CACHE_DIR = RUNTIME_DIR / "cache"
ZYGOTE_SCRIPT = Path(__file__).with_name("zygote.py")
HARNESS_SOURCES = Path(__file__).with_name("harness")
REPO_ROOT = Path(__file__).resolve().parents[2]
TAIL_CHARS = 4000
COMPILE_TIMEOUT_S = 60.0
COMPILE_MEMORY_MB = 2048
CACHE_MAX_ENTRIES = 20_000  # a compiled candidate takes tens of kB to a few MB
SIGXCPU = int(signal.SIGXCPU)
# The zygote, bwrap's init and its own bookkeeping live in the slot's cgroup too.
ZYGOTE_MEMORY_MB = 48
ZYGOTE_START_S = 30.0  # until its `ready`; a loaded host takes seconds to start bwrap


DEFAULT_LIMITS = Limits()


class SandboxUnavailable(RuntimeError):
    """No working isolation on this host and RR_SANDBOX_INSECURE is not set."""


@dataclass
class RawRun:
    """What one process tree did, before it is judged."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    output_exceeded: bool = False
    oom: bool = False
    lost: bool = False  # the sandbox itself died or failed to start
    stdout: bytes = b""
    stderr: bytes = b""
    duration_ms: float = 0.0
    peak_memory_kb: int | None = None
    reply: dict | None = None  # the zygote's report, for Python runs


def run_one(
    language: str,
    code: str,
    tests: str,
    *,
    io_cases: list[dict] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ExecutionResult:
    """Run one candidate: test mode, or stdin/stdout mode when `io_cases` is given."""
    recipe = recipe_for(language)
    host = _usable_host()
    slot = _POOL.acquire(host, warm=recipe.language == Language.PYTHON)
    try:
        return _judge(slot, recipe, code, tests, io_cases, limits)
    finally:
        _POOL.release(slot)


def run_batch(jobs: Sequence[Job], *, workers: int | None = None) -> list[ExecutionResult]:
    """Run many candidates concurrently (one per core by default), results in job order."""
    for job in jobs:
        recipe_for(job.language)  # unknown languages fail before anything runs
    if not jobs:
        return []
    workers = workers or os.cpu_count() or 1

    def one(job: Job) -> ExecutionResult:
        return run_one(job.language, job.code, job.tests, io_cases=job.io_cases, limits=job.limits)

    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(one, jobs))


def _usable_host() -> Host:
    host = isolation.probe_host()
    if not host.isolated and not isolation.insecure_allowed():
        raise SandboxUnavailable(
            f"no working sandbox on this host ({host.bwrap_error}); refusing to run untrusted "
            "code. Fix it (see `rewardranker sandbox doctor`) or set RR_SANDBOX_INSECURE=1."
        )
    return host


# 1. the slots


class Slot:
    """One worker's cgroup, host folders and (for Python) warm zygote."""

    def __init__(self, index: int, host: Host, warm: bool) -> None:
        self.host = host
        self.warm = warm  # runs Python through a zygote, never a cold sandbox
        name = f"{os.getpid()}-{index}"
        self.folder = RUNTIME_DIR / "slots" / name
        self.src = self.folder / "src"
        self.job = self.folder / "job"  # the working folder when running without bwrap
        shutil.rmtree(self.folder, ignore_errors=True)
        self.src.mkdir(parents=True, mode=0o755)
        self.job.mkdir(mode=0o700)
        os.chown(self.job, host.uid, host.gid)
        self.cgroup = SlotCgroup(name, host.cgroup_version) if host.cgroup_version else None
        self.zygote: subprocess.Popen | None = None
        self.control: socket.socket | None = None

    @property
    def procs_files(self) -> list[Path]:
        return self.cgroup.procs_files if self.cgroup else []

    def limit(self, memory_mb: int, max_pids: int) -> None:
        if self.cgroup:
            self.cgroup.configure(memory_mb * 1024 * 1024, max_pids)

    def oom_kills(self) -> int:
        return self.cgroup.oom_kills() if self.cgroup else 0

    def peak_memory_kb(self) -> int | None:
        return self.cgroup.peak_memory_kb() if self.cgroup else None

    def sweep(self, keep: int | None = None) -> None:
        if self.cgroup:
            self.cgroup.sweep(keep)

    def reset_job_folder(self) -> None:
        if not self.host.isolated:
            shutil.rmtree(self.job, ignore_errors=True)
            self.job.mkdir(mode=0o700)
            os.chown(self.job, self.host.uid, self.host.gid)

    def start_zygote(self) -> None:
        zygote = _readable_copy(ZYGOTE_SCRIPT)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if self.host.isolated:
            argv = ["/usr/bin/python3", "-I", "-B", "/rr/zygote.py", str(theirs.fileno()), "pidns"]
            argv += [SRC, JOB, JOB, "/tmp", "/dev/shm"]
        else:
            argv = ["/usr/bin/python3", "-I", "-B", str(zygote), str(theirs.fileno()), "shared"]
            argv += [str(self.src), str(self.job), str(self.job)]
        launch = Launch(argv, ro_binds=[(str(self.src), SRC), (str(zygote), "/rr/zygote.py")])
        with open(self.folder / "zygote.log", "ab") as log:
            self.zygote = isolation.start(
                self.host,
                launch,
                cgroup_procs=self.procs_files,
                sandbox_paths=self.host.isolated,
                stdout=subprocess.DEVNULL,
                stderr=log.fileno(),
                pass_fds=(theirs.fileno(),),
                cwd=None if self.host.isolated else str(self.job),
            )
        theirs.close()
        self.control = ours
        # Wait for `ready` before any job is sent: a zygote whose sandbox failed to
        # start must show as not started, not as a candidate that died mid-run.
        ours.settimeout(ZYGOTE_START_S)
        try:
            ready = ours.recv(16)
        except OSError:  # a reset, or the timeout
            ready = b""
        ours.settimeout(None)
        if ready != b"ready":
            self.stop_zygote()

    def stop_zygote(self) -> None:
        if self.zygote is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.zygote.pid, signal.SIGKILL)
            self.zygote.wait()
            self.zygote = None
        if self.control is not None:
            self.control.close()
            self.control = None
        self.sweep()

    def close(self) -> None:
        self.stop_zygote()
        if self.cgroup:
            self.cgroup.remove()
        shutil.rmtree(self.folder, ignore_errors=True)


class _SlotPool:
    """Slots are made on demand, one per concurrent run, and reused LIFO to stay warm.

    Python runs and the other languages draw from separate free lists: a cold
    run sweeps its slot's cgroup, which would kill a zygote living there.
    """

    def __init__(self) -> None:
        self._free: dict[bool, queue.LifoQueue[Slot]] = {
            True: queue.LifoQueue(),
            False: queue.LifoQueue(),
        }
        self._all: list[Slot] = []
        self._lock = threading.Lock()
        self._owner = os.getpid()
        # bwrap --die-with-parent kills the sandbox when the *thread* that started
        # it exits, and run_batch's threads end with each batch: zygotes are
        # therefore started from this one long-lived thread instead.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")

    def start_zygote(self, slot: "Slot") -> None:
        self._spawner.submit(slot.start_zygote).result()

    def acquire(self, host: Host, warm: bool) -> Slot:
        if self._owner != os.getpid():
            # A forked worker (e.g. Celery prefork) must not share its parent's
            # zygotes and cgroups: start an empty pool of its own.
            self.__init__()
        try:
            return self._free[warm].get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if not self._all:
                _prepare_runtime_dir()
            slot = Slot(len(self._all), host, warm)
            self._all.append(slot)
            return slot

    def release(self, slot: Slot) -> None:
        self._free[slot.warm].put(slot)

    def close(self) -> None:
        with self._lock:
            for slot in self._all:
                slot.close()
            self._all.clear()
            self._free = {True: queue.LifoQueue(), False: queue.LifoQueue()}


def _prepare_runtime_dir() -> None:
    """Create the shared folders and drop what sandbox processes that died left behind."""
    remove_stale_groups()
    slots = RUNTIME_DIR / "slots"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    slots.mkdir(exist_ok=True)
    for folder in (RUNTIME_DIR, slots, CACHE_DIR):
        folder.chmod(0o755)  # the sandbox user reads sources and artefacts from here
    for folder in slots.iterdir():
        owner = folder.name.partition("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)


_POOL = _SlotPool()
atexit.register(_POOL.close)


# 2. judging a candidate


def _judge(
    slot: Slot,
    recipe: Recipe,
    code: str,
    tests: str,
    io_cases: list[dict] | None,
    limits: Limits,
) -> ExecutionResult:
    io_mode = io_cases is not None
    program = program_text(recipe, code, tests, with_harness=not io_mode)
    recipe = io_mode_recipe(recipe, program) if io_mode else test_mode_recipe(recipe)
    if not io_mode and (reason := tampering.cpp_macro_tampering(recipe, code, tests)):
        return _result(Verdict.WRONG_ANSWER, 0, 1, None, [], reason)
    build: Path | None = None
    if recipe.compile is not None:
        build, compile_run = _compiled(slot, recipe, program)
        if build is None:
            total = len(io_cases) if io_mode else 1
            if reason := _tamper_reason(compile_run):
                return _result(Verdict.WRONG_ANSWER, 0, total, compile_run, [], reason)
            verdict = Verdict.SANDBOX_ERROR if compile_run.lost else Verdict.COMPILE_ERROR
            return _result(verdict, 0, total, compile_run, [])
    if any(arg.startswith(SRC) for arg in recipe.run):
        # Interpreted (a compile step, if any, only checked the syntax): runs from /src.
        (slot.src / recipe.source_name).write_text(program)
    if not io_mode:
        token = secrets.token_hex(16)
        tests_at = len(code) + 1
        run = _execute(slot, recipe, build, None, token, limits, tests_at)
        verdict = _test_verdict(recipe, run, token)
        reason = _tamper_reason(run) if verdict == Verdict.WRONG_ANSWER else None
        if reason is None and _limit_verdict(run) is None:
            # The harness prints the token once, last, and only then: any other
            # copy was printed by a program that got hold of it.
            copies = (run.stdout + run.stderr).count(token.encode())
            if copies > int(verdict == Verdict.OK):
                verdict, reason = Verdict.WRONG_ANSWER, "the program printed the success token"
        return _result(verdict, int(verdict == Verdict.OK), 1, run, [run], reason)
    return _judge_io(slot, recipe, build, io_cases or [], limits)


def _judge_io(
    slot: Slot, recipe: Recipe, build: Path | None, cases: list[dict], limits: Limits
) -> ExecutionResult:
    runs: list[RawRun] = []
    first_failure: Verdict | None = None
    passed = 0
    for case in cases:
        (slot.src / "stdin.txt").write_text(case["input"])
        # Room for the expected answer even when it is bigger than the usual cap.
        case_limits = replace(
            limits, output_bytes=max(limits.output_bytes, 2 * len(case["output"]) + 1024)
        )
        run = _execute(slot, recipe, build, slot.src / "stdin.txt", "", case_limits, 0)
        runs.append(run)
        verdict = _io_verdict(recipe, run, case["output"])
        if verdict == Verdict.OK:
            passed += 1
        elif first_failure is None:
            first_failure = verdict
        if verdict in (Verdict.TIME_LIMIT, Verdict.SANDBOX_ERROR):
            break  # the remaining cases would each cost a full timeout
    final = first_failure or Verdict.OK
    return _result(final, passed, len(cases), None, runs)


def _result(
    verdict: Verdict,
    passed: int,
    total: int,
    single: RawRun | None,
    runs: list[RawRun],
    tamper_reason: str | None = None,
) -> ExecutionResult:
    shown = single or (runs[-1] if runs else RawRun())
    peaks = [r.peak_memory_kb for r in runs if r.peak_memory_kb is not None]
    return ExecutionResult(
        verdict=verdict,
        passed=passed,
        total=total,
        duration_ms=round(sum(r.duration_ms for r in runs), 3),
        peak_memory_kb=max(peaks) if peaks else None,
        stdout_tail=_tail(shown.stdout),
        stderr_tail=_tail(shown.stderr),
        tampered=tamper_reason is not None,
        tamper_reason=tamper_reason,
    )


def _tamper_reason(run: RawRun) -> str | None:
    """The reason a harness gave for seeing tampering, if it saw any.

    Anything the candidate prints can only make its own verdict worse, so a
    marker it forges itself costs it nothing it could have had.
    """
    output = (run.stderr + b"\n" + run.stdout).decode(errors="replace")
    at = output.rfind(TAMPER_MARKER)
    if at < 0:
        return None
    reason = output[at + len(TAMPER_MARKER) :].split("\n", 1)[0].strip().strip('"')
    return reason[:500] or "tampered"


def _tail(data: bytes) -> str:
    return data[-4 * TAIL_CHARS :].decode(errors="replace")[-TAIL_CHARS:]


def _limit_verdict(run: RawRun) -> Verdict | None:
    """Verdicts that do not depend on what the program printed."""
    if run.output_exceeded:
        return Verdict.OUTPUT_LIMIT
    if run.oom or b"java.lang.OutOfMemoryError" in run.stderr:
        return Verdict.MEMORY_LIMIT
    if run.timed_out or run.signal == SIGXCPU:
        return Verdict.TIME_LIMIT
    if run.lost:
        return Verdict.SANDBOX_ERROR
    return None


# Languages whose test-mode runs exit COMPILE_ERROR_STATUS when the program does not parse.
_CHECKS_SYNTAX = {Language.PYTHON, Language.JAVASCRIPT, Language.BASH}


def _test_verdict(recipe: Recipe, run: RawRun, token: str) -> Verdict:
    if limit := _limit_verdict(run):
        return limit
    if _tamper_reason(run):
        return Verdict.WRONG_ANSWER
    if run.exit_code == 0:
        lines = run.stdout.decode(errors="replace").split()
        # OK needs the token the harness prints after the last test, as the final output.
        return Verdict.OK if lines and lines[-1] == token else Verdict.WRONG_ANSWER
    if run.exit_code == COMPILE_ERROR_STATUS and recipe.language in _CHECKS_SYNTAX:
        return Verdict.COMPILE_ERROR
    if recipe.language == Language.PHP and (
        b"PHP Parse error" in run.stderr or b"Uncaught ParseError" in run.stderr
    ):
        return Verdict.COMPILE_ERROR
    output = run.stderr + run.stdout
    if any(marker.encode() in output for marker in recipe.assertion_markers):
        return Verdict.WRONG_ANSWER
    if run.signal is None and run.exit_code == recipe.assertion_exit_status:
        return Verdict.WRONG_ANSWER
    return Verdict.RUNTIME_ERROR


def _io_verdict(recipe: Recipe, run: RawRun, expected: str) -> Verdict:
    if limit := _limit_verdict(run):
        return limit
    if run.exit_code != 0:
        if recipe.language == Language.PYTHON and run.exit_code == COMPILE_ERROR_STATUS:
            return Verdict.COMPILE_ERROR
        return Verdict.RUNTIME_ERROR
    # Whitespace-tolerant: the same tokens in the same order.
    same = run.stdout.decode(errors="replace").split() == expected.split()
    return Verdict.OK if same else Verdict.WRONG_ANSWER


# 3. compiling, cached by content


def _compiled(slot: Slot, recipe: Recipe, program: str) -> tuple[Path | None, RawRun]:
    """The folder of compiled artefacts, or None and the failed compile run."""
    assert recipe.compile is not None
    parts = [*recipe.compile, program]
    if recipe.harness_sources:
        parts.append(harness_dir().name)  # its name carries the harness's digest
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    final = CACHE_DIR / key
    if (final / "ok").exists():
        with contextlib.suppress(OSError):
            os.utime(final)  # recently used: pruning keeps it
        return final, RawRun()
    if (final / "error.txt").exists():
        return None, RawRun(exit_code=1, stderr=(final / "error.txt").read_bytes())
    (slot.src / recipe.source_name).write_text(program)
    staging = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".build-"))
    os.chown(staging, slot.host.uid, slot.host.gid)
    staging.chmod(0o755)
    ro_binds = [(str(slot.src), SRC), (str(harness_dir()), HARNESS)]
    if recipe.language == Language.TYPESCRIPT:
        ro_binds.append((str(typescript_dir()), TYPESCRIPT_DIR))
    launch = Launch(list(recipe.compile), ro_binds=ro_binds, rw_binds=[(str(staging), BUILD)])
    limits = Limits(COMPILE_TIMEOUT_S, COMPILE_MEMORY_MB, 64 * 1024)
    run = _run_cold(slot, launch, recipe, limits, None, {BUILD: staging})
    if run.exit_code == 0:
        (staging / "ok").touch()
    elif not (run.timed_out or run.oom or run.lost or run.output_exceeded):
        (staging / "error.txt").write_bytes(run.stdout + run.stderr)
    else:
        shutil.rmtree(staging)  # a compile that ran out of resources may succeed next time
        return None, run
    try:
        staging.rename(final)
    except OSError:  # another worker cached the same program first
        shutil.rmtree(staging)
    else:
        _prune_cache_now_and_then()
    return (final if run.exit_code == 0 else None), run


_new_cache_entries = itertools.count(1)


def _prune_cache_now_and_then() -> None:
    """Keep the newest CACHE_MAX_ENTRIES artefact folders; checked every 256 new ones."""
    if next(_new_cache_entries) % 256:
        return
    entries = [e for e in os.scandir(CACHE_DIR) if not e.name.startswith(".")]
    if len(entries) <= CACHE_MAX_ENTRIES:
        return
    entries.sort(key=lambda entry: entry.stat().st_mtime)
    for entry in entries[: len(entries) - CACHE_MAX_ENTRIES]:
        shutil.rmtree(entry.path, ignore_errors=True)


def typescript_dir() -> Path:
    """The pinned TypeScript compiler, copied where the sandbox user can read it.

    The checkout may sit under a folder only its owner can enter (a CI clone in
    a 0700 temp folder); bwrap binds paths as the sandbox user, so the compiler
    is copied once per version into the world-readable runtime folder.
    """
    candidates = [REPO_ROOT / "node_modules" / "typescript"]
    candidates += [
        Path("/usr/lib/node_modules/typescript"),
        Path("/usr/local/lib/node_modules/typescript"),
    ]
    for folder in candidates:
        if (folder / "bin" / "tsc").exists():
            return _readable_copy(folder)
    raise FileNotFoundError("the TypeScript compiler is missing: run `npm ci` in the repository")


def harness_dir() -> Path:
    """The judge's harness files (harness/), copied where the sandbox user can read them."""
    return _readable_copy(HARNESS_SOURCES)


def _readable_copy(source: Path) -> Path:
    """`source` (a file or folder) copied once, by content version, under RUNTIME_DIR."""
    if source.is_dir() and not (source / "package.json").exists():
        versioned = sorted(path for path in source.iterdir() if path.is_file())
    else:
        versioned = [source / "package.json" if source.is_dir() else source]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in versioned)).hexdigest()[:16]
    target = RUNTIME_DIR / f"{source.name}-{digest}"
    if target.exists():
        return target
    RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=RUNTIME_DIR, prefix=".copy-"))
    staging.chmod(0o755)
    if source.is_dir():
        shutil.copytree(source, staging / "tree")
    else:
        shutil.copy(source, staging / "tree")
    for root, folders, files in os.walk(staging):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    with contextlib.suppress(OSError):  # another process may have copied it first
        (staging / "tree").rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


# 4. running


def _execute(
    slot: Slot,
    recipe: Recipe,
    build: Path | None,
    stdin_path: Path | None,
    token: str,
    limits: Limits,
    tests_at: int,
) -> RawRun:
    """One run; in test mode (`token`) the harness reads the token from a pipe."""
    if recipe.language == Language.PYTHON:
        return _run_in_zygote(slot, stdin_path, token, limits, tests_at)
    argv = list(recipe.run)
    if token and recipe.language in (Language.JAVASCRIPT, Language.TYPESCRIPT):
        argv[1:1] = node_lockdown()
    if recipe.language == Language.JAVA:
        # The JVM sizes its heap from host RAM, not the cgroup it cannot see.
        argv.insert(1, f"-Xmx{max(32, limits.memory_mb * 3 // 4)}m")
    ro_binds = [(str(slot.src), SRC), (str(harness_dir()), HARNESS)]
    if build is not None:
        ro_binds.append((str(build), BUILD))
    secret_fd = None
    if token:
        # The harness learns only the pipe's number from its command line.
        secret_fd = _token_pipe(token, slot.host)
        argv.append(str(secret_fd))
    launch = Launch(argv, ro_binds=ro_binds, cpu_s=math.ceil(limits.timeout_s) + 1)
    paths = {BUILD: build} if build is not None else {}
    try:
        return _run_cold(slot, launch, recipe, limits, stdin_path, paths, secret_fd)
    finally:
        if secret_fd is not None:
            os.close(secret_fd)


@functools.cache
def node_lockdown() -> tuple[str, ...]:
    """Node's permission model for test runs, where this Node has it; () where not.

    It takes away the inspector (whose protocol reads any closure, the harness's
    secret included), child processes, workers and native addons; files stay
    readable and writable (the sandbox bounds those).
    """
    allow = ("--allow-fs-read=*", "--allow-fs-write=*")
    for flag in ("--permission", "--experimental-permission"):
        flags = ("--no-warnings", flag, *allow)  # no "experimental feature" line on stderr
        try:
            probe = subprocess.run(
                ["/usr/bin/node", *flags, "-e", "0"], capture_output=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return ()
        if probe.returncode == 0 and not probe.stderr:
            return flags
    return ()


def _token_pipe(token: str, host: Host) -> int:
    """The read end of a pipe holding `token`, which the harness reads to its end.

    The token is written whole before the program starts: far below a pipe's
    buffer, so this cannot block.
    """
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode() + b"\n")
    os.close(write_end)
    # Java and C# reopen it through /proc/self/fd, which checks the pipe's owner.
    os.fchown(read_end, host.uid, host.gid)
    return read_end


def _run_cold(
    slot: Slot,
    launch: Launch,
    recipe: Recipe,
    limits: Limits,
    stdin_path: Path | None,
    paths: dict[str, Path],
    secret_fd: int | None = None,
) -> RawRun:
    """One fresh sandbox for one command."""
    host = slot.host
    if not host.isolated:
        launch = _on_host_paths(slot, launch, paths)
        slot.reset_job_folder()
    slot.limit(limits.memory_mb, recipe.max_pids)
    oom_before = slot.oom_kills()
    stdin = open(stdin_path, "rb") if stdin_path else None  # noqa: SIM115
    started = time.monotonic()
    try:
        proc = isolation.start(
            host,
            launch,
            cgroup_procs=slot.procs_files,
            sandbox_paths=host.isolated,
            stdin=stdin.fileno() if stdin else subprocess.DEVNULL,
            pass_fds=() if secret_fd is None else (secret_fd,),
            cwd=None if host.isolated else str(slot.job),
        )
    finally:
        if stdin:
            stdin.close()
    assert proc.stdout is not None and proc.stderr is not None
    deadline = started + limits.timeout_s
    run = _pump(proc.stdout.fileno(), proc.stderr.fileno(), None, deadline, limits.output_bytes)
    if run.timed_out or run.output_exceeded:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        status = proc.wait()
        run.timed_out = True
    proc.stdout.close()
    proc.stderr.close()
    run.duration_ms = (time.monotonic() - started) * 1000
    slot.sweep()
    run.oom = slot.oom_kills() > oom_before
    run.peak_memory_kb = slot.peak_memory_kb()
    # bwrap reports a child killed by signal N as exit status 128 + N.
    if status < 0:
        run.signal = -status
    elif status > 128 and host.isolated:
        run.signal = status - 128
    else:
        run.exit_code = status
    trampoline_failed = status == isolation.TRAMPOLINE_FAILURE
    if (trampoline_failed and run.stderr.startswith(b"rr-trampoline:")) or (
        status == 1 and run.stderr.startswith(b"bwrap:")
    ):
        run.lost = True  # the trampoline could not join the cgroup, or bwrap could not start
    return run


def _on_host_paths(slot: Slot, launch: Launch, paths: dict[str, Path]) -> Launch:
    """Insecure mode: the same command with the host folders the sandbox would have bound."""
    mapping = {SRC: str(slot.src), JOB: str(slot.job), **{k: str(v) for k, v in paths.items()}}
    mapping[HARNESS] = str(harness_dir())
    if any(TYPESCRIPT_DIR in arg for arg in launch.argv):
        mapping[TYPESCRIPT_DIR] = str(typescript_dir())
    argv = []
    for arg in launch.argv:
        for prefix, folder in mapping.items():
            arg = arg.replace(prefix + "/", folder + "/") if arg != prefix else folder
        argv.append(arg)
    return replace(launch, argv=argv)


def _run_in_zygote(
    slot: Slot, stdin_path: Path | None, token: str, limits: Limits, tests_at: int
) -> RawRun:
    """Fork the slot's warm interpreter for one run; restart it if it is gone."""
    slot.limit(limits.memory_mb + ZYGOTE_MEMORY_MB, recipe_for(Language.PYTHON).max_pids)
    stdin_fd = os.open(stdin_path or os.devnull, os.O_RDONLY)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    cpu_s = math.ceil(limits.timeout_s) + 1
    request = json.dumps({"cpu_s": cpu_s, "tests_at": tests_at if token else None}).encode()
    fds = [stdin_fd, out_write, err_write]
    if token:
        fds.append(_token_pipe(token, slot.host))
    try:
        for _attempt in range(2):
            if slot.zygote is None or slot.zygote.poll() is not None:
                slot.stop_zygote()
                _POOL.start_zygote(slot)
            if slot.control is None:
                continue  # it did not start
            try:
                socket.send_fds(slot.control, [request], fds)
                break
            except OSError:
                slot.stop_zygote()
        else:
            return RawRun(lost=True, stderr=b"the sandboxed interpreter did not start")
    finally:
        for fd in fds:
            os.close(fd)
    oom_before = slot.oom_kills()
    started = time.monotonic()
    run = _pump(out_read, err_read, slot.control, started + limits.timeout_s, limits.output_bytes)
    run.duration_ms = (time.monotonic() - started) * 1000
    os.close(out_read)
    os.close(err_read)
    run.oom = slot.oom_kills() > oom_before
    run.peak_memory_kb = slot.peak_memory_kb()
    reply = run.reply
    if reply is None or not reply["clean"] or run.timed_out or run.output_exceeded:
        # Anything but a clean, finished run leaves the zygote suspect: start afresh.
        slot.stop_zygote()
    if reply is None:
        # The zygote died mid-run. It is a few lines of stdlib code that only the
        # candidate (same uid, same namespace) can kill: blame the candidate.
        run.signal = int(signal.SIGKILL)
        return run
    status = reply["status"]
    if os.WIFSIGNALED(status):
        run.signal = os.WTERMSIG(status)
        run.lost = False
    else:
        run.exit_code = os.WEXITSTATUS(status)
    return run


def _pump(
    out_fd: int, err_fd: int, control: socket.socket | None, deadline: float, cap: int
) -> RawRun:
    """Read both streams (and the zygote's reply) until all end, the deadline, or the cap."""
    run = RawRun()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    waiting_reply = control is not None
    if control is not None:
        poller.register(control.fileno(), select.POLLIN)
    while open_fds or waiting_reply:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            run.timed_out = True
            break
        for fd, _event in poller.poll(remaining * 1000):
            if control is not None and fd == control.fileno():
                try:
                    message = control.recv(4096)
                except OSError:  # reset by a zygote that died: no reply, as below
                    message = b""
                run.reply = json.loads(message) if message else None
                waiting_reply = False
                poller.unregister(fd)
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                poller.unregister(fd)
                continue
            buffers[fd] += chunk
            if len(buffers[fd]) > cap:
                run.output_exceeded = True
                del buffers[fd][cap:]
        if run.output_exceeded:
            break
        if control is not None and not waiting_reply and run.reply is None:
            break  # the zygote died: its pipes may be held open by orphans
    run.stdout, run.stderr = bytes(buffers[out_fd]), bytes(buffers[err_fd])
    return run
