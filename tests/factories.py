"""Keyword-only factories for store rows. They flush, so ids are set."""

import itertools

from sqlalchemy.orm import Session

from models import Candidate, Execution, ModelVersion, Problem
from models.enums import Language, ModelKind, Origin, Split, Verdict
from models.repository import content_hash

_sequence = itertools.count()


def make_problem(
    session: Session,
    *,
    task_id: str | None = None,
    language: Language = Language.PYTHON,
    prompt: str = "def add(a, b):\n",
    tests: str = "assert add(1, 2) == 3\n",
    reference_solution: str | None = "def add(a, b):\n    return a + b\n",
    source: str = "test",
    split: Split = Split.TRAIN,
) -> Problem:
    problem = Problem(
        source=source,
        task_id=task_id or f"t/{next(_sequence)}",
        language=language,
        prompt=prompt,
        tests=tests,
        entry_point="add",
        reference_solution=reference_solution,
        split=split,
    )
    session.add(problem)
    session.flush()
    return problem


def make_candidate(
    session: Session,
    *,
    problem: Problem,
    code: str | None = None,
    origin: Origin = Origin.GENERATOR,
    verdict: Verdict | None = None,
    iteration_id: int | None = None,
    tamper_reason: str | None = None,
) -> Candidate:
    code = code if code is not None else f"def add(a, b):\n    return a + b  # {next(_sequence)}\n"
    candidate = Candidate(
        problem_id=problem.id,
        code=code,
        content_hash=content_hash(code),
        origin=origin,
        iteration_id=iteration_id,
    )
    session.add(candidate)
    session.flush()
    if verdict is not None:
        session.add(
            Execution(
                candidate_id=candidate.id,
                iteration_id=iteration_id,
                verdict=verdict,
                passed=1 if verdict == Verdict.OK else 0,
                total=1,
                tampered=tamper_reason is not None,
                tamper_reason=tamper_reason,
            )
        )
        session.flush()
    return candidate


def make_model_version(
    session: Session, *, kind: ModelKind = ModelKind.REWARD, name: str = "rm-test"
) -> ModelVersion:
    version = ModelVersion(kind=kind, name=name, base_model="tiny", path=None, metrics={})
    session.add(version)
    session.flush()
    return version
