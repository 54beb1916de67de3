"""execute_problem's retries of SANDBOX_ERROR, through the real sandbox and Postgres.

A sandbox start is made to fail by putting first on PATH a `bwrap` script that
runs the real bwrap, adding a bind of a missing path on the starts it is told to
fail: bwrap then exits 1 with "bwrap: Can't find source path ..." before the
program runs, which is how a broken sandbox start fails and what the runner
calls a lost run. The probe (`probe_host`, cached per process) runs before any
start is failed and finds the script through `shutil.which`.

The problems are JavaScript because every JavaScript run starts a fresh bwrap,
while Python runs fork a warm zygote started once per slot. The runner's slots
also keep the host (and so the bwrap path) they were made with, so the fixture
closes the slot pool as well as clearing the probe, before and after.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from models import Execution, HardNegativeLabel, Problem, Score
from models.enums import Language, Verdict
from pipelines.sandbox import isolation, runner
from tests.conftest import unavailable
from tests.factories import make_candidate, make_model_version, make_problem
from tests.workers.conftest import collecting_iteration, count, register_reward_model
from workers import execution as execution_queue
from workers import labeling

JS_PROMPT = "function add(a, b) {\n"
JS_RIGHT = JS_PROMPT + "  return a + b;\n}\n"
JS_WRONG = JS_PROMPT + "  return a - b;\n}\n"
JS_TESTS = (
    "const assert = require('node:assert');\n"
    "assert.deepEqual(add(1, 2), 3);\nassert.deepEqual(add(-1, 1), 0);\n"
)

# Runs as the sandbox user, under the trampoline's bare environment: every path
# is spelled out. A plan file absent means pass everything through (the probe).
WRAPPER = """#!/bin/sh
state={state}
[ -f "$state/fail-first" ] || exec {real} "$@"
n=$(flock "$state/lock" sh -c 'n=$(($(cat "$1") + 1)); echo $n > "$1"; echo $n' sh "$state/starts")
if [ "$n" -le "$(cat "$state/fail-first")" ]; then
    sleep 0.2  # a failing start takes a moment, as bwrap's does on a loaded host
    exec {real} --ro-bind "$state/missing" /lost "$@"
fi
exec {real} "$@"
"""


@dataclass
class FailingBwrap:
    """The `bwrap` first on PATH: fails the first starts it is told to fail."""

    folder: Path

    def fail_first(self, starts: int) -> None:
        (self.folder / "fail-first").write_text(f"{starts}\n")

    @property
    def starts(self) -> int:
        return int((self.folder / "starts").read_text())


def _reset_sandbox() -> None:
    isolation.probe_host.cache_clear()
    runner._POOL.close()


@pytest.fixture
def failing_bwrap() -> Iterator[FailingBwrap]:
    real = shutil.which("bwrap")
    if real is None or not os.path.exists("/usr/bin/node"):
        unavailable("these tests need bwrap and node")
    # World-readable, not under pytest's 0700 tmp_path: the sandbox user runs the script.
    folder = Path(tempfile.mkdtemp(prefix="rr-failing-bwrap-"))
    folder.chmod(0o755)
    for name, text in (("starts", "0\n"), ("lock", "")):
        (folder / name).write_text(text)
        (folder / name).chmod(0o666)
    (folder / "bwrap").write_text(WRAPPER.format(state=folder, real=real))
    (folder / "bwrap").chmod(0o755)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
            _reset_sandbox()
            host = isolation.probe_host()
            if not host.isolated:
                unavailable(f"no working sandbox: {host.bwrap_error}")
            assert host.bwrap == str(folder / "bwrap")
            yield FailingBwrap(folder)
    finally:
        _reset_sandbox()  # PATH is restored: the next run probes the real bwrap
        shutil.rmtree(folder)


def execution_of(session, candidate_id: int) -> Execution:
    return session.scalars(select(Execution).where(Execution.candidate_id == candidate_id)).one()


def js_problem(session) -> Problem:
    """JavaScript: every run is one bwrap start, with no compile step."""
    return make_problem(
        session,
        language=Language.JAVASCRIPT,
        prompt=JS_PROMPT,
        tests=JS_TESTS,
        reference_solution=JS_RIGHT,
    )


def test_a_sandbox_that_fails_its_first_start_gives_the_real_verdict_on_the_second(
    pg_session, failing_bwrap
):
    problem = js_problem(pg_session)
    iteration = collecting_iteration(pg_session, problem, make_model_version(pg_session))
    right = make_candidate(pg_session, problem=problem, code=JS_RIGHT, iteration_id=iteration.id)
    wrong = make_candidate(pg_session, problem=problem, code=JS_WRONG, iteration_id=iteration.id)
    failing_bwrap.fail_first(2)  # each candidate's first run: one start each

    assert execution_queue.execute_candidates(pg_session, iteration.id, problem.id) == 2

    assert failing_bwrap.starts == 4
    for candidate, verdict in ((right, Verdict.OK), (wrong, Verdict.WRONG_ANSWER)):
        execution = execution_of(pg_session, candidate.id)
        assert (execution.verdict, execution.attempts) == (verdict, 2)
        assert "bwrap:" not in execution.stderr_tail  # the kept run is the second one


def test_a_sandbox_that_never_starts_is_a_sandbox_error_and_never_labelled(
    pg_session, failing_bwrap, tiny_model_dir
):
    problem = js_problem(pg_session)
    reward = register_reward_model(pg_session, tiny_model_dir)
    iteration = collecting_iteration(pg_session, problem, reward)
    # Neighbours judged earlier, so labelling has a real problem to mine.
    for code, verdict in ((JS_RIGHT, Verdict.OK), (JS_WRONG, Verdict.WRONG_ANSWER)):
        make_candidate(
            pg_session, problem=problem, code=code, verdict=verdict, iteration_id=iteration.id
        )
    lost = make_candidate(
        pg_session, problem=problem, code=JS_RIGHT + "// lost\n", iteration_id=iteration.id
    )
    failing_bwrap.fail_first(1000)

    assert execution_queue.execute_candidates(pg_session, iteration.id, problem.id) == 1

    assert failing_bwrap.starts == execution_queue.SANDBOX_ATTEMPTS
    execution = execution_of(pg_session, lost.id)
    assert execution.verdict == Verdict.SANDBOX_ERROR
    assert execution.attempts == execution_queue.SANDBOX_ATTEMPTS
    assert execution.stderr_tail.startswith("bwrap:")

    labeling.label_candidates(pg_session, iteration.id, problem.id)
    assert count(pg_session, Score) == 2  # the neighbours were scored: labelling ran
    assert count(pg_session, Score, Score.candidate_id == lost.id) == 0
    assert count(pg_session, HardNegativeLabel, HardNegativeLabel.candidate_id == lost.id) == 0


def test_a_python_zygote_that_fails_to_start_is_retried(pg_session, failing_bwrap):
    problem = make_problem(pg_session)  # Python: runs fork a zygote started through bwrap
    iteration = collecting_iteration(pg_session, problem, make_model_version(pg_session))
    candidate = make_candidate(pg_session, problem=problem, iteration_id=iteration.id)
    failing_bwrap.fail_first(1)

    execution_queue.execute_candidates(pg_session, iteration.id, problem.id)

    assert execution_of(pg_session, candidate.id).verdict == Verdict.OK
    assert failing_bwrap.starts == 2  # the failed zygote, then the one that ran it


def test_a_python_zygote_that_never_starts_is_a_sandbox_error(pg_session, failing_bwrap):
    problem = make_problem(pg_session)
    iteration = collecting_iteration(pg_session, problem, make_model_version(pg_session))
    candidate = make_candidate(pg_session, problem=problem, iteration_id=iteration.id)
    failing_bwrap.fail_first(1000)

    execution_queue.execute_candidates(pg_session, iteration.id, problem.id)

    execution = execution_of(pg_session, candidate.id)
    assert execution.verdict == Verdict.SANDBOX_ERROR  # not blamed on the candidate
    assert execution.attempts == execution_queue.SANDBOX_ATTEMPTS
    assert "interpreter did not start" in execution.stderr_tail
