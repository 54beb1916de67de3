"""The evaluation stage's task functions called directly against the real Postgres,
with the real Redis as broker so the follow-ups they enqueue can be counted."""

from dataclasses import asdict
from datetime import timedelta

import pytest
from sqlalchemy import select

from models import Evaluation, EvaluationSample, Execution, Iteration, ModelVersion, Problem, Score
from models.enums import EvaluationStatus, IterationStatus, ModelKind, Split
from pipelines.pairs import build_pairs
from tests.workers.conftest import (
    add_problems,
    assert_evaluation_exactly_once,
    count,
    queue_length,
    register_reward_model,
)
from workers import execution, generation, labeling
from workers.iteration import FlywheelParams, open_iteration, start_evaluation
from workers.reconcile import reconcile

MUTATION = FlywheelParams(backend="mutation", candidates=4, batch_size=2, eval_problems=0)


def _held_out_store(store, tiny_model_dir, *, problems: int = 6, held_out: int = 3) -> Iteration:
    """HumanEval problems, the last `held_out` of them held out, and iteration 1
    generating with a tiny reward model (the warm start is not what is tested)."""
    ids = add_problems(store, problems)
    for problem_id in ids[-held_out:]:
        store.get(Problem, problem_id).split = Split.EVAL
    reward = register_reward_model(store, tiny_model_dir)
    generator = ModelVersion(kind=ModelKind.GENERATOR, name="base", base_model=str(tiny_model_dir))
    store.add(generator)
    store.flush()
    iteration = Iteration(
        number=1,
        status=IterationStatus.GENERATING,
        generator_version_id=generator.id,
        reward_model_version_id=reward.id,
        params={**asdict(MUTATION), "problem_ids": ids[:-held_out], "generated": []},
    )
    store.add(iteration)
    store.flush()
    return iteration


def _run_all(evaluation: Evaluation) -> None:
    """Every task the evaluation's messages would run, called directly."""
    problem_ids = evaluation.params["problem_ids"]
    for start in range(0, len(problem_ids), evaluation.params["batch_size"]):
        generation.draw_samples(
            evaluation.id, problem_ids[start : start + evaluation.params["batch_size"]]
        )
    for problem_id in problem_ids:
        execution.execute_drawn(evaluation.id, problem_id)
        labeling.score_drawn(evaluation.id, problem_id)


def test_the_baseline_samples_executes_and_scores_each_held_out_draw_once(
    store, broker_url, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("RR_EVAL_SAMPLES", "5")
    from models.settings import get_settings

    get_settings.cache_clear()
    iteration = _held_out_store(store, tiny_model_dir)
    evaluation = start_evaluation(store, 0, iteration)
    store.commit()
    held_out = sorted(store.scalars(select(Problem.id).where(Problem.split == Split.EVAL)))
    assert evaluation.params["problem_ids"] == held_out and evaluation.params["samples"] == 5
    assert queue_length(broker_url, "generation") == 2  # 3 problems in batches of 2

    _run_all(evaluation)
    assert_evaluation_exactly_once(store, evaluation.id)
    metrics = store.get(Evaluation, evaluation.id).metrics
    assert set(metrics) == {"all", "python"}
    assert metrics["all"]["samples"] <= 15
    assert 0.0 <= metrics["all"]["generator_pass1"]["value"] <= 1.0

    # Every message delivered again (a redelivery, a reconcile) changes nothing.
    before = (count(store, EvaluationSample), count(store, Execution), count(store, Score))
    _run_all(evaluation)
    store.expire_all()
    assert (count(store, EvaluationSample), count(store, Execution), count(store, Score)) == before
    # Held-out programs never become training pairs.
    assert not {pair.problem_id for pair in build_pairs(store)} & set(held_out)


def test_later_evaluations_reuse_the_baselines_problems(store, tiny_model_dir):
    iteration = _held_out_store(store, tiny_model_dir, problems=8, held_out=4)
    iteration.params = {**iteration.params, "eval_problems": 2}
    baseline = start_evaluation(store, 0, iteration)
    assert len(baseline.params["problem_ids"]) == 2
    # Iteration 1's retrained reward model: evaluation 1 can now open.
    from models import TrainingRun
    from models.enums import RunKind, RunStatus

    reward = register_reward_model(store, tiny_model_dir)
    store.add(
        TrainingRun(
            kind=RunKind.REWARD,
            status=RunStatus.SUCCEEDED,
            iteration_id=iteration.id,
            result_model_version_id=reward.id,
        )
    )
    store.flush()
    iteration.params = {**iteration.params, "eval_problems": 4}
    after = start_evaluation(store, 1, iteration)
    assert after.params["problem_ids"] == baseline.params["problem_ids"]  # paired, not 4
    assert after.reward_model_version_id == reward.id
    assert start_evaluation(store, 1, iteration).id == after.id  # opened once


def test_reconcile_resends_only_what_an_evaluation_is_missing(store, broker_url, tiny_model_dir):
    iteration = _held_out_store(store, tiny_model_dir)
    evaluation = start_evaluation(store, 0, iteration)
    store.commit()
    first_batch = evaluation.params["problem_ids"][:2]
    generation.draw_samples(evaluation.id, first_batch)
    execution.execute_drawn(evaluation.id, first_batch[0])
    redis_queues = ("generation", "execution", "labeling")
    before = {name: queue_length(broker_url, name) for name in redis_queues}
    store.expire_all()  # the tasks committed in sessions of their own
    counts = reconcile(store, stall_after=timedelta(0))
    store.commit()
    assert counts["evaluation_batches"] == 1  # the third problem was never generated
    assert counts["evaluation_executions"] == 1  # the second problem has no verdicts
    assert counts["evaluation_scores"] == 1  # the first problem is executed, not scored
    after = {name: queue_length(broker_url, name) for name in redis_queues}
    # Generation also gets the iteration's own two batches, which nothing generated.
    assert counts["batches"] == 2
    assert {name: after[name] - before[name] for name in redis_queues} == {
        "generation": 3, "execution": 1, "labeling": 1,
    }  # fmt: skip
    assert store.get(Evaluation, evaluation.id).status == EvaluationStatus.RUNNING


def test_held_out_problems_never_open_an_iteration(session):
    from tests.factories import make_problem

    held_out = make_problem(session, split=Split.EVAL)
    with pytest.raises(ValueError, match=f"held-out .* ids \\[{held_out.id}\\]"):
        open_iteration(session, [held_out.id], MUTATION)


def test_evaluate_command_completes_then_recomputes_an_evaluation(store, tiny_model_dir):
    """`rewardranker evaluate --iteration 0` runs the stage in-process (no worker):
    it opens and completes the baseline, and a second call recomputes the same
    metrics from the stored draws."""
    from typer.testing import CliRunner

    from app.cli import app

    iteration = _held_out_store(store, tiny_model_dir)
    store.commit()

    def evaluate(number: int):
        return CliRunner().invoke(app, ["evaluate", "--iteration", str(number)])

    first = evaluate(0)
    assert first.exit_code == 0, first.output
    assert "pass@1 on held-out problems" in first.output
    store.expire_all()
    [evaluation] = store.scalars(select(Evaluation)).all()
    assert (evaluation.number, evaluation.iteration_id) == (0, iteration.id)
    assert_evaluation_exactly_once(store, evaluation.id)
    metrics = evaluation.metrics
    again = evaluate(0)
    assert again.exit_code == 0
    store.expire_all()
    assert store.get(Evaluation, evaluation.id).metrics == metrics
    assert count(store, Evaluation) == 1
    missing = evaluate(5)
    assert missing.exit_code == 1 and "no iteration 5" in missing.output
