"""Fixtures for the queue tests: a private Postgres database per test (the chain
commits for real, so it must not share the session database other tests roll
back in), a private Redis database as broker, and this process configured like
the workers it starts."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from models import Iteration, ModelVersion, Problem, db
from models.enums import IterationStatus, ModelKind
from models.settings import get_settings
from tests.conftest import fresh_database
from workers.celery_app import broker_options, celery

BROKER_DBS = range(1, 11)  # not 0, 11 (bench/flywheel.py) or the conftest's 15
CLAIM_KEY = "rr-workers-test-claim"


@pytest.fixture
def worker_db(pg_url: str) -> Iterator[str]:
    """A fresh, migrated database on the test server (pg_url proves the server is up)."""
    with fresh_database("rr_workers") as url:
        yield url


@pytest.fixture
def broker_url(redis_url: str) -> Iterator[str]:
    """A Redis database of its own: claimed with SET NX, so two test runs at once
    (or another suite's workers) never consume each other's messages."""
    token = uuid.uuid4().hex
    for number in BROKER_DBS:
        url = redis_url.rsplit("/", 1)[0] + f"/{number}"
        client = redis.Redis.from_url(url)
        if client.set(CLAIM_KEY, token, nx=True, ex=3600):
            for key in client.scan_iter():
                if key != CLAIM_KEY.encode():
                    client.delete(key)
            yield url
            client = redis.Redis.from_url(url)  # Redis may have been restarted meanwhile
            client.flushdb()
            return
    pytest.fail(f"no free Redis database among {list(BROKER_DBS)}")


@pytest.fixture
def flywheel_env(
    worker_db: str, broker_url: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch
) -> Iterator[dict[str, str]]:
    """RR_ variables for worker processes, also applied to this process."""
    env = {
        "RR_DATABASE_URL": worker_db,
        "RR_BROKER_URL": broker_url,
        "RR_DATA_DIR": str(tmp_path / "data"),
        "RR_REWARD_MODEL": str(tiny_model_dir),
        "RR_GENERATOR_MODEL": str(tiny_model_dir),
        "RR_RETRAIN_THRESHOLD": "100000",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _reload_settings()
    yield env
    monkeypatch.undo()
    _reload_settings()


def _reload_settings() -> None:
    """Point the cached settings, engine and Celery producer at the current env."""
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    settings = get_settings()
    celery.conf.broker_url = settings.celery_broker_url
    celery.conf.broker_transport_options = broker_options(settings)
    # Drop the connection and producer pools bound to the previous broker. Celery
    # 5.7's close() clears only the first, and an earlier test (the API's /health)
    # may have built both on the embedded broker; these are the two attributes
    # Celery itself resets after a fork.
    celery._pool = None
    celery.amqp._producer_pool = None


@pytest.fixture
def store(flywheel_env) -> Iterator:
    """A session on the private database, committed by the test where it says so."""
    with db.get_sessionmaker()() as session:
        yield session


def queue_length(broker_url: str, queue: str) -> int:
    return redis.Redis.from_url(broker_url).llen(queue)


def add_problems(session, count: int) -> list[int]:
    """HumanEval's first `count` problems (real prompts, tests and references)."""
    from app.problem_import import humaneval_rows, upsert_problems

    upsert_problems(session, humaneval_rows()[:count], eval_fraction=0.0)
    session.flush()
    return list(
        session.scalars(
            Problem.__table__.select().with_only_columns(Problem.id).order_by(Problem.id)
        )
    )


def register_reward_model(session, path: Path) -> ModelVersion:
    """A reward model version on the tiny backbone, so a test can skip the warm start."""
    version = ModelVersion(
        kind=ModelKind.REWARD, name="rm-tiny", base_model=str(path), path=str(path)
    )
    session.add(version)
    session.flush()
    return version


def count(session, model, *where) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where))


def collecting_iteration(session, problem: Problem, reward: ModelVersion) -> Iteration:
    """An iteration whose one problem is generated, so executing and labelling can run."""
    iteration = Iteration(
        number=1,
        status=IterationStatus.GENERATING,
        reward_model_version_id=reward.id,
        params={"problem_ids": [problem.id], "generated": [problem.id]},
    )
    session.add(iteration)
    session.flush()
    return iteration


def assert_evaluation_exactly_once(session, evaluation_id: int) -> None:
    """A finished evaluation holds one draw per (problem, sample index), and each
    distinct program drawn has one verdict and one score by the evaluation's
    reward model (none when the sandbox failed); nothing drawn joined an iteration."""
    from models import Candidate, Evaluation, EvaluationSample, Execution, Score
    from models.enums import EvaluationStatus, Origin, Verdict

    session.expire_all()
    evaluation = session.get(Evaluation, evaluation_id)
    assert evaluation.status == EvaluationStatus.DONE
    draws = session.execute(
        select(EvaluationSample.problem_id, EvaluationSample.sample_index).where(
            EvaluationSample.evaluation_id == evaluation_id
        )
    ).all()
    # Indices 0..k-1 per problem, k at most the samples asked for (the mutation
    # backend returns fewer when a reference has fewer distinct mutants).
    by_problem: dict[int, list[int]] = {}
    for problem_id, index in draws:
        by_problem.setdefault(problem_id, []).append(index)
    assert sorted(by_problem) == sorted(evaluation.params["problem_ids"])
    for indices in by_problem.values():
        assert sorted(indices) == list(range(len(indices)))
        assert 1 <= len(indices) <= evaluation.params["samples"]
    drawn = select(EvaluationSample.candidate_id).where(
        EvaluationSample.evaluation_id == evaluation_id
    )
    candidates = session.scalars(select(Candidate).where(Candidate.id.in_(drawn))).all()
    assert {(c.origin, c.iteration_id) for c in candidates} == {(Origin.EVALUATION, None)}
    verdicts = session.execute(
        select(Execution.candidate_id, Execution.verdict).where(Execution.candidate_id.in_(drawn))
    ).all()
    assert sorted(cid for cid, _ in verdicts) == sorted(c.id for c in candidates)
    judgeable = {cid for cid, verdict in verdicts if verdict != Verdict.SANDBOX_ERROR}
    scored = session.scalars(
        select(Score.candidate_id).where(
            Score.candidate_id.in_(drawn),
            Score.reward_model_version_id == evaluation.reward_model_version_id,
        )
    ).all()
    assert sorted(scored) == sorted(judgeable)
    assert evaluation.metrics["all"]["problems"] == len(evaluation.params["problem_ids"])
