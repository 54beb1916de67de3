"""Task functions called directly (not eager mode) against the real Postgres, with
the real Redis as broker so that the follow-ups they enqueue can be counted."""

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from models import (
    Candidate,
    Execution,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    TrainingRun,
    db,
)
from models.db import session_scope
from models.enums import IterationStatus, ModelKind, RunKind, RunStatus, Verdict
from models.repository import is_collected, iteration_summaries, problem_progress
from models.settings import get_settings
from tests.factories import make_candidate, make_problem
from tests.workers.conftest import (
    add_problems,
    collecting_iteration,
    count,
    queue_length,
    register_reward_model,
)
from workers import execution, generation, labeling, runs, training
from workers.after_commit import enqueue_after_commit, pending
from workers.celery_app import celery
from workers.iteration import (
    FlywheelParams,
    ProblemsWithoutTests,
    maybe_trigger_retraining,
    open_iteration,
)
from workers.reconcile import reconcile
from workers.runs import enqueue_training

MUTATION = FlywheelParams(backend="mutation", candidates=4, batch_size=2, policy_steps=0)


def add_pair_problems(store, problems: int = 2) -> None:
    """HumanEval problems, each with a passing and a failing candidate: pairs to train on."""
    for problem_id in add_problems(store, problems):
        problem = store.get(Problem, problem_id)
        make_candidate(
            store, problem=problem, code=problem.reference_solution + "\n", verdict=Verdict.OK
        )
        make_candidate(
            store, problem=problem, code="def x():\n    pass\n", verdict=Verdict.WRONG_ANSWER
        )


def test_problem_without_tests_is_refused_with_its_id(session):
    good = make_problem(session)
    untested = make_problem(session, tests="")
    with pytest.raises(ProblemsWithoutTests) as refused:
        open_iteration(session, [good.id, untested.id], MUTATION)
    assert refused.value.problem_ids == [untested.id]
    assert str(untested.id) in str(refused.value)
    assert count(session, Iteration) == 0


def test_follow_ups_are_sent_on_commit_and_dropped_on_rollback(store, broker_url):
    make_problem(store)
    enqueue_after_commit(store, celery.signature("execution.noop"))
    store.rollback()
    assert pending(store) == []
    assert queue_length(broker_url, "execution") == 0

    make_problem(store)
    enqueue_after_commit(store, celery.signature("execution.noop"))
    assert queue_length(broker_url, "execution") == 0  # nothing before the commit
    store.commit()
    assert queue_length(broker_url, "execution") == 1


def test_a_savepoint_rollback_keeps_the_outer_follow_ups(store, broker_url):
    make_problem(store)
    enqueue_after_commit(store, celery.signature("execution.noop"))
    savepoint = store.begin_nested()
    savepoint.rollback()
    store.commit()
    assert queue_length(broker_url, "execution") == 1


def test_each_stage_runs_once_however_often_its_task_runs(store, broker_url, tiny_model_dir):
    problem_ids = add_problems(store, 3)
    register_reward_model(store, tiny_model_dir)
    iteration = open_iteration(store, problem_ids, MUTATION)
    store.commit()
    assert iteration.status == IterationStatus.GENERATING
    assert queue_length(broker_url, "generation") == 2  # batches of 2 problems

    # 1. generate: a second run of the same batch stores nothing new
    generation.generate_batch(iteration.id, problem_ids)
    candidates = count(store, Candidate, Candidate.iteration_id == iteration.id)
    assert candidates > 0
    generation.generate_batch(iteration.id, problem_ids)
    assert count(store, Candidate, Candidate.iteration_id == iteration.id) == candidates
    assert queue_length(broker_url, "execution") == 2 * len(problem_ids)  # follow-ups re-sent

    # 2. execute: one verdict per candidate, however often
    for problem_id in problem_ids * 2:
        execution.execute_problem(iteration.id, problem_id)
    assert count(store, Execution, Execution.iteration_id == iteration.id) == candidates
    assert queue_length(broker_url, "labeling") == 2 * len(problem_ids)

    # 3. label: scores and labels once; the iteration then asks for its retraining
    for problem_id in problem_ids * 2:
        labeling.label_problem(iteration.id, problem_id)
    store.expire_all()
    assert count(store, Score) == candidates
    labels = count(store, HardNegativeLabel)
    assert labels == count(store, HardNegativeLabel, HardNegativeLabel.iteration_id == iteration.id)
    failing = count(store, Execution, Execution.verdict != Verdict.OK)
    assert 0 < labels <= failing
    runs = store.scalars(select(TrainingRun)).all()
    assert [(r.kind, r.status, r.params["trigger"]) for r in runs] == [
        (RunKind.REWARD, RunStatus.QUEUED, "iteration_end")
    ]
    assert queue_length(broker_url, "training") == 1


def test_concurrent_labelers_trigger_one_retraining(store, broker_url, flywheel_env, monkeypatch):
    """Two labelers cross the threshold at once, in two transactions; the unique
    partial index lets one create the run, and the other gets that run back."""
    problem = make_problem(store)
    reward = register_reward_model(store, Path(flywheel_env["RR_REWARD_MODEL"]))
    iteration = collecting_iteration(store, problem, reward)
    for _ in range(2):
        candidate = make_candidate(
            store, problem=problem, verdict=Verdict.WRONG_ANSWER, iteration_id=iteration.id
        )
        store.add(HardNegativeLabel(candidate_id=candidate.id, reward_model_version_id=reward.id,
                                    iteration_id=iteration.id, rule="test"))  # fmt: skip
    store.commit()
    monkeypatch.setattr(get_settings(), "retrain_threshold", 2)

    first_inserted = threading.Event()
    results = {}

    def labeler(name: str, hold_s: float) -> None:
        with db.get_sessionmaker()() as session:
            if name == "second":
                first_inserted.wait(10)
            run = maybe_trigger_retraining(session, iteration.id)
            if name == "first":
                first_inserted.set()
                threading.Event().wait(hold_s)  # the second now blocks on the index
            session.commit()
            results[name] = run

    threads = [threading.Thread(target=labeler, args=(n, 1.0)) for n in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results["first"] is not None and results["second"] is None
    assert count(store, TrainingRun) == 1
    assert queue_length(broker_url, "training") == 1


def test_a_crashed_training_registers_nothing_and_can_be_enqueued_again(
    store, flywheel_env, tmp_path, tiny_model_dir, monkeypatch
):
    add_pair_problems(store)
    store.commit()
    broken = tmp_path / "broken-backbone"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")  # fails mid-load, after config
    monkeypatch.setattr(get_settings(), "reward_model", str(broken))

    run, created = enqueue_training(store, RunKind.REWARD)
    store.commit()
    assert created
    training.run_training(run.id)
    store.expire_all()
    failed = store.get(TrainingRun, run.id)
    assert failed.status == RunStatus.FAILED and "safetensors" in failed.error.lower()
    assert count(store, ModelVersion, ModelVersion.kind == ModelKind.REWARD) == 0
    reward_dir = Path(flywheel_env["RR_DATA_DIR"]) / "models" / "reward"
    assert not reward_dir.exists() or list(reward_dir.iterdir()) == []

    monkeypatch.setattr(get_settings(), "reward_model", str(tiny_model_dir))
    again, created = enqueue_training(store, RunKind.REWARD)
    store.commit()
    assert created and again.id != run.id
    training.run_training(again.id)
    store.expire_all()
    assert store.get(TrainingRun, again.id).status == RunStatus.SUCCEEDED
    version = store.scalars(select(ModelVersion).where(ModelVersion.kind == ModelKind.REWARD)).one()
    assert store.get(TrainingRun, again.id).result_model_version_id == version.id
    assert Path(version.path, "config.json").is_file()


def test_reconcile_reclaims_a_run_whose_worker_died_and_resends_queued_ones(store, broker_url):
    from models.base import utcnow

    stale = TrainingRun(kind=RunKind.REWARD, status=RunStatus.RUNNING, attempt=1,
                        heartbeat_at=utcnow() - timedelta(minutes=3))  # fmt: skip
    queued = TrainingRun(kind=RunKind.POLICY)
    store.add_all([stale, queued])
    store.commit()
    counts = reconcile(store, stall_after=timedelta(0))  # the run limit: RR_RUN_STALE_AFTER
    store.commit()
    assert counts == {"runs_reclaimed": 1, "runs_resent": 1}
    store.expire_all()
    reclaimed = store.get(TrainingRun, stale.id)
    # Queued again for its next attempt, which resumes from its checkpoint.
    assert (reclaimed.status, reclaimed.attempt) == (RunStatus.QUEUED, 1)
    assert "no heartbeat" in reclaimed.error and reclaimed.owner_pid is None
    assert queue_length(broker_url, "training") == 2  # the retry and the lost queued one
    # The reclaimed run is still the active one of its kind: nothing starts beside it.
    assert enqueue_training(store, RunKind.REWARD) == (reclaimed, False)


def test_a_run_that_lost_its_worker_too_often_with_no_new_checkpoint_fails(
    store, broker_url, monkeypatch
):
    from models.base import utcnow

    monkeypatch.setattr(get_settings(), "run_max_attempts", 3)
    stale = utcnow() - timedelta(minutes=3)
    # Two attempts in a row saved nothing; the third resumed from step 40 and
    # died before saving a newer checkpoint.
    stalled = TrainingRun(kind=RunKind.REWARD, status=RunStatus.RUNNING, attempt=5,
                          stalled_attempts=2, resumed_from_step=40, checkpoint_step=40,
                          heartbeat_at=stale)  # fmt: skip
    # Nine attempts lost, but this one saved step 60 after resuming from 40.
    moving = TrainingRun(kind=RunKind.POLICY, status=RunStatus.RUNNING, attempt=9,
                         stalled_attempts=2, resumed_from_step=40, checkpoint_step=60,
                         heartbeat_at=stale)  # fmt: skip
    store.add_all([stalled, moving])
    store.commit()
    assert reconcile(store) == {"runs_reclaimed": 2}
    store.commit()
    store.expire_all()
    failed = store.get(TrainingRun, stalled.id)
    assert failed.status == RunStatus.FAILED and failed.stalled_attempts == 3
    assert "lost its worker 3 times in a row with no new checkpoint" in failed.error
    requeued = store.get(TrainingRun, moving.id)
    assert (requeued.status, requeued.stalled_attempts) == (RunStatus.QUEUED, 0)
    assert queue_length(broker_url, "training") == 1  # the moving run's retry only


def test_a_heartbeat_records_each_checkpoint_the_attempt_saved(store, flywheel_env):
    run = TrainingRun(kind=RunKind.REWARD, status=RunStatus.QUEUED)
    store.add(run)
    store.commit()
    attempt = runs.claim_run(store, run.id)
    store.commit()
    beat = runs.Heartbeat(run.id, attempt, every_s=3600)
    beat.checkpointed(12)
    beat(0.5)  # later beats carry it too
    store.expire_all()
    assert store.get(TrainingRun, run.id).checkpoint_step == 12


def test_sandbox_errors_are_never_labelled(store, tiny_model_dir):
    problem = make_problem(store)
    reward = register_reward_model(store, tiny_model_dir)
    iteration = collecting_iteration(store, problem, reward)
    lost = make_candidate(
        store, problem=problem, verdict=Verdict.SANDBOX_ERROR, iteration_id=iteration.id
    )
    make_candidate(store, problem=problem, verdict=Verdict.OK, iteration_id=iteration.id)
    for _ in range(3):
        make_candidate(
            store, problem=problem, verdict=Verdict.WRONG_ANSWER, iteration_id=iteration.id
        )
    labeling.label_candidates(store, iteration.id, problem.id)
    assert count(store, Score, Score.candidate_id == lost.id) == 0
    assert count(store, HardNegativeLabel, HardNegativeLabel.candidate_id == lost.id) == 0
    assert count(store, Score) == 4
    # Collection is complete without a score for the SANDBOX_ERROR candidate.
    assert is_collected(problem_progress(store, iteration))


def test_train_command_enqueues_onto_the_training_queue_and_never_runs_inline(
    store, flywheel_env, broker_url
):
    import os
    import subprocess

    from workers.processes import CLI

    env = {**os.environ, **flywheel_env}
    first = subprocess.run(
        [CLI, "train", "reward"], capture_output=True, text=True, env=env, check=True
    )
    again = subprocess.run(
        [CLI, "train", "reward"], capture_output=True, text=True, env=env, check=True
    )
    run = store.scalars(select(TrainingRun)).one()
    assert first.stdout.strip() == f"training run {run.id} (reward) queued"
    assert again.stdout.strip() == f"training run {run.id} (reward) already active"
    assert run.status == RunStatus.QUEUED  # nothing trained in the CLI process
    assert queue_length(broker_url, "training") == 1


def test_the_heartbeat_beats_between_progress_reports_and_stops_a_reclaimed_attempt(
    store, flywheel_env
):

    run, _ = enqueue_training(store, RunKind.REWARD)
    store.commit()
    attempt = runs.claim_run(store, run.id)
    assert attempt == 1
    store.commit()
    store.expire_all()
    claimed_beat = store.get(TrainingRun, run.id).heartbeat_at
    with runs.Heartbeat(run.id, attempt, every_s=0.2) as beat:
        time.sleep(1.0)  # a long training step: no progress report
    store.expire_all()
    beaten = store.get(TrainingRun, run.id)
    assert beaten.heartbeat_at > claimed_beat
    assert beaten.progress == 0.0  # alive, not further along

    # Reclaimed meanwhile (its beats were late): the next beat tells the training,
    # whose next progress report stops it.
    reconcile(store, stale_after=timedelta(0))
    store.commit()
    with runs.Heartbeat(run.id, attempt, every_s=0.1) as beat:
        time.sleep(0.5)
        assert beat.lost.is_set()
        with pytest.raises(runs.RunLost):
            beat(0.5)


def test_a_reclaimed_attempt_registers_nothing_and_its_retry_registers_its_weights(
    store, flywheel_env, tiny_model_dir, monkeypatch
):
    add_pair_problems(store)
    monkeypatch.setattr(get_settings(), "reward_model", str(tiny_model_dir))
    run, _ = enqueue_training(store, RunKind.REWARD)
    store.commit()
    attempt = runs.claim_run(store, run.id)
    training.freeze_inputs(store, run.id)
    # The worker's heartbeat went stale (a step longer than the limit, before
    # keep_alive): reconcile reclaims the run while this attempt still trains.
    reconcile(store, stale_after=timedelta(0))
    store.commit()

    result = training.train_run(run.id, attempt, lambda fraction: None)
    with pytest.raises(runs.RunLost), session_scope() as session:
        training.register_run(session, run.id, attempt, result)
    store.expire_all()
    assert store.get(TrainingRun, run.id).status == RunStatus.QUEUED
    assert count(store, ModelVersion, ModelVersion.kind == ModelKind.REWARD) == 0

    # The retry finds the finished weights in the run's folder and registers them,
    # once, without training again.
    training.run_training(run.id)
    store.expire_all()
    done = store.get(TrainingRun, run.id)
    assert (done.status, done.attempt) == (RunStatus.SUCCEEDED, 2)
    version = store.scalars(select(ModelVersion).where(ModelVersion.kind == ModelKind.REWARD)).one()
    assert version.path == result["path"] and done.result_model_version_id == version.id
    assert not training.run_folder(run).exists()  # checkpoints and inputs cleaned up


def test_status_says_how_many_samples_repeated_a_stored_program(store, tiny_model_dir):
    """Mutants of iteration 2 often repeat iteration 1's: each program is stored once,
    and the summary counts the repeats instead of silently storing fewer."""
    problem_ids = add_problems(store, 3)
    register_reward_model(store, tiny_model_dir)
    first = open_iteration(store, problem_ids, MUTATION)
    generation.generate_candidates(store, first.id, problem_ids)
    first.status = IterationStatus.DONE
    second = open_iteration(store, problem_ids, MUTATION)
    generation.generate_candidates(store, second.id, problem_ids)
    store.flush()
    rows = {row["number"]: row for row in iteration_summaries(store)}
    for number, iteration in ((1, first), (2, second)):
        sampled = store.get(Iteration, iteration.id).params["sampled"]
        assert sampled == len(problem_ids) * MUTATION.candidates  # every sample counted
        assert rows[number]["candidates"] + rows[number]["repeats"] == sampled
    assert rows[2]["repeats"] > 0  # the same references mutate into some of the same programs


def test_connections_cut_while_a_batch_samples_cost_no_sample(
    store, broker_url, tiny_model_dir, monkeypatch
):
    """Sampling holds no connection: one cut while the model samples (a database
    restart, a failover) is met by a fresh connection at the write, and the
    samples are stored without sampling again."""
    from sqlalchemy import text

    problem_ids = add_problems(store, 2)
    register_reward_model(store, tiny_model_dir)
    iteration = open_iteration(store, problem_ids, MUTATION)
    store.commit()
    sampled = []
    run = generation.Sampling.run

    def run_then_cut(self):
        samples = run(self)
        sampled.append(len(samples))
        store.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
        store.commit()
        return samples

    monkeypatch.setattr(generation.Sampling, "run", run_then_cut)
    generation.generate_batch(iteration.id, problem_ids)
    assert sampled == [len(problem_ids)]  # sampled once
    store.expire_all()
    assert sorted(store.get(Iteration, iteration.id).params["generated"]) == sorted(problem_ids)
    assert count(store, Candidate, Candidate.iteration_id == iteration.id) > 0
    assert queue_length(broker_url, "execution") == len(problem_ids)
