import json
import math
from fractions import Fraction

import numpy as np
import pytest

from models import Iteration, Score
from models.enums import Language, Origin, Verdict
from pipelines.evaluation import (
    Estimate,
    change_verdict,
    evaluate_iteration,
    evaluation_report,
    held_out_metrics,
    paired_change,
    paper_table,
    pass_at_k,
    rerank_metrics,
)
from tests.conftest import unavailable
from tests.factories import make_candidate, make_model_version, make_problem


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 1, 1, 0.1),  # pass@1 is the pass rate
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
        (4, 0, 1, 0.0),
        (4, 4, 3, 1.0),
        (8, 6, 3, 1.0),  # fewer than k failures: every draw has a pass
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 10_000, 3, 10
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, 1, 0), (5, 1, 6), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_rerank_metrics_by_hand():
    groups = [
        # n=5, c=2, the top score passes
        [(0.9, True), (0.1, False), (0.5, False), (0.2, False), (0.3, True)],
        # n=5, c=1, the top score fails
        [(0.8, False), (0.7, True), (0.1, False), (0.0, False), (0.2, False)],
        # a tie at the top between a pass and a fail counts one half
        [(1.0, True), (1.0, False), (0.0, False), (0.0, False), (0.0, False)],
        # nothing passes
        [(0.3, False)] * 5,
    ]
    metrics = rerank_metrics(groups)
    assert metrics["problems"] == 4
    assert metrics["samples"] == 20
    assert metrics["random_pass1"] == pytest.approx((0.4 + 0.2 + 0.2 + 0.0) / 4)
    assert metrics["reranked_pass1"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert metrics["oracle_pass_n"] == pytest.approx(3 / 4)
    assert metrics["pass@1"] == pytest.approx(metrics["random_pass1"])
    assert metrics["pass@5"] == pytest.approx(metrics["oracle_pass_n"])  # k = n
    assert "pass@10" not in metrics  # no group has 10 samples


@pytest.mark.parametrize("groups", [[], [[(0.1, True)], []]])
def test_rerank_metrics_rejects_empty_input(groups):
    with pytest.raises(ValueError, match="at least one"):
        rerank_metrics(groups)


def _sample(session, problem, iteration_id, verdict, score, reward, origin=Origin.GENERATOR):
    candidate = make_candidate(
        session, problem=problem, verdict=verdict, iteration_id=iteration_id, origin=origin
    )
    if score is not None:
        session.add(
            Score(candidate_id=candidate.id, reward_model_version_id=reward.id, score=score)
        )
    return candidate


def test_evaluate_iteration_per_language(session):
    reward = make_model_version(session)
    other_reward = make_model_version(session, name="rm-other")
    iteration = Iteration(number=1, reward_model_version_id=reward.id)
    earlier = Iteration(number=0)
    session.add_all([iteration, earlier])
    session.flush()
    ok, wrong = Verdict.OK, Verdict.WRONG_ANSWER
    py_a, py_b = make_problem(session), make_problem(session)
    cpp = make_problem(session, language=Language.CPP, prompt="int add(int a, int b) {\n")

    # Python A: 1 of 2 passes and the reward model prefers it.
    _sample(session, py_a, iteration.id, ok, 2.0, reward)
    _sample(session, py_a, iteration.id, wrong, 1.0, reward)
    # Not counted: a sandbox error, a reference, another iteration's sample.
    _sample(session, py_a, iteration.id, Verdict.SANDBOX_ERROR, 9.0, reward)
    _sample(session, py_a, iteration.id, ok, 9.0, reward, origin=Origin.REFERENCE)
    _sample(session, py_a, earlier.id, wrong, 9.0, reward)
    # Python B: 1 of 2 passes, the failing one scores higher; the passing one
    # has a score only under another model version, so it ranks last.
    _sample(session, py_b, iteration.id, wrong, -5.0, reward)
    unscored = _sample(session, py_b, iteration.id, ok, None, reward)
    session.add(Score(candidate_id=unscored.id, reward_model_version_id=other_reward.id, score=99))
    # C++: nothing passes.
    _sample(session, cpp, iteration.id, Verdict.COMPILE_ERROR, 0.0, reward)
    session.flush()

    report = evaluate_iteration(session, iteration.id)

    assert set(report) == {"python", "cpp"}
    python = report["python"]
    assert (python["problems"], python["samples"]) == (2, 4)
    assert python["random_pass1"] == pytest.approx(0.5)
    assert python["reranked_pass1"] == pytest.approx(0.5)  # right on A, wrong on B
    assert python["oracle_pass_n"] == pytest.approx(1.0)
    assert python["pass@1"] == pytest.approx(0.5)
    assert "pass@5" not in python
    assert report["cpp"]["oracle_pass_n"] == 0.0


def test_evaluate_iteration_without_reward_model(session):
    iteration = Iteration(number=2)
    session.add(iteration)
    session.flush()
    problem = make_problem(session)
    make_candidate(session, problem=problem, verdict=Verdict.OK, iteration_id=iteration.id)
    make_candidate(
        session, problem=problem, verdict=Verdict.RUNTIME_ERROR, iteration_id=iteration.id
    )

    report = evaluate_iteration(session, iteration.id)

    assert report["python"]["reranked_pass1"] is None
    assert report["python"]["random_pass1"] == pytest.approx(0.5)


def test_evaluate_unknown_iteration(session):
    with pytest.raises(ValueError, match="no iteration with id 424242"):
        evaluate_iteration(session, 424242)


# --- best-of-N -------------------------------------------------------------------------

ABSVAL = "def absval(x):\n    if x >= 0:\n        return x\n    return -x\n"
ABSVAL_EXAMPLES = "assert absval(-2) == 2\nassert absval(3) == 3\n"


@pytest.fixture(scope="module")
def absval_solve_parts(tiny_model_dir):
    """The mutation backend (no model needed) and an untrained tiny reward model:
    its scores are arbitrary but fixed by the seed, which is all selection needs."""
    import torch

    from pipelines.generation import GenerationConfig, PromptSpec, make_generator
    from pipelines.reward_model import RewardScorer

    torch.manual_seed(0)  # the fresh score head's initialisation
    prompt = PromptSpec(1, "python", "def absval(x):\n", reference_solution=ABSVAL)
    return (
        prompt,
        make_generator(GenerationConfig(backend="mutation")),
        RewardScorer(tiny_model_dir),
    )


def test_solve_returns_the_top_scored_sample(absval_solve_parts):
    from pipelines.evaluation import solve

    prompt, generator, scorer = absval_solve_parts
    solution = solve(prompt, 8, generator, scorer)

    assert len(solution.samples) == len(solution.scores) == 8
    assert solution.scores == scorer.score([prompt.prompt] * 8, [s.code for s in solution.samples])
    assert solution.score == max(solution.scores)
    assert solution.best is solution.samples[solution.scores.index(solution.score)]
    assert solution.passed_examples is None


def test_solve_prefers_samples_that_pass_the_example_tests(absval_solve_parts):
    from pipelines.evaluation import solve
    from pipelines.sandbox import SandboxUnavailable

    prompt, generator, scorer = absval_solve_parts
    try:
        solution = solve(prompt, 8, generator, scorer, tests=ABSVAL_EXAMPLES)
    except SandboxUnavailable as error:
        unavailable(f"sandbox: {error}")
    passed = solution.passed_examples

    # Mutants such as `x > 0` still pass; `x <= 0` does not.
    assert passed is not None and 0 < sum(passed) < len(passed)
    overall_best = solution.scores.index(max(solution.scores))
    assert not passed[overall_best]  # so the filter has something to overrule
    eligible = [i for i, ok in enumerate(passed) if ok]
    best = max(eligible, key=solution.scores.__getitem__)
    assert solution.best is solution.samples[best]
    assert solution.score == solution.scores[best]


def test_solve_falls_back_to_the_scores_when_no_sample_passes(absval_solve_parts):
    from pipelines.evaluation import solve
    from pipelines.sandbox import SandboxUnavailable

    prompt, generator, scorer = absval_solve_parts
    try:
        solution = solve(prompt, 8, generator, scorer, tests="assert absval(1) == 42\n")
    except SandboxUnavailable as error:
        unavailable(f"sandbox: {error}")

    assert solution.passed_examples == [False] * 8
    assert solution.score == max(solution.scores)


def test_solve_without_samples_is_a_clear_error(absval_solve_parts):
    from pipelines.evaluation import solve
    from pipelines.generation import PromptSpec

    _, generator, scorer = absval_solve_parts
    no_reference = PromptSpec(7, "python", "def f(x):\n")  # mutation needs a reference
    with pytest.raises(ValueError, match="no samples for problem 7"):
        solve(no_reference, 4, generator, scorer)


def _groups(*problems):
    """Problems as lists of (score, passed)."""
    return [list(problem) for problem in problems]


def test_held_out_metrics_agree_with_rerank_metrics_and_bracket_their_values():
    groups = _groups(
        [(0.9, True), (0.1, False), (0.2, False), (0.3, False)],
        [(0.2, True), (0.8, False), (0.1, False), (0.0, True)],
        [(0.5, False), (0.4, False), (0.3, False), (0.2, False)],
        [(0.7, True), (0.6, True), (0.5, True), (0.1, False)],
    )
    figures = held_out_metrics(groups, resamples=500)
    plain = rerank_metrics(groups)
    assert figures["generator_pass1"].value == pytest.approx(plain["random_pass1"])
    assert figures["reranked_pass1"].value == pytest.approx(plain["reranked_pass1"])
    assert figures["oracle_pass_n"].value == pytest.approx(plain["oracle_pass_n"])
    gap = plain["oracle_pass_n"] - plain["random_pass1"]
    assert figures["gap_closed"].value == pytest.approx(
        (plain["reranked_pass1"] - plain["random_pass1"]) / gap
    )
    # problem 1: 3 of 3 pairs right; problem 2: 1 of 4 (0.2 > 0.1); problem 4: 3 of 3
    assert figures["pairwise_accuracy"].value == pytest.approx(0.7)
    for name in ("generator_pass1", "reranked_pass1", "gap_closed", "pairwise_accuracy", "roc_auc"):
        estimate = figures[name]
        assert estimate.low <= estimate.value <= estimate.high
    assert figures["reranked_pass1"].high > figures["reranked_pass1"].low  # 4 problems: wide


def test_a_perfect_ranker_closes_the_whole_gap_and_a_constant_one_none():
    rows = [[(float(passed), passed) for passed in (True, False, False, True)]] * 3 + [
        [(0.0, False)] * 4
    ]
    perfect = held_out_metrics(rows, resamples=200)
    assert perfect["reranked_pass1"].value == perfect["oracle_pass_n"].value == 0.75
    assert perfect["gap_closed"].value == 1.0
    assert perfect["pairwise_accuracy"].value == 1.0 and perfect["roc_auc"].value == 1.0
    constant = held_out_metrics(
        [[(0.0, passed) for _, passed in group] for group in rows], resamples=200
    )
    assert constant["reranked_pass1"].value == constant["generator_pass1"].value
    assert constant["gap_closed"].value == 0.0
    assert constant["pairwise_accuracy"].value == 0.5 and constant["roc_auc"].value == 0.5


def test_figures_with_nothing_to_compare_are_none():
    figures = held_out_metrics([[(1.0, False), (float("-inf"), False)]] * 3, resamples=50)
    assert figures["gap_closed"] is None
    assert figures["pairwise_accuracy"] is None and figures["roc_auc"] is None
    assert figures["generator_pass1"] == Estimate(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least one problem"):
        held_out_metrics([])


def test_a_paired_change_sees_what_two_overlapping_intervals_hide():
    # 80 problems of every difficulty; the later model solves 1 more sample in 8
    # on a third of them, and never fewer.
    rng = np.random.default_rng(1)
    before = rng.integers(0, 9, 80) / 8
    after = np.minimum(1.0, before + (np.arange(80) % 3 == 0) / 8)
    change = paired_change(before, after, resamples=500)
    assert change.value == pytest.approx((after - before).mean())
    assert 0 < change.low <= change.value <= change.high
    assert change_verdict(change) == "better"
    # The same figures as two separate intervals: they overlap.
    separate = [
        held_out_metrics([[(0.0, k < 8 * x) for k in range(8)] for x in figure], resamples=500)
        for figure in (before, after)
    ]
    first, second = (figures["generator_pass1"] for figures in separate)
    assert first.high >= second.low

    assert change_verdict(paired_change(after, before)) == "worse"
    assert change_verdict(paired_change(before, np.roll(before, 1))) == "within noise"
    with pytest.raises(ValueError, match="one figure per problem"):
        paired_change(before, after[:-1])


def test_evaluation_report_splits_by_language_and_pools_all():
    samples = [
        ("python", 1, 0.9, True),
        ("python", 1, 0.1, False),
        ("python", 2, 0.3, False),
        ("python", 2, 0.2, False),
        ("cpp", 3, 0.5, True),
        ("cpp", 3, 0.7, False),
    ]
    report = evaluation_report(samples, resamples=100)
    assert set(report) == {"all", "cpp", "python"}
    assert report["python"]["problems"] == 2 and report["all"]["problems"] == 3
    assert report["python"]["reranked_pass1"]["value"] == 0.5
    assert report["cpp"]["reranked_pass1"]["value"] == 0.0
    assert report["all"]["reranked_pass1"]["value"] == pytest.approx(1 / 3)
    assert report["python"]["gap_closed"]["value"] == 1.0
    json.dumps(report)  # stored on the evaluation row as it is


def test_paper_table_rows_columns_and_the_paired_changes():
    def report(generator, reranked):
        figure = lambda value: {"value": value, "low": value - 0.05, "high": value + 0.05}  # noqa: E731
        return {
            language: {"problems": 40, "generator_pass1": figure(generator),
                       "reranked_pass1": figure(reranked)}
            for language in ("python", "all")
        }  # fmt: skip

    def draws(solved_top, solved_rest):
        # Per problem 4 samples, the first scored highest: it passes on the first
        # `solved_top` problems; one of the other three on the first `solved_rest`.
        return {
            problem: [(1.0, problem < solved_top), (0.5, problem < solved_rest),
                      (0.2, False), (0.1, False)]
            for problem in range(40)
        }  # fmt: skip

    base, after = draws(solved_top=4, solved_rest=20), draws(solved_top=16, solved_rest=20)
    table = paper_table([(0, report(0.15, 0.10)), (1, report(0.22, 0.40))], {0: base, 1: after})
    assert table["columns"] == ["python", "all"]
    assert [(row["evaluation"], row["row"]) for row in table["rows"]] == [
        (0, "generator"),
        (0, "reranked"),
        (1, "generator"),
        (1, "reranked"),
    ]
    assert table["rows"][3]["cells"]["all"]["value"] == 0.40
    changes = {change["change"]: change for change in table["changes"]}
    assert list(changes) == ["reranking", "generator", "flywheel", "overall"]
    assert all(change["problems"] == 40 for change in changes.values())
    # Reranking at evaluation 0 picks a passing sample on 4 problems, a random pick on 6.
    assert changes["reranking"]["difference"]["value"] == pytest.approx(4 / 40 - 24 / 160)
    assert changes["generator"]["difference"]["value"] == pytest.approx(12 / 160)
    assert changes["flywheel"]["verdict"] == "better"
    assert changes["flywheel"]["difference"]["value"] == pytest.approx(12 / 40)
    assert table["verdict"].startswith(
        "better: reranked at evaluation 1 against the generator alone at evaluation 0 +0.250"
    )
    assert "paired over the same 40 held-out problems" in table["verdict"]

    same = paper_table([(0, report(0.15, 0.10)), (1, report(0.15, 0.10))], {0: base, 1: base})
    assert [change["verdict"] for change in same["changes"]][1:3] == ["within noise"] * 2
    only_base = paper_table([(0, report(0.15, 0.10))], {0: base})
    assert [change["change"] for change in only_base["changes"]] == ["reranking"]
    assert paper_table([], {})["verdict"] == "no evaluation yet"
