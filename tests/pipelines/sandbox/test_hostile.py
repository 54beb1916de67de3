"""Hostile candidates: each attack must end non-OK, and the host must be untouched.

Every hostile program is written so that its tests pass only if the attack
worked; a sandbox that let the attack through would therefore report OK.
"""

import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

from models.enums import Verdict
from pipelines.sandbox import Limits, run_one

from .conftest import require_toolchain

PASS_IF = "\nassert attack_worked()\n"


FIVE_SECONDS = Limits(timeout_s=5)


def _python(body: str, limits: Limits = FIVE_SECONDS):
    code = "def attack_worked():\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return run_one("python", code, PASS_IF, limits=limits)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(pid))
    return found


@pytest.mark.parametrize("port", [5432, 6379])
def test_no_network_to_local_postgres_or_redis(port: int) -> None:
    body = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        "return True"
    )
    result = _python(body)
    assert result.verdict == Verdict.RUNTIME_ERROR, result
    assert "OSError" in result.stderr_tail or "Error" in result.stderr_tail


def test_no_network_from_a_compiled_language_either() -> None:
    require_toolchain("bash")
    code = "attack() { exec 3<>/dev/tcp/127.0.0.1/5432; }\n"
    result = run_one("bash", code, "set -e\nattack\n")
    assert result.verdict != Verdict.OK, result


def test_host_files_are_invisible(tmp_path: Path) -> None:
    # A file the runner's user can read on the host, outside /usr and /etc.
    secret = Path(__file__).resolve().parents[3] / "pyproject.toml"
    body = (
        "import os\n"
        f"seen = [p for p in ({str(secret)!r}, '/work', '/root', '/home', '/var/lib/postgresql',\n"
        "                      '/proc/1/root/work', '/etc/shadow') if os.path.exists(p)]\n"
        "readable = []\n"
        "for p in seen:\n"
        "    try:\n"
        "        open(p, 'rb').read(1) if os.path.isfile(p) else os.listdir(p)\n"
        "        readable.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(readable)\n"
        "return bool(readable)"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_host_environment_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RR_SECRET_CANARY", "do-not-leak")
    body = (
        "import os\n"
        "return any(k.startswith('RR_') for k in os.environ) or "
        "b'do-not-leak' in open('/proc/self/environ', 'rb').read()"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_writes_outside_the_job_folder_fail_and_never_reach_the_host() -> None:
    canary = f"rr-canary-{uuid.uuid4().hex}"
    targets = [f"/usr/{canary}", f"/etc/{canary}", f"/src/{canary}", f"/{canary}"]
    body = (
        "written = []\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        f"open('/tmp/{canary}', 'w').write('private tmp only')\n"
        "return bool(written)"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result
    assert not list(Path("/").glob(f"*/{canary}")) and not Path(f"/{canary}").exists()
    assert not Path(f"/tmp/{canary}").exists()


def test_fork_bomb_is_contained_and_the_slot_recovers() -> None:
    body = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    result = _python(body, Limits(timeout_s=2))
    assert result.verdict in {Verdict.TIME_LIMIT, Verdict.RUNTIME_ERROR}, result
    assert time.monotonic() - started < 15
    after = run_one("python", "x = 1\n", "assert x == 1\n")
    assert after.verdict == Verdict.OK, after


def test_memory_hogs_across_processes_hit_the_group_limit() -> None:
    # Eight children of 64 MiB each: no single process is big, the group is.
    body = (
        "import os\n"
        "children = []\n"
        "for _ in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(64 * 1024 * 1024)\n"
        "        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n"
        "        import time; time.sleep(1)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
        "return True"
    )
    result = _python(body, Limits(timeout_s=10, memory_mb=256))
    assert result.verdict == Verdict.MEMORY_LIMIT, result


def test_disk_fill_is_capped_and_the_host_disk_untouched() -> None:
    free_before = shutil.disk_usage("/").free
    body = (
        "written = 0\n"
        "chunk = b'x' * (1 << 20)\n"
        "for n in range(4096):\n"
        "    with open(f'/job/fill{n}', 'wb') as handle:\n"
        "        handle.write(chunk * 16)\n"
        "    written += 16 << 20\n"
        "return written >= 2 << 30"
    )
    result = _python(body, Limits(timeout_s=10))
    assert result.verdict in {Verdict.RUNTIME_ERROR, Verdict.MEMORY_LIMIT}, result
    # Other work shares this disk; a fill that escaped would take gigabytes.
    assert shutil.disk_usage("/").free > free_before - (512 << 20)


def test_huge_output_is_cut_off() -> None:
    body = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    started = time.monotonic()
    result = _python(body, Limits(timeout_s=10, output_bytes=64 * 1024))
    assert result.verdict == Verdict.OUTPUT_LIMIT, result
    assert len(result.stdout_tail) <= 4000
    assert time.monotonic() - started < 5


def test_daemons_left_behind_are_killed() -> None:
    marker = f"rr-daemon-{uuid.uuid4().hex}"
    body = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', [{marker!r}, '600'])\n"
        "    os._exit(0)\n"
        "import time; time.sleep(0.2)\n"
        "return False"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result
    assert _processes_with(marker) == []


def test_daemons_of_a_cold_sandbox_are_killed_too() -> None:
    require_toolchain("bash")
    marker = f"rr-daemon-{uuid.uuid4().hex}"
    code = (
        f"spawn() {{ setsid bash -c 'exec -a {marker} sleep 600' </dev/null >/dev/null 2>&1 & }}\n"
    )
    result = run_one("bash", code, "spawn\nsleep 0.2\nexit 1\n")
    assert result.verdict != Verdict.OK, result
    time.sleep(0.2)
    assert _processes_with(marker) == []


@pytest.mark.parametrize(
    "kill", ["os.kill(os.getppid(), signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)"]
)
def test_killing_the_harness_or_every_process_is_not_ok(kill: str) -> None:
    body = f"import os, signal\n{kill}\nimport time; time.sleep(0.5)\nreturn True"
    result = _python(body)
    assert result.verdict == Verdict.RUNTIME_ERROR, result
    after = run_one("python", "x = 1\n", "assert x == 1\n")
    assert after.verdict == Verdict.OK, after


def test_cold_sandbox_survives_kill_of_every_process(samples) -> None:
    require_toolchain("bash")
    code = samples["bash"].wrong + "kill -9 1 -1 2>/dev/null\n"
    result = run_one("bash", code, samples["bash"].tests)
    # The candidate's code runs in a shell of its own: it takes the harness down with it.
    assert result.verdict in {Verdict.WRONG_ANSWER, Verdict.RUNTIME_ERROR}, result
    assert run_one("bash", samples["bash"].right, samples["bash"].tests).verdict == Verdict.OK


def test_seccomp_blocks_namespace_and_ptrace_escapes() -> None:
    body = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "CLONE_NEWUSER = 0x10000000\n"
        "escaped = libc.unshare(CLONE_NEWUSER) == 0\n"
        "escaped |= libc.ptrace(16, os.getppid(), 0, 0) == 0  # PTRACE_ATTACH\n"
        "return escaped"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_runs_as_an_unprivileged_user_in_fresh_namespaces() -> None:
    body = (
        "import os, socket\n"
        "interfaces = open('/proc/net/dev').read().split()\n"
        "return os.getuid() == 0 or socket.gethostname() != 'sandbox' or 'eth0:' in interfaces"
    )
    result = _python(body)
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_host_socket_listener_is_unreachable() -> None:
    # Even a port opened just now by this test process is out of reach.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        body = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "return True"
        )
        result = _python(body)
    assert result.verdict == Verdict.RUNTIME_ERROR, result
