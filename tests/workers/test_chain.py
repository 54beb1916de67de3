"""The event chain with real worker processes, one per queue, on the real Redis and
Postgres; the mutation backend and a tiny reward model keep it fast. The fault
tests break something mid-iteration (a worker, Redis, Postgres) and then demand
exactly the expected candidates, executions, scores and labels."""

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.flywheel_cli import wait_for_iteration
from models import (
    Candidate,
    DatasetVersion,
    Execution,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    TrainingRun,
)
from models.enums import IterationStatus, ModelKind, RunKind, RunStatus, Verdict
from models.repository import content_hash, is_collected, problem_progress
from tests.workers.conftest import add_problems, register_reward_model
from workers.iteration import FlywheelParams, open_iteration
from workers.names import QUEUES
from workers.processes import CLI, kill_worker, start_worker, stop_workers
from workers.reconcile import reconcile

REDIS_RESTART = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


@contextmanager
def workers(env: dict[str, str], log_dir: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """One worker process per queue; all stopped at the end, whatever happened."""
    started = {q: start_worker([q], env=env, log_path=log_dir / f"{q}.log") for q in QUEUES}
    try:
        yield started
    finally:
        stop_workers(list(started.values()), timeout_s=10)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def count(session, model, *where) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(model).where(*where))


def assert_exactly_once(store, iteration_id: int, params: FlywheelParams) -> None:
    """The iteration holds what a clean run would: every expected program once,
    one verdict each, one score per judgeable one, and exactly the labels the
    mining rule gives on the stored scores."""
    from pipelines.generation import GenerationConfig, PromptSpec, make_generator
    from pipelines.mining import MiningPolicy, ScoredCandidate, mine_hard_negatives

    store.expire_all()
    iteration = store.get(Iteration, iteration_id)
    problems = store.scalars(
        select(Problem).where(Problem.id.in_(iteration.params["problem_ids"])).order_by(Problem.id)
    ).all()
    generator = make_generator(GenerationConfig(backend="mutation", seed=iteration.number))
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params.candidates)
    # A mutant equal to an earlier program (the warm start's) stays that program.
    earlier = set(
        store.execute(
            select(Candidate.problem_id, Candidate.content_hash).where(
                (Candidate.iteration_id != iteration_id) | Candidate.iteration_id.is_(None)
            )
        ).all()
    )
    expected = {
        (p.id, content_hash(s.code))
        for p, group in zip(problems, samples, strict=True)
        for s in group
    }
    stored = store.execute(
        select(Candidate.problem_id, Candidate.content_hash).where(
            Candidate.iteration_id == iteration_id
        )
    ).all()
    assert len(stored) == len(set(stored)) > 0
    assert set(stored) == expected - earlier

    rows = store.execute(
        select(Candidate.id, Candidate.problem_id, Execution.verdict, Score.score)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(Score, (Score.candidate_id == Candidate.id)
                   & (Score.reward_model_version_id == iteration.reward_model_version_id))
        .where(Candidate.iteration_id == iteration_id)
    ).all()  # fmt: skip
    assert len(rows) == len(stored)  # one verdict per candidate, one score at most
    judgeable = [r for r in rows if r.verdict != Verdict.SANDBOX_ERROR]
    assert all(r.score is not None for r in judgeable)
    assert count(store, Score, Score.candidate_id.in_([r.id for r in rows])) == len(judgeable)
    scored = [
        ScoredCandidate(r.id, r.problem_id, r.verdict == Verdict.OK, r.score) for r in judgeable
    ]
    labels = store.execute(
        select(HardNegativeLabel.candidate_id, HardNegativeLabel.rule).where(
            HardNegativeLabel.iteration_id == iteration_id
        )
    ).all()
    assert sorted(labels) == sorted(mine_hard_negatives(scored, MiningPolicy()))

    # Exactly one retraining asked for, however many labelers and reconciles ran.
    reward_runs = store.scalars(
        select(TrainingRun).where(
            TrainingRun.iteration_id == iteration_id, TrainingRun.kind == RunKind.REWARD
        )
    ).all()
    assert len([r for r in reward_runs if not r.params.get("warm_start")]) == 1


def wait_until_collected(store, iteration_id: int, timeout_s: float = 240) -> None:
    """Drive like `flywheel run` does (reconcile when nothing moves for 5 s) until
    every candidate of the iteration is executed and scored."""
    last, last_change = None, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.expire_all()
            progress = problem_progress(store, store.get(Iteration, iteration_id))
            store.rollback()
            if is_collected(progress) and count(store, TrainingRun) > 0:
                return
            if progress != last:
                last, last_change = progress, time.monotonic()
            elif time.monotonic() - last_change > 5:
                reconcile(store, stall_after=timedelta(0))
                store.commit()
                last_change = time.monotonic()
        except OperationalError:  # the store restarting
            store.rollback()
        if time.monotonic() > deadline:
            raise TimeoutError(f"iteration {iteration_id} not collected: {last}")
        time.sleep(0.5)


def start_iteration(store, tiny_model_dir: Path, params: FlywheelParams, problems: int) -> int:
    problem_ids = add_problems(store, problems)
    register_reward_model(store, tiny_model_dir)  # skip the warm start: faults are the subject
    iteration = open_iteration(store, problem_ids, params)
    store.commit()
    return iteration.id


FAULT_PARAMS = FlywheelParams(backend="mutation", candidates=6, batch_size=1, policy_steps=0)


def test_the_chain_runs_an_iteration_from_warm_start_to_policy_update(
    store, flywheel_env, tmp_path, tiny_model_dir
):
    params = FlywheelParams(
        backend="mutation", candidates=4, batch_size=2, policy_steps=1, max_new_tokens=16
    )
    problem_ids = add_problems(store, 3)
    iteration_id = open_iteration(store, problem_ids, params).id
    store.commit()
    with workers(flywheel_env, tmp_path):
        wait_for_iteration(iteration_id, show=False, timeout_s=240)
    assert_exactly_once(store, iteration_id, params)
    assert store.get(Iteration, iteration_id).status == IterationStatus.DONE
    dataset = store.scalars(select(DatasetVersion)).one()
    assert (dataset.iteration_id, dataset.dvc_tag) == (iteration_id, "iter-1")

    runs = store.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
    assert [(r.kind, r.status, bool(r.params.get("warm_start"))) for r in runs] == [
        (RunKind.REWARD, RunStatus.SUCCEEDED, True),
        (RunKind.REWARD, RunStatus.SUCCEEDED, False),
        (RunKind.POLICY, RunStatus.SUCCEEDED, False),
    ]
    warm = store.get(ModelVersion, runs[0].result_model_version_id)
    assert store.get(Iteration, iteration_id).reward_model_version_id == warm.id
    generators = store.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind == ModelKind.GENERATOR)
        .order_by(ModelVersion.id)
    ).all()
    assert len(generators) == 2 and generators[1].parent_id == generators[0].id
    assert Path(generators[1].path, "config.json").is_file()

    status = subprocess.run(
        [CLI, "status", "--json"], capture_output=True, text=True, check=True,
        env=flywheel_env | _path_env(),
    )  # fmt: skip
    report = json.loads(status.stdout)
    [row] = report["iterations"]
    assert row["number"] == 1 and row["dvc_tag"] == "iter-1"
    assert (
        row["candidates"]
        == row["executions"]
        == count(store, Candidate, Candidate.iteration_id == iteration_id)
    )
    assert row["hard_negatives"] == count(store, HardNegativeLabel)
    assert row["reward_model_version"] == warm.id and row["generator_version"] == generators[0].id


def _path_env() -> dict[str, str]:
    import os

    return {"PATH": os.environ["PATH"]}


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(
    store, flywheel_env, tmp_path, tiny_model_dir
):
    iteration_id = start_iteration(store, tiny_model_dir, FAULT_PARAMS, problems=6)
    with workers(flywheel_env, tmp_path) as started:
        executed = lambda: count(store, Execution, Execution.iteration_id == iteration_id)  # noqa: E731
        wait_until(lambda: executed() >= 1, 120, "no execution within 120 s")
        assert executed() < count(store, Candidate)  # still mid-iteration
        kill_worker(started["execution"])
        started["execution"] = start_worker(
            ["execution"], env=flywheel_env, log_path=tmp_path / "exec2.log"
        )
        wait_until_collected(store, iteration_id)
    assert_exactly_once(store, iteration_id, FAULT_PARAMS)


def test_a_redis_restart_mid_iteration_loses_and_duplicates_nothing(
    store, flywheel_env, tmp_path, tiny_model_dir
):
    iteration_id = start_iteration(store, tiny_model_dir, FAULT_PARAMS, problems=6)
    with workers(flywheel_env, tmp_path):
        wait_until(lambda: count(store, Execution) >= 1, 120, "no execution within 120 s")
        try:
            subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], check=False)
            time.sleep(1)
        finally:
            subprocess.run(REDIS_RESTART, check=True)
        wait_until_collected(store, iteration_id)
    assert_exactly_once(store, iteration_id, FAULT_PARAMS)


def _pg_version() -> str:
    """The installed cluster's major version (15 on Debian 12), as the set-up script finds it."""
    return sorted(Path("/etc/postgresql").iterdir(), key=lambda p: int(p.name))[-1].name


def test_a_postgres_restart_mid_iteration_loses_and_duplicates_nothing(
    store, flywheel_env, tmp_path, tiny_model_dir
):
    iteration_id = start_iteration(store, tiny_model_dir, FAULT_PARAMS, problems=6)
    with workers(flywheel_env, tmp_path):
        wait_until(lambda: count(store, Execution) >= 1, 120, "no execution within 120 s")
        store.close()  # its connection dies with the server
        cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main"]
        restarted = subprocess.run([*cluster, "restart"], check=False)
        if restarted.returncode != 0:  # never leave the shared server down
            subprocess.run([*cluster, "start"], check=False)
        assert restarted.returncode == 0
        wait_until_collected(store, iteration_id)
    assert_exactly_once(store, iteration_id, FAULT_PARAMS)


@pytest.fixture(autouse=True)
def _servers_back_up() -> Iterator[None]:
    """Whatever a test did, Redis is running when it ends."""
    yield
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError:
        subprocess.run(REDIS_RESTART, check=False)
