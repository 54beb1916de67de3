"""Chaos: the distributed flywheel under killed workers, an emptied broker and a
cut or restarted database, against the same work run fault-free.

Everything runs privately on this machine: a Postgres cluster of its own (initdb
on a free port, as the `postgres` user when run as root, so that it can be
restarted), a Redis server of its own (no persistence, so a restart empties it),
a data folder, one `rewardranker worker` per queue, one `rewardranker beat`, and
the driver `rewardranker flywheel run --no-start-workers` with the mutation
backend and the bundled reward model. The same work runs twice, each time on a
fresh database, broker and data folder: fault-free first, then with faults.

Faults, on a schedule from the chaos run's start (--seed draws the order):
- kill: SIGKILL one worker's whole process group every --kill-every seconds,
  the queues taken in shuffled rounds (the training worker first, in the warm
  start) so that all four are hit alike; a fresh worker for that queue is
  started at once, as an orchestrator would.
- broker: SIGKILL Redis and start it again, empty (--broker-restarts).
- db-cut: pg_terminate_backend on every connection to the database (--db-cuts).
- db-restart: `pg_ctl restart`, -m immediate then -m fast (--db-restarts).
The other faults are spread over the fault-free run's duration, halfway between
two kills. With --aim each fault waits, up to half a kill period, for a moment
when it hits work (a message in work or queued; for the training worker, a run
with a checkpoint to resume from).

Recovery, per fault:
- progress: from the fault to the first store poll (once a second) in which any
  counter grew: candidates, executions, scores, hard-negative labels, model and
  dataset versions, evaluation samples, iterations and evaluations done, training
  runs created, claimed or succeeded, a running run's progress.
- lost work: what the fault hit, read from Redis (a killed worker's
  unacknowledged message; everything queued or in work for the broker; what was
  in work for the database), until the workers' task events show each item
  finished again (a training task: taken again). Copies of work that was
  finished before the fault are counted apart: nothing needed redoing.
- for a killed training worker that held a run: the time until the run was
  running again under its next attempt (reclaim latency), and whether that
  attempt resumed from a checkpoint (`training_runs.resumed_from_step`).

After each run the store's invariants are checked (every iteration done with its
DVC tag; every candidate executed exactly once; every judgeable candidate of an
iteration scored by that iteration's reward model; each succeeded run registered
exactly one model of its own and no failed run one; no model folder registered
twice; every registered folder on disk).

    .venv/bin/python bench/chaos.py [--quick] [--seed N] [--kill-every S] [--aim]
        [--broker-restarts N] [--db-cuts N] [--db-restarts N]
        [--faults kill,broker,db-cut,db-restart] [--checkpoint-interval S]

Logs and a dump of each run's rows stay in the folder it prints. The last line is
`RESULT faults=N ... recovery_p50_s=X recovery_max_s=X lost_work_hits=N
lost_work_p50_s=X lost_work_max_s=X reclaim_max_s=X resumed=K/N wall_ratio=X
invariants=pass|fail fault_free_s=X chaos_s=X` (nan: nothing to measure); the exit
status is 1 when an invariant fails or a run does not finish.
"""

import argparse
import ast
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import (  # noqa: E402 (after the path is set)
    Candidate,
    DatasetVersion,
    Evaluation,
    EvaluationSample,
    Execution,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Score,
    TrainingRun,
)
from models.db import make_engine  # noqa: E402
from models.enums import (  # noqa: E402
    EvaluationStatus,
    IterationStatus,
    RunStatus,
    Verdict,
)
from workers.names import QUEUES, RECONCILE, RUN_TRAINING, TRAINING  # noqa: E402
from workers.processes import CLI, kill_worker, start_beat, start_worker, stop_workers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
FAULT_KINDS = ("kill", "broker", "db-cut", "db-restart")
RECOVERY_TARGET_S = 120.0
WALL_RATIO_TARGET = 2.0


# --- the private servers ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """A Postgres cluster of our own, so that it can be restarted: initdb in a
    temporary folder, trust auth, loopback on a free port."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = free_port()
        # initdb refuses to run as root: the cluster then belongs to `postgres`.
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(root, "postgres")
        self._pg("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync")  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\n"
            )
        self._pg("pg_ctl", "-D", self.data, "-l", self.log, "-w", "start")

    def _pg(self, program: str, *args: Any) -> None:
        command = [*self.as_owner, str(PG_BIN / program), *map(str, args)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        )

    def create_database(self, name: str) -> None:
        with self.admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')

    def cut(self, database: str) -> int:
        """Terminate every connection to `database`; returns how many."""
        with self.admin() as admin:
            return len(
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (database,),
                ).fetchall()
            )

    def restart(self, mode: str) -> None:
        self._pg("pg_ctl", "-D", self.data, "-l", self.log, "-m", mode, "-w", "restart")

    def stop(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self._pg("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")


class Broker:
    """A Redis server of our own with no persistence: a restart empties it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.folder),
        ]  # fmt: skip
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while not _accepts(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- one deployment: servers, workers, beat, driver -------------------------------------


@dataclass(frozen=True)
class Work:
    """What each of the two runs does: the driver's sizes, the system's settings
    (RR_ variables), and how long to wait for it."""

    problems: int
    candidates: int
    iterations: int
    eval_problems: int
    settings: dict[str, str]
    timeout_s: float


@dataclass
class Deployment:
    name: str
    cluster: Cluster
    database: str
    broker: Broker
    folder: Path
    env: dict[str, str]
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    beat: subprocess.Popen | None = None
    driver: subprocess.Popen | None = None
    worker_logs: dict[str, Path] = field(default_factory=dict)
    spawned: int = 0  # workers started, for log names

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    def start_worker(self, queue: str) -> None:
        self.spawned += 1
        self.worker_logs[queue] = self.logs / f"worker-{queue}-{self.spawned}.log"
        self.workers[queue] = start_worker([queue], env=self.env, log_path=self.worker_logs[queue])

    def start_driver(self, work: Work) -> None:
        command = [
            CLI, "flywheel", "run", "--backend", "mutation", "--policy-steps", "0",
            "--problems", str(work.problems), "--candidates", str(work.candidates),
            "--iterations", str(work.iterations), "--eval-problems", str(work.eval_problems),
            "--no-start-workers",
        ]  # fmt: skip
        with open(self.logs / "driver.log", "ab") as log:
            self.driver = subprocess.Popen(
                command,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        """Every process this deployment started; the cluster is shared by the runs."""
        for process in (self.driver, self.beat):
            if process is not None and process.poll() is None:
                kill_worker(process)  # its whole group
        stop_workers(list(self.workers.values()), timeout_s=10)
        self.broker.kill()


@contextmanager
def deployment(name: str, cluster: Cluster, base: Path, work: Work) -> Iterator[Deployment]:
    """Fresh database, broker and data folder; the schema, HumanEval, a worker per
    queue and the beat, all ready. Everything it started is stopped on the way out."""
    folder = base / name
    (folder / "logs").mkdir(parents=True)
    database = f"rr_chaos_{name.replace('-', '_')}"
    cluster.create_database(database)
    broker = Broker(folder)
    env = {
        "RR_DATABASE_URL": cluster.url(database),
        "RR_BROKER_URL": broker.url,
        "RR_DATA_DIR": str(folder / "data"),
        # Four torch processes on two cores: one thread each (as `flywheel run` does).
        "OMP_NUM_THREADS": "1",
        # The workers and the driver run this checkout's code.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **work.settings,
    }
    run = Deployment(name, cluster, database, broker, folder, env)
    try:
        for command in (["db", "upgrade"], ["problems", "import", "humaneval"]):
            subprocess.run(
                [CLI, *command], env={**os.environ, **env}, check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        for queue in QUEUES:
            run.start_worker(queue)
        run.beat = start_beat(env=env, log_path=run.logs / "beat.log")
        wait_ready(run)
        yield run
    finally:
        run.stop()
        # The store as the run left it, also when it was interrupted: the evidence.
        engine = make_engine(env["RR_DATABASE_URL"])
        with suppress(SQLAlchemyError):
            dump_store(engine, run.logs / "store.json")
        engine.dispose()


def wait_ready(run: Deployment, timeout_s: float = 180) -> None:
    """Until every worker says it is ready (they import torch: not part of the run)."""
    deadline = time.monotonic() + timeout_s
    for queue, process in run.workers.items():
        log = run.worker_logs[queue]
        while "ready." not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {queue} did not start: see {log}")
            time.sleep(0.5)


# --- the store: progress and run rows ---------------------------------------------------


def read_store(engine: Engine) -> tuple[dict[str, float], list[Any]]:
    """The progress counters and every training run's row, in one transaction."""
    count = lambda model, *where: (  # noqa: E731
        select(func.count()).select_from(model).where(*where).scalar_subquery()
    )
    names = {
        "candidates": count(Candidate),
        "executions": count(Execution),
        "scores": count(Score),
        "hard_negatives": count(HardNegativeLabel),
        "model_versions": count(ModelVersion),
        "dataset_versions": count(DatasetVersion),
        "evaluation_samples": count(EvaluationSample),
        "iterations_done": count(Iteration, Iteration.status == IterationStatus.DONE),
        "evaluations_done": count(Evaluation, Evaluation.status == EvaluationStatus.DONE),
    }
    with engine.connect() as connection:
        row = connection.execute(select(*names.values())).one()
        runs = connection.execute(
            select(
                TrainingRun.id, TrainingRun.status, TrainingRun.attempt, TrainingRun.progress,
                TrainingRun.resumed_from_step, TrainingRun.owner_pid,
            ).order_by(TrainingRun.id)
        ).all()  # fmt: skip
    counters = dict(zip(names, row, strict=True))
    counters["runs"] = len(runs)
    counters["runs_claimed"] = sum(r.attempt for r in runs)
    counters["runs_succeeded"] = sum(r.status == RunStatus.SUCCEEDED for r in runs)
    for r in runs:
        if r.status == RunStatus.RUNNING:
            counters[f"run{r.id}_progress"] = r.progress
    return counters, runs


def grew(now: dict[str, float], before: dict[str, float]) -> list[str]:
    return [key for key, value in now.items() if value > before.get(key, 0.0)]


# --- the broker: lost messages and finished tasks ---------------------------------------


def work_items(task: str, argsrepr: str) -> list[tuple]:
    """The work a task message stands for, one item per problem: a batch of problems
    lost whole may come back regrouped (reconcile sends what is missing)."""
    try:
        args = ast.literal_eval(argsrepr)
    except (ValueError, SyntaxError):
        return [(task, argsrepr)]
    *head, last = args or [None]
    if isinstance(last, list):
        return [(task, *head, each) for each in last]
    return [(task, *args)]


def unacked(client: redis.Redis) -> dict[str, list[tuple]]:
    """Delivery tag -> work of every message delivered and not acknowledged: in work
    on a live worker, or lost with a dead one (Redis would hand it out again only
    after the visibility timeout)."""
    return {
        tag.decode(): _work(json.loads(value)[0])
        for tag, value in client.hgetall("unacked").items()
    }


def queued(client: redis.Redis) -> list[tuple]:
    """The work of every message waiting in a queue."""
    items = []
    for key in client.scan_iter():
        if client.type(key) == b"list":
            items += [item for raw in client.lrange(key, 0, -1) for item in _work(json.loads(raw))]
    return items


def _work(message: dict[str, Any]) -> list[tuple]:
    headers = message.get("headers") or {}
    task = headers.get("task", "?")
    # The scheduled reconcile is no stage's work: the next one comes anyway.
    return [] if task == RECONCILE else work_items(task, headers.get("argsrepr", "()"))


class TaskLog:
    """When each item of work was finished, from the workers' task events (they send
    them on a real broker): a thread listening on the broker, reconnecting after a
    restart. A training task counts once a worker takes it: from there its run row
    carries the training (and the reclaim latency measures it)."""

    def __init__(self, broker_url: str):
        self.app = Celery(broker=broker_url)
        self.received: dict[str, list[tuple]] = {}  # task id -> its work
        self.finished: dict[tuple, list[float]] = {}  # work -> epoch seconds it succeeded
        self.receiver = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._listen, name="task-events", daemon=True)
        self.thread.start()

    def done_after(self, item: tuple, since: float) -> float | None:
        """Seconds from `since` (epoch) until `item` was next finished: 0 when it
        was finished in the 2 s before (a race with the fault), None if never."""
        times = [t for t in self.finished.get(item, []) if t >= since - 2.0]
        return max(0.0, min(times) - since) if times else None

    def finished_before(self, item: tuple, moment: float) -> bool:
        return any(t < moment for t in self.finished.get(item, []))

    def _listen(self) -> None:
        handlers = {"task-received": self._on_received, "task-succeeded": self._on_succeeded}
        while not self.stopping.is_set():
            try:
                with self.app.connection() as connection:
                    self.receiver = self.app.events.Receiver(connection, handlers=handlers)
                    self.receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:  # the broker restarting: listen again
                time.sleep(0.5)

    def _on_received(self, event: dict[str, Any]) -> None:
        if event.get("name") == RECONCILE:
            return
        self.received[event["uuid"]] = work_items(event["name"], event.get("args", "()"))
        if event["name"] == RUN_TRAINING:
            self._on_succeeded(event)

    def _on_succeeded(self, event: dict[str, Any]) -> None:
        for item in self.received.get(event["uuid"], []):
            self.finished.setdefault(item, []).append(event["timestamp"])

    def stop(self) -> None:
        self.stopping.set()
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=5)


# --- faults -----------------------------------------------------------------------------


@dataclass
class Fault:
    at: float  # seconds since the driver started
    kind: str  # kill, broker, db-cut, db-restart
    detail: str = ""
    queue: str | None = None
    baseline: dict[str, float] | None = None  # the counters right after it
    recovered_after: float | None = None
    progress: list[str] = field(default_factory=list)  # what grew first
    run_id: int | None = None  # the training run its worker held
    attempt: int | None = None
    checkpoint: int | None = None  # the newest complete checkpoint at the kill
    running_again_after: float | None = None
    resumed_from_step: int | None = None
    run_outcome: str = ""
    wall: float = 0.0  # epoch seconds, as the task events have it
    lost: list[tuple] = field(default_factory=list)  # work queued or in work when it struck
    redone_after: dict[tuple, float | None] = field(default_factory=dict)
    duplicates: int = 0  # copies of work finished before it struck

    @property
    def work_recovery(self) -> float | None:
        """When the last of the work it hit was finished; None if some never was."""
        if not self.lost or None in self.redone_after.values():
            return None
        return max(self.redone_after.values())

    @property
    def label(self) -> str:
        return f"kill:{self.queue}" if self.kind == "kill" else self.kind


def plan(args: argparse.Namespace, anchor_s: float, horizon_s: float) -> list[tuple[float, str]]:
    """(second, fault) pairs: a kill every --kill-every s up to `horizon_s`, the
    queues in shuffled rounds, the training worker first; the other faults spread
    over the fault-free run's `anchor_s`, each halfway between two kills, in a
    shuffled order."""
    rng = random.Random(args.seed)
    period = args.kill_every
    events: list[tuple[float, str]] = []
    if "kill" in args.faults:
        order: list[str] = []
        for k in range(1, int(horizon_s // period) + 1):
            if not order:
                order = rng.sample(QUEUES, len(QUEUES))
                if k == 1:  # the first kill hits the warm-start training, the first minute's work
                    order.remove(TRAINING)
                    order.append(TRAINING)
            events.append((k * period, f"kill:{order.pop()}"))
    others = [kind for kind, n in args.counts.items() if kind in args.faults for _ in range(n)]
    rng.shuffle(others)
    taken: set[int] = set()
    for i, kind in enumerate(others):
        slot = max(0, round(anchor_s * (i + 1) / (len(others) + 1) / period - 0.5))
        while slot in taken:
            slot += 1
        taken.add(slot)
        events.append(((slot + 0.5) * period, kind))
    return sorted(events)


class Chaos:
    """Injects the planned faults into a deployment and measures recovery."""

    def __init__(
        self, run: Deployment, engine: Engine, events: list[tuple[float, str]], aim_s: float
    ):
        self.run = run
        self.engine = engine
        self.events = list(events)
        self.faults: list[Fault] = []
        self.db_restarts = 0
        self.broker = redis.Redis.from_url(run.broker.url, socket_timeout=5)
        self.attributed: set[str] = set()  # delivery tags already lost to a kill
        self.tasks = TaskLog(run.broker.url)
        self.aim_s = aim_s

    def pending(self, now: float) -> bool:
        return bool(self.events) and self.events[0][0] <= now

    def due(self, now: float, runs: list[Any]) -> None:
        """Inject the faults that are due; with `aim_s`, each waits up to that long
        for a moment when it hits work (`follow` asks again every 50 ms)."""
        while self.pending(now):
            planned, name = self.events[0]
            aimed = self.aim_s > 0 and self._hits_work(name, runs)
            if self.aim_s > 0 and not aimed and now - planned < self.aim_s:
                return
            self.events.pop(0)
            fault = Fault(at=now, kind=name.split(":")[0], queue=name.partition(":")[2] or None)
            fault.wall = time.time()
            self.inject(fault)
            if self.aim_s > 0:
                fault.detail += "" if aimed else " (no aim found)"
            try:
                fault.baseline = read_store(self.engine)[0]
            except SQLAlchemyError:  # a restart: the first reading after it is the baseline
                fault.baseline = None
            self.faults.append(fault)
            print(f"  t={fault.at:6.1f}s {fault.label} {fault.detail}", flush=True)

    def inject(self, fault: Fault) -> None:
        run = self.run
        if fault.kind == "kill":
            process = run.workers[fault.queue]
            if fault.queue == TRAINING:
                self._note_held_run(fault, process.pid)
            kill_worker(process)
            # What the dead worker held stays unacknowledged: its queue's, not yet seen.
            held = {tag: work for tag, work in unacked(self.broker).items()
                    if tag not in self.attributed and work and work[0][0].startswith(f"{fault.queue}.")}  # fmt: skip
            self.attributed |= set(held)
            fault.lost = [item for work in held.values() for item in work]
            run.start_worker(fault.queue)
            fault.detail = f"pid {process.pid}" + (
                f", held run {fault.run_id} attempt {fault.attempt} (checkpoint step "
                f"{fault.checkpoint})" if fault.run_id else ""
            )  # fmt: skip
        elif fault.kind == "broker":
            fault.lost = queued(self.broker) + self._in_work()
            run.broker.restart_empty()
            fault.detail = f"redis on port {run.broker.port} restarted empty"
        elif fault.kind == "db-cut":
            fault.lost = self._in_work()
            fault.detail = f"{run.cluster.cut(run.database)} connections terminated"
        elif fault.kind == "db-restart":
            mode = ("immediate", "fast")[self.db_restarts % 2]
            self.db_restarts += 1
            fault.lost = self._in_work()
            started = time.monotonic()
            run.cluster.restart(mode)
            fault.detail = f"pg_ctl restart -m {mode} ({time.monotonic() - started:.1f}s)"

    def _hits_work(self, name: str, runs: list[Any]) -> bool:
        """Would the fault hit work now? A kill: its worker holds a message (the
        training worker: a running run with a checkpoint); the broker: a message is
        queued or in work; the database: a message is in work or a run is running."""
        kind, _, queue = name.partition(":")
        training = any(r.status == RunStatus.RUNNING for r in runs)
        if name == f"kill:{TRAINING}":  # best when it has a checkpoint to resume from
            return any(
                r.status == RunStatus.RUNNING and self._checkpoint(r.id) is not None for r in runs
            )
        if kind == "kill":
            held = [item[0] for item in self._in_work()]
            return any(t.startswith(f"{queue}.") for t in held) or (queue == TRAINING and training)
        if kind == "broker":
            return bool(self._in_work() or queued(self.broker))
        return bool(self._in_work()) or training

    def _in_work(self) -> list[tuple]:
        """The work live workers hold unacknowledged (not the dead ones' leftovers)."""
        held = unacked(self.broker)
        return [item for tag, work in held.items() if tag not in self.attributed for item in work]

    def settle(self) -> None:
        """After the run: when was each fault's lost work finished again?"""
        self.tasks.stop()
        for fault in self.faults:
            # A copy of work finished before the fault (reconcile re-sends what is in
            # flight once a stage looks stalled) needed no redoing.
            lost = [i for i in fault.lost if not self.tasks.finished_before(i, fault.wall - 2.0)]
            fault.duplicates, fault.lost = len(fault.lost) - len(lost), lost
            fault.redone_after = {
                item: self.tasks.done_after(item, fault.wall) for item in fault.lost
            }

    def _note_held_run(self, fault: Fault, group: int) -> None:
        """The running training run owned by a process of the worker's group, and its
        newest complete checkpoint."""
        try:
            runs = read_store(self.engine)[1]
        except SQLAlchemyError:
            return
        for r in runs:
            if r.status == RunStatus.RUNNING and r.owner_pid and _group_of(r.owner_pid) == group:
                fault.run_id, fault.attempt = r.id, r.attempt
                fault.checkpoint = self._checkpoint(r.id)

    def _checkpoint(self, run_id: int) -> int | None:
        """The step of the run's newest complete checkpoint (its folder is
        runs/run-<id>-<created>/checkpoints/checkpoint-<step> with a `complete` marker)."""
        runs = Path(self.run.env["RR_DATA_DIR"]) / "runs"
        return max(
            (int(marker.parent.name.removeprefix("checkpoint-"))
             for marker in runs.glob(f"run-{run_id}-*/checkpoints/checkpoint-*/complete")),
            default=None,
        )  # fmt: skip

    def observe(self, now: float, counters: dict[str, float], runs: list[Any]) -> None:
        """Recovery of every fault still waiting for it, and the killed runs' retries."""
        by_id = {r.id: r for r in runs}
        for fault in self.faults:
            if fault.baseline is None:
                fault.baseline = counters
                continue
            if fault.recovered_after is None and (progress := grew(counters, fault.baseline)):
                fault.recovered_after = now - fault.at
                fault.progress = progress
            if fault.run_id is None or fault.run_outcome:
                continue
            r = by_id[fault.run_id]
            retry = r.attempt == fault.attempt + 1
            if retry and r.status in (RunStatus.RUNNING, RunStatus.SUCCEEDED):
                if fault.running_again_after is None:
                    fault.running_again_after = now - fault.at
                if r.resumed_from_step is not None:
                    fault.resumed_from_step = r.resumed_from_step
            if r.attempt > fault.attempt + 1 or r.status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
                fault.run_outcome = f"{r.status.value} at attempt {r.attempt}"


def _group_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


# --- one run ------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    wall_s: float
    finished: bool
    driver_exits: list[int]
    faults: list[Fault]
    checks: list[tuple[str, bool, str]]


def follow(run: Deployment, work: Work, chaos: Chaos | None) -> tuple[float, bool, list[int]]:
    """Start the driver and poll the store once a second until it finishes (a driver
    that exits with an error is started again, up to 3 times, as an orchestrator
    would); inject the planned faults on the way. Returns the wall time, whether
    the run finished, and the driver's exit codes."""
    engine = make_engine(run.env["RR_DATABASE_URL"])
    exits: list[int] = []
    started = time.monotonic()
    run.start_driver(work)
    try:
        while True:
            now = time.monotonic() - started
            code = run.driver.poll()
            if code is not None:
                exits.append(code)
                if code == 0 or len(exits) > 3:
                    return now, code == 0, exits
                print(f"  t={now:6.1f}s driver exited {code}: started again", flush=True)
                run.start_driver(work)
            if now > work.timeout_s:
                return now, False, exits
            try:
                counters, runs = read_store(engine)
            except SQLAlchemyError:
                counters, runs = None, []
            if chaos is not None and counters is not None:
                chaos.observe(now, counters, runs)
            next_poll = started + now + 1.0
            while (left := next_poll - time.monotonic()) > 0:
                if chaos is not None and chaos.pending(time.monotonic() - started):
                    chaos.due(time.monotonic() - started, runs)
                    time.sleep(min(left, 0.05))
                else:
                    time.sleep(left)
    finally:
        engine.dispose()


def run_once(
    name: str,
    cluster: Cluster,
    base: Path,
    work: Work,
    events: list[tuple[float, str]] | None = None,
    aim_s: float = 0.0,
) -> Outcome:
    print(f"== {name}: setting up", flush=True)
    with deployment(name, cluster, base, work) as run:
        print(f"== {name}: driver started ({'faults on' if events else 'no faults'})", flush=True)
        engine = make_engine(run.env["RR_DATABASE_URL"])
        chaos = Chaos(run, engine, events, aim_s) if events else None
        try:
            wall_s, finished, exits = follow(run, work, chaos)
        finally:
            if chaos is not None:
                chaos.settle()
            engine.dispose()
    engine = make_engine(run.env["RR_DATABASE_URL"])  # the workers are stopped now
    try:
        checks = invariants(engine, work.iterations)
    finally:
        engine.dispose()
    state = "finished" if finished else f"did NOT finish (timeout {work.timeout_s:.0f}s)"
    print(f"== {name}: {state} in {wall_s:.1f}s, driver exit codes {exits}", flush=True)
    return Outcome(name, wall_s, finished, exits, chaos.faults if chaos else [], checks)


# --- invariants -----------------------------------------------------------------------------


def invariants(engine: Engine, iterations: int) -> list[tuple[str, bool, str]]:
    """(name, holds, evidence) for each invariant of a finished run."""
    with engine.connect() as c:
        rows = c.execute(
            select(Iteration.number, Iteration.status, DatasetVersion.dvc_tag)
            .outerjoin(DatasetVersion, DatasetVersion.iteration_id == Iteration.id)
            .order_by(Iteration.number)
        ).all()
        not_done = [(r.number, r.status.value, r.dvc_tag) for r in rows
                    if r.status != IterationStatus.DONE or not r.dvc_tag]  # fmt: skip
        unexecuted = c.scalars(
            select(Candidate.id).outerjoin(Execution).where(Execution.id.is_(None))
        ).all()
        twice = c.scalars(
            select(Execution.candidate_id).group_by(Execution.candidate_id).having(func.count() > 1)
        ).all()
        unscored = c.execute(
            select(Candidate.id, Iteration.number)
            .join(Iteration, Iteration.id == Candidate.iteration_id)
            .join(Execution, Execution.candidate_id == Candidate.id)
            .outerjoin(Score, (Score.candidate_id == Candidate.id)
                       & (Score.reward_model_version_id == Iteration.reward_model_version_id))
            .where(Execution.verdict != Verdict.SANDBOX_ERROR, Score.id.is_(None))
        ).all()  # fmt: skip
        runs = c.execute(
            select(TrainingRun.id, TrainingRun.status, TrainingRun.result_model_version_id)
        ).all()
        paths = c.scalars(select(ModelVersion.path).where(ModelVersion.path.is_not(None))).all()
    succeeded = [r for r in runs if r.status == RunStatus.SUCCEEDED]
    results = [r.result_model_version_id for r in succeeded]
    bad_runs = [
        (r.id, r.status.value, r.result_model_version_id)
        for r in runs
        if (r.status == RunStatus.SUCCEEDED) != (r.result_model_version_id is not None)
        or r.status in (RunStatus.QUEUED, RunStatus.RUNNING)
    ]
    repeated = sorted(p for p, n in Counter(paths).items() if n > 1)
    missing = [p for p in paths if not Path(p).is_dir()]
    return [
        (f"all {iterations} iterations DONE with a DVC tag",
         len(rows) == iterations and not not_done, f"{len(rows)} iterations; not done: {not_done}"),
        ("every candidate executed exactly once", not unexecuted and not twice,
         f"unexecuted {unexecuted[:10]} ({len(unexecuted)}), twice {twice[:10]}"),
        ("every judgeable candidate scored by its iteration's reward model", not unscored,
         f"unscored (candidate, iteration) {unscored[:10]} ({len(unscored)})"),
        ("each succeeded run registered one model, distinct; no failed or active run one",
         not bad_runs and len(set(results)) == len(results),
         f"{len(succeeded)} succeeded of {len(runs)}; bad {bad_runs}; results {results}"),
        ("no model folder registered twice", not repeated, f"repeated {repeated}"),
        ("every registered model folder exists", not missing, f"missing {missing}"),
    ]  # fmt: skip


def dump_store(engine: Engine, path: Path) -> None:
    """The run rows, iterations and model versions, for the record."""
    tables = {"training_runs": TrainingRun, "iterations": Iteration, "model_versions": ModelVersion,
              "dataset_versions": DatasetVersion, "evaluations": Evaluation}  # fmt: skip
    with engine.connect() as c:
        dump = {
            name: [dict(row._mapping) for row in c.execute(select(model.__table__))]
            for name, model in tables.items()
        }
    path.write_text(json.dumps(dump, indent=1, default=str))


# --- the report -------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def highest(values: list[float]) -> float:
    return max(values, default=float("nan"))


def seconds(values: list[float]) -> str:
    if not values:
        return "p50 -, max -"
    return f"p50 {median(values):.1f}s, max {max(values):.1f}s"


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def report(clean: Outcome, chaos: Outcome, args: argparse.Namespace) -> bool:
    """Print the figures beside the targets and the RESULT line; returns whether both
    runs finished and every invariant held in both."""
    faults = chaos.faults
    print("\n== faults (t: seconds since the chaos run's driver started)")
    for f in faults:
        print_fault(f)
    kinds = Counter(f.label for f in faults)
    print("\n== recovery (p50, max)")
    print("  progress: the fault -> the next poll (1 s) in which any store counter grew")
    print("  lost work: the fault -> the last task it hit (queued, or in work unacknowledged)")
    print("             finished again (a training task: taken again), by the workers' task")
    print("             events; copies of work finished before the fault are left out")
    for label in [None, *sorted(kinds)]:
        mine = [f for f in faults if label is None or f.label == label]
        hit = [f for f in mine if f.lost]
        print(f"  {label or 'all':<16} n={len(mine):<3} progress {seconds(_progress(mine))}; "
              f"lost work {seconds(_redone(mine))} ({len(hit)} hit work, "
              f"{sum(f.work_recovery is None for f in hit)} not all seen finished again)")  # fmt: skip
    held = [f for f in faults if f.run_id is not None]
    reclaims = [f.running_again_after for f in held if f.running_again_after is not None]
    resumed = [f for f in held if f.resumed_from_step is not None]
    print(f"  training kills that held a run: {len(held)}; running again: {seconds(reclaims)}; "
          f"resumed from a checkpoint {len(resumed)} of {len(held)} "
          f"({sum(f.checkpoint is not None for f in held)} had one at the kill)")  # fmt: skip
    ratio = chaos.wall_s / clean.wall_s
    print("\n== wall time (driver start -> exit)")
    print(f"  fault-free {clean.wall_s:.1f}s, chaos {chaos.wall_s:.1f}s, ratio {ratio:.2f}")
    holds = print_invariants(clean) & print_invariants(chaos)
    worst = max([*_progress(faults), *_redone(faults), *reclaims], default=0.0)
    print("\n== targets")
    print(f"  every invariant holds under one SIGKILL per {args.kill_every:g}s over all four "
          f"queues: {met(holds)}")  # fmt: skip
    print(f"  recovery from any single fault <= {RECOVERY_TARGET_S:.0f}s: "
          f"{met(worst <= RECOVERY_TARGET_S and chaos.finished)} (max {worst:.1f}s: progress, "
          f"lost work or reclaim)")  # fmt: skip
    print(f"  chaos wall time <= {WALL_RATIO_TARGET:g}x fault-free: "
          f"{met(ratio <= WALL_RATIO_TARGET)} ({ratio:.3f}x)")  # fmt: skip
    counts = " ".join(
        f"{k.replace('-', '_').replace(':', '_')}={v}" for k, v in sorted(kinds.items())
    )
    print(
        f"RESULT faults={len(faults)} {counts} recovery_p50_s={median(_progress(faults)):.1f} "
        f"recovery_max_s={highest(_progress(faults)):.1f} "
        f"lost_work_hits={sum(bool(f.lost) for f in faults)} "
        f"lost_work_p50_s={median(_redone(faults)):.1f} lost_work_max_s={highest(_redone(faults)):.1f} "
        f"reclaim_max_s={highest(reclaims):.1f} resumed={len(resumed)}/{len(held)} "
        f"wall_ratio={ratio:.2f} invariants={'pass' if holds else 'fail'} "
        f"fault_free_s={clean.wall_s:.1f} chaos_s={chaos.wall_s:.1f}"
    )
    return holds


def _progress(faults: list[Fault]) -> list[float]:
    return [f.recovered_after for f in faults if f.recovered_after is not None]


def _redone(faults: list[Fault]) -> list[float]:
    return [f.work_recovery for f in faults if f.work_recovery is not None]


def print_fault(f: Fault) -> None:
    """One line per fault: what it hit, and when the store moved again."""
    anyone = f"{f.recovered_after:.0f}s" if f.recovered_after is not None else "never"
    line = f"  t={f.at:6.1f}s {f.label:<16} progress after {anyone} ({', '.join(f.progress[:3])})"
    if f.duplicates:
        line += f"; hit {f.duplicates} copies of work already done"
    if f.lost:
        redone = [v for v in f.redone_after.values() if v is not None]
        line += (f"; hit {len(f.lost)} tasks' work, finished again after "
                 f"{max(redone, default=0):.0f}s" if len(redone) == len(f.lost) else
                 f"; hit {len(f.lost)} tasks' work, {len(f.lost) - len(redone)} never seen "
                 f"finished again: {[i for i, v in f.redone_after.items() if v is None][:4]}")  # fmt: skip
    if f.run_id is not None:
        again = f"{f.running_again_after:.0f}s" if f.running_again_after is not None else "never"
        resumed = (f"resumed from step {f.resumed_from_step}" if f.resumed_from_step is not None
                   else "started over")  # fmt: skip
        line += (f"; run {f.run_id} running again after {again}, {resumed} (checkpoint at the "
                 f"kill: {f.checkpoint}); {f.run_outcome or 'still open'}")  # fmt: skip
    print(line)


def print_invariants(outcome: Outcome) -> bool:
    print(f"\n== invariants, {outcome.name}")
    print(f"  [{'PASS' if outcome.finished else 'FAIL'}] the run finished "
          f"(driver exit codes {outcome.driver_exits})")  # fmt: skip
    for name, ok, evidence in outcome.checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + ("" if ok else f": {evidence}"))
    return outcome.finished and all(ok for _, ok, _ in outcome.checks)


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="6 problems x 4 candidates, one iteration")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="draws the kill order")
    parser.add_argument("--kill-every", type=float, default=25.0, metavar="S",
                        help="SIGKILL one worker's process group every S seconds")  # fmt: skip
    parser.add_argument("--broker-restarts", type=int, default=1, metavar="N")
    parser.add_argument("--db-cuts", type=int, default=1, metavar="N")
    parser.add_argument("--db-restarts", type=int, default=1, metavar="N")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"kinds to inject, of {','.join(FAULT_KINDS)}")  # fmt: skip
    parser.add_argument("--aim", action="store_true",
                        help="each fault waits (up to half a kill period) until it hits work")  # fmt: skip
    parser.add_argument("--checkpoint-interval", type=float, metavar="S",
                        help="RR_CHECKPOINT_INTERVAL of both runs (default: the system's)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=2400.0, metavar="S",
                        help="give up on a run after S seconds")  # fmt: skip
    args = parser.parse_args()
    args.faults = set(args.faults.split(","))
    if unknown := args.faults - set(FAULT_KINDS):
        parser.error(f"unknown fault kinds {sorted(unknown)}")
    args.counts = {"broker": args.broker_restarts, "db-cut": args.db_cuts,
                   "db-restart": args.db_restarts}  # fmt: skip
    return args


def main() -> int:
    args = parse_args()
    sizes = (6, 4, 1) if args.quick else (12, 6, 2)  # problems, candidates, iterations
    settings = {}
    if args.checkpoint_interval is not None:
        settings["RR_CHECKPOINT_INTERVAL"] = f"{args.checkpoint_interval:g}"
    work = Work(*sizes, eval_problems=4, settings=settings, timeout_s=args.timeout)
    for key in [k for k in os.environ if k.startswith("RR_")]:
        del os.environ[key]  # the deployments are configured by this script alone
    # A SIGTERM unwinds like Ctrl-C: every process started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix=f"rr-chaos-{datetime.now(UTC):%Y%m%d-%H%M%S}-"))
    base.chmod(0o755)  # the cluster's owner must reach its folder
    (base / "pg").mkdir()
    print(f"folder {base}; {work}; load average {os.getloadavg()}", flush=True)
    cluster = None
    try:
        cluster = Cluster(base / "pg")
        clean = run_once("fault-free", cluster, base, work)
        events = plan(args, anchor_s=clean.wall_s, horizon_s=args.timeout)
        aim_s = args.kill_every / 2 if args.aim else 0.0
        chaos = run_once("chaos", cluster, base, work, events, aim_s)
    finally:
        if cluster is not None:
            cluster.stop()
        with suppress(OSError):
            shutil.copy(base / "pg" / "postgres.log", base)
        for name in ("pg", "fault-free/data", "chaos/data"):  # the logs stay
            shutil.rmtree(base / name, ignore_errors=True)
    ok = report(clean, chaos, args)
    print(f"logs and store dumps in {base}; load average {os.getloadavg()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
