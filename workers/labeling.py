"""The `labeling` queue: score a problem's executed candidates with the iteration's
reward model and label its hard negatives; score an evaluation's judged draws."""

from functools import lru_cache

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from models import Candidate, Evaluation, Execution, Iteration, ModelVersion, Problem, Score
from models.db import session_scope
from models.enums import Verdict
from models.repository import insert_hard_negative_labels, insert_scores

# Imported here, once, in the worker's parent process before it forks its pool.
from pipelines.mining import MiningPolicy, ScoredCandidate, mine_hard_negatives
from pipelines.reward_model import RewardScorer
from workers.celery_app import RETRY, celery
from workers.evaluation import drawn, finish_evaluation
from workers.iteration import advance_iteration, maybe_trigger_retraining
from workers.names import LABEL_PROBLEM, SCORE_DRAWN


@lru_cache(maxsize=2)
def scorer_for(path_or_spec: str):

    return RewardScorer(path_or_spec)


def label_candidates(session: Session, iteration_id: int, problem_id: int) -> int:
    """Score the problem's executed candidates with the iteration's reward model and
    label the hard negatives; returns labels written. SANDBOX_ERROR is never judged."""

    iteration = session.get(Iteration, iteration_id)
    reward = session.get(ModelVersion, iteration.reward_model_version_id)
    problem = session.get(Problem, problem_id)
    if _unexecuted(session, iteration_id, problem_id):
        # Mining compares a candidate with its problem's others: labelling before
        # they all have verdicts would make the labels depend on timing.
        return 0
    rows = session.execute(
        select(Candidate.id, Candidate.code, Execution.verdict, Score.score)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(
            Score,
            and_(Score.candidate_id == Candidate.id, Score.reward_model_version_id == reward.id),
        )
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.verdict != Verdict.SANDBOX_ERROR,
        )
        .order_by(Candidate.id)
    ).all()
    scores = {cid: score for cid, _, _, score in rows if score is not None}
    unscored = [(cid, code) for cid, code, _, score in rows if score is None]
    if unscored:
        values = scorer_for(reward.path or reward.base_model).score(
            [problem.prompt] * len(unscored), [code for _, code in unscored]
        )
        new = [
            {"candidate_id": cid, "reward_model_version_id": reward.id, "score": float(value)}
            for (cid, _), value in zip(unscored, values, strict=True)
        ]
        insert_scores(session, new)
        scores.update({row["candidate_id"]: row["score"] for row in new})
    scored = [
        ScoredCandidate(cid, problem_id, verdict == Verdict.OK, scores[cid])
        for cid, _, verdict, _ in rows
    ]
    labels = [
        {
            "candidate_id": candidate_id,
            "reward_model_version_id": reward.id,
            "iteration_id": iteration_id,
            "rule": rule,
        }
        for candidate_id, rule in mine_hard_negatives(scored, MiningPolicy())
    ]
    return insert_hard_negative_labels(session, labels)


def _unexecuted(session: Session, iteration_id: int, problem_id: int) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Candidate)
        .outerjoin(Execution)
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.problem_id == problem_id,
            Execution.id.is_(None),
        )
    )


def score_drawn_programs(session: Session, evaluation_id: int, problem_id: int) -> int:
    """Score the problem's judged programs an evaluation drew with its reward model;
    returns how many. Nothing is mined here: held-out programs never train anything."""
    evaluation = session.get(Evaluation, evaluation_id)
    reward = session.get(ModelVersion, evaluation.reward_model_version_id)
    unscored = session.execute(
        select(Candidate.id, Candidate.code)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(
            Score,
            and_(Score.candidate_id == Candidate.id, Score.reward_model_version_id == reward.id),
        )
        .where(
            Candidate.id.in_(drawn(evaluation_id, problem_id)),
            Execution.verdict != Verdict.SANDBOX_ERROR,
            Score.id.is_(None),
        )
        .order_by(Candidate.id)
    ).all()
    if not unscored:
        return 0
    prompt = session.get(Problem, problem_id).prompt
    values = scorer_for(reward.path or reward.base_model).score(
        [prompt] * len(unscored), [code for _, code in unscored]
    )
    insert_scores(
        session,
        [
            {"candidate_id": cid, "reward_model_version_id": reward.id, "score": float(value)}
            for (cid, _), value in zip(unscored, values, strict=True)
        ],
    )
    return len(unscored)


@celery.task(name=SCORE_DRAWN, **RETRY)
def score_drawn(evaluation_id: int, problem_id: int) -> None:
    with session_scope() as session:
        score_drawn_programs(session, evaluation_id, problem_id)
    with session_scope() as session:
        done = finish_evaluation(session, evaluation_id)
        iteration_id = session.get(Evaluation, evaluation_id).iteration_id
    if done:
        with session_scope() as session:
            advance_iteration(session, iteration_id)


@celery.task(name=LABEL_PROBLEM, **RETRY)
def label_problem(iteration_id: int, problem_id: int) -> None:
    with session_scope() as session:
        label_candidates(session, iteration_id, problem_id)
        maybe_trigger_retraining(session, iteration_id)
    # A separate unit of work: the labels stay committed even if advancing waits
    # on the iteration lock and fails.
    with session_scope() as session:
        advance_iteration(session, iteration_id)
