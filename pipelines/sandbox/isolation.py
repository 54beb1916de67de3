"""How a sandboxed process is started: user switch, cgroup, rlimits, bwrap, seccomp.

Every sandboxed process is launched through one short `sh` trampoline that
joins the slot's cgroups and sets rlimits while still the runner's user, then
drops to the unprivileged `sandbox` user with setpriv and execs bwrap.  Joining
the cgroup before bwrap forks is what puts every descendant in it; doing it in
a Python preexec hook instead would be unsafe next to the batch thread pool.
"""

import functools
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from models.settings import get_settings
from pipelines.sandbox import cgroup, seccomp

SANDBOX_USER = "sandbox"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
TRAMPOLINE_FAILURE = 125
_TRAMPOLINE = (
    'for f in $RR_CGROUP_PROCS; do echo $$ > "$f" '
    '|| {{ echo "rr-trampoline: cannot join $f" >&2; exit 125; }}; done; {ulimits} exec "$@"'
)


def insecure_allowed() -> bool:
    """RR_SANDBOX_INSECURE=1 lets candidates run unisolated where bwrap cannot work."""
    return get_settings().sandbox_insecure


@dataclass(frozen=True)
class Host:
    """What this host can provide, probed once per process."""

    uid: int
    gid: int
    switch_user: bool  # the runner is root and drops to the sandbox user
    bwrap: str | None
    bwrap_error: str
    disable_userns: bool
    seccomp: bool
    cgroup_version: int | None

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None


@dataclass
class Launch:
    """One sandboxed command: what it sees and what it may use."""

    argv: list[str]
    ro_binds: list[tuple[str, str]] = field(default_factory=list)
    rw_binds: list[tuple[str, str]] = field(default_factory=list)
    tmpfs_bytes: int = 64 * 1024 * 1024
    cpu_s: int | None = None
    file_bytes: int = 64 * 1024 * 1024
    open_files: int = 256


@functools.cache
def probe_host() -> Host:
    """Find the sandbox user, a working bwrap, seccomp and cgroups on this host."""
    euid = os.geteuid()
    switch_user = euid == 0
    uid, gid = euid, os.getegid()
    bwrap = shutil.which("bwrap")
    error = ""
    if switch_user:
        try:
            entry = pwd.getpwnam(SANDBOX_USER)
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            # bwrap started as root keeps root's capabilities: never do that.
            bwrap, error = None, f"running as root and no '{SANDBOX_USER}' user exists"
    if bwrap is None and not error:
        error = "bwrap is not installed"
    version = cgroup.detect_version() if euid == 0 else None
    host = Host(uid, gid, switch_user, bwrap, error, False, False, version)
    if bwrap is None:
        return host
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True).stdout
    host = Host(uid, gid, switch_user, bwrap, "", "--disable-userns" in help_text, False, version)
    failure = _try_bwrap(host)
    if failure:
        return Host(uid, gid, switch_user, None, failure, False, False, version)
    with_seccomp = Host(uid, gid, switch_user, bwrap, "", host.disable_userns, True, version)
    if seccomp.supported() and not _try_bwrap(with_seccomp):
        return with_seccomp
    return host


def _try_bwrap(host: Host) -> str:
    """An empty string when a trivial command runs under `host`'s full sandbox."""
    try:
        proc = start(host, Launch(["/bin/true"]), cgroup_procs=[], sandbox_paths=True)
        _, err = proc.communicate(timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap failed to start: {exc}"
    if proc.returncode != 0:
        return f"bwrap exited {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
    return ""


def bwrap_argv(host: Host, launch: Launch, seccomp_fd: int | None) -> list[str]:
    """bwrap's command line: fresh namespaces, read-only /usr and /etc, private tmpfs."""
    assert host.bwrap is not None
    argv = [host.bwrap, "--unshare-user", "--unshare-net", "--unshare-pid", "--unshare-ipc"]
    argv += ["--unshare-uts", "--hostname", "sandbox"]
    if host.disable_userns:
        argv.append("--disable-userns")
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for name, value in ENV.items():
        argv += ["--setenv", name, value]
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for link in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    size = str(launch.tmpfs_bytes)
    for writable in ("/tmp", "/job", "/dev/shm"):
        argv += ["--size", size, "--tmpfs", writable]
    for source, target in launch.ro_binds:
        argv += ["--ro-bind", source, target]
    for source, target in launch.rw_binds:
        argv += ["--bind", source, target]
    # bwrap's own root and /dev tmpfs are writable and unbounded until remounted.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    argv += ["--chdir", "/job"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", *launch.argv]


def start(
    host: Host,
    launch: Launch,
    *,
    cgroup_procs: list[Path],
    sandbox_paths: bool,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    pass_fds: tuple[int, ...] = (),
    cwd: str | None = None,
) -> subprocess.Popen:
    """Start `launch` through the trampoline; under bwrap when `sandbox_paths`."""
    ulimits = f"ulimit -c 0 && ulimit -n {launch.open_files} && "
    ulimits += f"ulimit -f {launch.file_bytes // 512} && "
    if launch.cpu_s is not None:
        ulimits += f"ulimit -t {launch.cpu_s} && "
    argv = ["/bin/sh", "-c", _TRAMPOLINE.format(ulimits=ulimits), "sh"]
    if host.switch_user:
        argv += ["setpriv", f"--reuid={host.uid}", f"--regid={host.gid}", "--clear-groups", "--"]
    seccomp_read = None
    if sandbox_paths and host.seccomp:
        # bwrap reads the whole filter from this pipe; it is a few hundred bytes,
        # far below the pipe buffer, so writing it all up front cannot block.
        seccomp_read, seccomp_write = os.pipe()
        os.write(seccomp_write, _FILTER)
        os.close(seccomp_write)
        pass_fds = (*pass_fds, seccomp_read)
    if sandbox_paths:
        argv += bwrap_argv(host, launch, seccomp_read)
    else:
        argv += launch.argv
    env = dict(ENV, RR_CGROUP_PROCS=" ".join(str(p) for p in cgroup_procs))
    if not sandbox_paths:
        env["HOME"] = env["TMPDIR"] = cwd or "/tmp"
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            env=env,
            cwd=cwd or "/",
            start_new_session=True,
        )
    finally:
        if seccomp_read is not None:
            os.close(seccomp_read)


_FILTER = seccomp.build_filter()
