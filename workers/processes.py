"""Start and stop real worker processes (`rewardranker worker`), for the main job,
the tests and the benchmark. Each is its own process group, so stopping it
also stops its pool children."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

CLI = str(Path(sys.executable).with_name("rewardranker"))


def start_worker(
    queues: Sequence[str],
    *,
    concurrency: int = 1,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen:
    """A `rewardranker worker` process consuming `queues`, logging to `log_path`."""
    command = [CLI, "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency)]
    return _start(command, env, log_path)


def _start(
    command: list[str], env: Mapping[str, str] | None, log_path: Path | None
) -> subprocess.Popen:
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path:
            log.close()


def start_beat(
    *, env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen:
    """A `rewardranker beat` process: the scheduled reconcile."""
    return _start([CLI, "beat"], env, log_path)


def stop_workers(processes: Sequence[subprocess.Popen], *, timeout_s: float = 20.0) -> None:
    """Warm shutdown of all at once (SIGTERM: each finishes its current task and
    takes no new one), then SIGKILL whatever is still running after `timeout_s`.
    All at once, so that the chain stops everywhere instead of draining into the
    workers stopped last."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        # To the main process only: it waits for its pool to finish the current
        # task; signalling the group would kill that task midway.
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_worker(process)


def kill_worker(process: subprocess.Popen) -> None:
    """SIGKILL the worker and its pool children at once, as a crashed machine would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
