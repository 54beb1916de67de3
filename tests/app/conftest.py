"""Shared by the app tests: a seeded store and an app that serves the test's
rolled-back transaction."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.api import create_app
from app.api.deps import stream_session, transactions, write_session
from models import (
    DatasetVersion,
    Evaluation,
    EvaluationSample,
    HardNegativeLabel,
    Iteration,
    Score,
)
from models.enums import EvaluationStatus, Language, ModelKind, Origin, Split, Verdict
from models.settings import Settings
from tests.factories import make_candidate, make_model_version, make_problem
from workers.evaluation import evaluation_metrics


@dataclass
class Seeded:
    python_problem: int
    cpp_problem: int
    generator: int
    old_reward: int
    reward: int
    passing: list[int]
    failing: list[int]
    hard_negative: int
    cpp_candidate: int


def seed_store(session: Session) -> Seeded:
    """Two iterations of a small flywheel: a generator, two reward models, scored
    and executed candidates, one hard negative and a dataset version."""
    generator = make_model_version(session, kind=ModelKind.GENERATOR, name="gen-v1")
    old_reward = make_model_version(session, name="rm-v1")
    old_reward.metrics = {"pairwise_accuracy": 0.61}
    reward = make_model_version(session, name="rm-v2")
    reward.metrics = {"pairwise_accuracy": 0.74}
    first = Iteration(
        number=1,
        generator_version_id=generator.id,
        reward_model_version_id=old_reward.id,
        metrics={
            "random_pass1": 0.3,
            "reranked_pass1": 0.5,
            "oracle_pass_n": 0.8,
            "pass_at_k": {"1": 0.3},
            "reward_pairwise_accuracy": 0.61,
        },
    )
    # The shape the flywheel stores: one `rerank_metrics` dict per language.
    evaluation = {
        "python": {
            "problems": 3,
            "random_pass1": 0.5,
            "reranked_pass1": 0.7,
            "oracle_pass_n": 1.0,
            "pass@1": 0.5,
        },
        "cpp": {
            "problems": 1,
            "random_pass1": 0.1,
            "reranked_pass1": 0.3,
            "oracle_pass_n": 0.4,
            "pass@1": 0.1,
        },
    }
    second = Iteration(
        number=2,
        generator_version_id=generator.id,
        reward_model_version_id=reward.id,
        metrics={"evaluation": evaluation},
    )
    session.add_all([first, second])
    session.flush()
    session.add(DatasetVersion(iteration_id=first.id, dvc_tag="iter-1", path="datasets/iter-1"))
    python_problem = make_problem(session, task_id="api/add")
    cpp_problem = make_problem(
        session,
        task_id="api/cpp",
        language=Language.CPP,
        prompt="int add(int a, int b)",
        tests="int main(){}",
    )
    passing, failing = [], []
    for i in range(6):
        candidate = make_candidate(
            session,
            problem=python_problem,
            iteration_id=first.id,
            verdict=Verdict.OK,
            code=f"def add(a, b):\n    return a + b  # ok {i}\n",
        )
        candidate.generator_version_id = generator.id
        passing.append(candidate.id)
        # Scored by the iteration's own reward model, as the flywheel scores them.
        session.add(
            Score(
                candidate_id=candidate.id, reward_model_version_id=old_reward.id, score=0.5 + i / 10
            )
        )
    for i in range(4):
        candidate = make_candidate(
            session,
            problem=python_problem,
            iteration_id=second.id,
            verdict=Verdict.WRONG_ANSWER,
            code=f"def add(a, b):\n    return a - {i}\n",
            # the first one forged its success signal: caught, and kept as a negative
            tamper_reason="success token printed before the tests ran" if i == 0 else None,
        )
        failing.append(candidate.id)
        session.add(
            Score(candidate_id=candidate.id, reward_model_version_id=reward.id, score=i / 10)
        )
        session.add(
            Score(candidate_id=candidate.id, reward_model_version_id=old_reward.id, score=0.9)
        )
    hard_negative = failing[-1]
    session.add(
        HardNegativeLabel(
            candidate_id=hard_negative,
            reward_model_version_id=old_reward.id,
            iteration_id=first.id,
            rule="above_lowest_passing",
        )
    )
    cpp = make_candidate(
        session,
        problem=cpp_problem,
        origin=Origin.MUTATION,
        code="int add(int a, int b) { return a + b; }",
    )
    session.flush()
    return Seeded(
        python_problem.id,
        cpp_problem.id,
        generator.id,
        old_reward.id,
        reward.id,
        passing,
        failing,
        hard_negative,
        cpp.id,
    )


def seed_held_out(session: Session, seeded: Seeded) -> None:
    """Two finished evaluations of the seeded models on held-out problems, with
    their draws: what the paper's table reads."""
    first_iteration = session.scalar(select(Iteration.id).where(Iteration.number == 1))
    # 4 held-out problems x 4 draws of 2 programs (the first passes on even
    # problems): the baseline's reward model ties every draw, the next one puts
    # the first program first.
    held_out = [
        make_problem(session, task_id=f"api/held-out-{k}", split=Split.EVAL) for k in range(4)
    ]
    first_verdicts = (Verdict.OK, Verdict.WRONG_ANSWER) * 2
    programs = [
        [
            make_candidate(session, problem=problem, origin=Origin.EVALUATION, verdict=verdict)
            for verdict in (first_verdict, Verdict.WRONG_ANSWER)
        ]
        for problem, first_verdict in zip(held_out, first_verdicts, strict=True)
    ]
    for number, model, scores in (
        (0, seeded.old_reward, (0.5, 0.5)),
        (1, seeded.reward, (1.0, 0.0)),
    ):
        evaluation = Evaluation(
            number=number,
            iteration_id=first_iteration,
            generator_version_id=seeded.generator,
            reward_model_version_id=model,
            status=EvaluationStatus.DONE,
            params={"samples": 4, "problem_ids": [problem.id for problem in held_out]},
        )
        session.add(evaluation)
        session.flush()
        for problem, pair in zip(held_out, programs, strict=True):
            session.add_all(
                Score(candidate_id=candidate.id, reward_model_version_id=model, score=score)
                for candidate, score in zip(pair, scores, strict=True)
            )
            session.add_all(
                EvaluationSample(evaluation_id=evaluation.id, problem_id=problem.id,
                                 sample_index=index, candidate_id=pair[min(index, 1)].id)
                for index in range(4)
            )  # fmt: skip
        session.flush()
        evaluation.metrics = evaluation_metrics(session, evaluation)


def serve_session(app, session: Session) -> None:
    """Route the app's sessions to the test's rolled-back transaction. A lock
    serialises requests, since one Session must not serve two threads at once.
    Nothing commits, so enqueue-after-commit hooks stay pending and inspectable."""
    lock = threading.Lock()

    @contextmanager
    def shared() -> Iterator[Session]:
        with lock:
            try:
                yield session
            except SQLAlchemyError:
                # Like the real dependency, leave no failed transaction behind; only
                # on database errors, so a 404 keeps the test's seeded rows.
                session.rollback()
                raise

    def override() -> Iterator[Session]:
        with shared() as shared_session:
            yield shared_session

    app.dependency_overrides[write_session] = override
    app.dependency_overrides[stream_session] = override
    app.dependency_overrides[transactions] = lambda: shared


@pytest.fixture
def client(pg_session: Session) -> Iterator[TestClient]:
    app = create_app(Settings(api_token=None))
    serve_session(app, pg_session)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def seeded(pg_session: Session) -> Seeded:
    return seed_store(pg_session)
