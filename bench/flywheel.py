"""Queue and database overhead of the flywheel, and raw task throughput.

One iteration with the mutation backend over HumanEval (all 164 problems; 12
with --quick) through Redis and Postgres, one worker process per queue. Then the
same stages run again back to back in this process, with no queue and no
database (generate every prompt, sandbox every candidate, score every
candidate): their sum is the compute the iteration needs. The ratio of the
iteration's collection wall time (open -> last score) to that sum is what queues
and the store cost; below 1 means the stages overlapped. Last, a burst of no-op
tasks measures the broker's own rate.

    .venv/bin/python bench/flywheel.py [--quick]

Needs the test servers: Postgres at RR_BENCH_PG_ADMIN (default: the test
server's `postgres` user) and Redis at 127.0.0.1:6379 (database 11, flushed).
The last line is `RESULT overhead_ratio=X overlap=yes|no noop_tasks_per_s=X`.
"""

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PG_ADMIN = os.environ.get("RR_BENCH_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
BROKER = "redis://127.0.0.1:6379/11"
TINY = Path(__file__).resolve().parent.parent / "var" / "test-cache" / "tiny-llama-v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 problems x 4 candidates")
    args = parser.parse_args()
    problems, candidates = (12, 4) if args.quick else (164, 8)
    database = f"rr_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    data_dir = Path(tempfile.mkdtemp(prefix="rr-bench-"))
    try:
        configure(database, data_dir)
        run(problems, candidates, data_dir)
    finally:
        from models import db

        db.get_engine().dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def configure(database: str, data_dir: Path) -> None:
    """Environment for this process and the workers it starts."""
    from pipelines.loading import save_tiny_llama

    if not (TINY / "model.safetensors").is_file():
        save_tiny_llama(TINY)
    params = dict(part.split("=", 1) for part in PG_ADMIN.split())
    os.environ.update(
        RR_DATABASE_URL=f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{database}",
        RR_BROKER_URL=BROKER,
        RR_DATA_DIR=str(data_dir),
        RR_REWARD_MODEL=str(TINY),
        RR_GENERATOR_MODEL=str(TINY),
        RR_RETRAIN_THRESHOLD="1000000",  # one retraining, at the iteration's end
    )
    redis.Redis.from_url(BROKER).flushdb()


def run(problems: int, candidates: int, data_dir: Path) -> None:
    from sqlalchemy import func, select

    from app import migrate
    from app.problem_import import humaneval_rows, upsert_problems
    from models import Candidate, Execution, ModelVersion, Problem, Score
    from models.db import session_scope
    from models.enums import ModelKind
    from workers.iteration import FlywheelParams, open_iteration
    from workers.names import QUEUES, TRAINING
    from workers.processes import kill_worker, start_worker, stop_workers

    migrate.upgrade()
    with session_scope() as session:
        upsert_problems(session, humaneval_rows()[:problems], eval_fraction=0.0)
        # A registered reward model: the warm start is not what is measured.
        session.add(
            ModelVersion(kind=ModelKind.REWARD, name="bench", base_model=str(TINY), path=str(TINY))
        )
    with session_scope() as session:
        problem_ids = list(session.scalars(select(Problem.id).order_by(Problem.id)))
    params = FlywheelParams(backend="mutation", candidates=candidates, batch_size=4, policy_steps=0)
    logs = data_dir / "logs"
    logs.mkdir()
    workers = [start_worker([q], log_path=logs / f"{q}.log") for q in QUEUES]
    try:
        wait_ready(QUEUES)  # workers import torch at start: not part of the iteration
        with session_scope() as session:
            iteration = open_iteration(session, problem_ids, params)
        wait_until_collected(iteration.id)
        # The retraining it triggers would compete for the CPU with what follows.
        kill_worker(workers[QUEUES.index(TRAINING)])
        with session_scope() as session:
            in_iteration = Candidate.iteration_id == iteration.id
            first_candidate, last_candidate, total = session.execute(
                select(
                    func.min(Candidate.created_at), func.max(Candidate.created_at), func.count()
                ).where(in_iteration)
            ).one()
            first_execution, last_execution = session.execute(
                select(func.min(Execution.created_at), func.max(Execution.created_at)).where(
                    Execution.iteration_id == iteration.id
                )
            ).one()
            last_score = session.scalar(
                select(func.max(Score.created_at))
                .join(Candidate, Candidate.id == Score.candidate_id)
                .where(in_iteration)
            )
            opened_at = iteration.created_at
        first_score = session.scalar(
            select(func.min(Score.created_at))
            .join(Candidate, Candidate.id == Score.candidate_id)
            .where(in_iteration)
        )
        collect_wall = (last_score - opened_at).total_seconds()
        overlap = first_execution < last_candidate
        noop_rate = noop_throughput(2000 if problems > 20 else 300)
    finally:
        stop_workers(workers)
    compute = stage_compute(problem_ids, params, seed=iteration.number)
    ratio = collect_wall / sum(compute.values())
    print(f"problems={len(problem_ids)} candidates={total} (asked {candidates} per problem)")
    print(f"collection wall (open -> last score): {collect_wall:.1f}s")
    print("stage compute, standalone: " + ", ".join(f"{k}={v:.1f}s" for k, v in compute.items()))
    print(f"generation {first_candidate:%H:%M:%S}-{last_candidate:%H:%M:%S}, "
          f"execution {first_execution:%H:%M:%S}-{last_execution:%H:%M:%S}, "
          f"labeling {first_score:%H:%M:%S}-{last_score:%H:%M:%S}")  # fmt: skip
    print(
        f"RESULT overhead_ratio={ratio:.2f} overlap={'yes' if overlap else 'no'} noop_tasks_per_s={noop_rate:.0f}"
    )


def stage_compute(problem_ids: list[int], params, *, seed: int) -> dict[str, float]:
    """Each stage once over the same programs (the mutation generator is seeded by
    the iteration number), in this process: generation, sandbox, scoring."""
    from sqlalchemy import select

    from models import Problem
    from models.db import session_scope
    from pipelines.generation import GenerationConfig, PromptSpec, make_generator
    from pipelines.reward_model import RewardScorer
    from pipelines.sandbox import Job, run_batch

    with session_scope() as session:
        problems = session.scalars(select(Problem).where(Problem.id.in_(problem_ids))).all()
        session.expunge_all()
    started = time.perf_counter()
    generator = make_generator(GenerationConfig(backend="mutation", seed=seed))
    samples = generator.generate([PromptSpec.from_problem(p) for p in problems], params.candidates)
    generation = time.perf_counter() - started
    run_batch([Job(language="python", code="pass", tests="")])  # starts the sandbox: not counted
    started = time.perf_counter()
    # One sandbox batch per problem, as the execution tasks do.
    for problem, group in zip(problems, samples, strict=True):
        run_batch([Job(language="python", code=s.code, tests=problem.tests) for s in group])
    execution = time.perf_counter() - started
    started = time.perf_counter()
    scorer = RewardScorer(TINY)  # a labeling worker loads it once per reward model too
    for problem, group in zip(problems, samples, strict=True):
        scorer.score([problem.prompt] * len(group), [s.code for s in group])
    labeling = time.perf_counter() - started
    return {"generation": generation, "execution": execution, "labeling": labeling}


def wait_until_collected(iteration_id: int) -> None:
    """Until every candidate is executed and scored: the stages that flow through
    the queues. The retraining that follows is one long task, not queue traffic."""
    from models import Iteration
    from models.db import session_scope
    from models.repository import is_collected, problem_progress

    while True:
        with session_scope() as session:
            if is_collected(problem_progress(session, session.get(Iteration, iteration_id))):
                return
        time.sleep(0.5)


def wait_ready(queues) -> None:
    """Until every queue's worker has consumed a no-op."""
    from workers.celery_app import celery
    from workers.names import NOOP

    client = redis.Redis.from_url(BROKER)
    for queue in queues:
        celery.signature(NOOP).apply_async(queue=queue)
    while any(client.llen(q) for q in queues) or client.hlen("unacked"):
        time.sleep(0.2)


def noop_throughput(count: int) -> float:
    """No-op tasks per second through the same broker, one execution worker, acks_late."""
    from workers.celery_app import celery
    from workers.names import EXECUTION, NOOP

    client = redis.Redis.from_url(BROKER)
    started = time.perf_counter()
    for _ in range(count):
        celery.signature(NOOP).apply_async()
    while client.llen(EXECUTION) or client.hlen("unacked"):
        time.sleep(0.05)
    return count / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
