"""The evaluation stage: a generator and a reward model measured on held-out problems.

Evaluation 0 measures the base generator with the warm-start reward model, before
iteration 1 trains anything; evaluation N measures the models iteration N left
(its policy update's generator, its retrained reward model). Each one:

1. `open_evaluation` picks the held-out problems (the same ones as evaluation 0,
   so every evaluation is paired with the baseline) and sends their batches.
2. `generate_evaluation_batch` samples RR_EVAL_SAMPLES programs per problem and
   stores one `EvaluationSample` row per draw; each problem then gets one
   `execute_evaluation_problem`, then one `score_evaluation_problem`.
3. `finish_evaluation` computes the metrics once everything is scored.

Evaluation programs have origin `evaluation` and no iteration, and live only on
`eval` problems, so no training path (pairs, mining, datasets, policy prompts)
ever reads them. Like every stage, each step is idempotent by store state.
"""

from collections import Counter
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from app.flywheel import (
    FlywheelParams,
    _generator,
    _scorer,
    _send,
    execution_row,
    run_with_retries,
)
from app.settings import get_settings
from models import (
    Candidate,
    Evaluation,
    EvaluationSample,
    Execution,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    TrainingRun,
)
from models.base import utcnow
from models.enums import EvaluationStatus, Origin, RunKind, RunStatus, Split, Verdict
from models.repository import dialect_insert, insert_candidates, insert_executions


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
    params: FlywheelParams,
    *,
    enqueue: bool = True,
) -> Evaluation | None:
    """Evaluation `number`, opened (its batches enqueued unless `enqueue` is False)
    unless it exists; None when there is nothing to evaluate (no held-out problem)
    or its models are not trained yet."""
    existing = session.scalar(select(Evaluation).where(Evaluation.number == number))
    if existing is not None:
        return existing
    models = models_after(session, number)
    baseline = session.scalar(select(Evaluation).where(Evaluation.number == 0))
    problem_ids = (
        baseline.params["problem_ids"]
        if baseline is not None
        else held_out_problem_ids(session, params.eval_problems)
    )
    if models is None or not problem_ids:
        return None
    evaluation = Evaluation(
        number=number,
        iteration_id=iteration.id,
        generator_version_id=models[0],
        reward_model_version_id=models[1],
        params={
            "samples": get_settings().eval_samples,
            "backend": params.backend,
            "max_new_tokens": params.max_new_tokens,
            "prompt_style": params.prompt_style,
            "seed": iteration.number,  # the iteration's generator instance is reused
            "batch_size": params.batch_size,
            "problem_ids": problem_ids,
            "generated": [],
        },
    )
    session.add(evaluation)
    session.flush()
    for batch in _batches(evaluation, problem_ids) if enqueue else []:
        _send(session, "generation.evaluate_batch", evaluation.id, batch)
    return evaluation


def _batches(evaluation: Evaluation, problem_ids: list[int]) -> list[list[int]]:
    size = evaluation.params["batch_size"]
    return [problem_ids[i : i + size] for i in range(0, len(problem_ids), size)]


def lock_evaluation(session: Session, evaluation_id: int) -> Evaluation:
    """The evaluation's row, locked (see `app.flywheel.lock_iteration`)."""
    session.execute(
        update(Evaluation).where(Evaluation.id == evaluation_id).values(status=Evaluation.status)
    )
    evaluation = session.get(Evaluation, evaluation_id, populate_existing=True)
    if evaluation is None:
        raise LookupError(f"no evaluation {evaluation_id}")
    return evaluation


def generate_evaluation_batch(
    session: Session, evaluation_id: int, problem_ids: list[int]
) -> list[int]:
    """Store the draws of these problems, once; returns the problems to execute."""
    from pipelines.generation import PromptSpec

    evaluation = session.get(Evaluation, evaluation_id)
    todo = [p for p in problem_ids if p not in evaluation.params["generated"]]
    if not todo:
        return problem_ids
    params = evaluation.params
    problems = session.scalars(
        select(Problem).where(Problem.id.in_(todo)).order_by(Problem.id)
    ).all()
    version = session.get(ModelVersion, evaluation.generator_version_id)
    generator = _generator(
        params["backend"],
        version.path or version.base_model,
        params["seed"],
        params["max_new_tokens"],
        params["prompt_style"],
    )
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params["samples"])
    evaluation = lock_evaluation(session, evaluation_id)  # held only for the write
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
    if draws:
        session.execute(
            dialect_insert(session, EvaluationSample).on_conflict_do_nothing(
                index_elements=["evaluation_id", "problem_id", "sample_index"]
            ),
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


def _drawn(evaluation_id: int, problem_id: int | None = None):
    """The distinct candidates drawn by the evaluation (for one problem)."""
    query = select(EvaluationSample.candidate_id).where(
        EvaluationSample.evaluation_id == evaluation_id
    )
    if problem_id is not None:
        query = query.where(EvaluationSample.problem_id == problem_id)
    return query.distinct()


def execute_evaluation_problem(session: Session, evaluation_id: int, problem_id: int) -> int:
    """Run the problem's drawn programs that have no verdict yet; returns executions written."""
    problem = session.get(Problem, problem_id)
    candidates = session.scalars(
        select(Candidate)
        .outerjoin(Execution, Execution.candidate_id == Candidate.id)
        .where(Candidate.id.in_(_drawn(evaluation_id, problem_id)), Execution.id.is_(None))
        .order_by(Candidate.id)
    ).all()
    if not candidates:
        return 0
    results = run_with_retries([c.code for c in candidates], problem)
    return insert_executions(
        session,
        [
            execution_row(candidate.id, result, attempts)
            for candidate, (result, attempts) in zip(candidates, results, strict=True)
        ],
    )


def score_evaluation_problem(session: Session, evaluation_id: int, problem_id: int) -> int:
    """Score the problem's judged programs with the evaluation's reward model; returns
    scores written. Nothing is mined here: held-out programs never train anything."""
    evaluation = session.get(Evaluation, evaluation_id)
    reward = session.get(ModelVersion, evaluation.reward_model_version_id)
    problem = session.get(Problem, problem_id)
    unscored = session.execute(
        select(Candidate.id, Candidate.code)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(
            Score,
            and_(Score.candidate_id == Candidate.id, Score.reward_model_version_id == reward.id),
        )
        .where(
            Candidate.id.in_(_drawn(evaluation_id, problem_id)),
            Execution.verdict != Verdict.SANDBOX_ERROR,
            Score.id.is_(None),
        )
        .order_by(Candidate.id)
    ).all()
    if not unscored:
        return 0
    values = _scorer(reward.path or reward.base_model).score(
        [problem.prompt] * len(unscored), [code for _, code in unscored]
    )
    written = session.execute(
        dialect_insert(session, Score)
        .on_conflict_do_nothing(index_elements=["candidate_id", "reward_model_version_id"])
        .returning(Score.id),
        [
            {"candidate_id": cid, "reward_model_version_id": reward.id, "score": float(value)}
            for (cid, _), value in zip(unscored, values, strict=True)
        ],
    )
    return len(written.all())


def evaluation_progress(session: Session, evaluation: Evaluation) -> dict[str, int]:
    """How far the evaluation's collection is, in distinct programs."""
    drawn = Candidate.id.in_(_drawn(evaluation.id))

    def count(query) -> int:
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


def finish_evaluation(session: Session, evaluation_id: int) -> bool:
    """Compute and store the metrics once every draw is judged and scored; True when
    the evaluation is done (now or before)."""
    from app.flywheel import is_collected

    evaluation = lock_evaluation(session, evaluation_id)
    if evaluation.status == EvaluationStatus.DONE:
        return True
    if not is_collected(evaluation_progress(session, evaluation)):
        return False
    evaluation.metrics = evaluation_metrics(session, evaluation)
    evaluation.status = EvaluationStatus.DONE
    evaluation.finished_at = utcnow()
    return True


def evaluation_metrics(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    """`evaluation_report` over every draw (SANDBOX_ERROR draws left out: the sandbox
    failed, not the program)."""
    from pipelines.evaluation import evaluation_report

    rows = session.execute(
        select(Problem.language, EvaluationSample.problem_id, Execution.verdict, Score.score)
        .join(Problem, Problem.id == EvaluationSample.problem_id)
        .join(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
        .outerjoin(
            Score,
            and_(
                Score.candidate_id == EvaluationSample.candidate_id,
                Score.reward_model_version_id == evaluation.reward_model_version_id,
            ),
        )
        .where(
            EvaluationSample.evaluation_id == evaluation.id,
            Execution.verdict != Verdict.SANDBOX_ERROR,
        )
    ).all()
    return evaluation_report(
        (
            language.value,
            problem_id,
            float("-inf") if score is None else score,
            verdict == Verdict.OK,
        )
        for language, problem_id, verdict, score in rows
    )


def reconcile_evaluation(session: Session, evaluation_id: int) -> Counter[str]:
    """Re-send whatever the store shows as missing for a running evaluation."""
    counts: Counter[str] = Counter()
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation.status == EvaluationStatus.DONE:
        return counts
    params = evaluation.params
    missing = [p for p in params["problem_ids"] if p not in params["generated"]]
    for batch in _batches(evaluation, missing):
        _send(session, "generation.evaluate_batch", evaluation_id, batch)
        counts["evaluation_batches"] += 1
    drawn = EvaluationSample.evaluation_id == evaluation_id
    unexecuted = set(
        session.scalars(
            select(EvaluationSample.problem_id)
            .distinct()
            .outerjoin(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
            .where(drawn, Execution.id.is_(None))
        )
    )
    for problem_id in sorted(unexecuted):
        _send(session, "execution.execute_evaluation", evaluation_id, problem_id)
    unscored = set(
        session.scalars(
            select(EvaluationSample.problem_id)
            .distinct()
            .join(Execution, Execution.candidate_id == EvaluationSample.candidate_id)
            .outerjoin(
                Score,
                and_(
                    Score.candidate_id == EvaluationSample.candidate_id,
                    Score.reward_model_version_id == evaluation.reward_model_version_id,
                ),
            )
            .where(drawn, Execution.verdict != Verdict.SANDBOX_ERROR, Score.id.is_(None))
        )
    )
    for problem_id in sorted(unscored - unexecuted):
        _send(session, "labeling.score_evaluation", evaluation_id, problem_id)
    counts["evaluation_executions"] += len(unexecuted)
    counts["evaluation_scores"] += len(unscored - unexecuted)
    return counts


def run_inline(session: Session, evaluation_id: int) -> Evaluation:
    """Take a running evaluation to done in this process, step by step (what the
    queue's tasks do, for `rewardranker evaluate` without workers)."""
    evaluation = session.get(Evaluation, evaluation_id)
    for batch in _batches(evaluation, evaluation.params["problem_ids"]):
        generate_evaluation_batch(session, evaluation_id, batch)
    for problem_id in evaluation.params["problem_ids"]:
        execute_evaluation_problem(session, evaluation_id, problem_id)
        score_evaluation_problem(session, evaluation_id, problem_id)
    if not finish_evaluation(session, evaluation_id):
        raise RuntimeError(f"evaluation {evaluation_id} is still incomplete after a full pass")
    return evaluation
