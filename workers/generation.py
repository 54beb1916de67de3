"""The `generation` queue: store an iteration's candidates, a batch of problems at a time."""

from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Iteration, ModelVersion, Problem
from models.db import session_scope
from models.enums import Origin
from models.repository import insert_candidates

# The stage's heavy imports (torch, transformers) happen here, once, in the worker's
# parent process before it forks its pool, instead of in the first task each runs.
from pipelines.generation import GenerationConfig, PromptSpec, make_generator
from workers.celery_app import RETRY, celery
from workers.iteration import FlywheelParams, after_generation, lock_iteration
from workers.names import GENERATE_BATCH


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
    iteration = lock_iteration(session, iteration_id)
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
    iteration.params = {**iteration.params, "generated": sorted(generated | set(todo))}
    return problem_ids


@celery.task(name=GENERATE_BATCH, **RETRY)
def generate_batch(iteration_id: int, problem_ids: list[int]) -> None:
    with session_scope() as session:
        done = generate_candidates(session, iteration_id, problem_ids)
        after_generation(session, iteration_id, done)
