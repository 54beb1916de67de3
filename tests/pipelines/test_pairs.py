"""The pairing rule on plain rows (the store's side is tested through build_pairs
in test_reward_model.py and the dataset export in test_datasets.py)."""

from models.enums import Verdict
from models.repository import content_hash
from pipelines.pairs import Executed, problem_pairs


def executed(candidate_id: int, code: str, verdict: Verdict) -> Executed:
    return Executed(candidate_id, content_hash(code), code, verdict)


def test_reference_first_hard_negatives_first_and_no_sandbox_errors():
    rows = [
        executed(1, "wrong = 1", Verdict.WRONG_ANSWER),
        executed(2, "right = 1", Verdict.OK),
        executed(3, "hard = 1", Verdict.WRONG_ANSWER),
        executed(4, "lost = 1", Verdict.SANDBOX_ERROR),
        executed(5, "reference = 1\n", Verdict.OK),  # the reference's text: not chosen twice
    ]
    pairs = problem_pairs("reference = 1", rows, hard_negatives={3})
    assert [(chosen[0], rejected[0]) for chosen, rejected in pairs] == [
        (None, 3),  # round 1: every rejected once, the chosen side shifting
        (2, 1),
        (2, 3),  # round 2
        (None, 1),
    ]


def test_the_cap_keeps_both_sides_varied():
    rows = [executed(i, f"ok_{i} = 1", Verdict.OK) for i in range(1, 4)]
    rows += [executed(i, f"bad_{i} = 1", Verdict.RUNTIME_ERROR) for i in range(10, 14)]
    pairs = problem_pairs(None, rows, hard_negatives=set(), limit=4)
    assert len(pairs) == 4
    assert {chosen[0] for chosen, _ in pairs} == {1, 2, 3}
    assert [rejected[0] for _, rejected in pairs] == [10, 11, 12, 13]


def test_no_pairs_without_both_sides():
    passing = [executed(1, "ok = 1", Verdict.OK)]
    failing = [executed(2, "bad = 1", Verdict.WRONG_ANSWER)]
    assert problem_pairs(None, passing, hard_negatives=set()) == []
    assert problem_pairs(None, failing, hard_negatives=set()) == []
    assert len(problem_pairs("ok = 2", failing, hard_negatives=set())) == 1


def test_runs_caught_tampering_are_paired_first_like_hard_negatives():
    rows = [
        executed(1, "wrong = 1", Verdict.WRONG_ANSWER),
        executed(2, "right = 1", Verdict.OK),
        Executed(3, content_hash("forged = 1"), "forged = 1", Verdict.WRONG_ANSWER, tampered=True),
        executed(4, "hard = 1", Verdict.WRONG_ANSWER),
    ]
    pairs = problem_pairs(None, rows, hard_negatives={4}, limit=2)
    assert [rejected[0] for _, rejected in pairs] == [3, 4]  # both before the plain failure
