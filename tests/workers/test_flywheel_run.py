"""`rewardranker flywheel run` on the embedded defaults (SQLite, the filesystem
broker, worker processes it starts itself): interrupted mid-iteration and run
again, it resumes and ends with everything exactly once."""

import os
import signal
import subprocess
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import Evaluation, Execution, Iteration
from models.db import make_engine
from models.enums import IterationStatus
from tests.workers.conftest import assert_evaluation_exactly_once
from tests.workers.test_chain import assert_exactly_once
from workers.iteration import FlywheelParams
from workers.processes import CLI


def test_an_interrupted_run_resumes_with_nothing_lost_or_done_twice(tmp_path: Path, tiny_model_dir):
    data = tmp_path / "var"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RR_")},
        "RR_DATA_DIR": str(data),
        "RR_REWARD_MODEL": str(tiny_model_dir),
        "RR_GENERATOR_MODEL": str(tiny_model_dir),
    }
    command = [CLI, "flywheel", "run", "--backend", "mutation", "--problems", "4",
               "--candidates", "6", "--iterations", "1", "--policy-steps", "0"]  # fmt: skip
    engine = make_engine(f"sqlite:///{data / 'rewardranker.db'}")

    def executed() -> int:
        try:
            with Session(engine) as session:
                return session.scalar(
                    select(func.count())
                    .select_from(Execution)
                    .where(Execution.iteration_id.is_not(None))
                )
        except Exception:  # the database is not created yet
            return 0

    first = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A suite started in the background by a non-interactive shell inherits an
        # ignored SIGINT, and Python then never raises KeyboardInterrupt: give the
        # run the Ctrl-C a user's terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while executed() == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert executed() > 0, "nothing executed within 240 s"
        first.send_signal(signal.SIGINT)  # Ctrl-C: it stops its workers and exits
        assert first.wait(120) != 0
    finally:
        if first.poll() is None:
            first.kill()
    with Session(engine) as session:
        assert (
            session.scalar(select(Iteration.status)) != IterationStatus.DONE
        )  # really interrupted

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "wall time" in second.stdout  # it printed its report
    with Session(engine) as session:
        [iteration] = session.scalars(select(Iteration)).all()
        assert iteration.status == IterationStatus.DONE
        assert_exactly_once(session, iteration.id, FlywheelParams(backend="mutation", candidates=6))
        # The baseline and iteration 1's evaluation, on the same held-out problems.
        evaluations = session.scalars(select(Evaluation).order_by(Evaluation.number)).all()
        assert [e.number for e in evaluations] == [0, 1]
        assert evaluations[0].params["problem_ids"] == evaluations[1].params["problem_ids"]
        for evaluation in evaluations:
            assert_evaluation_exactly_once(session, evaluation.id)
    assert "pass@1 on held-out problems" in second.stdout
    engine.dispose()
