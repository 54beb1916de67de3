"""The `generation` queue: store an iteration's candidates, or an evaluation's draws,
a batch of problems at a time."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Evaluation, Iteration, ModelVersion, Problem
from models.db import session_scope, write_with_retry
from models.enums import Origin
from models.repository import insert_candidates, insert_evaluation_samples, lock_row

# The stage's heavy imports (torch, transformers) happen here, once, in the worker's
# parent process before it forks its pool, instead of in the first task each runs.
from pipelines.generation import GenerationConfig, PromptSpec, Sample, make_generator
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


@dataclass(frozen=True)
class Sampling:
    """A batch's sampling, read from the store before the long work, so that no
    connection is held while the model samples."""

    prompts: tuple[PromptSpec, ...]
    samples: int
    generator_version_id: int
    backend: str
    model: str
    seed: int
    max_new_tokens: int
    prompt_style: str

    def run(self) -> list[list[Sample]]:
        generator = generator_for(
            self.backend, self.model, self.seed, self.max_new_tokens, self.prompt_style
        )
        return generator.generate(list(self.prompts), self.samples)


def _problems(session: Session, problem_ids: list[int]) -> tuple[PromptSpec, ...]:
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(problem_ids)).order_by(Problem.id)
    ).all()
    return tuple(PromptSpec.from_problem(p) for p in problems)


def plan_candidates(session: Session, iteration_id: int, problem_ids: list[int]) -> Sampling | None:
    """What the iteration still has to sample for these problems, or None."""
    iteration = session.get(Iteration, iteration_id)
    todo = [p for p in problem_ids if p not in iteration.params["generated"]]
    if not todo:
        return None
    params = FlywheelParams.from_dict(iteration.params)
    version = session.get(ModelVersion, iteration.generator_version_id)
    return Sampling(
        prompts=_problems(session, todo),
        samples=params.candidates,
        generator_version_id=version.id,
        backend=params.backend,
        model=version.path or version.base_model,
        seed=iteration.number,
        max_new_tokens=params.max_new_tokens,
        prompt_style=params.prompt_style,
    )


def store_candidates(
    session: Session, iteration_id: int, sampling: Sampling, samples: list[list[Sample]]
) -> None:
    """Store the iteration's samples as candidates, once (flush only)."""
    iteration = lock_row(session, Iteration, iteration_id)  # held only for the write
    generated = set(iteration.params["generated"])
    origin = Origin.MUTATION if sampling.backend == "mutation" else Origin.GENERATOR
    rows = [
        {
            "problem_id": prompt.problem_id,
            "code": sample.code,
            "origin": origin,
            "iteration_id": iteration_id,
            "generator_version_id": sampling.generator_version_id,
            "num_tokens": sample.num_tokens,
        }
        for prompt, problem_samples in zip(sampling.prompts, samples, strict=True)
        if prompt.problem_id not in generated  # a concurrent copy of this task got here first
        for sample in problem_samples
    ]
    insert_candidates(session, rows)
    iteration.params = {
        **iteration.params,
        "generated": sorted(generated | {p.problem_id for p in sampling.prompts}),
        # Samples drawn, against which the stored candidates are counted: a program
        # stored before (an earlier iteration's, a repeat) is kept once.
        "sampled": iteration.params.get("sampled", 0) + len(rows),
    }


def generate_candidates(session: Session, iteration_id: int, problem_ids: list[int]) -> None:
    """Plan, sample and store in one session: the in-process path."""
    if sampling := plan_candidates(session, iteration_id, problem_ids):
        store_candidates(session, iteration_id, sampling, sampling.run())


def plan_draws(session: Session, evaluation_id: int, problem_ids: list[int]) -> Sampling | None:
    """What the evaluation still has to draw for these held-out problems, or None."""
    evaluation = session.get(Evaluation, evaluation_id)
    todo = [p for p in problem_ids if p not in evaluation.params["generated"]]
    if not todo:
        return None
    params = evaluation.params
    version = session.get(ModelVersion, evaluation.generator_version_id)
    return Sampling(
        prompts=_problems(session, todo),
        samples=params["samples"],
        generator_version_id=version.id,
        backend=params["backend"],
        model=version.path or version.base_model,
        seed=params["seed"],
        max_new_tokens=params["max_new_tokens"],
        prompt_style=params["prompt_style"],
    )


def store_draws(
    session: Session, evaluation_id: int, sampling: Sampling, samples: list[list[Sample]]
) -> None:
    """Store an evaluation's draws, once: each sample a candidate (origin
    `evaluation`, no iteration) and one `EvaluationSample` per draw (flush only)."""
    evaluation = lock_row(session, Evaluation, evaluation_id)  # held only for the write
    generated = set(evaluation.params["generated"])
    draws = [
        (prompt.problem_id, index, sample)
        for prompt, problem_samples in zip(sampling.prompts, samples, strict=True)
        if prompt.problem_id not in generated  # a concurrent copy of this task got here first
        for index, sample in enumerate(problem_samples)
    ]
    ids = insert_candidates(
        session,
        [
            {
                "problem_id": problem_id,
                "code": sample.code,
                "origin": Origin.EVALUATION,
                "generator_version_id": sampling.generator_version_id,
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
    evaluation.params = {
        **evaluation.params,
        "generated": sorted(generated | {p.problem_id for p in sampling.prompts}),
    }


def draw_evaluation_samples(session: Session, evaluation_id: int, problem_ids: list[int]) -> None:
    """Plan, sample and store in one session: the in-process path (`rewardranker evaluate`)."""
    if sampling := plan_draws(session, evaluation_id, problem_ids):
        store_draws(session, evaluation_id, sampling, sampling.run())


def _sample_then_store(
    plan: Callable[[Session], Sampling | None],
    store: Callable[[Session, Sampling, list[list[Sample]]], None],
    follow_up: Callable[[Session], None],
) -> None:
    """Plan in one short transaction, sample with no connection held, then store
    and send the follow-ups through `write_with_retry`: minutes of sampling
    survive a cut connection or a database restart."""
    with session_scope() as session:
        sampling = plan(session)
    samples = sampling.run() if sampling else []

    def write(session: Session) -> None:
        if sampling:
            store(session, sampling, samples)
        follow_up(session)

    write_with_retry(write)


@celery.task(name=DRAW_SAMPLES, **RETRY)
def draw_samples(evaluation_id: int, problem_ids: list[int]) -> None:
    _sample_then_store(
        lambda session: plan_draws(session, evaluation_id, problem_ids),
        lambda session, sampling, samples: store_draws(session, evaluation_id, sampling, samples),
        lambda session: after_drawing(session, evaluation_id, problem_ids),
    )


@celery.task(name=GENERATE_BATCH, **RETRY)
def generate_batch(iteration_id: int, problem_ids: list[int]) -> None:
    _sample_then_store(
        lambda session: plan_candidates(session, iteration_id, problem_ids),
        lambda session, sampling, samples: store_candidates(
            session, iteration_id, sampling, samples
        ),
        lambda session: after_generation(session, iteration_id, problem_ids),
    )
