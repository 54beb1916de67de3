"""Which score the candidate listings show, on both databases: by default the one each
candidate's own iteration's reward model gave it, whatever was registered since."""

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session

from app.queries import CandidateFilter, list_candidates, score_samples
from models import Iteration, Problem
from models.enums import IterationStatus, ModelKind, Origin, Verdict
from models.repository import current_model, insert_hard_negative_labels, insert_scores
from tests.factories import make_candidate, make_model_version, make_problem


def make_iteration(session: Session, *, number: int, reward_model_version_id: int) -> Iteration:
    iteration = Iteration(
        number=number,
        status=IterationStatus.DONE,
        reward_model_version_id=reward_model_version_id,
        params={},
        finished_at=datetime.now(UTC),
    )
    session.add(iteration)
    session.flush()
    return iteration


def scored_candidate(
    session: Session,
    *,
    problem: Problem,
    scores: dict[int, float],
    iteration_id: int | None = None,
    origin: Origin = Origin.GENERATOR,
    verdict: Verdict = Verdict.WRONG_ANSWER,
) -> int:
    """A candidate, executed, with a score from each reward model version in `scores`."""
    candidate = make_candidate(
        session, problem=problem, iteration_id=iteration_id, origin=origin, verdict=verdict
    )
    insert_scores(
        session,
        [
            {"candidate_id": candidate.id, "reward_model_version_id": version, "score": score}
            for version, score in scores.items()
        ],
    )
    return candidate.id


def every_page(session: Session, flt: CandidateFilter, limit: int) -> list[dict]:
    rows, cursor = [], None
    while True:
        page = list_candidates(session, flt, limit=limit, cursor=cursor)
        assert len(page.items) <= limit
        rows += page.items
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


def test_a_finished_iteration_shows_its_scores_after_a_newer_reward_model(session):
    problem = make_problem(session)
    first = make_model_version(session, name="rm-v1")
    iteration = make_iteration(session, number=1, reward_model_version_id=first.id)
    passing = scored_candidate(
        session,
        problem=problem,
        iteration_id=iteration.id,
        verdict=Verdict.OK,
        scores={first.id: 0.4},
    )
    # Failing, yet scored above the passing one: mined as a hard negative.
    hard_negative = scored_candidate(
        session, problem=problem, iteration_id=iteration.id, scores={first.id: 0.8}
    )
    insert_hard_negative_labels(
        session,
        [
            {
                "candidate_id": hard_negative,
                "reward_model_version_id": first.id,
                "iteration_id": iteration.id,
                "rule": "above_lowest_passing",
            }
        ],
    )
    # The warm start's mutants: no iteration, never scored.
    warm_start = make_candidate(session, problem=problem, origin=Origin.MUTATION).id
    # Trained at the iteration's end: the newest reward model, which has scored nothing.
    newer = make_model_version(session, name="rm-v2")
    assert current_model(session, ModelKind.REWARD).id == newer.id

    page = list_candidates(session, CandidateFilter())
    shown = {row["id"]: (row["score"], row["reward_model_version_id"]) for row in page.items}
    assert shown == {
        hard_negative: (0.8, first.id),
        passing: (0.4, first.id),
        warm_start: (None, None),
    }
    assert page.reward_model_version_id is None  # each row names its own
    [labelled] = list_candidates(session, CandidateFilter(hard_negative=True)).items
    assert labelled["id"] == hard_negative and labelled["score"] == 0.8
    by_score = list_candidates(session, CandidateFilter(sort="-score")).items
    assert [row["id"] for row in by_score] == [hard_negative, passing]
    # The dashboard's score plot reads the same scores.
    assert score_samples(session) == {"passing": [0.4], "failing": [0.8]}

    # Asked for by name, the newer model's (empty) scores are still what is shown.
    explicit = list_candidates(session, CandidateFilter(reward_model_version_id=newer.id))
    assert explicit.reward_model_version_id == newer.id
    assert {row["score"] for row in explicit.items} == {None}
    assert (
        list_candidates(
            session, CandidateFilter(reward_model_version_id=newer.id, sort="score")
        ).items
        == []
    )
    assert score_samples(session, newer.id) == {"passing": [], "failing": []}


@dataclass
class Store:
    versions: list[int]  # rm-v1, rm-v2, rm-v3, oldest first
    shown: dict[int, float | None]  # the score each candidate shows by default
    by_newest: dict[int, float]  # rm-v3's scores
    drawn: list[int]  # held-out draws, scored 0.0 by rm-v1


def mixed_store(session: Session) -> Store:
    """Two iterations with their own reward models and tied scores, held-out draws
    scored by two evaluations, a /solve sample and never-scored mutants."""
    problem = make_problem(session)
    versions = [make_model_version(session, name=f"rm-v{i}").id for i in (1, 2, 3)]
    v1, v2, v3 = versions
    first = make_iteration(session, number=1, reward_model_version_id=v1)
    second = make_iteration(session, number=2, reward_model_version_id=v2)
    shown: dict[int, float | None] = {}
    by_newest: dict[int, float] = {}
    for index, score in enumerate([0.5, 0.2, 0.5, 0.9, 0.2, 0.7, 0.5]):
        # Some are scored by a later model as well, which is not their iteration's.
        later = {v3: 0.95 - index / 100} if index % 3 == 0 else {}
        cid = scored_candidate(
            session, problem=problem, iteration_id=first.id, scores={v1: score, **later}
        )
        shown[cid] = score
        if later:
            by_newest[cid] = later[v3]
    for score in [0.5, 0.1, 0.9, 0.3, 0.5, 0.6]:
        cid = scored_candidate(session, problem=problem, iteration_id=second.id, scores={v2: score})
        shown[cid] = score
    # Held-out draws: scored by evaluation 1's model (v1), then evaluation 2's (v3).
    drawn = []
    for score in [0.5, 0.8, 0.5]:
        cid = scored_candidate(
            session, problem=problem, origin=Origin.EVALUATION, scores={v1: 0.0, v3: score}
        )
        shown[cid] = by_newest[cid] = score
        drawn.append(cid)
    # A /solve sample, scored by the model that answered the request.
    shown[scored_candidate(session, problem=problem, origin=Origin.REQUEST, scores={v2: 0.4})] = 0.4
    for _ in range(2):
        shown[make_candidate(session, problem=problem, origin=Origin.MUTATION).id] = None
    return Store(versions, shown, by_newest, drawn)


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
def test_paging_by_score_returns_each_candidate_once_in_score_order(session, limit):
    store = mixed_store(session)
    scored = {cid: score for cid, score in store.shown.items() if score is not None}
    ascending = sorted(scored, key=lambda cid: (scored[cid], cid))
    for sort, expected in (("score", ascending), ("-score", ascending[::-1])):
        rows = every_page(session, CandidateFilter(sort=sort), limit)
        assert [row["id"] for row in rows] == expected, sort
        assert all(row["score"] == scored[row["id"]] for row in rows)
    # Newest first lists every candidate, each with the score it shows.
    newest_first = every_page(session, CandidateFilter(), limit)
    assert [row["id"] for row in newest_first] == sorted(store.shown, reverse=True)
    assert {row["id"]: row["score"] for row in newest_first} == store.shown
    # A score range pages through the shown scores too.
    in_range = every_page(
        session, CandidateFilter(min_score=0.45, max_score=0.75, sort="-score"), limit
    )
    assert [row["id"] for row in in_range] == [
        cid for cid in ascending[::-1] if 0.45 <= scored[cid] <= 0.75
    ]


def test_an_explicit_reward_model_shows_its_own_scores(session):
    store = mixed_store(session)
    v1, _, v3 = store.versions
    ascending = sorted(store.by_newest, key=lambda cid: (store.by_newest[cid], cid))
    for sort, expected in (("score", ascending), ("-score", ascending[::-1])):
        rows = every_page(session, CandidateFilter(reward_model_version_id=v3, sort=sort), 2)
        assert [row["id"] for row in rows] == expected
        assert all(
            row["score"] == store.by_newest[row["id"]] and row["reward_model_version_id"] == v3
            for row in rows
        )
    # rm-v1 gave the held-out draws 0.0, which by default show evaluation 2's scores.
    zero = CandidateFilter(reward_model_version_id=v1, max_score=0.0)
    page = list_candidates(session, zero)
    assert page.reward_model_version_id == v1
    assert [row["id"] for row in page.items] == sorted(store.drawn, reverse=True)
    assert list_candidates(session, CandidateFilter(max_score=0.0)).items == []
