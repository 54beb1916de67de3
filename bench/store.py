"""Candidate-store benchmark: bulk-insert throughput into Postgres and SQLite,
and the analysis queries' latency at 1M candidates.

    .venv/bin/python bench/store.py            # 100k inserts, queries at 1M rows
    .venv/bin/python bench/store.py --quick    # 10k inserts, queries at 100k rows

Both databases are private and dropped at the end. The last line is
`RESULT pg_rows_per_s=X sqlite_rows_per_s=X query_p95_ms=X`; the line before it
gives the load average around the inserts, as other work on the machine skews them."""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/models.py would
# shadow the `models` package: put the repo root first.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import psycopg  # noqa: E402
from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from app import migrate  # noqa: E402
from app.queries import CandidateFilter, encode_cursor, list_candidates  # noqa: E402
from models import Problem  # noqa: E402
from models.db import make_engine  # noqa: E402
from models.enums import Language, Origin, Verdict  # noqa: E402
from models.repository import insert_candidates, insert_executions  # noqa: E402

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
VERDICTS = [Verdict.OK, Verdict.WRONG_ANSWER, Verdict.RUNTIME_ERROR, Verdict.TIME_LIMIT]
BATCH = 5000  # one generation batch's worth of rows per transaction

QUERIES = {
    # The reward model's favourites for one problem.
    "candidates_of_problem_by_score": """
        SELECT c.id, s.score FROM candidates c JOIN scores s ON s.candidate_id = c.id
        WHERE c.problem_id = :problem AND s.reward_model_version_id = :version
        ORDER BY s.score DESC LIMIT 100""",
    "hard_negatives_per_iteration": """
        SELECT iteration_id, count(*) FROM hard_negative_labels
        WHERE reward_model_version_id = :version GROUP BY iteration_id""",
    "verdict_histogram_of_iteration": """
        SELECT verdict, count(*) FROM executions WHERE iteration_id = :iteration GROUP BY verdict""",
}


def seed_problems(engine: Engine, count: int) -> list[int]:
    with Session(engine) as session:
        problems = [
            Problem(
                source="bench",
                task_id=f"b/{i}",
                language=Language.PYTHON,
                prompt="def f():\n",
                tests="assert f()\n",
            )
            for i in range(count)
        ]
        session.add_all(problems)
        session.commit()
        return [problem.id for problem in problems]


def bulk_insert(engine: Engine, problem_ids: list[int], rows: int) -> float:
    """Candidates with their executions through the store's bulk path; rows/s."""
    start = time.perf_counter()
    for offset in range(0, rows, BATCH):
        with Session(engine) as session:
            batch = [
                {
                    "problem_id": problem_ids[i % len(problem_ids)],
                    "code": f"def f():\n    return {i}\n",
                    "origin": Origin.MUTATION,
                }
                for i in range(offset, min(offset + BATCH, rows))
            ]
            ids = insert_candidates(session, batch)
            insert_executions(
                session,
                [
                    {
                        "candidate_id": cid,
                        "verdict": VERDICTS[cid % 4],
                        "passed": cid % 3,
                        "total": 3,
                    }
                    for cid in ids
                ],
            )
            session.commit()
    return rows / (time.perf_counter() - start)


def fill_postgres(engine: Engine, rows: int, problems: int, iterations: int) -> None:
    """Bulk-load the query data set server-side: `rows` candidates, each executed
    and scored, 5% labelled hard negative."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO model_versions (kind, name, base_model, metrics, status, created_at) "
                "VALUES ('reward', 'rm-bench', 'x', '{}', 'ready', now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO iterations (number, status, reward_model_version_id, params, "
                "metrics, created_at) SELECT n, 'done', m.id, '{}', '{}', now() "
                "FROM generate_series(1, :n) n, model_versions m WHERE m.name = 'rm-bench'"
            ),
            {"n": iterations},
        )
        connection.execute(
            text("""
            INSERT INTO problems (source, task_id, language, prompt, tests, created_at)
            SELECT 'q', 'q/' || n, 'python', 'p', 't', now() FROM generate_series(1, :n) n"""),
            {"n": problems},
        )
        connection.execute(
            text("""
            INSERT INTO candidates (problem_id, code, content_hash, origin, iteration_id, created_at)
            SELECT (SELECT min(id) FROM problems WHERE source = 'q') + n % :p, 'code ' || n, md5(n::text),
                   'generator', (SELECT min(id) FROM iterations) + n % :it, now()
            FROM generate_series(1, :rows) n"""),
            {"p": problems, "it": iterations, "rows": rows},
        )
        connection.execute(
            text("""
            INSERT INTO executions (candidate_id, iteration_id, verdict, passed, total, duration_ms, stdout_tail, stderr_tail, attempts, created_at)
            SELECT id, iteration_id, (ARRAY['OK','WRONG_ANSWER','RUNTIME_ERROR','TIME_LIMIT'])[1 + id % 4], 0, 3, 1.0, '', '', 1, now()
            FROM candidates WHERE iteration_id IS NOT NULL""")
        )
        connection.execute(
            text("""
            INSERT INTO scores (candidate_id, reward_model_version_id, score, created_at)
            SELECT c.id, m.id, random(), now() FROM candidates c, model_versions m
            WHERE m.name = 'rm-bench' AND c.iteration_id IS NOT NULL""")
        )
        connection.execute(
            text("""
            INSERT INTO hard_negative_labels (candidate_id, reward_model_version_id, iteration_id, rule, created_at)
            SELECT c.id, m.id, c.iteration_id, 'above_lowest_passing', now() FROM candidates c, model_versions m
            WHERE m.name = 'rm-bench' AND c.iteration_id IS NOT NULL AND c.id % 20 = 0""")
        )


def vacuum(engine: Engine) -> None:
    """What autovacuum does to a live table after a bulk load: statistics, and the
    visibility map that lets index-only scans skip the heap."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))


def time_queries(engine: Engine, repeats: int) -> dict[str, list[float]]:
    """The SQL above, and a page of `candidates list --sort=-score` half-way down
    (each candidate's own iteration's score; app.queries builds that SQL)."""
    timings = {**time_sql(engine, repeats), "listing_by_score_deep_page": []}
    with Session(engine) as session:
        middle = session.scalar(text("SELECT max(id) / 2 FROM candidates"))
        cursor = encode_cursor("-score", 0.5, middle)
        for _ in range(repeats):
            start = time.perf_counter()
            page = list_candidates(
                session, CandidateFilter(sort="-score"), limit=100, cursor=cursor
            )
            timings["listing_by_score_deep_page"].append((time.perf_counter() - start) * 1000)
            assert len(page.items) == 100
    return timings


def time_sql(engine: Engine, repeats: int) -> dict[str, list[float]]:
    with engine.connect() as connection:
        version = connection.scalar(text("SELECT id FROM model_versions WHERE name = 'rm-bench'"))
        problems = connection.scalars(
            text("SELECT id FROM problems WHERE source = 'q' ORDER BY id LIMIT 50")
        ).all()
        iterations = connection.scalars(text("SELECT id FROM iterations ORDER BY id")).all()
        timings: dict[str, list[float]] = {name: [] for name in QUERIES}
        for i in range(repeats):
            params = {
                "problem": problems[i % len(problems)],
                "version": version,
                "iteration": iterations[i % len(iterations)],
            }
            for name, sql in QUERIES.items():
                start = time.perf_counter()
                connection.execute(text(sql), params).all()
                timings[name].append((time.perf_counter() - start) * 1000)
    return timings


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k inserts, queries at 100k rows")
    args = parser.parse_args()
    insert_rows, query_rows = (10_000, 100_000) if args.quick else (100_000, 1_000_000)

    name = f"rr_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    pg_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            sqlite_url = f"sqlite:///{Path(folder) / 'bench.db'}"
            rates = {}
            for url in (pg_url, sqlite_url):
                migrate.upgrade(url)
            engines = {"pg": make_engine(pg_url), "sqlite": make_engine(sqlite_url)}
            load_before = os.getloadavg()[0]
            for label, engine in engines.items():
                problem_ids = seed_problems(engine, 164)
                rates[label] = bulk_insert(engine, problem_ids, insert_rows)
                print(
                    f"{label}: {insert_rows} candidates + executions at {rates[label]:,.0f} rows/s"
                )
            engines["sqlite"].dispose()
            load_after = os.getloadavg()[0]

        fill_start = time.perf_counter()
        fill_postgres(engines["pg"], query_rows, problems=1000, iterations=10)
        vacuum(engines["pg"])
        print(
            f"pg: loaded {query_rows:,} more candidates for the queries in {time.perf_counter() - fill_start:.1f}s"
        )
        timings = time_queries(engines["pg"], repeats=20 if args.quick else 100)
        for query, values in timings.items():
            print(f"{query}: p50={statistics.median(values):.1f}ms p95={p95(values):.1f}ms")
        engines["pg"].dispose()
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    worst = max(p95(values) for values in timings.values())
    print(
        f"load average (1 min) on {os.cpu_count()} CPUs: {load_before:.2f} before the inserts, {load_after:.2f} after"
    )
    print(
        f"RESULT pg_rows_per_s={rates['pg']:.0f} sqlite_rows_per_s={rates['sqlite']:.0f} query_p95_ms={worst:.1f}"
    )


if __name__ == "__main__":
    main()
