"""Per-slot cgroups: one memory+pids group per worker slot, reused across runs.

Creating a cgroup costs ~10 ms, about as much as a whole sandboxed Python run,
so each slot makes its group once and resets its counters between runs.
Supports cgroup v1 (separate memory and pids hierarchies) and v2 (one tree).
"""

import contextlib
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP_PREFIX = "rewardranker-sandbox"


def detect_version() -> int | None:
    """1 or 2 when this process can create sandbox cgroups, else None."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        # v2: usable only if we may make a child group that gets both controllers.
        try:
            probe = SlotCgroup(f"{os.getpid()}-probe", 2)
            probe.remove()
            return 2
        except OSError:
            return None
    v1_dirs = [CGROUP_ROOT / "memory", CGROUP_ROOT / "pids"]
    if all(d.is_dir() and os.access(d, os.W_OK) for d in v1_dirs):
        return 1
    return None


class SlotCgroup:
    """The memory and pids groups of one worker slot."""

    def __init__(self, name: str, version: int) -> None:
        self.version = version
        if version == 1:
            self.memory_dir = CGROUP_ROOT / "memory" / GROUP_PREFIX / name
            self.pids_dir = CGROUP_ROOT / "pids" / GROUP_PREFIX / name
        else:
            base = CGROUP_ROOT / GROUP_PREFIX
            base.mkdir(exist_ok=True)
            # v2 only hands controllers to children that the parent enables.
            (base / "cgroup.subtree_control").write_text("+memory +pids")
            self.memory_dir = self.pids_dir = base / name
        for folder in {self.memory_dir, self.pids_dir}:
            folder.mkdir(parents=True, exist_ok=True)
        for limit_file in (self.memory_dir / "memory.max", self.pids_dir / "pids.max"):
            if version == 2 and not limit_file.exists():
                raise OSError(f"{limit_file} missing: the controller is not delegated here")
        self._memory_limit = -1
        self._pids_limit = -1

    @property
    def procs_files(self) -> list[Path]:
        """Files a process writes its pid to in order to join every group of this slot."""
        return sorted({self.memory_dir / "cgroup.procs", self.pids_dir / "cgroup.procs"})

    def configure(self, memory_bytes: int, max_pids: int) -> None:
        """Set limits (only when they change) and reset the peak and OOM counters."""
        if memory_bytes != self._memory_limit:
            self._set_memory_limit(memory_bytes)
            self._memory_limit = memory_bytes
        if max_pids != self._pids_limit:
            _write(self.pids_dir / "pids.max", str(max_pids))
            self._pids_limit = max_pids
        if self.version == 1:
            _write(self.memory_dir / "memory.max_usage_in_bytes", "0")
        else:
            # memory.peak is reset by writing to it on kernels >= 6.12; older ones keep it.
            with contextlib.suppress(OSError):
                _write(self.memory_dir / "memory.peak", "0")

    def _set_memory_limit(self, memory_bytes: int) -> None:
        if self.version == 2:
            _write(self.memory_dir / "memory.max", str(memory_bytes))
            _write(self.memory_dir / "memory.swap.max", "0", optional=True)
            return
        mem = self.memory_dir / "memory.limit_in_bytes"
        memsw = self.memory_dir / "memory.memsw.limit_in_bytes"
        # memsw must stay >= the memory limit, so the write order depends on the direction.
        try:
            _write(mem, str(memory_bytes))
            _write(memsw, str(memory_bytes), optional=True)
        except OSError:
            _write(memsw, str(memory_bytes), optional=True)
            _write(mem, str(memory_bytes))

    def oom_kills(self) -> int:
        """How many processes the kernel has OOM-killed in this group so far."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.memory_dir / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_memory_kb(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.memory_dir / name).read_text()) // 1024
        except (OSError, ValueError):
            return None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
        return found

    def sweep(self, keep: int | None = None, timeout_s: float = 2.0) -> bool:
        """SIGKILL every process in the slot but `keep`; True once none is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            victims = self.pids() - {keep}
            if not victims:
                return True
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    def remove(self) -> None:
        self.sweep()
        for folder in {self.memory_dir, self.pids_dir}:
            with contextlib.suppress(OSError):
                folder.rmdir()


def remove_stale_groups() -> None:
    """Drop groups left by sandbox processes that died without cleaning up."""
    for hierarchy in (CGROUP_ROOT / "memory", CGROUP_ROOT / "pids", CGROUP_ROOT):
        base = hierarchy / GROUP_PREFIX
        if not base.is_dir():
            continue
        for group in base.iterdir():
            owner = group.name.partition("-")[0]
            if group.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
                with contextlib.suppress(OSError):
                    if not (group / "cgroup.procs").read_text().strip():
                        group.rmdir()


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not optional:
            raise
