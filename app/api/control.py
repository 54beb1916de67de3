"""Control endpoints: training triggers, best-of-N solving and health.

Celery, torch and the pipelines are imported inside the endpoints that use
them: the read endpoints and the dashboard should start fast and need neither."""

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app import queries
from app.api.deps import DbSession, Transactions
from app.api.schemas import HealthOut, SolveIn, SolveOut, TrainingRunIn, TrainingRunOut
from app.problem_import import upsert_problems
from models import Iteration, ModelVersion, Problem, TrainingRun
from models.enums import ModelKind, Origin, Split
from models.repository import current_model, insert_candidates, insert_scores
from models.settings import get_settings
from workers.names import QUEUES

router = APIRouter()

INSPECT_TIMEOUT_S = 1.0


@router.post(
    "/training-runs",
    status_code=202,
    response_model=TrainingRunOut,
    tags=["training"],
    responses={409: {"description": "A run of that kind is already queued or running."}},
)
def post_training_run(session: DbSession, body: TrainingRunIn) -> Any:
    """Queue a reward-model or policy training; the task is enqueued once this commits."""
    from workers.runs import enqueue_training

    iteration_id = None
    if body.iteration is not None:
        iteration_id = session.scalar(
            select(Iteration.id).where(Iteration.number == body.iteration)
        )
        if iteration_id is None:
            raise HTTPException(422, f"no iteration {body.iteration}")
    run, created = enqueue_training(
        session, body.kind, params=body.params, iteration_id=iteration_id
    )
    if not created:
        return JSONResponse(
            status_code=409,
            content={
                "detail": f"a {body.kind} training is already {run.status} (run {run.id})",
                "run_id": run.id,
            },
        )
    session.flush()
    return queries.training_run_dict(run)


@router.get("/training-runs/{run_id}", response_model=TrainingRunOut, tags=["training"])
def get_training_run(session: DbSession, run_id: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> Any:
    """Status and progress of one training run."""
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise HTTPException(404, f"no training run {run_id}")
    return queries.training_run_dict(run)


@router.post(
    "/solve",
    response_model=SolveOut,
    tags=["inference"],
    responses={
        409: {"description": "No reward model is registered yet."},
        503: {"description": "The current models cannot be loaded on this machine."},
    },
)
def post_solve(transactions: Transactions, body: SolveIn, request: Request) -> dict[str, Any]:
    """Best-of-N: sample `n` programs with the current generator, return the one the
    current reward model ranks first. Every sample is stored with origin `request`."""
    from pipelines.evaluation import solve
    from pipelines.generation import PromptSpec
    from pipelines.loading import ModelNotFoundError

    # 1. Read the current models and store the request's problem, and commit:
    # no transaction (nor the locks of its writes) stays open while generating.
    with transactions() as session:
        reward_version = current_model(session, ModelKind.REWARD)
        if reward_version is None:
            raise HTTPException(
                409,
                "no reward model is registered yet: "
                'train one with POST /training-runs {"kind": "reward"}',
            )
        generator_version = current_model(session, ModelKind.GENERATOR)
        problem_id = _request_problem(session, body)

    # 2. Load the models, generate and score: seconds to minutes, outside any transaction.
    try:
        generator, scorer = _models_for(
            request, generator_version, reward_version, body.max_new_tokens
        )
    except ModelNotFoundError as error:
        # The registry points at weights this machine cannot load: not the
        # caller's fault, and not a crash either.
        raise HTTPException(503, f"the current models cannot be loaded: {error}") from None
    prompt = PromptSpec(problem_id=problem_id, language=str(body.language), prompt=body.prompt)
    solution = solve(prompt, body.n, generator, scorer, tests=body.tests)

    # 3. Store the samples and their scores in a second, short transaction. A
    # program already stored for the problem keeps its row and score, so running
    # this again (a retried request) stores nothing twice.
    generator_version_id = None if generator_version is None else generator_version.id
    with transactions() as session:
        ids = insert_candidates(
            session,
            [
                {
                    "problem_id": problem_id,
                    "code": sample.code,
                    "origin": Origin.REQUEST,
                    "generator_version_id": generator_version_id,
                    "num_tokens": sample.num_tokens,
                }
                for sample in solution.samples
            ],
        )
        scores = dict(zip(ids, solution.scores, strict=True))  # duplicate programs share one row
        insert_scores(
            session,
            [
                {"candidate_id": i, "reward_model_version_id": reward_version.id, "score": s}
                for i, s in scores.items()
            ],
        )
    best_id = ids[next(i for i, s in enumerate(solution.samples) if s.code == solution.best.code)]
    return {
        "candidate_id": best_id,
        "problem_id": problem_id,
        "code": solution.best.code,
        "score": solution.score,
        "generator_version_id": generator_version_id,
        "reward_model_version_id": reward_version.id,
        "samples": [{"candidate_id": i, "score": s} for i, s in scores.items()],
    }


def _models_for(
    request: Request,
    generator_version: ModelVersion | None,
    reward_version: ModelVersion,
    max_new_tokens: int,
) -> tuple[Any, Any]:
    """The generator and scorer of the current versions, loaded once and kept on the
    app until a newer version is registered (loading takes seconds)."""
    from pipelines.generation import GenerationConfig, make_generator
    from pipelines.reward_model import RewardScorer

    generator_id = None if generator_version is None else generator_version.id
    key = (generator_id, reward_version.id, max_new_tokens)
    cached = request.app.state.solver_models
    if cached.get("key") != key:
        spec = (
            get_settings().generator_model
            if generator_version is None
            else generator_version.path or generator_version.base_model
        )
        cached.clear()
        cached.update(
            key=key,
            generator=make_generator(GenerationConfig(model=spec, max_new_tokens=max_new_tokens)),
            scorer=RewardScorer(reward_version.path or reward_version.base_model),
        )
    return cached["generator"], cached["scorer"]


def _request_problem(session: Session, body: SolveIn) -> int:
    """The problem row a request's candidates hang off: one per distinct prompt
    and language, keyed by the prompt's hash, so asking twice reuses it."""
    task_id = hashlib.sha256(body.prompt.encode()).hexdigest()[:32]
    upsert_problems(
        session,
        [
            {
                "source": "request",
                "task_id": task_id,
                "language": body.language,
                "prompt": body.prompt,
                "tests": body.tests or "",
                "entry_point": None,
                "reference_solution": None,
                "io_cases": None,
                # A request is not a benchmark problem: nothing evaluates on it.
                "split": Split.TRAIN,
            }
        ],
        eval_fraction=0.0,
    )
    return session.scalar(
        select(Problem.id).where(
            Problem.source == "request",
            Problem.language == body.language,
            Problem.task_id == task_id,
        )
    )


@router.get("/health", response_model=HealthOut, tags=["health"])
def get_health(session: DbSession) -> JSONResponse:
    """The database, the broker and the live workers per queue; 503 when degraded."""
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as error:  # a health check reports failures, it does not raise them
        database = f"error: {type(error).__name__}: {error}"
    broker, workers = _broker_health()
    healthy = database == "ok" and broker == "ok"
    body = {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "broker": broker,
        "workers": workers,
    }
    return JSONResponse(status_code=200 if healthy else 503, content=body)


def _broker_health() -> tuple[str, dict[str, list[str]]]:
    workers: dict[str, list[str]] = {queue: [] for queue in QUEUES}
    try:
        from workers.celery_app import celery

        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=INSPECT_TIMEOUT_S)
        replies = celery.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
    except Exception as error:  # any broker failure is what this endpoint exists to report
        return f"error: {type(error).__name__}: {error}", workers
    for worker, consumed in replies.items():
        for queue in consumed:
            workers.setdefault(queue["name"], []).append(worker)
    return "ok", workers
