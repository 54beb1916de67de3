"""`rewardranker sandbox run|doctor`, through the root CLI app."""

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from app.cli import app


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["sandbox", *args])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "right": "def add(a, b):\n    return a + b\n",
        "wrong": "def add(a, b):\n    return a - b\n",
        "tests": "assert add(1, 2) == 3\n",
        "io": "print(sum(map(int, input().split())))\n",
        "cases": json.dumps([{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "5"}]),
    }
    for name, text in paths.items():
        (tmp_path / name).write_text(text)
    return {name: tmp_path / name for name in paths}


def test_run_prints_one_json_object_and_exits_zero_whatever_the_verdict(files) -> None:
    for code, verdict in (("right", "OK"), ("wrong", "WRONG_ANSWER")):
        done = _cli(
            "run", "--language", "python", "--code", str(files[code]),
            "--tests", str(files["tests"]), "--timeout", "5", "--memory-mb", "256", "--json",
        )  # fmt: skip
        assert done.exit_code == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["verdict"] == verdict
        assert {"verdict", "passed", "total", "duration_ms", "stdout_tail", "stderr_tail"} <= set(
            result
        )


def test_run_with_io_cases(files) -> None:
    done = _cli(
        "run", "--language", "python", "--code", str(files["io"]),
        "--tests", str(files["tests"].with_name("none")), "--io", str(files["cases"]), "--json",
    )  # fmt: skip
    assert done.exit_code != 0 and "none" in done.stderr  # unreadable tests file
    files["tests"].write_text("")
    done = _cli(
        "run", "--language", "python", "--code", str(files["io"]),
        "--tests", str(files["tests"]), "--io", str(files["cases"]), "--json",
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert (result["verdict"], result["passed"], result["total"]) == ("WRONG_ANSWER", 1, 2)


def test_bad_usage_exits_non_zero_with_a_one_line_reason(files) -> None:
    done = _cli(
        "run", "--language", "cobol", "--code", str(files["right"]),
        "--tests", str(files["tests"]), "--json",
    )  # fmt: skip
    assert done.exit_code != 0
    assert "cobol" in done.stderr and "python" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = _cli(
        "run", "--language", "python", "--code", "/nonexistent/code.py",
        "--tests", str(files["tests"]), "--json",
    )  # fmt: skip
    assert done.exit_code != 0 and "/nonexistent/code.py" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_doctor_reports_every_layer_active() -> None:
    done = _cli("doctor")
    assert done.exit_code == 0, done.stdout + done.stderr
    for layer in ("bubblewrap", "network namespace", "seccomp filter", "cgroup memory limit"):
        assert f"[ok  ] {layer}" in done.stdout
    assert "MISS" not in done.stdout
