"""The one pairing rule: which programs of a problem the reward model learns to
rank above which. The reward model trains on `build_pairs`, and each iteration's
versioned dataset exports the same rule's pairs (`datasets`), so a tagged dataset
holds what the reward model trained on.

Chosen = the reference solution, then passing candidates with other text; rejected
= failing candidates, hard negatives and runs the sandbox caught tampering first; a
SANDBOX_ERROR says nothing about the program, so it is never used. Pairs are dealt
round-robin up to a cap per problem.
"""

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from models import Candidate, Execution, HardNegativeLabel, Problem
from models.enums import Origin, Split, Verdict
from models.repository import content_hash

MAX_PAIRS_PER_PROBLEM = 32

Program = tuple[int | None, str]
"""(candidate id, code); the reference solution has no candidate id."""


@dataclass(frozen=True)
class Pair:
    """A passing (`chosen`) and a failing (`rejected`) program for one problem."""

    problem_id: int
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Executed:
    """One executed candidate of a problem, as the pairing rule sees it."""

    candidate_id: int
    content_hash: str
    code: str
    verdict: Verdict
    # The sandbox caught it forging OK or disarming its tests: the failure a policy
    # most wants the reward model to miss, so it is paired first, as a hard negative.
    tampered: bool = False


def problem_pairs(
    reference: str | None,
    executed: Iterable[Executed],
    hard_negatives: set[int] | frozenset[int],
    limit: int = MAX_PAIRS_PER_PROBLEM,
) -> list[tuple[Program, Program]]:
    """Up to `limit` (chosen, rejected) pairs of one problem's programs; `executed`
    in candidate id order."""
    chosen: dict[str, Program] = {}
    if reference:
        chosen[content_hash(reference)] = (None, reference)
    rejected: list[Program] = []
    first = set(hard_negatives)
    for row in executed:
        if row.verdict == Verdict.OK:
            chosen.setdefault(row.content_hash, (row.candidate_id, row.code))
        elif row.verdict != Verdict.SANDBOX_ERROR:
            rejected.append((row.candidate_id, row.code))
            if row.tampered:
                first.add(row.candidate_id)
    rejected.sort(key=lambda item: (item[0] not in first, item[0]))
    return _round_robin(list(chosen.values()), rejected, limit)


def _round_robin(chosen: list, rejected: list, limit: int) -> list[tuple]:
    """Up to `limit` (chosen, rejected) pairs: every rejected item once per round,
    each round shifting the chosen one, so a cap keeps both sides varied."""
    pairs: list[tuple] = []
    for shift in range(len(chosen)):
        for index, rejected_item in enumerate(rejected):
            if len(pairs) == limit:
                return pairs
            pairs.append((chosen[(index + shift) % len(chosen)], rejected_item))
    return pairs


def executed_candidates() -> Select:
    """(problem id, candidate id, content hash, code, verdict, tampered) of every
    candidate with a verdict on its program: what the pairing rule reads. Held-out problems and
    evaluation samples are never in it: nothing trains on them."""
    return (
        select(
            Candidate.problem_id,
            Candidate.id,
            Candidate.content_hash,
            Candidate.code,
            Execution.verdict,
            Execution.tampered,
        )
        .join(Execution, Execution.candidate_id == Candidate.id)
        .join(Problem, Problem.id == Candidate.problem_id)
        .where(
            Execution.verdict != Verdict.SANDBOX_ERROR,
            Problem.split == Split.TRAIN,
            Candidate.origin != Origin.EVALUATION,
        )
    )


def build_pairs(
    session: Session,
    *,
    problem_ids: Sequence[int] | None = None,
    max_pairs_per_problem: int = MAX_PAIRS_PER_PROBLEM,
) -> list[Pair]:
    """Every pair in the store (or of `problem_ids`), problem by problem."""
    problems = select(Problem.id, Problem.prompt, Problem.reference_solution)
    candidates = (
        executed_candidates()
        .add_columns(Candidate.id.in_(select(HardNegativeLabel.candidate_id)).label("hard"))
        .order_by(Candidate.id)
    )
    if problem_ids is not None:
        problems = problems.where(Problem.id.in_(problem_ids))
        candidates = candidates.where(Candidate.problem_id.in_(problem_ids))
    executed: dict[int, list[Executed]] = defaultdict(list)
    hard_negatives = set()
    for problem_id, candidate_id, code_hash, code, verdict, tampered, hard in session.execute(
        candidates
    ):
        executed[problem_id].append(Executed(candidate_id, code_hash, code, verdict, tampered))
        if hard:
            hard_negatives.add(candidate_id)
    references = {row.id: row for row in session.execute(problems)}
    pairs = []
    for problem_id, rows in sorted(executed.items()):
        problem = references[problem_id]
        for (_, chosen), (_, rejected) in problem_pairs(
            problem.reference_solution, rows, hard_negatives, max_pairs_per_problem
        ):
            pairs.append(Pair(problem_id, problem.prompt, chosen, rejected))
    return pairs
