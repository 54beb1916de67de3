"""The `generation` queue: store an iteration's candidates, or an evaluation's draws,
a batch of problems at a time."""

from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Evaluation, Iteration, ModelVersion, Problem
from models.db import session_scope
from models.enums import Origin
from models.repository import insert_candidates, insert_evaluation_samples, lock_row

# The stage's heavy imports (torch, transformers) happen here, once, in the worker's
# parent process before it forks its pool, instead of in the first task each runs.
from pipelines.generation import GenerationConfig, PromptSpec, make_generator
from workers.celery_app import RETRY, celery
from workers.iteration import FlywheelParams, after_drawing, after_generation
from workers.names import DRAW_SAMPLES, GENERATE_BATCH


# One at a time: a new policy version replaces the last, and a vLLM engine holds
# its share of the GPU until it is dropped.
@lru_cache(maxsize=1)
def generator_for(
    backend: str, model: str, seed: int, max_new_tokens: int, prompt_style: str = "auto"
):
    """One generator per worker process and configuration: loading a model is slow."""
    return make_generator(
        GenerationConfig(
            backend=backend,
            model=model,
            seed=seed,
            max_new_tokens=max_new_tokens,
            prompt_style=prompt_style,
        )
    )


def generate_candidates(session: Session, iteration_id: int, problem_ids: list[int]) -> list[int]:
    """Store the iteration's candidates for these problems, once. Returns the problems
    to execute (all of the batch: executing is itself idempotent)."""

    iteration = session.get(Iteration, iteration_id)
    todo = [p for p in problem_ids if p not in iteration.params["generated"]]
    if not todo:
        return problem_ids
    params = FlywheelParams.from_dict(iteration.params)
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(todo)).order_by(Problem.id)
    ).all()
    version = session.get(ModelVersion, iteration.generator_version_id)
    generator = generator_for(
        params.backend,
        version.path or version.base_model,
        iteration.number,
        params.max_new_tokens,
        params.prompt_style,
    )
    # Generate before taking the lock: the lock is held only for the write.
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params.candidates)
    iteration = lock_row(session, Iteration, iteration_id)
    generated = set(iteration.params["generated"])
    origin = Origin.MUTATION if params.backend == "mutation" else Origin.GENERATOR
    rows = [
        {
            "problem_id": problem.id,
            "code": sample.code,
            "origin": origin,
            "iteration_id": iteration_id,
            "generator_version_id": version.id,
            "num_tokens": sample.num_tokens,
        }
        for problem, problem_samples in zip(problems, samples, strict=True)
        if problem.id not in generated  # a concurrent copy of this task got here first
        for sample in problem_samples
    ]
    insert_candidates(session, rows)
    iteration.params = {
        **iteration.params,
        "generated": sorted(generated | set(todo)),
        # Samples drawn, against which the stored candidates are counted: a program
        # stored before (an earlier iteration's, a repeat) is kept once.
        "sampled": iteration.params.get("sampled", 0) + len(rows),
    }
    return problem_ids


def draw_evaluation_samples(
    session: Session, evaluation_id: int, problem_ids: list[int]
) -> list[int]:
    """Store an evaluation's draws for these held-out problems, once: each sample a
    candidate (origin `evaluation`, no iteration) and one `EvaluationSample` per draw.
    Returns the problems to execute."""
    evaluation = session.get(Evaluation, evaluation_id)
    todo = [p for p in problem_ids if p not in evaluation.params["generated"]]
    if not todo:
        return problem_ids
    params = evaluation.params
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(todo)).order_by(Problem.id)
    ).all()
    version = session.get(ModelVersion, evaluation.generator_version_id)
    generator = generator_for(
        params["backend"],
        version.path or version.base_model,
        params["seed"],
        params["max_new_tokens"],
        params["prompt_style"],
    )
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params["samples"])
    evaluation = lock_row(session, Evaluation, evaluation_id)  # held only for the write
    generated = set(evaluation.params["generated"])
    draws = [
        (problem.id, index, sample)
        for problem, problem_samples in zip(problems, samples, strict=True)
        if problem.id not in generated  # a concurrent copy of this task got here first
        for index, sample in enumerate(problem_samples)
    ]
    ids = insert_candidates(
        session,
        [
            {
                "problem_id": problem_id,
                "code": sample.code,
                "origin": Origin.EVALUATION,
                "generator_version_id": version.id,
                "num_tokens": sample.num_tokens,
            }
            for problem_id, _, sample in draws
        ],
    )
    insert_evaluation_samples(
        session,
        [
            {
                "evaluation_id": evaluation_id,
                "problem_id": problem_id,
                "sample_index": index,
                "candidate_id": candidate_id,
            }
            for (problem_id, index, _), candidate_id in zip(draws, ids, strict=True)
        ],
    )
    evaluation.params = {**evaluation.params, "generated": sorted(generated | set(todo))}
    return problem_ids


@celery.task(name=DRAW_SAMPLES, **RETRY)
def draw_samples(evaluation_id: int, problem_ids: list[int]) -> None:
    with session_scope() as session:
        done = draw_evaluation_samples(session, evaluation_id, problem_ids)
        after_drawing(session, evaluation_id, done)


@celery.task(name=GENERATE_BATCH, **RETRY)
def generate_batch(iteration_id: int, problem_ids: list[int]) -> None:
    with session_scope() as session:
        done = generate_candidates(session, iteration_id, problem_ids)
        after_generation(session, iteration_id, done)
