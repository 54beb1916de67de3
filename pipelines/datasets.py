"""Version each iteration's training data in a git + DVC repository.

The data repository lives at `data_dir / "dvc-repo"`. Every iteration writes its
tables as Parquet into `data/` there, `dvc add`s the folder, pushes it to the DVC
remote, commits and tags the commit `iter-N`. The repository also carries a copy
of `pipelines/dvc.yaml`, so a clone checked out at a tag can `dvc pull` and
`dvc repro` the reward-model training of that iteration.

Tables in `data/`:
- `pairs.parquet`: the reward model's training pairs (`pipelines.pairs`'
  rule over the candidates up to the iteration, with the paired candidates' ids);
- `candidates.parquet`: every candidate up to the iteration, with its verdict;
- `scores.parquet`: reward-model scores of those candidates;
- `hard_negatives.parquet`: their hard-negative labels.
"""

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.orm import Session

from models import (
    Candidate,
    DatasetVersion,
    Execution,
    HardNegativeLabel,
    Iteration,
    Problem,
    Score,
)
from models.enums import Origin, Split
from models.repository import dataset_version, insert_dataset_version
from models.settings import get_settings
from pipelines.pairs import Executed, executed_candidates, problem_pairs

DVC_YAML = Path(__file__).with_name("dvc.yaml")
REPO_DIRNAME = "dvc-repo"
DATA_DIRNAME = "data"  # the DVC-tracked folder inside the repository
_BATCH_ROWS = 5000

PAIRS_SCHEMA = pa.schema(
    [
        ("problem_id", pa.int64()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_candidate_id", pa.int64()),  # null: the problem's reference solution
        ("rejected_candidate_id", pa.int64()),
        ("rejected_hard_negative", pa.bool_()),
    ]
)
CANDIDATES_SCHEMA = pa.schema(
    [
        ("candidate_id", pa.int64()),
        ("problem_id", pa.int64()),
        ("language", pa.string()),
        ("iteration", pa.int64()),
        ("origin", pa.string()),
        ("generator_version_id", pa.int64()),
        ("code", pa.string()),
        ("verdict", pa.string()),  # null: not executed yet
        ("tests_passed", pa.int64()),
        ("tests_total", pa.int64()),
        ("duration_ms", pa.float64()),
    ]
)
SCORES_SCHEMA = pa.schema(
    [
        ("candidate_id", pa.int64()),
        ("reward_model_version_id", pa.int64()),
        ("score", pa.float64()),
    ]
)
HARD_NEGATIVES_SCHEMA = pa.schema(
    [
        ("candidate_id", pa.int64()),
        ("reward_model_version_id", pa.int64()),
        ("iteration", pa.int64()),
        ("rule", pa.string()),
    ]
)


class DatasetVersioningError(RuntimeError):
    """A git or DVC step of versioning failed."""


def iteration_tag(number: int) -> str:
    return f"iter-{number}"


def version_iteration(
    session: Session, iteration_id: int, *, data_dir: Path, remote: str | None = None
) -> DatasetVersion:
    """Export, `dvc add`, push, commit and tag the data of one iteration; flush its row.

    `remote` is a DVC remote URL; None reads `RR_DVC_REMOTE`, and empty means a
    local remote at `data_dir / "dvc-remote"`. Calling it again for a versioned
    iteration returns the existing row and changes nothing.
    """
    existing = dataset_version(session, iteration_id)
    if existing is not None:
        return existing
    iteration = session.get_one(Iteration, iteration_id)
    tag = iteration_tag(iteration.number)
    if remote is None:
        remote = get_settings().dvc_remote
    data_dir = data_dir.resolve()
    root = data_dir / REPO_DIRNAME
    with _repo_lock(data_dir):
        _ensure_repo(root, remote or str(data_dir / "dvc-remote"))
        # A tag without a row: an earlier call versioned the data but its
        # transaction rolled back. The tag is the record; do not export again.
        if not _has_tag(root, tag):
            _commit_iteration(session, iteration, root, tag)
        git_rev = _git(root, "rev-list", "-n", "1", tag)
        md5 = _dvc_md5(_git(root, "show", f"{tag}:{DATA_DIRNAME}.dvc"))
        counts = json.loads(_git(root, "show", f"{tag}:counts.json"))
    return insert_dataset_version(
        session,
        iteration_id=iteration_id,
        dvc_tag=tag,
        git_rev=git_rev,
        md5=md5,
        path=str(root / DATA_DIRNAME),
        counts=counts,
    )


@contextmanager
def _repo_lock(data_dir: Path) -> Iterator[None]:
    """Serialize every writer of the data repo, across threads and processes.

    DVC's own repo lock fails a second writer instead of making it wait; flock on
    a separate open file blocks until the holder is done (or dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".{REPO_DIRNAME}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _ensure_repo(root: Path, remote_url: str) -> None:
    """Create the git + DVC repository on first use; point it at `remote_url`."""
    from dvc.repo import Repo

    if not (root / ".dvc").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _git(root, "init", "-q", "-b", "main")
        # Workers have no global git identity; commits must not depend on one,
        # nor on signing keys.
        _git(root, "config", "user.name", "RewardRanker flywheel")
        _git(root, "config", "user.email", "flywheel@localhost")
        _git(root, "config", "commit.gpgsign", "false")
        _git(root, "config", "tag.gpgsign", "false")
        Repo.init(str(root)).close()
    with Repo(str(root)) as repo, repo.config.edit() as config:
        # Nothing may phone home from a worker (or from `dvc` run in a clone).
        config["core"]["analytics"] = False
        config["core"]["check_update"] = False
        config["core"]["autostage"] = True
        config["core"]["remote"] = "storage"
        config["remote"]["storage"] = {"url": remote_url}


def _commit_iteration(session: Session, iteration: Iteration, root: Path, tag: str) -> None:
    """Write the tables, `dvc add` and push them, then commit and tag."""
    from dvc.repo import Repo

    data = root / DATA_DIRNAME
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    counts = _export_tables(session, iteration.number, data)
    (root / "counts.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(DVC_YAML, root / "dvc.yaml")
    with Repo(str(root)) as repo:
        # Absolute target: DVC resolves relative ones against the process's cwd.
        repo.add(str(data))
        # Push before committing: a tag only ever names data the remote holds.
        repo.push()
    _git(root, "add", "-A")
    summary = ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
    _git(root, "commit", "-q", "--allow-empty", "-m", f"{tag}: {summary}")
    _git(root, "tag", "-a", tag, "-m", f"dataset of iteration {iteration.number}")


def _export_tables(session: Session, number: int, folder: Path) -> dict[str, int]:
    """Write the four tables for iteration `number`; return their row counts."""
    in_scope = _candidates_in_scope(number)
    counts = {
        "candidates": _write_parquet(
            folder / "candidates.parquet", CANDIDATES_SCHEMA, _candidate_rows(session, in_scope)
        ),
        "scores": _write_parquet(
            folder / "scores.parquet", SCORES_SCHEMA, _score_rows(session, in_scope)
        ),
        "hard_negatives": _write_parquet(
            folder / "hard_negatives.parquet",
            HARD_NEGATIVES_SCHEMA,
            _hard_negative_rows(session, in_scope, number),
        ),
        "pairs": _write_parquet(
            folder / "pairs.parquet", PAIRS_SCHEMA, _pair_rows(session, in_scope, number)
        ),
    }
    counts["executions"] = session.scalar(
        select(func.count()).select_from(Execution).where(Execution.candidate_id.in_(in_scope))
    )
    return counts


def _candidates_in_scope(number: int) -> Select:
    """Ids of the candidates an iteration's dataset holds: those of iterations up
    to `number`, and those outside any iteration (references, imports); never a
    held-out problem's or an evaluation's (training must not see them)."""
    earlier = select(Iteration.id).where(Iteration.number <= number)
    return select(Candidate.id).where(
        or_(Candidate.iteration_id.is_(None), Candidate.iteration_id.in_(earlier)),
        Candidate.origin != Origin.EVALUATION,
        Candidate.problem_id.in_(select(Problem.id).where(Problem.split == Split.TRAIN)),
    )


def _labels_in_scope(number: int) -> ColumnElement[bool]:
    earlier = select(Iteration.id).where(Iteration.number <= number)
    return or_(
        HardNegativeLabel.iteration_id.is_(None), HardNegativeLabel.iteration_id.in_(earlier)
    )


def _candidate_rows(session: Session, in_scope: Select) -> Iterator[dict[str, Any]]:
    rows = session.execute(
        select(
            Candidate.id,
            Candidate.problem_id,
            Problem.language,
            Iteration.number,
            Candidate.origin,
            Candidate.generator_version_id,
            Candidate.code,
            Execution.verdict,
            Execution.passed,
            Execution.total,
            Execution.duration_ms,
        )
        .join(Problem, Problem.id == Candidate.problem_id)
        .outerjoin(Execution, Execution.candidate_id == Candidate.id)
        .outerjoin(Iteration, Iteration.id == Candidate.iteration_id)
        .where(Candidate.id.in_(in_scope))
        .order_by(Candidate.id)
        # Programs are the bulk of the store: stream them (a server-side cursor
        # on Postgres) instead of holding every row in memory.
        .execution_options(yield_per=_BATCH_ROWS)
    )
    for row in rows:
        yield {
            "candidate_id": row.id,
            "problem_id": row.problem_id,
            "language": str(row.language),
            "iteration": row.number,
            "origin": str(row.origin),
            "generator_version_id": row.generator_version_id,
            "code": row.code,
            "verdict": None if row.verdict is None else str(row.verdict),
            "tests_passed": row.passed,
            "tests_total": row.total,
            "duration_ms": row.duration_ms,
        }


def _score_rows(session: Session, in_scope: Select) -> Iterator[dict[str, Any]]:
    rows = session.execute(
        select(Score.candidate_id, Score.reward_model_version_id, Score.score)
        .where(Score.candidate_id.in_(in_scope))
        .order_by(Score.candidate_id, Score.reward_model_version_id)
    )
    return (row._asdict() for row in rows)


def _hard_negative_rows(
    session: Session, in_scope: Select, number: int
) -> Iterator[dict[str, Any]]:
    rows = session.execute(
        select(
            HardNegativeLabel.candidate_id,
            HardNegativeLabel.reward_model_version_id,
            Iteration.number.label("iteration"),
            HardNegativeLabel.rule,
        )
        .outerjoin(Iteration, Iteration.id == HardNegativeLabel.iteration_id)
        .where(HardNegativeLabel.candidate_id.in_(in_scope), _labels_in_scope(number))
        .order_by(HardNegativeLabel.candidate_id, HardNegativeLabel.id)
    )
    return (row._asdict() for row in rows)


def _pair_rows(session: Session, in_scope: Select, number: int) -> Iterator[dict[str, Any]]:
    """The pairing rule's pairs (`pipelines.pairs`), limited to the candidates and
    labels up to iteration `number`, with the ids of the programs paired."""
    hard_negatives = set(
        session.scalars(
            select(HardNegativeLabel.candidate_id).where(
                HardNegativeLabel.candidate_id.in_(in_scope), _labels_in_scope(number)
            )
        )
    )
    problems = {
        row.id: row
        for row in session.execute(
            select(Problem.id, Problem.prompt, Problem.reference_solution).where(
                Problem.id.in_(select(Candidate.problem_id).where(Candidate.id.in_(in_scope)))
            )
        )
    }
    executed = session.execute(
        executed_candidates()
        .where(Candidate.id.in_(in_scope))
        .order_by(Candidate.problem_id, Candidate.id)
        .execution_options(yield_per=_BATCH_ROWS)
    )
    for problem_id, group in groupby(executed, key=lambda row: row.problem_id):
        problem = problems[problem_id]
        rows = [
            Executed(row.id, row.content_hash, row.code, row.verdict, row.tampered) for row in group
        ]
        for (chosen_id, chosen_code), (rejected_id, rejected_code) in problem_pairs(
            problem.reference_solution, rows, hard_negatives
        ):
            yield {
                "problem_id": problem_id,
                "prompt": problem.prompt,
                "chosen": chosen_code,
                "rejected": rejected_code,
                "chosen_candidate_id": chosen_id,
                "rejected_candidate_id": rejected_id,
                "rejected_hard_negative": rejected_id in hard_negatives,
            }


def _write_parquet(path: Path, schema: pa.Schema, rows: Iterator[dict[str, Any]]) -> int:
    """Stream rows into a Parquet file in batches; return how many were written."""
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                written += len(batch)
                batch.clear()
        # Also for zero rows: the file must exist with its schema.
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        written += len(batch)
    return written


def _has_tag(root: Path, tag: str) -> bool:
    return bool(_git(root, "tag", "--list", tag))


def _dvc_md5(dvc_file: str) -> str:
    import yaml

    return yaml.safe_load(dvc_file)["outs"][0]["md5"]


def _git(root: Path, *args: str) -> str:
    # No prompts: a worker has no terminal, and nothing here may wait for one.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    result = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise DatasetVersioningError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()
