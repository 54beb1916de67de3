"""Best-of-N inference and the evaluation metrics of an iteration.

`rerank_metrics` compares three ways of picking one program out of N samples:
at random (pass@1), the reward model's top choice (reranked pass@1), and an
oracle that knows the verdicts (pass@N). Reranking is worth it when it closes
the gap from the first to the last.
"""

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Candidate, Execution, Iteration, Problem, Score
from models.enums import Origin, Verdict

if TYPE_CHECKING:  # annotations only: generation imports torch and transformers
    from pipelines.generation import PromptSpec, Sample

PASS_AT_K = (1, 5, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples, drawn without replacement from n of
    which c pass, passes: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as a product of ratios, as in the paper, so large n neither
    overflows nor loses precision the way the binomials would.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a passing sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _reranked_pass(group: Sequence[tuple[float, bool]]) -> float:
    """Whether the top-scored sample passes; ties at the top count as a random pick among them."""
    top = max(score for score, _ in group)
    tied = [passed for score, passed in group if score == top]
    return sum(tied) / len(tied)


def rerank_metrics(groups: Sequence[Sequence[tuple[float, bool]]]) -> dict[str, float | int]:
    """Means over problems; each group is one problem's `(score, passed)` samples.

    `pass@k` is reported for the k in 1, 5, 10 that every group has samples for.
    """
    if not groups or any(not group for group in groups):
        raise ValueError("rerank_metrics needs at least one problem, each with at least one sample")
    counts = [(len(group), sum(passed for _, passed in group)) for group in groups]
    metrics: dict[str, float | int] = {
        "problems": len(groups),
        "samples": sum(n for n, _ in counts),
        "random_pass1": float(np.mean([c / n for n, c in counts])),
        "reranked_pass1": float(np.mean([_reranked_pass(group) for group in groups])),
        "oracle_pass_n": float(np.mean([c > 0 for _, c in counts])),
    }
    smallest_n = min(n for n, _ in counts)
    for k in PASS_AT_K:
        if k <= smallest_n:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return metrics


@dataclass(frozen=True)
class Estimate:
    """A figure over problems with its percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def per_problem_pass1(groups: Sequence[Sequence[tuple[float, bool]]]) -> dict[str, np.ndarray]:
    """Per problem: `generator_pass1` (the share of its samples that pass) and
    `reranked_pass1` (whether the reward model's top pick passes)."""
    return {
        "generator_pass1": np.array([sum(p for _, p in group) / len(group) for group in groups]),
        "reranked_pass1": np.array([_reranked_pass(group) for group in groups]),
    }


def paired_change(
    before: Sequence[float],
    after: Sequence[float],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The mean over problems of `after - before`, two figures of the same problems,
    with a paired percentile-bootstrap interval (each resample draws problems, and
    takes both figures of each). Pairing cancels how hard each problem is, which
    two separate intervals carry in full: their overlap can hide a real change."""
    if not len(before) or len(before) != len(after):
        raise ValueError(
            f"paired_change needs one figure per problem each: {len(before)}, {len(after)}"
        )
    difference = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (resamples, len(difference)))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(difference.mean()), float(low), float(high))


def change_verdict(change: Estimate) -> str:
    """`better` or `worse` when the interval of a change excludes 0, else `within noise`."""
    if change.low > 0:
        return "better"
    if change.high < 0:
        return "worse"
    return "within noise"


def _pair_counts(group: Sequence[tuple[float, bool]]) -> tuple[float, int]:
    """(passing-over-failing orderings, pairs) within one problem; ties count half."""
    passing = np.array([score for score, passed in group if passed], dtype=float)
    failing = np.array([score for score, passed in group if not passed], dtype=float)
    if not len(passing) or not len(failing):
        return 0.0, 0
    wins = (passing[:, None] > failing[None, :]).sum() + 0.5 * (
        passing[:, None] == failing[None, :]
    ).sum()
    return float(wins), len(passing) * len(failing)


def _roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `labels` (Mann-Whitney U, ties half);
    nan when one class is missing."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    ordered = np.sort(scores)
    for value in np.unique(ordered[1:][ordered[1:] == ordered[:-1]]):
        tied = scores == value  # a tie shares the mean of its ranks
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def held_out_metrics(
    groups: Sequence[Sequence[tuple[float, bool]]],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation's figures over problems, each with a bootstrap interval.

    Each group is one held-out problem's `(score, passed)` samples (an unscored
    sample carries `-inf`). Problems are resampled with replacement `resamples`
    times; every figure is recomputed on each resample, and the interval is the
    central `confidence` share of those values. Figures: `generator_pass1` (the
    unbiased pass@1 over the N samples), `reranked_pass1` (best-of-N by the
    reward model), `oracle_pass_n`, `pass@k`, `gap_closed` (the share of the
    generator->oracle gap that reranking closes; None when there is no gap),
    `pairwise_accuracy` (passing over failing sample of the same problem) and
    `roc_auc` (pooled over every sample); the last two are None when no problem
    has both a passing and a failing sample.
    """
    if not groups or any(not group for group in groups):
        raise ValueError("held_out_metrics needs at least one problem, each with a sample")
    counts = [(len(group), sum(passed for _, passed in group)) for group in groups]
    per_problem = per_problem_pass1(groups) | {
        "oracle_pass_n": np.array([float(c > 0) for _, c in counts]),
    }
    smallest_n = min(n for n, _ in counts)
    for k in PASS_AT_K:
        if k <= smallest_n:
            per_problem[f"pass@{k}"] = np.array([pass_at_k(n, c, k) for n, c in counts])
    wins, pairs = np.array([_pair_counts(group) for group in groups]).T
    scores = [np.array([score for score, _ in group], dtype=float) for group in groups]
    labels = [np.array([passed for _, passed in group], dtype=bool) for group in groups]

    def figures(index: np.ndarray) -> dict[str, float]:
        means = {name: float(values[index].mean()) for name, values in per_problem.items()}
        gap = means["oracle_pass_n"] - means["generator_pass1"]
        means["gap_closed"] = (
            (means["reranked_pass1"] - means["generator_pass1"]) / gap if gap > 0 else np.nan
        )
        means["pairwise_accuracy"] = (
            float(wins[index].sum() / pairs[index].sum()) if pairs[index].sum() else np.nan
        )
        means["roc_auc"] = _roc_auc(
            np.concatenate([scores[i] for i in index]), np.concatenate([labels[i] for i in index])
        )
        return means

    point = figures(np.arange(len(groups)))
    rng = np.random.default_rng(seed)
    draws = [figures(rng.integers(0, len(groups), len(groups))) for _ in range(resamples)]
    tail = (1.0 - confidence) / 2 * 100
    report: dict[str, Any] = {"problems": len(groups), "samples": sum(n for n, _ in counts)}
    for name, value in point.items():
        if np.isnan(value):
            report[name] = None
            continue
        values = np.array([draw[name] for draw in draws])
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        report[name] = Estimate(value, float(low), float(high))
    return report


def evaluation_report(
    samples: Iterable[tuple[str, int, float, bool]], *, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """`held_out_metrics` per language and over all problems (key `all`), as JSON:
    each estimate becomes `{"value", "low", "high"}`.

    `samples` are `(language, problem_id, score, passed)`, one per draw.
    """
    groups: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for language, problem_id, score, passed in samples:
        groups[language][problem_id].append((score, passed))
    if not groups:
        raise ValueError("evaluation_report needs at least one sample")
    by_language = {language: list(problems.values()) for language, problems in groups.items()}
    by_language["all"] = [group for groups in by_language.values() for group in groups]
    return {
        language: {
            name: value.as_dict() if isinstance(value, Estimate) else value
            for name, value in held_out_metrics(
                problem_groups, resamples=resamples, seed=seed
            ).items()
        }
        for language, problem_groups in sorted(by_language.items())
    }


TABLE_FIGURES = (("generator", "generator_pass1"), ("reranked", "reranked_pass1"))

Draws = Mapping[int, Sequence[tuple[float, bool]]]
"""One evaluation's draws: per held-out problem id, its `(score, passed)` samples."""


def paper_table(
    evaluations: Sequence[tuple[int, dict[str, dict[str, Any]]]],
    draws: Mapping[int, Draws],
) -> dict[str, Any]:
    """The paper's Table 1 from stored `evaluation_report`s, in evaluation order,
    and what changed between the first and the last (`evaluation_changes`, from
    `draws` by evaluation number).

    Rows are `generator` (pass@1 of one sample) and `reranked` (best-of-N) for
    each evaluation (0: the base generator with the warm-start reward model;
    N: the models iteration N left). Columns are the languages and `all`. The
    verdict is the last change's: the last evaluation's reranked pass@1 against
    the baseline's generator alone.
    """
    columns = sorted({language for _, report in evaluations for language in report} - {"all"})
    columns.append("all")
    rows = [
        {
            "evaluation": number,
            "row": label,
            "cells": {language: report.get(language, {}).get(figure) for language in columns},
        }
        for number, report in evaluations
        for label, figure in TABLE_FIGURES
    ]
    if not evaluations:
        return {"columns": columns, "rows": rows, "changes": [], "verdict": "no evaluation yet"}
    first, last = evaluations[0][0], evaluations[-1][0]
    changes = evaluation_changes((first, draws[first]), (last, draws[last]))
    verdict = _table_verdict(changes)
    return {"columns": columns, "rows": rows, "changes": changes, "verdict": verdict}


def evaluation_changes(first: tuple[int, Draws], last: tuple[int, Draws]) -> list[dict[str, Any]]:
    """pass@1 changes over the held-out problems both evaluations drew, each a
    `paired_change` with its verdict: reranking at the first evaluation and, when
    the last is another one, the generator alone, the reranked pick (the
    flywheel's own effect, reranking held constant), and reranked at the last
    against the generator alone at the first (the paper's claim)."""
    (first_number, before), (last_number, after) = first, last
    shared = sorted(before.keys() & after.keys())
    if not shared:
        return []
    was = per_problem_pass1([before[problem] for problem in shared])
    now = per_problem_pass1([after[problem] for problem in shared])
    compared = [
        ("reranking", f"reranked against the generator alone at evaluation {first_number}",
         was["generator_pass1"], was["reranked_pass1"]),
    ]  # fmt: skip
    if last_number != first_number:
        compared += [
            ("generator", f"the generator alone at evaluation {last_number} against "
             f"{first_number}", was["generator_pass1"], now["generator_pass1"]),
            ("flywheel", f"reranked at evaluation {last_number} against {first_number}",
             was["reranked_pass1"], now["reranked_pass1"]),
            ("overall", f"reranked at evaluation {last_number} against the generator alone "
             f"at evaluation {first_number}", was["generator_pass1"], now["reranked_pass1"]),
        ]  # fmt: skip
    changes = []
    for name, description, from_figure, to_figure in compared:
        change = paired_change(from_figure, to_figure)
        changes.append(
            {
                "change": name,
                "description": description,
                "problems": len(shared),
                "difference": change.as_dict(),
                "verdict": change_verdict(change),
            }
        )
    return changes


def change_text(change: dict[str, Any]) -> str:
    """`within noise: reranked at ... +0.012 [-0.010, +0.035]`."""
    difference = change["difference"]
    return (
        f"{change['verdict']}: {change['description']} {difference['value']:+.3f} "
        f"[{difference['low']:+.3f}, {difference['high']:+.3f}]"
    )


def _table_verdict(changes: Sequence[dict[str, Any]]) -> str:
    if not changes:
        return "no held-out problem drawn by both the first and the last evaluation"
    return (
        f"{change_text(changes[-1])} (pass@1, paired over the same {changes[-1]['problems']} "
        "held-out problems, 95% bootstrap interval of the difference)"
    )


class Generator(Protocol):
    def generate(self, prompts: Sequence["PromptSpec"], n: int) -> list[list["Sample"]]: ...


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], codes: Sequence[str]) -> list[float]: ...


@dataclass
class Solution:
    """The sample `solve` returns, with everything it chose among."""

    best: "Sample"
    score: float
    samples: list["Sample"]
    scores: list[float]
    # Per sample, whether it passed the example tests; None when none were given.
    passed_examples: list[bool] | None = None


def solve(
    prompt: "PromptSpec",
    n: int,
    generator: Generator,
    scorer: Scorer,
    *,
    tests: str | None = None,
) -> Solution:
    """Best-of-N: sample `n` programs, return the one the reward model scores highest.

    With `tests` (the prompt's example tests), samples that fail them are
    passed over, unless all fail: then the reward model alone decides.
    """
    samples = generator.generate([prompt], n)[0]
    if not samples:
        raise ValueError(f"the generator returned no samples for problem {prompt.problem_id}")
    scores = scorer.score([prompt.prompt] * len(samples), [sample.code for sample in samples])
    passed = _passes_examples(prompt.language, samples, tests) if tests else None
    eligible = [i for i in range(len(samples)) if passed is None or passed[i]]
    best = max(eligible or range(len(samples)), key=scores.__getitem__)
    return Solution(samples[best], scores[best], samples, scores, passed)


def _passes_examples(language: str, samples: Sequence["Sample"], tests: str) -> list[bool]:
    from pipelines.sandbox import Job, run_batch

    results = run_batch(
        [Job(language=language, code=sample.code, tests=tests) for sample in samples]
    )
    return [result.verdict == Verdict.OK for result in results]


def evaluate_iteration(session: Session, iteration_id: int) -> dict[str, dict]:
    """`rerank_metrics` per language over the iteration's sampled candidates.

    Only generator and mutation samples count (not references or /solve
    requests), and only those with a verdict other than SANDBOX_ERROR.
    Reranking uses the iteration's reward-model version's stored scores; an
    unscored sample ranks last, and with no reward model `reranked_pass1` is None.
    """
    iteration = session.get(Iteration, iteration_id)
    if iteration is None:
        raise ValueError(f"no iteration with id {iteration_id}")
    reward_version_id = iteration.reward_model_version_id
    rows = session.execute(
        select(Problem.language, Candidate.problem_id, Execution.verdict, Score.score)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .join(Problem, Problem.id == Candidate.problem_id)
        .outerjoin(
            Score,
            (Score.candidate_id == Candidate.id)
            & (Score.reward_model_version_id == reward_version_id),
        )
        .where(
            Candidate.iteration_id == iteration_id,
            Candidate.origin.in_([Origin.GENERATOR, Origin.MUTATION]),
            Execution.verdict != Verdict.SANDBOX_ERROR,
        )
    )
    groups: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for language, problem_id, verdict, score in rows:
        ranked = float("-inf") if score is None else score
        groups[language.value][problem_id].append((ranked, verdict == Verdict.OK))
    report = {}
    for language, by_problem in sorted(groups.items()):
        metrics: dict = rerank_metrics(list(by_problem.values()))
        if reward_version_id is None:
            metrics["reranked_pass1"] = None
        report[language] = metrics
    return report
