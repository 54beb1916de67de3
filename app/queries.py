"""Read queries over the candidate store, shared by the HTTP API, the CLI, the
report and the dashboard, so that all four answer a question the same way.

Candidates are listed with keyset pagination: the cursor carries the sort key
of the last row seen, so page 1000 costs what page 1 costs (an OFFSET would
scan every skipped row)."""

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, Select, and_, exists, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from models import (
    Candidate,
    DatasetVersion,
    Evaluation,
    Execution,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    TrainingRun,
    repository,
)
from models.enums import EvaluationStatus, Language, ModelKind, Origin, Split, Verdict

CandidateSort = Literal["time", "-time", "score", "-score"]
SORTS: tuple[str, ...] = ("time", "-time", "score", "-score")

# Columns of one row of a candidate listing, in the order CSV and Parquet use.
CANDIDATE_COLUMNS: tuple[str, ...] = (
    "id",
    "problem_id",
    "task_id",
    "language",
    "origin",
    "iteration",
    "generator_version_id",
    "verdict",
    "tests_passed",
    "tests_total",
    "tampered",
    "reward_model_version_id",
    "score",
    "hard_negative",
    "created_at",
)

# The headline metrics of an iteration, as the report, dashboard, CLI and
# `GET /iterations` show them (`headline` in each iteration):
#   random_pass1    mean pass rate of one random sample per problem
#   reranked_pass1  pass rate of the sample the reward model ranks first
#   oracle_pass_n   share of problems with at least one passing sample
#   pass_at_k       {"1": ..., "5": ..., "10": ...}, unbiased pass@k (Chen et al. 2021)
#   reward_pairwise_accuracy  held-out pairwise accuracy of the iteration's reward model
# A key stored at the top level of `Iteration.metrics` is taken as is. Otherwise
# they are derived from what the flywheel stores, `metrics["evaluation"]` (one
# `rerank_metrics` dict per language), as means over languages weighted by
# their number of problems, and from the reward model's `pairwise_accuracy`.
ITERATION_METRIC_KEYS: tuple[str, ...] = (
    "random_pass1",
    "reranked_pass1",
    "oracle_pass_n",
    "pass_at_k",
    "reward_pairwise_accuracy",
)


def headline_metrics(metrics: dict[str, Any], reward_accuracy: float | None) -> dict[str, Any]:
    """The ITERATION_METRIC_KEYS of one iteration (None where unknown)."""
    by_language = [m for m in (metrics.get("evaluation") or {}).values() if isinstance(m, dict)]

    def weighted(key: str) -> float | None:
        pairs = [
            (m[key], m.get("problems", 1))
            for m in by_language
            if isinstance(m.get(key), int | float)
        ]
        weight = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / weight if weight else None

    ks = sorted(
        {key.removeprefix("pass@") for m in by_language for key in m if key.startswith("pass@")}
    )
    derived = {
        "random_pass1": weighted("random_pass1"),
        "reranked_pass1": weighted("reranked_pass1"),
        "oracle_pass_n": weighted("oracle_pass_n"),
        "pass_at_k": {k: weighted(f"pass@{k}") for k in sorted(ks, key=int)} or None,
        "reward_pairwise_accuracy": reward_accuracy,
    }
    return {key: metrics.get(key, derived[key]) for key in ITERATION_METRIC_KEYS}


class QueryError(ValueError):
    """A query that cannot be answered as asked (a bad cursor, an unknown version)."""


INT32 = 2**31 - 1


class CandidateFilter(BaseModel):
    """What `GET /candidates`, `rewardranker candidates list` and the dashboard filter
    on, with each filter's bounds: the API takes it as its query parameters, the CLI
    builds it from its options.

    Each candidate shows one score: by default the one its own iteration's reward
    model gave it (a candidate without an iteration: the newest reward model that
    scored it), or that of `reward_model_version_id` when one is asked for.
    Sorting by score, or a score range, lists only candidates with a score shown.
    """

    model_config = ConfigDict(frozen=True)

    problem_id: int | None = Field(None, ge=1, le=INT32)
    language: Language | None = None
    iteration: int | None = Field(None, ge=0, le=INT32, description="Iteration number.")
    verdict: Verdict | None = None
    hard_negative: bool | None = None  # labelled by any reward model version
    tampered: bool | None = Field(
        None, description="Runs the sandbox caught forging OK or disarming the tests."
    )
    origin: Origin | None = None
    generator_version_id: int | None = Field(None, ge=1, le=INT32)
    reward_model_version_id: int | None = Field(
        None,
        ge=1,
        le=INT32,
        description="Whose scores to show and filter on; default each candidate's "
        "iteration's reward model.",
    )
    min_score: float | None = Field(None, allow_inf_nan=False)
    max_score: float | None = Field(None, allow_inf_nan=False)
    sort: CandidateSort = Field(
        "-time",
        description="time or score, '-' for descending; score lists scored candidates only.",
    )

    @property
    def needs_score(self) -> bool:
        """Whether only scored candidates are listed."""
        return (
            self.sort.endswith("score") or self.min_score is not None or self.max_score is not None
        )


def encode_cursor(sort: str, key: Any, candidate_id: int) -> str:
    """An opaque cursor: the sort and the last row's key, so the next page starts after it."""
    raw = json.dumps({"s": sort, "k": key, "i": candidate_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> tuple[Any, int]:
    """The (key, id) a cursor carries; QueryError when it is not one of ours or
    was made for another sort order."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        key, candidate_id = data["k"], data["i"]
        made_for = data["s"]
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError):
        raise QueryError("cursor is not valid: pass next_cursor from a previous page") from None
    if made_for != sort:
        raise QueryError(f"cursor was made for sort={made_for!r}, not sort={sort!r}")
    if not isinstance(candidate_id, int) or isinstance(candidate_id, bool):
        raise QueryError("cursor is not valid: pass next_cursor from a previous page")
    if sort.endswith("score") and not isinstance(key, int | float):
        raise QueryError("cursor is not valid: pass next_cursor from a previous page")
    return key, candidate_id


def shown_score(reward_model_version_id: int | None) -> ColumnElement[bool]:
    """The join condition that picks the one score a listing shows per candidate, in
    a query over Candidate, outer-joined Iteration and Score: the score of
    `reward_model_version_id`, or by default the one the candidate's iteration's
    reward model gave it. A candidate without an iteration shows the newest reward
    model's that scored it: an evaluation draw is scored once per evaluation, so
    that is the newest evaluation's, and a /solve sample has only its request's."""
    if reward_model_version_id is not None:
        return Score.reward_model_version_id == reward_model_version_id
    newer = aliased(Score)
    # Spelt as OR and NOT EXISTS, not as `= COALESCE(iteration's, (SELECT max ...))`:
    # PostgreSQL guesses that an equality with a subquery keeps 0.5% of the rows
    # and would then sort every score instead of walking the score index.
    return or_(
        Score.reward_model_version_id == Iteration.reward_model_version_id,
        and_(
            Candidate.iteration_id.is_(None),
            ~exists().where(
                newer.candidate_id == Score.candidate_id,
                newer.reward_model_version_id > Score.reward_model_version_id,
            ),
        ),
    )


def _is_hard_negative():
    return exists().where(HardNegativeLabel.candidate_id == Candidate.id)


def candidate_select(flt: CandidateFilter, *, with_code: bool = False) -> Select:
    """The filtered, sorted listing (without cursor or limit)."""
    score_join = and_(Score.candidate_id == Candidate.id, shown_score(flt.reward_model_version_id))
    columns = [
        Candidate.id,
        Candidate.problem_id,
        Problem.task_id,
        Problem.language,
        Candidate.origin,
        Iteration.number.label("iteration"),
        Candidate.generator_version_id,
        Execution.verdict,
        Execution.passed.label("tests_passed"),
        Execution.total.label("tests_total"),
        Execution.tampered,
        Score.reward_model_version_id,
        Score.score,
        Candidate.created_at,
    ]
    if with_code:
        columns.append(Candidate.code)
    query = (
        select(*columns)
        .join(Problem, Problem.id == Candidate.problem_id)
        .outerjoin(Iteration, Iteration.id == Candidate.iteration_id)
    )
    query = (
        query.join(Execution, Execution.candidate_id == Candidate.id)
        if flt.verdict is not None or flt.tampered is not None
        else query.outerjoin(Execution, Execution.candidate_id == Candidate.id)
    )
    query = query.join(Score, score_join) if flt.needs_score else query.outerjoin(Score, score_join)

    if flt.problem_id is not None:
        query = query.where(Candidate.problem_id == flt.problem_id)
    if flt.language is not None:
        query = query.where(Problem.language == flt.language)
    if flt.iteration is not None:
        query = query.where(Iteration.number == flt.iteration)
    if flt.verdict is not None:
        query = query.where(Execution.verdict == flt.verdict)
    if flt.hard_negative is not None:
        query = query.where(_is_hard_negative() if flt.hard_negative else ~_is_hard_negative())
    if flt.tampered is not None:
        query = query.where(Execution.tampered == flt.tampered)
    if flt.origin is not None:
        query = query.where(Candidate.origin == flt.origin)
    if flt.generator_version_id is not None:
        query = query.where(Candidate.generator_version_id == flt.generator_version_id)
    if flt.min_score is not None:
        query = query.where(Score.score >= flt.min_score)
    if flt.max_score is not None:
        query = query.where(Score.score <= flt.max_score)

    if flt.sort == "time":
        query = query.order_by(Candidate.id)
    elif flt.sort == "-time":
        # Ids come from a sequence, so id order is insertion (creation) order,
        # and the primary key index serves it.
        query = query.order_by(Candidate.id.desc())
    elif flt.sort == "score":
        query = query.order_by(Score.score, Candidate.id)
    else:
        query = query.order_by(Score.score.desc(), Candidate.id.desc())
    return query


def _after_cursor(query: Select, flt: CandidateFilter, cursor: str) -> Select:
    sort = flt.sort
    key, last_id = decode_cursor(cursor, sort)
    # Each bound below that repeats another (through a join, or as part of a
    # row comparison) lets an index scan start at the cursor: without them,
    # PostgreSQL reads every row of the pages before it. Only inner-joined
    # tables get one, as a WHERE on an outer-joined table would drop rows.
    if sort in ("time", "-time"):
        ids = [Candidate.id]
        if flt.verdict is not None:
            ids.append(Execution.candidate_id)
        if flt.needs_score:
            ids.append(Score.candidate_id)
        return query.where(*(i > last_id if sort == "time" else i < last_id for i in ids))
    if sort == "score":
        return query.where(
            Score.score >= key, tuple_(Score.score, Candidate.id) > tuple_(key, last_id)
        )
    return query.where(Score.score <= key, tuple_(Score.score, Candidate.id) < tuple_(key, last_id))


def _with_labels(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `hard_negative` on a chunk of an export with one indexed lookup.
    As a correlated EXISTS in the listing, PostgreSQL hashes the whole label
    table instead."""
    ids = [row["id"] for row in rows]
    labelled = (
        set(
            session.scalars(
                select(HardNegativeLabel.candidate_id).where(
                    HardNegativeLabel.candidate_id.in_(ids)
                )
            )
        )
        if ids
        else set()
    )
    for row in rows:
        row["hard_negative"] = row["id"] in labelled
    return rows


def _row_dict(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    for name in ("language", "origin", "verdict"):
        if data.get(name) is not None:
            data[name] = str(data[name])
    return data


@dataclass
class CandidatePage:
    items: list[dict[str, Any]]
    next_cursor: str | None
    # The version asked for; None when each row shows its own iteration's (the
    # row's `reward_model_version_id` names the version of its score).
    reward_model_version_id: int | None


def list_candidates(
    session: Session, flt: CandidateFilter, *, limit: int = 50, cursor: str | None = None
) -> CandidatePage:
    """One page of candidates; `next_cursor` is None on the last page."""
    query = candidate_select(flt)
    if cursor:
        query = _after_cursor(query, flt, cursor)
    # The hard-negative flag is one index probe per row of the page, in the
    # same statement: PostgreSQL evaluates an expensive output column after
    # the sort and limit. As an EXISTS it might hash the whole label table
    # instead; a scalar subquery it can only probe.
    labelled = (
        select(HardNegativeLabel.id)
        .where(HardNegativeLabel.candidate_id == Candidate.id)
        .limit(1)
        .scalar_subquery()
        .is_not(None)
    )
    query = query.add_columns(labelled.label("hard_negative")).limit(limit + 1)
    rows = [_row_dict(row) for row in session.execute(query)]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(
            flt.sort, last["score"] if flt.sort.endswith("score") else None, last["id"]
        )
    return CandidatePage(rows, next_cursor, flt.reward_model_version_id)


def iter_candidates(
    session: Session,
    flt: CandidateFilter,
    *,
    cursor: str | None = None,
    with_code: bool = True,
    chunk_size: int = 2000,
) -> Iterator[list[dict[str, Any]]]:
    """Every matching candidate, in chunks, read through a server-side cursor:
    memory stays bounded by one chunk however many rows match."""
    query = candidate_select(flt, with_code=with_code)
    if cursor:
        query = _after_cursor(query, flt, cursor)
    result = session.execute(query.execution_options(stream_results=True, yield_per=chunk_size))
    for partition in result.partitions():
        yield _with_labels(session, [_row_dict(row) for row in partition])


def candidate_detail(session: Session, candidate_id: int) -> dict[str, Any] | None:
    """Everything known about one candidate: code, execution, scores, labels, lineage."""
    candidate = session.get(Candidate, candidate_id)
    if candidate is None:
        return None
    problem = session.get(Problem, candidate.problem_id)
    execution = session.scalars(
        select(Execution).where(Execution.candidate_id == candidate_id)
    ).first()
    scores = session.execute(
        select(Score.reward_model_version_id, ModelVersion.name, Score.score, Score.created_at)
        .join(ModelVersion, ModelVersion.id == Score.reward_model_version_id)
        .where(Score.candidate_id == candidate_id)
        .order_by(Score.reward_model_version_id)
    ).all()
    labels = session.execute(
        select(
            HardNegativeLabel.reward_model_version_id,
            HardNegativeLabel.rule,
            Iteration.number,
            HardNegativeLabel.iteration_id,
            HardNegativeLabel.created_at,
        )
        .outerjoin(Iteration, Iteration.id == HardNegativeLabel.iteration_id)
        .where(HardNegativeLabel.candidate_id == candidate_id)
        .order_by(HardNegativeLabel.id)
    ).all()
    generator = (
        session.get(ModelVersion, candidate.generator_version_id)
        if candidate.generator_version_id is not None
        else None
    )
    iteration = (
        session.get(Iteration, candidate.iteration_id)
        if candidate.iteration_id is not None
        else None
    )
    # The datasets exported by the iteration that produced the candidate and by
    # the iterations that labelled it a hard negative carry it as training data.
    iteration_ids = {candidate.iteration_id} | {label.iteration_id for label in labels}
    iteration_ids.discard(None)
    datasets = session.scalars(
        select(DatasetVersion)
        .where(DatasetVersion.iteration_id.in_(iteration_ids))
        .order_by(DatasetVersion.iteration_id)
    ).all()
    return {
        "id": candidate.id,
        "problem": {
            "id": problem.id,
            "source": problem.source,
            "task_id": problem.task_id,
            "language": str(problem.language),
            "prompt": problem.prompt,
        },
        "code": candidate.code,
        "origin": str(candidate.origin),
        "num_tokens": candidate.num_tokens,
        "created_at": candidate.created_at,
        "execution": None
        if execution is None
        else {
            "verdict": str(execution.verdict),
            "tests_passed": execution.passed,
            "tests_total": execution.total,
            "duration_ms": execution.duration_ms,
            "peak_memory_kb": execution.peak_memory_kb,
            "stdout_tail": execution.stdout_tail,
            "stderr_tail": execution.stderr_tail,
            "attempts": execution.attempts,
            "tampered": execution.tampered,
            "tamper_reason": execution.tamper_reason,
        },
        "scores": [
            {"reward_model_version_id": v, "reward_model_name": n, "score": s, "created_at": t}
            for v, n, s, t in scores
        ],
        "hard_negative_labels": [
            {"reward_model_version_id": v, "rule": r, "iteration": n, "created_at": t}
            for v, r, n, _, t in labels
        ],
        "lineage": {
            "generator": None if generator is None else model_dict(generator),
            "iteration": None if iteration is None else iteration.number,
            "dataset_versions": [dataset_dict(d) for d in datasets],
        },
    }


def model_dict(version: ModelVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "kind": str(version.kind),
        "name": version.name,
        "parent_id": version.parent_id,
        "base_model": version.base_model,
        "path": version.path,
        "status": str(version.status),
        "metrics": version.metrics,
        "created_at": version.created_at,
    }


def dataset_dict(dataset: DatasetVersion) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "iteration_id": dataset.iteration_id,
        "dvc_tag": dataset.dvc_tag,
        "git_rev": dataset.git_rev,
        "md5": dataset.md5,
        "path": dataset.path,
        "counts": dataset.counts,
    }


def list_models(session: Session, kind: ModelKind | None = None) -> list[dict[str, Any]]:
    query = select(ModelVersion).order_by(ModelVersion.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return [model_dict(version) for version in session.scalars(query)]


def problem_dict(problem: Problem, *, full: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": problem.id,
        "source": problem.source,
        "task_id": problem.task_id,
        "language": str(problem.language),
        "split": str(problem.split),
        "entry_point": problem.entry_point,
        "created_at": problem.created_at,
    }
    if full:
        data |= {
            "prompt": problem.prompt,
            "tests": problem.tests,
            "reference_solution": problem.reference_solution,
            "io_cases": problem.io_cases,
        }
    return data


def list_problems(
    session: Session,
    *,
    language: Language | None = None,
    source: str | None = None,
    split: Split | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Problems in id order; pass the last id seen as `after_id` for the next page."""
    query = select(Problem).order_by(Problem.id).limit(limit)
    if split is not None:
        query = query.where(Problem.split == split)
    if language is not None:
        query = query.where(Problem.language == language)
    if source is not None:
        query = query.where(Problem.source == source)
    if after_id is not None:
        query = query.where(Problem.id > after_id)
    return [problem_dict(problem) for problem in session.scalars(query)]


def iteration_summaries(session: Session) -> list[dict[str, Any]]:
    """The store's per-iteration summary with its headline metrics: what
    `GET /iterations`, the CLI and the report show."""
    accuracies = {
        version_id: accuracy for version_id, _, accuracy in reward_model_accuracies(session)
    }
    return [
        {
            **summary,
            "headline": headline_metrics(
                summary["metrics"], accuracies.get(summary["reward_model_version_id"])
            ),
        }
        for summary in repository.iteration_summaries(session)
    ]


def interval_text(figure: dict[str, float] | None) -> str:
    """A table cell: `0.123 [0.080, 0.170]`, or `-` where a figure is undefined."""
    if figure is None:
        return "-"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def held_out_table(session: Session) -> dict[str, Any]:
    """The paper's table over the finished evaluations on held-out problems, with
    what each one measured: `paper_table`'s columns, rows and verdict, plus
    `evaluations` (number, status, model versions, problems and samples)."""
    from pipelines.evaluation import paper_table

    evaluations = session.scalars(select(Evaluation).order_by(Evaluation.number)).all()
    done = [e for e in evaluations if e.status == EvaluationStatus.DONE]
    draws = {e.number: _draws_by_problem(session, e) for e in {*done[:1], *done[-1:]}}
    return {
        **paper_table([(e.number, e.metrics) for e in done], draws),
        "evaluations": [
            {
                "number": e.number,
                "status": str(e.status),
                "generator_version_id": e.generator_version_id,
                "reward_model_version_id": e.reward_model_version_id,
                "problems": len(e.params.get("problem_ids", [])),
                "samples": e.params.get("samples"),
                "finished_at": e.finished_at,
            }
            for e in evaluations
        ],
    }


def _draws_by_problem(session: Session, evaluation: Evaluation) -> dict[int, list]:
    """An evaluation's judged draws as `(score, passed)` by problem; unscored last."""
    draws: dict[int, list[tuple[float, bool]]] = {}
    for _, problem_id, score, passed in repository.evaluation_draws(session, evaluation):
        draws.setdefault(problem_id, []).append((float("-inf") if score is None else score, passed))
    return draws


def iteration_detail(session: Session, number: int) -> dict[str, Any] | None:
    iteration = session.scalars(select(Iteration).where(Iteration.number == number)).first()
    if iteration is None:
        return None
    summary = next(s for s in iteration_summaries(session) if s["number"] == number)
    dataset = session.scalars(
        select(DatasetVersion).where(DatasetVersion.iteration_id == iteration.id)
    ).first()
    runs = session.scalars(
        select(TrainingRun).where(TrainingRun.iteration_id == iteration.id).order_by(TrainingRun.id)
    ).all()
    return {
        **summary,
        "dataset_version": None if dataset is None else dataset_dict(dataset),
        "training_runs": [training_run_dict(run) for run in runs],
    }


def training_run_dict(run: TrainingRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "kind": str(run.kind),
        "status": str(run.status),
        "iteration_id": run.iteration_id,
        "params": run.params,
        "metrics": run.metrics,
        "progress": run.progress,
        "error": run.error,
        "result_model_version_id": run.result_model_version_id,
        "attempt": run.attempt,
        "owner": f"{run.owner_host}/{run.owner_pid}" if run.owner_host else None,
        "resumed_from_step": run.resumed_from_step,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "heartbeat_at": run.heartbeat_at,
        "finished_at": run.finished_at,
    }


def reward_model_accuracies(session: Session) -> list[tuple[int, str, float]]:
    """(version id, name, pairwise accuracy) of every reward model that recorded one."""
    found = []
    for version in session.scalars(
        select(ModelVersion).where(ModelVersion.kind == ModelKind.REWARD).order_by(ModelVersion.id)
    ):
        accuracy = version.metrics.get("pairwise_accuracy")
        if isinstance(accuracy, int | float):
            found.append((version.id, version.name, float(accuracy)))
    return found


def score_samples(
    session: Session, reward_model_version_id: int | None = None, *, limit: int = 20000
) -> dict[str, list[float]]:
    """Scores of passing and failing candidates, the one the listing shows for each
    (see `shown_score`), at most `limit` of the newest scores."""
    rows = session.execute(
        select(Score.score, Execution.verdict == Verdict.OK)
        .join(Candidate, Candidate.id == Score.candidate_id)
        .outerjoin(Iteration, Iteration.id == Candidate.iteration_id)
        .join(Execution, Execution.candidate_id == Score.candidate_id)
        .where(shown_score(reward_model_version_id))
        .order_by(Score.id.desc())
        .limit(limit)
    )
    samples: dict[str, list[float]] = {"passing": [], "failing": []}
    for score, passed in rows:
        samples["passing" if passed else "failing"].append(score)
    return samples


def candidate_row_values(row: dict[str, Any], columns: tuple[str, ...]) -> list[Any]:
    """A row's values in column order, datetimes as ISO 8601 (for CSV and tables)."""
    return [row[c].isoformat() if isinstance(row.get(c), datetime) else row.get(c) for c in columns]
