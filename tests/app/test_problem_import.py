import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.problem_import import (
    ProblemFormatError,
    SplitLeak,
    humaneval_rows,
    parse_problem_line,
    read_problem_file,
    set_split,
    upsert_problems,
)
from models import Problem
from models.enums import Language, Origin, Split
from models.problem import split_for
from tests.factories import make_candidate

NATIVE = {
    "task_id": "sum/1",
    "language": "python",
    "prompt": "def add(a, b):\n",
    "tests": "assert add(1, 2) == 3\n",
    "entry_point": "add",
}
MULTIPLE = {
    "name": "HumanEval_0_has_close_elements",
    "language": "cpp",
    "prompt": "#include<assert.h>\nbool has_close_elements(std::vector<float> n, float t) {\n",
    "doctests": "transform",
    "original": "HumanEval_0.py",
    "prompt_terminology": "reworded",
    "tests": "}\nint main() {\n    assert(candidate({1.0f}, 0.5f) == false);\n}\n",
    "stop_tokens": ["\n}"],
}


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_humaneval_ships_164_problems_with_runnable_tests():
    rows = humaneval_rows()
    assert len(rows) == 164
    first = rows[0]
    assert first["task_id"] == "HumanEval/0" and first["language"] is Language.PYTHON
    assert first["tests"].rstrip().endswith("check(has_close_elements)")
    assert first["reference_solution"].startswith(first["prompt"])


def test_humaneval_reference_passes_its_tests_and_a_broken_one_fails(tmp_path):
    row = humaneval_rows()[0]

    def run(code: str) -> int:
        script = tmp_path / "program.py"
        script.write_text(code + "\n" + row["tests"])
        return subprocess.run(
            [sys.executable, str(script)], capture_output=True, timeout=60
        ).returncode

    assert run(row["reference_solution"]) == 0
    assert run(row["prompt"] + "    return not True\n") != 0


def test_multiple_format_is_recognised():
    row = parse_problem_line(MULTIPLE, 1, default_source="file")
    assert row["source"] == "multipl-e" and row["language"] is Language.CPP
    assert row["task_id"] == MULTIPLE["name"]
    # The closing brace of the prompt's function belongs to the candidate.
    assert row["tests"] == MULTIPLE["tests"].removeprefix("}\n")


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({**NATIVE, "language": "cobol"}, "language", "unknown language 'cobol'"),
        ({**NATIVE, "prompt": ""}, "prompt", "non-empty string"),
        ({k: v for k, v in NATIVE.items() if k != "task_id"}, "task_id", "non-empty string"),
        ({**NATIVE, "tests": ""}, "tests", "needs tests or io_cases"),
        ({**NATIVE, "io_cases": [{"input": 1}]}, "io_cases", "non-empty list"),
        ({**MULTIPLE, "language": "rkt"}, "language", "unknown MultiPL-E language"),
        ([1, 2], "<line>", "JSON object"),
    ],
)
def test_malformed_records_name_line_and_field(record, field, reason):
    with pytest.raises(ProblemFormatError) as caught:
        parse_problem_line(record, 7, default_source="file")
    assert caught.value.line == 7 and caught.value.field == field
    assert f"line 7: field '{field}'" in str(caught.value) and reason in str(caught.value)


def test_io_cases_alone_are_enough():
    row = parse_problem_line(
        {**NATIVE, "tests": None, "io_cases": [{"input": "1 2\n", "output": "3\n"}]}, 1, "f"
    )
    assert row["tests"] == "" and row["io_cases"][0]["output"] == "3\n"


def test_file_keeps_good_lines_and_reports_bad_ones(tmp_path, session):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [NATIVE, "{not json", {**NATIVE, "task_id": "sum/2", "language": "rust"}, MULTIPLE, ""],
    )
    rows, errors = read_problem_file(path)
    assert [row["task_id"] for row in rows] == ["sum/1", MULTIPLE["name"]]
    assert [(error.line, error.field) for error in errors] == [(2, "<line>"), (3, "language")]
    assert upsert_problems(session, rows, eval_fraction=0.5).imported == 2


def test_reimport_is_idempotent(session):
    rows = humaneval_rows()[:20]
    first = upsert_problems(session, rows, eval_fraction=0.5)
    again = upsert_problems(session, rows, eval_fraction=0.5)
    assert (first.imported, first.unchanged) == (20, 0)
    assert (again.imported, again.unchanged) == (0, 20)
    assert (
        session.scalar(
            select(func.count()).select_from(Problem).where(Problem.source == "humaneval")
        )
        == 20
    )


def test_cli_import_reports_bad_lines_and_keeps_the_rest(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [NATIVE, {**NATIVE, "task_id": "x", "prompt": 3}])
    env = {**os.environ, "RR_DATA_DIR": str(tmp_path / "data"), "RR_DATABASE_URL": ""}
    cli = [str(Path(sys.executable).with_name("rewardranker")), "problems", "import"]
    result = subprocess.run([*cli, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "imported 1 problems" in result.stdout
    assert "line 2: field 'prompt'" in result.stderr
    again = subprocess.run([*cli, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert "imported 0 problems, 1 already stored" in again.stdout
    missing = subprocess.run(
        [*cli, str(tmp_path / "nope.jsonl")], capture_output=True, text=True, env=env, timeout=120
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_split_is_a_stable_hash_that_only_grows_the_held_out_side():
    rows = humaneval_rows()
    at = {
        fraction: {
            row["task_id"]
            for row in rows
            if split_for("humaneval", row["task_id"], fraction) == Split.EVAL
        }
        for fraction in (0.0, 0.3, 0.5, 1.0)
    }
    assert at[0.0] == set() and len(at[1.0]) == 164
    assert at[0.3] < at[0.5]
    assert 60 <= len(at[0.5]) <= 104  # a fair coin over 164 problems, far from either end
    assert split_for("humaneval", "HumanEval/0", 0.5) == split_for("humaneval", "HumanEval/0", 0.5)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_for("humaneval", "HumanEval/0", 1.5)


def test_import_assigns_the_split_and_a_line_may_set_it(session):
    rows = humaneval_rows()[:40] + [parse_problem_line({**NATIVE, "split": "eval"}, 1, "mine")]
    upsert_problems(session, rows, eval_fraction=0.5)
    stored = {p.task_id: p.split for p in session.scalars(select(Problem))}
    assert stored["sum/1"] == Split.EVAL
    for row in rows[:40]:
        assert stored[row["task_id"]] == split_for("humaneval", row["task_id"], 0.5)
    assert set(stored.values()) == {Split.TRAIN, Split.EVAL}
    with pytest.raises(ProblemFormatError, match="field 'split'"):
        parse_problem_line({**NATIVE, "split": "test"}, 7, "mine")


def test_holding_out_a_problem_training_sampled_is_refused(session):
    upsert_problems(session, humaneval_rows()[:3], eval_fraction=0.0)
    used, fresh = session.scalars(select(Problem).order_by(Problem.id).limit(2)).all()
    make_candidate(session, problem=used, origin=Origin.GENERATOR)
    with pytest.raises(SplitLeak, match=used.task_id):
        set_split(
            session, source="humaneval", task_ids=[used.task_id, fresh.task_id], split=Split.EVAL
        )
    assert (used.split, fresh.split) == (Split.TRAIN, Split.TRAIN)  # nothing changed
    assert set_split(session, source="humaneval", task_ids=[fresh.task_id], split=Split.EVAL) == 1
    assert fresh.split == Split.EVAL
    with pytest.raises(ValueError, match="HumanEval/999"):
        set_split(session, source="humaneval", task_ids=["HumanEval/999"], split=Split.TRAIN)


def test_cli_shows_and_changes_the_split(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [NATIVE, {**NATIVE, "task_id": "sum/2"}])
    env = {
        **os.environ,
        "RR_DATA_DIR": str(tmp_path / "data"),
        "RR_DATABASE_URL": "",
        "RR_EVAL_FRACTION": "0",
    }
    cli = [str(Path(sys.executable).with_name("rewardranker")), "problems"]

    def run(*args):
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)

    assert run("import", str(path)).returncode == 0
    assert "│ p      │ python   │ train │ 2 " in run("split").stdout
    moved = run("split", "--source", "p", "--set", "eval", "sum/2")
    assert moved.returncode == 0 and "moved 1 problem(s) to eval" in moved.stdout
    shown = run("split").stdout
    assert "│ eval  │ 1 " in shown and "│ train │ 1 " in shown
    unknown = run("split", "--source", "p", "--set", "eval", "nope")
    assert (
        unknown.returncode == 1 and "no problem in source 'p' with task id nope" in unknown.stderr
    )
