"""Hard-negative mining: which failing candidates did a reward model rank too high?

Pure functions over scored candidates; the labeling task loads scores and
verdicts from the store, calls `mine_hard_negatives`, and writes the labels.
Candidates with no trustworthy verdict (SANDBOX_ERROR) must not be passed in:
the sandbox failing says nothing about the program.
"""

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

RULE_ABOVE_LOWEST_PASSING = "above_lowest_passing"
RULE_ABOVE_QUANTILE = "above_quantile"  # what `above_lowest_passing` falls back to
RULE_RANDOM = "random"
POLICY_RULES = (RULE_ABOVE_LOWEST_PASSING, RULE_RANDOM)


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate's verdict and its score under one reward-model version."""

    candidate_id: int
    problem_id: int
    passed: bool
    score: float


@dataclass(frozen=True)
class MiningPolicy:
    """Which failing candidates become hard negatives."""

    rule: str = field(
        default=RULE_ABOVE_LOWEST_PASSING,
        metadata={
            "help": "`above_lowest_passing`: failing candidates scored at or above the problem's "
            "lowest-scoring passing one (or above `quantile` when none passes). `random`: a "
            "random `random_rate` of failing candidates, the paper's ablation."
        },
    )
    quantile: float = field(
        default=0.9,
        metadata={
            "help": "When no candidate of a problem passes, failing candidates scored strictly "
            "above this quantile of the problem's scores are hard negatives."
        },
    )
    random_rate: float = field(
        default=0.25,
        metadata={"help": "Fraction of failing candidates the `random` rule picks."},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the `random` rule; a candidate's draw depends only on it and its id."
        },
    )

    def __post_init__(self) -> None:
        if self.rule not in POLICY_RULES:
            raise ValueError(f"unknown mining rule {self.rule!r}; expected one of {POLICY_RULES}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"random_rate must be in [0, 1], got {self.random_rate}")


def hard_negative_rule(
    candidate: ScoredCandidate,
    problem_candidates: Sequence[ScoredCandidate],
    policy: MiningPolicy,
) -> str | None:
    """The name of the rule that makes `candidate` a hard negative, or None.

    `problem_candidates` are all scored candidates of the candidate's problem
    (the candidate itself among them).
    """
    if any(other.problem_id != candidate.problem_id for other in problem_candidates):
        raise ValueError(f"problem_candidates mix problems with problem {candidate.problem_id}")
    return _judge(candidate, _problem_bar(problem_candidates or [candidate], policy), policy)


def mine_hard_negatives(
    candidates: Sequence[ScoredCandidate], policy: MiningPolicy
) -> list[tuple[int, str]]:
    """`(candidate_id, rule)` for every hard negative in `candidates`, in input order."""
    by_problem: dict[int, list[ScoredCandidate]] = defaultdict(list)
    for candidate in candidates:
        by_problem[candidate.problem_id].append(candidate)
    # One bar per problem, not per candidate: a problem can have hundreds of samples.
    bars = {problem_id: _problem_bar(group, policy) for problem_id, group in by_problem.items()}
    mined = []
    for candidate in candidates:
        rule = _judge(candidate, bars[candidate.problem_id], policy)
        if rule is not None:
            mined.append((candidate.candidate_id, rule))
    return mined


def _problem_bar(
    problem_candidates: Sequence[ScoredCandidate], policy: MiningPolicy
) -> tuple[str, float, bool]:
    """The rule that applies to a problem, its score bar, and whether a tie reaches it."""
    passing_scores = [other.score for other in problem_candidates if other.passed]
    if passing_scores:
        return RULE_ABOVE_LOWEST_PASSING, min(passing_scores), True
    scores = [other.score for other in problem_candidates]
    return RULE_ABOVE_QUANTILE, float(np.quantile(scores, policy.quantile)), False


def _judge(
    candidate: ScoredCandidate, bar: tuple[str, float, bool], policy: MiningPolicy
) -> str | None:
    if candidate.passed:
        return None
    if policy.rule == RULE_RANDOM:
        # Seeded by (seed, id) rather than one shared stream, so the pick of a
        # candidate does not depend on the order or the batch it arrives in.
        draw = random.Random(f"{policy.seed}:{candidate.candidate_id}").random()
        return RULE_RANDOM if draw < policy.random_rate else None
    rule, threshold, ties_count = bar
    reached = candidate.score >= threshold if ties_count else candidate.score > threshold
    return rule if reached else None
