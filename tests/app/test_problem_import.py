import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.problem_import import (
    ProblemFormatError,
    humaneval_rows,
    parse_problem_line,
    read_problem_file,
    upsert_problems,
)
from models import Problem
from models.enums import Language

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
    assert upsert_problems(session, rows).imported == 2


def test_reimport_is_idempotent(session):
    rows = humaneval_rows()[:20]
    first = upsert_problems(session, rows)
    again = upsert_problems(session, rows)
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
