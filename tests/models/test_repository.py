import multiprocessing

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, IntegrityError

from models import Candidate, Execution, Iteration, Problem, Score, TrainingRun
from models.enums import Origin, RunKind, RunStatus, Verdict
from models.repository import content_hash, insert_candidates, insert_executions
from tests.factories import make_candidate, make_model_version, make_problem


def test_models_round_trip(session):
    problem = make_problem(session, task_id="rt/1")
    candidate = make_candidate(session, problem=problem, verdict=Verdict.WRONG_ANSWER)
    version = make_model_version(session)
    session.add(Score(candidate_id=candidate.id, reward_model_version_id=version.id, score=0.25))
    session.flush()
    session.expunge_all()

    loaded = session.get(Candidate, candidate.id)
    assert loaded.problem_id == problem.id and loaded.origin is Origin.GENERATOR
    assert session.get(Problem, problem.id).language == "python"
    execution = session.scalars(
        select(Execution).where(Execution.candidate_id == candidate.id)
    ).one()
    assert execution.verdict is Verdict.WRONG_ANSWER
    assert session.scalar(select(Score.score).where(Score.candidate_id == candidate.id)) == 0.25


def test_relationships_refuse_lazy_loads(session):
    candidate = make_candidate(session, problem=make_problem(session))
    session.expire(candidate, ["problem"])
    with pytest.raises(Exception, match="lazy='raise'"):
        _ = candidate.problem


def test_insert_candidates_is_idempotent(session):
    problem = make_problem(session)
    rows = [
        {
            "problem_id": problem.id,
            "code": f"def add(a, b): return a + {i}",
            "origin": Origin.MUTATION,
        }
        for i in range(5)
    ]
    first = insert_candidates(session, rows)
    again = insert_candidates(session, rows + [{**rows[0], "code": rows[0]["code"] + "\n\n"}])
    assert again[:5] == first and again[5] == first[0]  # trailing whitespace is the same program
    count = session.scalar(select(func.count()).where(Candidate.problem_id == problem.id))
    assert count == 5


def test_insert_executions_keeps_the_first_verdict(session):
    candidate = make_candidate(session, problem=make_problem(session))
    row = {"candidate_id": candidate.id, "verdict": Verdict.OK, "passed": 3, "total": 3}
    assert insert_executions(session, [row]) == 1
    assert insert_executions(session, [{**row, "verdict": Verdict.RUNTIME_ERROR}]) == 0
    assert (
        session.scalar(select(Execution.verdict).where(Execution.candidate_id == candidate.id))
        == Verdict.OK
    )


def test_bulk_rows_round_trip_odd_text_exactly(session):
    problem = make_problem(session)
    odd = [
        "tab\there",
        "line\nbreak\r\nand carriage",
        "back\\slash \\N \\. \\t",
        "quotes ' \" , ; |",
        "unicode é ß 漢字 🐍 \u2028",
        "\\.\n",  # COPY's text-format end marker on a line of its own
        "",  # not NULL
    ]
    rows = [{"problem_id": problem.id, "code": code, "origin": Origin.MUTATION} for code in odd]
    ids = insert_candidates(session, rows)
    insert_executions(
        session,
        [
            {
                "candidate_id": i,
                "verdict": Verdict.RUNTIME_ERROR,
                "stdout_tail": code,
                "stderr_tail": "",
            }
            for i, code in zip(ids, odd, strict=True)
        ],
    )
    session.expire_all()
    stored = session.execute(
        select(Candidate.code, Candidate.origin, Execution.stdout_tail, Execution.verdict)
        .join(Execution)
        .where(Candidate.id.in_(ids))
        .order_by(Candidate.id)
    ).all()
    assert stored == [(code, Origin.MUTATION, code, Verdict.RUNTIME_ERROR) for code in odd]
    assert insert_candidates(session, rows) == ids


def test_insert_executions_copies_the_candidates_iteration(session):
    iteration = Iteration(number=7001)
    session.add(iteration)
    session.flush()
    problem = make_problem(session)
    with_iteration = make_candidate(session, problem=problem, iteration_id=iteration.id)
    without = make_candidate(session, problem=problem)
    rows = [
        {"candidate_id": with_iteration.id, "verdict": Verdict.OK, "iteration_id": None},
        {"candidate_id": without.id, "verdict": Verdict.OK},
        {"candidate_id": with_iteration.id, "verdict": Verdict.TIME_LIMIT},  # first one wins
    ]
    assert insert_executions(session, rows) == 2
    stored = session.execute(
        select(
            Execution.candidate_id, Execution.iteration_id, Execution.verdict, Execution.attempts
        ).where(Execution.candidate_id.in_([with_iteration.id, without.id]))
    ).all()
    assert sorted(stored) == sorted(
        [(with_iteration.id, iteration.id, Verdict.OK, 1), (without.id, None, Verdict.OK, 1)]
    )


def test_insert_executions_refuses_an_unknown_candidate(session):
    with pytest.raises(IntegrityError):
        insert_executions(session, [{"candidate_id": 10**12, "verdict": Verdict.OK}])


def test_postgres_refuses_a_nul_character_as_a_data_error(pg_session):
    """As SQLAlchemy raises it: the API answers a DataError with a 422."""
    row = {"problem_id": make_problem(pg_session).id, "code": "x\x00", "origin": Origin.MUTATION}
    with pytest.raises(DataError):
        insert_candidates(pg_session, [row])


def test_bulk_inserts_see_rows_pending_in_the_session(session):
    candidate = make_candidate(session, problem=make_problem(session))
    session.add(Execution(candidate_id=candidate.id, verdict=Verdict.WRONG_ANSWER))
    assert insert_executions(session, [{"candidate_id": candidate.id, "verdict": Verdict.OK}]) == 0
    verdict = select(Execution.verdict).where(Execution.candidate_id == candidate.id)
    assert session.scalar(verdict) == Verdict.WRONG_ANSWER


def test_bulk_inserts_share_one_transaction(session):
    """Both calls, twice, inside one transaction: what they stage does not collide."""
    problem = make_problem(session)
    for _ in range(2):
        ids = insert_candidates(
            session,
            [
                {"problem_id": problem.id, "code": f"x = {i}", "origin": Origin.MUTATION}
                for i in range(3)
            ],
        )
        insert_executions(session, [{"candidate_id": i, "verdict": Verdict.OK} for i in ids])
    executed = select(func.count()).select_from(Execution).where(Execution.candidate_id.in_(ids))
    assert session.scalar(executed) == 3


def test_one_active_training_run_per_kind(session):
    session.add(TrainingRun(kind=RunKind.REWARD, status=RunStatus.QUEUED))
    session.add(TrainingRun(kind=RunKind.POLICY, status=RunStatus.RUNNING))
    session.add(TrainingRun(kind=RunKind.REWARD, status=RunStatus.SUCCEEDED))
    session.flush()
    session.add(TrainingRun(kind=RunKind.REWARD, status=RunStatus.RUNNING))
    with pytest.raises(IntegrityError):
        session.flush()


def _insert_same_batch(url: str, problem_id: int, barrier) -> list[int]:
    from sqlalchemy.orm import Session

    from models.db import make_engine

    engine = make_engine(url)
    rows = [
        {
            "problem_id": problem_id,
            "code": f"def add(a, b):\n    return a - {i}\n",
            "origin": Origin.MUTATION,
        }
        for i in range(500)
    ]
    with Session(engine) as session:
        barrier.wait()
        ids = insert_candidates(session, rows)
        session.commit()
    engine.dispose()
    return ids


def test_concurrent_bulk_inserts_do_not_duplicate(pg_url, pg_engine):
    from sqlalchemy.orm import Session

    with Session(pg_engine) as session:
        problem = make_problem(session, task_id="concurrent/1")
        session.commit()
        problem_id = problem.id
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        first, second = pool.starmap(_insert_same_batch, [(pg_url, problem_id, barrier)] * 2)
    assert first == second
    with Session(pg_engine) as session:
        stored = session.scalars(
            select(Candidate.content_hash).where(Candidate.problem_id == problem_id)
        ).all()
        assert len(stored) == 500 == len(set(stored))
        session.execute(Problem.__table__.delete().where(Problem.id == problem_id))
        session.commit()


def test_content_hash_ignores_surrounding_whitespace():
    assert content_hash("x = 1\n") == content_hash("\n x = 1") != content_hash("x = 2")
