"""The evaluation stage: a generator and a reward model measured on held-out problems.

Evaluation 0 measures the base generator with the warm-start reward model, before
iteration 1 trains anything; evaluation N measures the models iteration N left
(its policy update's generator, its retrained reward model). Each one:

1. `open_evaluation` picks the held-out problems (the same ones as evaluation 0,
   so every evaluation is paired with the baseline); the state machine
   (`workers.iteration.start_evaluation`) sends its batches.
2. The queues do the work: `generation.draw_samples` stores one `EvaluationSample`
   per draw (RR_EVAL_SAMPLES per problem), `execution.execute_drawn` judges the
   programs, `labeling.score_drawn` scores them with the evaluation's reward model.
3. `finish_evaluation` computes the metrics once everything is scored.

Evaluation programs have origin `evaluation` and no iteration, and live only on
`eval` problems, so no training path (pairs, mining, datasets, policy prompts)
ever reads them. Like every stage, each step is idempotent by store state.
"""

from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from models import (
    Evaluation,
    EvaluationSample,
    Execution,
    Iteration,
    Problem,
    Score,
    TrainingRun,
)
from models.base import utcnow
from models.enums import EvaluationStatus, RunKind, RunStatus, Split, Verdict
from models.repository import (
    drawn_score,
    evaluation_draws,
    evaluation_progress,
    insert_evaluation,
    is_collected,
    lock_row,
)
from models.settings import get_settings
from pipelines.evaluation import evaluation_report


def held_out_problem_ids(session: Session, limit: int) -> list[int]:
    """The first `limit` held-out problems with tests, by id (0: all of them)."""
    query = (
        select(Problem.id)
        .where(Problem.split == Split.EVAL, (Problem.tests != "") | Problem.io_cases.is_not(None))
        .order_by(Problem.id)
    )
    return list(session.scalars(query.limit(limit) if limit else query))


def models_after(session: Session, number: int) -> tuple[int, int] | None:
    """(generator, reward model) version ids that evaluation `number` measures, or
    None while they do not exist yet. 0: iteration 1's generator and the reward
    model it generated with (the warm start); N: iteration N's policy result (or
    its generator when it skipped the update) and its last retrained reward model."""
    iteration = session.scalar(select(Iteration).where(Iteration.number == max(number, 1)))
    if iteration is None or iteration.reward_model_version_id is None:
        return None
    if number == 0:
        return iteration.generator_version_id, iteration.reward_model_version_id

    def result(kind: RunKind) -> int | None:
        return session.scalar(
            select(TrainingRun.result_model_version_id)
            .where(
                TrainingRun.iteration_id == iteration.id,
                TrainingRun.kind == kind,
                TrainingRun.status == RunStatus.SUCCEEDED,
            )
            .order_by(TrainingRun.id.desc())
            .limit(1)
        )

    reward = result(RunKind.REWARD)
    if reward is None:
        return None
    return result(RunKind.POLICY) or iteration.generator_version_id, reward


def open_evaluation(
    session: Session,
    number: int,
    iteration: Iteration,
    *,
    eval_problems: int,
    generation: dict[str, Any],
) -> Evaluation | None:
    """Evaluation `number`, added unless it exists; None when there is nothing to
    evaluate (no held-out problem) or its models are not trained yet.

    `generation` holds the iteration's backend, max_new_tokens, prompt_style and
    batch_size; the samples per problem come from RR_EVAL_SAMPLES.
    """
    existing = session.scalar(select(Evaluation).where(Evaluation.number == number))
    if existing is not None:
        return existing
    models = models_after(session, number)
    baseline = session.scalar(select(Evaluation).where(Evaluation.number == 0))
    problem_ids = (
        baseline.params["problem_ids"]
        if baseline is not None
        else held_out_problem_ids(session, eval_problems)
    )
    if models is None or not problem_ids:
        return None
    return insert_evaluation(
        session,
        number=number,
        iteration_id=iteration.id,
        generator_version_id=models[0],
        reward_model_version_id=models[1],
        params={
            **generation,
            "samples": get_settings().eval_samples,
            "seed": iteration.number,  # so the iteration's loaded generator is reused
            "problem_ids": problem_ids,
            "generated": [],
        },
    )


def batches(evaluation: Evaluation, problem_ids: list[int]) -> list[list[int]]:
    size = evaluation.params["batch_size"]
    return [problem_ids[i : i + size] for i in range(0, len(problem_ids), size)]


def drawn(evaluation_id: int, problem_id: int) -> Select:
    """Ids of the distinct programs the evaluation drew for one problem."""
    return (
        select(EvaluationSample.candidate_id)
        .where(
            EvaluationSample.evaluation_id == evaluation_id,
            EvaluationSample.problem_id == problem_id,
        )
        .distinct()
    )


def finish_evaluation(session: Session, evaluation_id: int) -> bool:
    """Compute and store the metrics once every draw is judged and scored; True when
    the evaluation is done (now or before)."""
    evaluation = lock_row(session, Evaluation, evaluation_id)
    if evaluation.status == EvaluationStatus.DONE:
        return True
    if not is_collected(evaluation_progress(session, evaluation)):
        return False
    evaluation.metrics = evaluation_metrics(session, evaluation)
    evaluation.status = EvaluationStatus.DONE
    evaluation.finished_at = utcnow()
    return True


def evaluation_metrics(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    """`evaluation_report` over every judged draw; an unscored one ranks last."""
    return evaluation_report(
        (language.value, problem_id, float("-inf") if score is None else score, passed)
        for language, problem_id, score, passed in evaluation_draws(session, evaluation)
    )


def missing_work(session: Session, evaluation: Evaluation) -> dict[str, list[int]]:
    """What a running evaluation still lacks, by problem: `generate` (no draws
    stored), `execute` (a drawn program without a verdict), `score` (a judged
    program without the evaluation's score, on a problem fully executed)."""
    params = evaluation.params
    in_evaluation = EvaluationSample.evaluation_id == evaluation.id
    unexecuted = set(
        session.scalars(
            select(EvaluationSample.problem_id)
            .distinct()
            .outerjoin(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
            .where(in_evaluation, Execution.id.is_(None))
        )
    )
    unscored = set(
        session.scalars(
            select(EvaluationSample.problem_id)
            .distinct()
            .join(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
            .outerjoin(Score, drawn_score(evaluation))
            .where(in_evaluation, Execution.verdict != Verdict.SANDBOX_ERROR, Score.id.is_(None))
        )
    )
    return {
        "generate": [p for p in params["problem_ids"] if p not in params["generated"]],
        "execute": sorted(unexecuted),
        "score": sorted(unscored - unexecuted),
    }
