import pytest

from pipelines.mining import MiningPolicy, ScoredCandidate, hard_negative_rule, mine_hard_negatives

DEFAULT = MiningPolicy()


def scored(candidate_id: int, passed: bool, score: float, problem_id: int = 1) -> ScoredCandidate:
    return ScoredCandidate(
        candidate_id=candidate_id, problem_id=problem_id, passed=passed, score=score
    )


def test_failing_at_or_above_lowest_passing_are_hard_negatives():
    problem = [
        scored(1, True, 0.9),
        scored(2, True, 0.2),  # the lowest passing score
        scored(3, False, 0.5),  # above it
        scored(4, False, 0.2),  # a tie counts ("at or above")
        scored(5, False, 0.19),
        scored(6, False, -3.0),
    ]
    assert mine_hard_negatives(problem, DEFAULT) == [
        (3, "above_lowest_passing"),
        (4, "above_lowest_passing"),
    ]


def test_passing_candidates_are_never_hard_negatives():
    problem = [scored(1, True, 5.0), scored(2, True, -1.0), scored(3, True, 0.0)]
    assert mine_hard_negatives(problem, DEFAULT) == []
    assert hard_negative_rule(problem[1], problem, DEFAULT) is None


def test_none_passing_uses_the_score_quantile():
    # Scores 0..9: the 0.8 quantile (linear interpolation) is 7.2, so 8 and 9 are above it.
    problem = [scored(i, False, float(i)) for i in range(10)]
    policy = MiningPolicy(quantile=0.8)
    assert mine_hard_negatives(problem, policy) == [(8, "above_quantile"), (9, "above_quantile")]


def test_none_passing_with_equal_scores_mines_nothing():
    # Strictly above: when the model cannot tell candidates apart none stands out.
    problem = [scored(i, False, 1.0) for i in range(4)]
    assert mine_hard_negatives(problem, DEFAULT) == []


def test_problems_are_judged_separately():
    candidates = [
        scored(1, True, 0.0, problem_id=1),
        scored(2, False, 1.0, problem_id=1),  # above problem 1's passing candidate
        scored(3, True, 5.0, problem_id=2),
        scored(4, False, 1.0, problem_id=2),  # below problem 2's: same score, not mined
    ]
    assert mine_hard_negatives(candidates, DEFAULT) == [(2, "above_lowest_passing")]


def test_single_candidate_problem():
    alone = scored(1, False, 0.3)
    assert hard_negative_rule(alone, [alone], DEFAULT) is None


def test_rule_rejects_candidates_of_another_problem():
    with pytest.raises(ValueError, match="mix problems"):
        hard_negative_rule(scored(1, False, 0.0), [scored(2, True, 0.0, problem_id=2)], DEFAULT)


def test_random_policy_picks_failing_candidates_at_its_rate_independent_of_order():
    candidates = [scored(i, i % 5 == 0, float(i), problem_id=i % 7) for i in range(2000)]
    policy = MiningPolicy(rule="random", random_rate=0.25, seed=3)
    mined = mine_hard_negatives(candidates, policy)
    failing = {c.candidate_id for c in candidates if not c.passed}
    picked = {candidate_id for candidate_id, _ in mined}
    assert picked <= failing
    assert {rule for _, rule in mined} == {"random"}
    assert 0.21 < len(picked) / len(failing) < 0.29
    # Same picks whatever the order or batch; another seed picks others.
    assert {i for i, _ in mine_hard_negatives(candidates[::-1], policy)} == picked
    assert {i for i, _ in mine_hard_negatives(candidates[:1000], policy)} == {
        i for i in picked if i < 1000
    }
    other = mine_hard_negatives(candidates, MiningPolicy(rule="random", random_rate=0.25, seed=4))
    assert {i for i, _ in other} != picked


@pytest.mark.parametrize("kwargs", [{"rule": "top_k"}, {"quantile": 1.5}, {"random_rate": -0.1}])
def test_invalid_policy_is_refused(kwargs):
    with pytest.raises(ValueError):
        MiningPolicy(**kwargs)


@pytest.mark.parametrize("policy", [DEFAULT, MiningPolicy(quantile=0.5)])
def test_mining_a_set_agrees_with_the_rule_per_candidate(policy):
    import random

    rng = random.Random(7)
    candidates = [
        # Problems 0-2 have passing candidates, 3-5 none; scores are coarse so ties occur.
        scored(
            i, problem_id=i % 6, passed=i % 6 < 3 and rng.random() < 0.3, score=rng.randint(0, 9)
        )
        for i in range(300)
    ]
    groups = {p: [c for c in candidates if c.problem_id == p] for p in range(6)}
    expected = [
        (c.candidate_id, rule)
        for c in candidates
        if (rule := hard_negative_rule(c, groups[c.problem_id], policy)) is not None
    ]
    mined = mine_hard_negatives(candidates, policy)
    assert mined == expected
    assert {rule for _, rule in mined} == {"above_lowest_passing", "above_quantile"}
