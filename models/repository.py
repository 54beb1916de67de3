"""Every write path of the candidate store, and the reads that more than one part
of the service shares ("the current model", an iteration's progress). Writes flush,
never commit: the caller owns the transaction. All are idempotent, so a rerun of a
batch is harmless.

On Postgres the rows travel by binary COPY into a temporary table and go on with
one INSERT ... SELECT; on SQLite they are bound parameters, in chunks."""

import hashlib
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from typing import Any

import psycopg
from sqlalchemy import (
    ColumnElement,
    Insert,
    Row,
    Select,
    Table,
    and_,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.candidate import Candidate, Execution, HardNegativeLabel, Score
from models.enums import ModelKind, ModelStatus, RunKind, RunStatus, Verdict
from models.evaluation import Evaluation, EvaluationSample
from models.problem import Problem
from models.training import DatasetVersion, Iteration, ModelVersion, TrainingRun

# SQLite allows 32766 bound parameters per statement; an execution binds 11.
_SQLITE_CHUNK = 2000


def content_hash(code: str) -> str:
    """Identity of a program for deduplication: whitespace at the ends does not count."""
    return hashlib.sha256(code.strip().encode()).hexdigest()


def dialect_insert(session: Session, model: type) -> Insert:
    """A Core INSERT on the model's table with the dialect's ON CONFLICT support."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model.__table__)


def _defaults(table: Table) -> dict[str, Any]:
    """Every column but the key, with the value INSERT would give it when left out."""
    defaults: dict[str, Any] = {}
    for column in table.columns:
        if column.primary_key:
            continue
        default = column.default
        if default is None:
            defaults[column.name] = None
        elif default.is_callable:
            defaults[column.name] = default.arg(None)  # type: ignore[union-attr]
        else:
            defaults[column.name] = default.arg  # type: ignore[union-attr]
    return defaults


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert_candidates(session: Session, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert candidates, skipping programs already stored for their problem.

    Each row needs `problem_id`, `code` and `origin`; `content_hash` is filled in.
    Returns the id of every row, in order, whether it was new or already there.
    """
    if not rows:
        return []
    defaults = _defaults(Candidate.__table__)
    rows = [{**defaults, **row, "content_hash": content_hash(row["code"])} for row in rows]
    keys = [(row["problem_id"], row["content_hash"]) for row in rows]
    if _is_postgres(session):
        ids = _insert_candidates_postgres(session, rows, distinct=len(set(keys)))
    else:
        ids = _insert_candidates_sqlite(session, rows, keys)
    return [ids[key] for key in keys]


def _insert_candidates_postgres(
    session: Session, rows: list[dict[str, Any]], *, distinct: int
) -> dict[tuple[int, str], int]:
    with _staged(session, Candidate.__table__, rows) as names:
        columns = ", ".join(names)
        inserted = session.execute(
            text(
                f"INSERT INTO candidates ({columns}) SELECT {columns} FROM staged ORDER BY ord "
                "ON CONFLICT (problem_id, content_hash) DO NOTHING "
                "RETURNING problem_id, content_hash, id"
            )
        ).all()
        ids = {(p, h): i for p, h, i in inserted}
        if len(ids) < distinct:
            # Rows already stored (a rerun, or a concurrent writer that got there
            # first) returned nothing. A new statement sees what that writer committed.
            found = session.execute(
                text(
                    "SELECT c.problem_id, c.content_hash, c.id FROM candidates c "
                    "JOIN staged s USING (problem_id, content_hash)"
                )
            )
            ids.update({(p, h): i for p, h, i in found})
    return ids


def _insert_candidates_sqlite(
    session: Session, rows: list[dict[str, Any]], keys: list[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    inserted = _insert_ignoring_conflicts(
        session,
        Candidate,
        rows,
        ["problem_id", "content_hash"],
        [Candidate.id, Candidate.problem_id, Candidate.content_hash],
    )
    ids = {(p, h): i for i, p, h in inserted}
    # Rows that were already stored (a rerun) returned nothing: look them up.
    missing = list(set(keys) - ids.keys())
    for start in range(0, len(missing), _SQLITE_CHUNK):
        found = session.execute(
            select(Candidate.problem_id, Candidate.content_hash, Candidate.id).where(
                tuple_(Candidate.problem_id, Candidate.content_hash).in_(
                    missing[start : start + _SQLITE_CHUNK]
                )
            )
        )
        ids.update({(p, h): i for p, h, i in found})
    return ids


def insert_executions(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Record verdicts; a candidate that already has one keeps it. Returns rows written.

    Each row needs `candidate_id` and `verdict`; `iteration_id` is copied from
    the candidate."""
    if not rows:
        return 0
    defaults = _defaults(Execution.__table__)
    rows = [{**defaults, **row} for row in rows]
    if _is_postgres(session):
        return _insert_executions_postgres(session, rows)
    return _insert_executions_sqlite(session, rows)


def _insert_executions_postgres(session: Session, rows: list[dict[str, Any]]) -> int:
    with _staged(session, Execution.__table__, rows) as names:
        # A row whose candidate does not exist keeps a NULL iteration, so that
        # its foreign key fails the insert instead of the row going missing.
        values = ", ".join(
            "(SELECT iteration_id FROM candidates c WHERE c.id = s.candidate_id)"
            if name == "iteration_id"
            else f"s.{name}"
            for name in names
        )
        return session.execute(
            text(
                f"INSERT INTO executions ({', '.join(names)}) SELECT {values} FROM staged s "
                "ORDER BY s.ord ON CONFLICT (candidate_id) DO NOTHING"
            )
        ).rowcount


def _insert_executions_sqlite(session: Session, rows: list[dict[str, Any]]) -> int:
    candidate_ids = [row["candidate_id"] for row in rows]
    iteration_of: dict[int, int | None] = {}
    for start in range(0, len(candidate_ids), _SQLITE_CHUNK):
        found = session.execute(
            select(Candidate.id, Candidate.iteration_id).where(
                Candidate.id.in_(candidate_ids[start : start + _SQLITE_CHUNK])
            )
        )
        iteration_of.update({candidate_id: iteration_id for candidate_id, iteration_id in found})
    rows = [{**row, "iteration_id": iteration_of.get(row["candidate_id"])} for row in rows]
    inserted = _insert_ignoring_conflicts(
        session, Execution, rows, ["candidate_id"], [Execution.id]
    )
    return len(inserted)


@contextmanager
def _staged(session: Session, table: Table, rows: list[dict[str, Any]]) -> Iterator[list[str]]:
    """The rows in the temporary table `staged`: their columns, typed as in
    `table`, and `ord`, each row's position. Yields the column names.

    Binary COPY moves the rows several times faster than bound parameters or
    arrays, which SQLAlchemy and psycopg process value by value in Python. The
    table lives in the caller's transaction: dropped on the way out, or by the
    rollback that an error brings."""
    names = list(rows[0])
    values = itemgetter(*names)
    # Through the session, so that it autoflushes as before; the COPY goes around it.
    session.execute(
        text(
            f"CREATE TEMPORARY TABLE staged ON COMMIT DROP AS "
            f"SELECT 0 AS ord, {', '.join(names)} FROM {table.name} WITH NO DATA"
        )
    )
    copy_statement = "COPY staged FROM STDIN (FORMAT BINARY)"
    try:
        with session.connection().connection.driver_connection.cursor() as cursor:
            # Never prepared: the same text has another result type for another table.
            cursor.execute("SELECT * FROM staged LIMIT 0", prepare=False)
            types = [column.type_code for column in cursor.description]
            with cursor.copy(copy_statement) as copy:
                # Each value is written as its column's type: a StrEnum as its value.
                copy.set_types(types)
                for position, row in enumerate(rows):
                    copy.write_row((position, *values(row)))
    except psycopg.Error as error:
        # As SQLAlchemy raises what its own statements meet: a value the store
        # refuses (a NUL character, say) is a DataError the API answers with a 422.
        raise DBAPIError.instance(copy_statement, None, error, psycopg.Error) from error
    yield names
    session.execute(text("DROP TABLE staged"))


def _insert_ignoring_conflicts(
    session: Session, model: type, rows: list[dict[str, Any]], conflict: list[str], returning: list
) -> list[Row]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING, in chunks of bound parameters."""
    statement = (
        dialect_insert(session, model)
        .on_conflict_do_nothing(index_elements=conflict)
        .returning(*returning)
    )
    out: list[Row] = []
    for start in range(0, len(rows), _SQLITE_CHUNK):
        out.extend(session.execute(statement, rows[start : start + _SQLITE_CHUNK]))
    return out


def insert_scores(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert reward-model scores (`candidate_id`, `reward_model_version_id`, `score`);
    a candidate already scored by that version keeps its score."""
    if rows:
        session.execute(
            dialect_insert(session, Score).on_conflict_do_nothing(
                index_elements=["candidate_id", "reward_model_version_id"]
            ),
            rows,
        )


def insert_hard_negative_labels(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert hard-negative labels, once per candidate and reward model version;
    returns how many were new."""
    if not rows:
        return 0
    written = session.execute(
        dialect_insert(session, HardNegativeLabel)
        .on_conflict_do_nothing(index_elements=["candidate_id", "reward_model_version_id"])
        .returning(HardNegativeLabel.id),
        rows,
    )
    return len(written.all())


def lock_row(session: Session, model: type[Iteration] | type[Evaluation], row_id: int):
    """Take an iteration's or evaluation's row lock and return the row freshly read.

    A no-op UPDATE rather than SELECT ... FOR UPDATE: it locks the row on
    Postgres and takes the database write lock on SQLite, which ignores FOR UPDATE.
    """
    session.execute(update(model).where(model.id == row_id).values(status=model.status))
    row = session.get(model, row_id, populate_existing=True)
    if row is None:
        raise LookupError(f"no {model.__tablename__[:-1]} {row_id}")
    return row


def insert_evaluation(session: Session, **values: Any) -> Evaluation:
    """Add an evaluation's row (flush only); `number` is unique, so a second opening
    of the same evaluation fails here instead of measuring twice."""
    evaluation = Evaluation(**values)
    session.add(evaluation)
    session.flush()
    return evaluation


def insert_evaluation_samples(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Record evaluation draws (`evaluation_id`, `problem_id`, `sample_index`,
    `candidate_id`); a draw already recorded keeps its candidate."""
    if rows:
        session.execute(
            dialect_insert(session, EvaluationSample).on_conflict_do_nothing(
                index_elements=["evaluation_id", "problem_id", "sample_index"]
            ),
            rows,
        )


def register_model_version(session: Session, version: ModelVersion) -> ModelVersion:
    """Add a trained model's row (flush only). Its folder is already in place; if the
    row cannot be added, the folder goes too, so there is no folder without its row."""
    try:
        session.add(version)
        session.flush()
    except BaseException:
        if version.path:
            shutil.rmtree(version.path, ignore_errors=True)  # the caller rolls the row back
        raise
    return version


def insert_dataset_version(session: Session, **values: Any) -> DatasetVersion:
    """Record an iteration's versioned dataset (flush only) and return its row. A
    concurrent call for the same iteration that committed first keeps its row, and
    this one returns it (ON CONFLICT DO NOTHING)."""
    session.execute(
        dialect_insert(session, DatasetVersion)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["iteration_id"])
    )
    session.flush()
    version = dataset_version(session, values["iteration_id"])
    assert version is not None  # inserted above or by the concurrent winner
    return version


def dataset_version(session: Session, iteration_id: int) -> DatasetVersion | None:
    return session.scalar(select(DatasetVersion).where(DatasetVersion.iteration_id == iteration_id))


def current_model(session: Session, kind: ModelKind) -> ModelVersion | None:
    """The newest ready model of a kind: what new iterations, trainings and /solve use."""
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind == kind, ModelVersion.status == ModelStatus.READY)
        .order_by(ModelVersion.id.desc())
        .limit(1)
    ).first()


def problem_progress(session: Session, iteration: Iteration) -> dict[str, int]:
    """Counts that say how far the iteration's collection is."""
    in_iteration = Candidate.iteration_id == iteration.id
    candidates = session.scalar(select(func.count()).select_from(Candidate).where(in_iteration))
    executed = session.scalar(
        select(func.count()).select_from(Candidate).join(Execution).where(in_iteration)
    )
    judgeable = session.scalar(
        select(func.count())
        .select_from(Candidate)
        .join(Execution)
        .where(in_iteration, Execution.verdict != Verdict.SANDBOX_ERROR)
    )
    scored = session.scalar(
        select(func.count())
        .select_from(Candidate)
        .join(Score, Score.candidate_id == Candidate.id)
        .where(in_iteration, Score.reward_model_version_id == iteration.reward_model_version_id)
    )
    return {
        "problems": len(iteration.params["problem_ids"]),
        "generated": len(iteration.params["generated"]),
        "candidates": candidates,
        "executed": executed,
        "judgeable": judgeable,
        "scored": scored,
    }


def evaluation_progress(session: Session, evaluation: Evaluation) -> dict[str, int]:
    """How far an evaluation's collection is, in distinct programs drawn; the keys
    of `problem_progress`."""
    drawn = Candidate.id.in_(
        select(EvaluationSample.candidate_id).where(EvaluationSample.evaluation_id == evaluation.id)
    )

    def count(query: Select) -> int:
        return session.scalar(select(func.count()).select_from(query.subquery()))

    executed = select(Candidate.id).join(Execution).where(drawn)
    return {
        "problems": len(evaluation.params["problem_ids"]),
        "generated": len(evaluation.params["generated"]),
        "candidates": count(select(Candidate.id).where(drawn)),
        "executed": count(executed),
        "judgeable": count(executed.where(Execution.verdict != Verdict.SANDBOX_ERROR)),
        "scored": count(
            select(Candidate.id)
            .join(Score, Score.candidate_id == Candidate.id)
            .where(drawn, Score.reward_model_version_id == evaluation.reward_model_version_id)
        ),
    }


def drawn_score(evaluation: Evaluation) -> ColumnElement[bool]:
    """Joins a draw to its program's score by the evaluation's reward model."""
    return and_(
        Score.candidate_id == EvaluationSample.candidate_id,
        Score.reward_model_version_id == evaluation.reward_model_version_id,
    )


def evaluation_draws(session: Session, evaluation: Evaluation) -> list[Row]:
    """(language, problem_id, score, passed) of each judged draw of an evaluation,
    scored by its reward model (score None where it has none yet); SANDBOX_ERROR
    draws are left out: the sandbox failed, not the program."""
    return session.execute(
        select(
            Problem.language,
            EvaluationSample.problem_id,
            Score.score,
            (Execution.verdict == Verdict.OK).label("passed"),
        )
        .join(Problem, Problem.id == EvaluationSample.problem_id)
        .join(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
        .outerjoin(Score, drawn_score(evaluation))
        .where(
            EvaluationSample.evaluation_id == evaluation.id,
            Execution.verdict != Verdict.SANDBOX_ERROR,
        )
        .order_by(EvaluationSample.problem_id, EvaluationSample.sample_index)
    ).all()


def is_collected(progress: dict[str, int]) -> bool:
    """Every problem generated, every program executed, every judgeable one scored
    (a `problem_progress` or `evaluation_progress`)."""
    return (
        progress["generated"] == progress["problems"]
        and progress["executed"] == progress["candidates"]
        and progress["scored"] == progress["judgeable"]
    )


def _counts_by_iteration(session: Session, query: Select) -> dict[int, int]:
    return {iteration_id: count for iteration_id, count in session.execute(query)}


def iteration_summaries(session: Session) -> list[dict[str, Any]]:
    """Every iteration with its candidate, execution and hard-negative counts, verdict
    mix, dataset tag and the accuracy of the reward model trained at its end: the one
    summary behind `rewardranker status`, `GET /iterations`, the dashboard and the report."""
    iterations = session.scalars(select(Iteration).order_by(Iteration.number)).all()
    candidates = _counts_by_iteration(
        session,
        select(Candidate.iteration_id, func.count())
        .where(Candidate.iteration_id.is_not(None))
        .group_by(Candidate.iteration_id),
    )
    hard_negatives = _counts_by_iteration(
        session,
        select(
            HardNegativeLabel.iteration_id,
            func.count(func.distinct(HardNegativeLabel.candidate_id)),
        )
        .where(HardNegativeLabel.iteration_id.is_not(None))
        .group_by(HardNegativeLabel.iteration_id),
    )
    verdicts: dict[int, dict[str, int]] = {}
    # executions.iteration_id copies the candidate's, so this needs no join.
    for iteration_id, verdict, count in session.execute(
        select(Execution.iteration_id, Execution.verdict, func.count())
        .where(Execution.iteration_id.is_not(None))
        .group_by(Execution.iteration_id, Execution.verdict)
    ):
        verdicts.setdefault(iteration_id, {})[str(verdict)] = count
    tampered = _counts_by_iteration(
        session,
        select(Execution.iteration_id, func.count())
        .where(Execution.iteration_id.is_not(None), Execution.tampered)
        .group_by(Execution.iteration_id),
    )
    tags = dict(session.execute(select(DatasetVersion.iteration_id, DatasetVersion.dvc_tag)).all())
    trained = {}  # the last successful reward training of each iteration
    for run in session.scalars(
        select(TrainingRun)
        .where(TrainingRun.kind == RunKind.REWARD, TrainingRun.status == RunStatus.SUCCEEDED)
        .order_by(TrainingRun.id)
    ):
        trained[run.iteration_id] = run.metrics.get("pairwise_accuracy")
    return [
        {
            "number": iteration.number,
            "status": str(iteration.status),
            "generator_version_id": iteration.generator_version_id,
            "reward_model_version_id": iteration.reward_model_version_id,
            "params": iteration.params,
            "metrics": iteration.metrics,
            "created_at": iteration.created_at,
            "finished_at": iteration.finished_at,
            "candidates": candidates.get(iteration.id, 0),
            # samples that repeated a program already stored (kept once, so not counted above)
            "repeats": max(iteration.params.get("sampled", 0) - candidates.get(iteration.id, 0), 0),
            "executions": sum(verdicts.get(iteration.id, {}).values()),
            "hard_negatives": hard_negatives.get(iteration.id, 0),
            # runs the sandbox caught forging OK or disarming the tests
            "tampered": tampered.get(iteration.id, 0),
            "verdicts": verdicts.get(iteration.id, {}),
            "dvc_tag": tags.get(iteration.id),
            "reward_accuracy": trained.get(iteration.id),
        }
        for iteration in iterations
    ]
