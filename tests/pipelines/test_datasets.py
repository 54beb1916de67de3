"""DVC versioning of iterations, against the real databases, git and DVC."""

import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app as cli_app
from models import (
    Candidate,
    DatasetVersion,
    HardNegativeLabel,
    Iteration,
    ModelVersion,
    Problem,
    Score,
    db,
    settings,
)
from models.db import make_engine
from models.enums import Origin, Verdict
from pipelines.datasets import REPO_DIRNAME, version_iteration
from pipelines.pairs import MAX_PAIRS_PER_PROBLEM, Pair, build_pairs
from tests.factories import make_candidate, make_model_version, make_problem

DVC = str(Path(sys.executable).with_name("dvc"))
REFERENCE = "def add(a, b):\n    return a + b\n"


@dataclass
class Store:
    """Two iterations of candidates; names say what each one exercises."""

    iteration_1: Iteration
    iteration_2: Iteration
    reference: Candidate  # OK, outside any iteration, same text as the reference solution
    passing_1: Candidate
    hard_negative_1: Candidate  # WRONG_ANSWER, labelled in iteration 1
    sandbox_error_1: Candidate  # never a rejected example
    unexecuted_1: Candidate
    failing_2: Candidate  # RUNTIME_ERROR, iteration 2
    passing_2b: Candidate  # on a problem with no reference solution
    hard_negative_2b: Candidate  # COMPILE_ERROR, labelled in iteration 2


def build_store(session: Session) -> Store:
    reward = make_model_version(session)
    iteration_1 = Iteration(number=1, reward_model_version_id=reward.id)
    iteration_2 = Iteration(number=2, reward_model_version_id=reward.id)
    session.add_all([iteration_1, iteration_2])
    session.flush()
    problem = make_problem(session, reference_solution=REFERENCE)
    problem_b = make_problem(session, reference_solution=None, prompt="def sub(a, b):\n")

    def candidate(problem: Problem, verdict: Verdict | None, iteration: Iteration | None, **kw):
        return make_candidate(
            session,
            problem=problem,
            verdict=verdict,
            iteration_id=iteration.id if iteration else None,
            **kw,
        )

    store = Store(
        iteration_1=iteration_1,
        iteration_2=iteration_2,
        reference=candidate(problem, Verdict.OK, None, code=REFERENCE, origin=Origin.REFERENCE),
        passing_1=candidate(problem, Verdict.OK, iteration_1),
        hard_negative_1=candidate(problem, Verdict.WRONG_ANSWER, iteration_1),
        sandbox_error_1=candidate(problem, Verdict.SANDBOX_ERROR, iteration_1),
        unexecuted_1=candidate(problem, None, iteration_1),
        failing_2=candidate(problem, Verdict.RUNTIME_ERROR, iteration_2),
        passing_2b=candidate(problem_b, Verdict.OK, iteration_2),
        hard_negative_2b=candidate(problem_b, Verdict.COMPILE_ERROR, iteration_2),
    )
    for scored, value in [(store.passing_1, 0.5), (store.hard_negative_1, 0.9)]:
        session.add(Score(candidate_id=scored.id, reward_model_version_id=reward.id, score=value))
    for labelled, iteration in [
        (store.hard_negative_1, iteration_1),
        (store.hard_negative_2b, iteration_2),
    ]:
        session.add(
            HardNegativeLabel(
                candidate_id=labelled.id,
                reward_model_version_id=reward.id,
                iteration_id=iteration.id,
                rule="above_lowest_passing",
            )
        )
    session.flush()
    return store


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def pair_ids(folder: Path) -> set[tuple[int | None, int]]:
    table = pq.read_table(folder / "pairs.parquet").to_pylist()
    return {(row["chosen_candidate_id"], row["rejected_candidate_id"]) for row in table}


def column(path: Path, name: str) -> list:
    return pq.read_table(path, columns=[name]).column(name).to_pylist()


def test_two_iterations_are_tagged_exported_and_pushed(session: Session, tmp_path: Path):
    store = build_store(session)
    repo = tmp_path / REPO_DIRNAME
    s = store

    first = version_iteration(session, s.iteration_1.id, data_dir=tmp_path, remote="")
    second = version_iteration(session, s.iteration_2.id, data_dir=tmp_path, remote="")

    assert run("git", "tag", "--list", cwd=repo).split() == ["iter-1", "iter-2"]
    assert (first.dvc_tag, second.dvc_tag) == ("iter-1", "iter-2")
    assert first.git_rev == run("git", "rev-list", "-n", "1", "iter-1", cwd=repo)
    assert second.git_rev == run("git", "rev-parse", "HEAD", cwd=repo)
    assert first.md5 != second.md5 and first.md5.endswith(".dir")
    assert first.counts == {
        "candidates": 5,
        "executions": 4,
        "scores": 2,
        "hard_negatives": 1,
        "pairs": 2,
    }
    assert second.counts["candidates"] == 8 and second.counts["pairs"] == 5

    # The workspace holds iteration 2.
    data = repo / "data"
    rows = pq.read_table(data / "pairs.parquet").to_pylist()
    # The reference solution is chosen once, as itself (no candidate id), although
    # a stored candidate has the same text.
    assert {(r["chosen_candidate_id"], r["rejected_candidate_id"]) for r in rows} == {
        (None, s.hard_negative_1.id),
        (s.passing_1.id, s.hard_negative_1.id),
        (None, s.failing_2.id),
        (s.passing_1.id, s.failing_2.id),
        (s.passing_2b.id, s.hard_negative_2b.id),
    }
    # Rounds pair every rejected program once, hard negatives first in each round.
    rejected = [
        r["rejected_candidate_id"] for r in rows if r["problem_id"] == rows[0]["problem_id"]
    ]
    assert rejected == [s.hard_negative_1.id, s.failing_2.id] * 2
    flags = {r["rejected_candidate_id"]: r["rejected_hard_negative"] for r in rows}
    assert flags == {s.hard_negative_1.id: True, s.failing_2.id: False, s.hard_negative_2b.id: True}
    assert column(data / "hard_negatives.parquet", "candidate_id") == [
        s.hard_negative_1.id,
        s.hard_negative_2b.id,
    ]

    # A clone has no cache: checking out iter-1 and pulling proves the remote
    # holds that version, and its tables hold iteration 1 only.
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    run("git", "checkout", "-q", "iter-1", cwd=clone)
    run(DVC, "pull", "-q", "data.dvc", cwd=clone)
    assert pair_ids(clone / "data") == {
        (None, s.hard_negative_1.id),
        (s.passing_1.id, s.hard_negative_1.id),
    }
    candidates = pq.read_table(clone / "data" / "candidates.parquet").to_pylist()
    assert [c["candidate_id"] for c in candidates] == [
        s.reference.id,
        s.passing_1.id,
        s.hard_negative_1.id,
        s.sandbox_error_1.id,
        s.unexecuted_1.id,
    ]
    assert [c["verdict"] for c in candidates] == [
        "OK",
        "OK",
        "WRONG_ANSWER",
        "SANDBOX_ERROR",
        None,
    ]
    assert [c["iteration"] for c in candidates] == [None, 1, 1, 1, 1]
    assert column(clone / "data" / "scores.parquet", "score") == [0.5, 0.9]
    assert (clone / "dvc.yaml").is_file()

    # Losing the data repo's cache and workspace copy is recoverable from the remote.
    expected = (data / "candidates.parquet").read_bytes()
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    run(DVC, "pull", "-q", "data.dvc", cwd=repo)
    assert (data / "candidates.parquet").read_bytes() == expected
    assert run("git", "status", "--porcelain", cwd=repo) == ""


def test_pairs_are_build_pairs_limited_to_the_iteration(session: Session, tmp_path: Path):
    store = build_store(session)
    # 6 x 6 programs: 36 combinations, more than the cap of pairs per problem.
    crowded = make_problem(session, prompt="def mul(a, b):\n")
    for verdict in [Verdict.OK] * 6 + [Verdict.WRONG_ANSWER] * 6:
        make_candidate(session, problem=crowded, verdict=verdict, iteration_id=store.iteration_2.id)

    version_iteration(session, store.iteration_2.id, data_dir=tmp_path, remote="")

    exported = pq.read_table(tmp_path / REPO_DIRNAME / "data" / "pairs.parquet").to_pylist()
    as_pairs = [Pair(r["problem_id"], r["prompt"], r["chosen"], r["rejected"]) for r in exported]
    # Iteration 2 is the latest, so its scope is the whole store: the same pairs
    # the reward model trains on.
    assert Counter(as_pairs) == Counter(build_pairs(session))
    assert sum(pair.problem_id == crowded.id for pair in as_pairs) == MAX_PAIRS_PER_PROBLEM


def test_rerun_changes_nothing_and_a_lost_row_is_rebuilt_from_the_tag(
    session: Session, tmp_path: Path
):
    store = build_store(session)
    repo = tmp_path / REPO_DIRNAME
    first = version_iteration(session, store.iteration_1.id, data_dir=tmp_path, remote="")
    head = run("git", "rev-parse", "HEAD", cwd=repo)
    remote_files = sorted(p.name for p in (tmp_path / "dvc-remote").rglob("*"))

    again = version_iteration(session, store.iteration_1.id, data_dir=tmp_path, remote="")

    assert again.id == first.id
    assert run("git", "rev-parse", "HEAD", cwd=repo) == head
    assert run("git", "status", "--porcelain", cwd=repo) == ""
    assert sorted(p.name for p in (tmp_path / "dvc-remote").rglob("*")) == remote_files

    # The caller's transaction rolled back after the tag was made: the tag is the
    # record, so the row comes back identical and git is not touched.
    session.delete(first)
    session.flush()
    rebuilt = version_iteration(session, store.iteration_1.id, data_dir=tmp_path, remote="")
    assert (rebuilt.dvc_tag, rebuilt.git_rev, rebuilt.md5, rebuilt.counts) == (
        "iter-1",
        head,
        first.md5,
        first.counts,
    )
    assert run("git", "rev-list", "--count", "HEAD", cwd=repo) == "1"


def test_remote_is_configurable(session: Session, tmp_path: Path):
    store = build_store(session)
    elsewhere = tmp_path / "elsewhere"
    version_iteration(session, store.iteration_1.id, data_dir=tmp_path, remote=str(elsewhere))
    assert any(elsewhere.rglob("*")), "nothing pushed to the configured remote"
    assert not (tmp_path / "dvc-remote").exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def committing_engine(request, tmp_path: Path) -> Iterator[Engine]:
    """An engine whose sessions really commit, for tests with several connections;
    on Postgres the rows are deleted afterwards (the database is shared)."""
    if request.param == "sqlite":
        engine = make_engine(request.getfixturevalue("sqlite_url"))
        yield engine
        engine.dispose()
        return
    engine = request.getfixturevalue("pg_engine")
    with Session(engine) as session:
        before = {
            model: set(session.scalars(select(model.id)))
            for model in (Problem, Iteration, ModelVersion)
        }
    yield engine
    with Session(engine) as session:
        for model in (Problem, Iteration, ModelVersion):  # candidates cascade from problems
            new = set(session.scalars(select(model.id))) - before[model]
            if model is Iteration:
                session.execute(delete(DatasetVersion).where(DatasetVersion.iteration_id.in_(new)))
            session.execute(delete(model).where(model.id.in_(new)))
        session.commit()


def test_concurrent_calls_queue_and_all_succeed(committing_engine: Engine, tmp_path: Path):
    with Session(committing_engine) as session:
        store = build_store(session)
        session.commit()
        ids = [store.iteration_1.id, store.iteration_2.id, store.iteration_2.id]
    barrier = threading.Barrier(len(ids))
    results: dict[int, DatasetVersion] = {}
    errors: list[BaseException] = []

    def worker(index: int, iteration_id: int) -> None:
        try:
            with Session(committing_engine, expire_on_commit=False) as session:
                barrier.wait()
                results[index] = version_iteration(
                    session, iteration_id, data_dir=tmp_path, remote=""
                )
                session.commit()
        except BaseException as error:  # reported below, with the thread's traceback lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=item) for item in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    repo = tmp_path / REPO_DIRNAME
    assert run("git", "tag", "--list", cwd=repo).split() == ["iter-1", "iter-2"]
    assert run("git", "status", "--porcelain", cwd=repo) == ""
    assert results[1].id == results[2].id
    assert {results[0].dvc_tag, results[1].dvc_tag} == {"iter-1", "iter-2"}
    with Session(committing_engine) as session:
        stored = session.scalar(
            select(func.count())
            .select_from(DatasetVersion)
            .where(DatasetVersion.iteration_id.in_(ids))
        )
    assert stored == 2


def test_dvc_repro_at_a_tag_rebuilds_the_reward_model(
    sqlite_session: Session, tmp_path: Path, tiny_model_dir: Path
):
    # One database is enough: the stage reads the tagged Parquet, not the store.
    session = sqlite_session
    store = build_store(session)
    version_iteration(session, store.iteration_1.id, data_dir=tmp_path, remote="")
    version_iteration(session, store.iteration_2.id, data_dir=tmp_path, remote="")
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(tmp_path / REPO_DIRNAME), str(clone), cwd=tmp_path)
    run("git", "checkout", "-q", "iter-1", cwd=clone)
    run(DVC, "pull", "-q", "data.dvc", cwd=clone)

    env = {
        **os.environ,
        "RR_REWARD_MODEL": str(tiny_model_dir),
        # The stage's command is the installed CLI of this environment.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [DVC, "repro"], cwd=clone, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (clone / "reward-model" / "config.json").is_file()
    assert "train_pairs" in (clone / "metrics.json").read_text()
    assert run(DVC, "status", "-q", cwd=clone) == ""


def test_dataset_cli_versions_and_lists(sqlite_url: str, tmp_path: Path, monkeypatch):
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        build_store(session)
        session.commit()
    engine.dispose()
    monkeypatch.setenv("RR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("RR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RR_DVC_REMOTE", raising=False)
    caches = (settings.get_settings, db.get_engine, db.get_sessionmaker)
    for cached in caches:  # settings and engine are cached per process
        cached.cache_clear()
    try:
        runner = CliRunner()
        versioned = runner.invoke(cli_app, ["dataset", "version", "1"], catch_exceptions=False)
        assert versioned.exit_code == 0, versioned.output
        assert "iter-1" in versioned.stdout
        missing = runner.invoke(cli_app, ["dataset", "version", "7"])
        assert missing.exit_code == 1 and "no iteration number 7" in missing.output
        listed = runner.invoke(cli_app, ["dataset", "list"], catch_exceptions=False)
        assert listed.exit_code == 0, listed.output
        (row,) = [line for line in listed.stdout.splitlines() if "iter-1" in line]
        # iteration, tag, commit, pairs, candidates, hard negatives
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert cells[:2] == ["1", "iter-1"] and cells[3:] == ["2", "5", "1"]
    finally:
        db.get_engine().dispose()
        for cached in caches:
            cached.cache_clear()
    assert (tmp_path / "dvc-remote").is_dir()
