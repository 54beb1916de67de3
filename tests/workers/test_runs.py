"""The training-run lifecycle under faults, with real worker processes, the real
Postgres and Redis: a run whose worker dies is reclaimed (at once by a worker
starting on its host, or by the scheduled reconcile once its heartbeat is
stale), exactly once, and its retry resumes from the run's checkpoint."""

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, text

from models import ModelVersion, TrainingRun, db
from models.base import utcnow
from models.db import session_scope, write_with_retry
from models.enums import ModelKind, RunKind, RunStatus
from tests.workers.conftest import count, queue_length
from tests.workers.test_tasks import add_pair_problems
from workers import runs
from workers.processes import kill_worker, start_beat, start_worker, stop_workers
from workers.runs import enqueue_training

SLOW_REWARD = {"epochs": 1500}  # two pairs, one step an epoch: seconds of training


def wait_for(store, read: Callable[[TrainingRun], bool], run_id: int, timeout_s: float) -> float:
    """Seconds until `read(run)` holds; fails after `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        store.expire_all()
        run = store.get(TrainingRun, run_id)
        store.rollback()
        if read(run):
            return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError(f"training run {run_id}: {store.get(TrainingRun, run_id).__dict__}")


def checkpointed(run: TrainingRun) -> bool:
    from workers.training import run_folder

    folder = run_folder(run) / "checkpoints"
    return run.progress > 0.2 and any(
        (p / "complete").is_file() for p in folder.glob("checkpoint-*")
    )


def start_slow_reward_run(store, flywheel_env) -> tuple[int, dict]:
    """A queued reward run of many short steps, checkpointed every 0.2 s."""
    add_pair_problems(store)
    run, _ = enqueue_training(store, RunKind.REWARD, params=SLOW_REWARD)
    store.commit()
    return run.id, {**flywheel_env, "RR_CHECKPOINT_INTERVAL": "0.2"}


def assert_resumed_and_registered_once(store, run_id: int) -> None:
    wait_for(store, lambda r: r.status == RunStatus.SUCCEEDED, run_id, timeout_s=600)
    run = store.get(TrainingRun, run_id)
    # The retry went on from the checkpoint: the step counter continued.
    assert run.attempt == 2 and run.resumed_from_step and run.resumed_from_step > 0
    version = store.scalars(select(ModelVersion).where(ModelVersion.kind == ModelKind.REWARD)).one()
    assert run.result_model_version_id == version.id
    assert version.metrics["resumed_from_step"] == run.resumed_from_step


def test_a_worker_starting_on_the_host_reclaims_a_dead_workers_run_at_once(
    store, flywheel_env, tmp_path
):
    run_id, env = start_slow_reward_run(store, flywheel_env)
    first = start_worker(["training"], env=env, log_path=tmp_path / "first.log")
    second = None
    try:
        wait_for(store, checkpointed, run_id, timeout_s=180)
        assert store.get(TrainingRun, run_id).owner_pid != first.pid  # a pool child trains
        kill_worker(first)  # the whole process group, as a lost machine
        store.rollback()
        assert store.get(TrainingRun, run_id).status == RunStatus.RUNNING  # nobody knows yet

        second = start_worker(["training"], env=env, log_path=tmp_path / "second.log")
        # The heartbeat limit is RR_RUN_STALE_AFTER (90 s): the new worker does not wait.
        seconds = wait_for(store, lambda r: r.attempt == 2, run_id, timeout_s=60)
        assert seconds < 45, f"reclaimed after {seconds:.0f}s"
        assert_resumed_and_registered_once(store, run_id)
    finally:
        stop_workers([p for p in (first, second) if p is not None], timeout_s=10)


def test_the_scheduled_reconcile_reclaims_a_run_within_the_heartbeat_limit(
    store, flywheel_env, tmp_path
):
    run_id, env = start_slow_reward_run(store, flywheel_env)
    env |= {"RR_RUN_STALE_AFTER": "3", "RR_RECONCILE_INTERVAL": "1"}
    trainer = start_worker(["training"], env=env, log_path=tmp_path / "trainer.log")
    # The reconcile runs on a worker that does not train; beat sends it.
    others = [
        start_worker(["labeling"], env=env, log_path=tmp_path / "labeling.log"),
        start_beat(env=env, log_path=tmp_path / "beat.log"),
    ]
    try:
        wait_for(store, checkpointed, run_id, timeout_s=180)
        kill_worker(trainer)
        seconds = wait_for(store, lambda r: r.status == RunStatus.QUEUED, run_id, timeout_s=60)
        lost = store.get(TrainingRun, run_id)
        assert "no heartbeat" in lost.error and lost.attempt == 1
        # Within the limit: 3 s stale after the last beat, on a 1 s schedule.
        assert seconds < 30, f"reclaimed after {seconds:.0f}s"
        # Its retry is on its way: the message is sent just after the commit that
        # queued the run, so it may land a moment after the status is seen.
        deadline = time.monotonic() + 10
        while queue_length(env["RR_BROKER_URL"], "training") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue_length(env["RR_BROKER_URL"], "training") >= 1

        others.append(start_worker(["training"], env=env, log_path=tmp_path / "again.log"))
        assert_resumed_and_registered_once(store, run_id)
    finally:
        stop_workers([trainer, *others], timeout_s=10)


def test_two_reclaimers_racing_make_one_retry(store, flywheel_env, broker_url):
    stale = TrainingRun(kind=RunKind.REWARD, status=RunStatus.RUNNING, attempt=1,
                        heartbeat_at=utcnow() - timedelta(minutes=5))  # fmt: skip
    store.add(stale)
    store.commit()
    barrier = threading.Barrier(2)
    reclaimed: list[int] = []

    def reclaimer() -> None:
        with session_scope() as session:
            # Both have read the run as lost before either writes.
            session.execute(select(TrainingRun).where(TrainingRun.id == stale.id)).all()
            barrier.wait(10)
            reclaimed.append(runs.reclaim_lost_runs(session))

    threads = [threading.Thread(target=reclaimer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(reclaimed) == [0, 1]
    store.expire_all()
    run = store.get(TrainingRun, stale.id)
    assert (run.status, run.attempt) == (RunStatus.QUEUED, 1)
    assert queue_length(broker_url, "training") == 1  # one retry sent


def test_a_write_after_long_work_survives_a_cut_connection(store, flywheel_env):
    calls = []

    def register(session) -> int:
        calls.append(session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar())
        if len(calls) == 1:
            # The connection is cut under the write, as a database restart would.
            with db.get_engine().connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": calls[0]})
        version = ModelVersion(kind=ModelKind.REWARD, name="after-a-cut", base_model="x")
        session.add(version)
        session.flush()
        return version.id

    version_id = write_with_retry(register, give_up_after=timedelta(seconds=30))
    assert len(calls) == 2 and calls[0] != calls[1]  # retried on a new connection
    assert count(store, ModelVersion) == 1
    assert store.get(ModelVersion, version_id).name == "after-a-cut"


def test_the_owner_of_a_run_is_this_host_and_process(store, flywheel_env):
    run, _ = enqueue_training(store, RunKind.POLICY)
    store.commit()
    assert runs.claim_run(store, run.id) == 1
    assert runs.claim_run(store, run.id) is None  # a second delivery takes nothing
    store.commit()
    store.expire_all()
    claimed = store.get(TrainingRun, run.id)
    assert (
        (claimed.owner_host, claimed.owner_pid)
        == runs.owner()
        == (os.uname().nodename, os.getpid())
    )
    # Its own host's reclaim leaves a live owner alone.
    assert runs.reclaim_lost_runs(store, host=runs.owner()[0]) == 0


def test_a_worker_starting_on_a_queue_resends_that_stages_lost_work_at_once(
    store, flywheel_env, tmp_path, tiny_model_dir
):
    """The execution message a dead worker held is not redelivered by Redis before
    its visibility timeout; a fresh execution worker re-sends it on start, well
    before the stage would count as stalled (RR_STALL_AFTER)."""
    import redis

    from models import Candidate, Execution
    from tests.workers.conftest import add_problems, register_reward_model
    from workers import execution, generation
    from workers.iteration import FlywheelParams, open_iteration

    problem_ids = add_problems(store, 2)
    register_reward_model(store, tiny_model_dir)
    iteration = open_iteration(store, problem_ids, FlywheelParams(backend="mutation"))
    store.commit()
    generation.generate_batch(iteration.id, problem_ids)
    execution.execute_problem(iteration.id, problem_ids[0])  # a recent execution row
    redis.Redis.from_url(flywheel_env["RR_BROKER_URL"]).delete("execution")  # lost messages
    lost = Candidate.problem_id == problem_ids[1]

    worker = start_worker(["execution"], env=flywheel_env, log_path=tmp_path / "execution.log")
    try:
        started = time.monotonic()
        while (
            count(store, Execution, Execution.candidate_id.in_(select(Candidate.id).where(lost)))
            == 0
        ):
            assert time.monotonic() - started < 45, "the lost execution was not re-sent at start"
            time.sleep(0.5)
    finally:
        stop_workers([worker], timeout_s=10)
    assert count(store, Execution) == count(store, Candidate)  # each once
