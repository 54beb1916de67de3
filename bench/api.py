"""HTTP API benchmark: `GET /candidates` latency with common filters, and CSV
export throughput and server memory, at 1M candidates in PostgreSQL.

    .venv/bin/python bench/api.py            # 1M candidates
    .venv/bin/python bench/api.py --quick    # 50k candidates, fewer requests

The store is a private database, filled by PostgreSQL itself (INSERT ...
SELECT generate_series: the same rows insert_candidates would write, in
seconds) and dropped at the end. The API runs as its own uvicorn process, as
`rewardranker api` runs it, so its memory is measured apart from the client's.
The last line is `RESULT candidates_p95_ms=X export_rows_per_s=X export_peak_mb=X`
(export_peak_mb: the server's peak resident memory during the export, minus its
resident memory before it).

To compare with another commit on a machine whose load drifts, serve that
commit's API from the same store and alternate requests between the two:

    git worktree add /tmp/api-old <commit>
    .venv/bin/python bench/api.py --baseline /tmp/api-old

A `BASELINE ...` line, with the same fields, then comes before the RESULT line."""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/api.py`, this folder would come first on sys.path and its
# models.py (the model benchmark) would shadow the `models` package.
sys.path[0] = str(ROOT)

import httpx  # noqa: E402
import psycopg  # noqa: E402

from app import migrate  # noqa: E402
from app.queries import encode_cursor  # noqa: E402

ADMIN_DSN = os.environ.get("RR_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PAGE = 100


def load(dsn: str, candidates: int) -> None:
    """200 problems in 8 languages, 5 iterations, one generator and two reward
    models (rm-v1 scores iterations 1-2, rm-v2 iterations 3-5); every candidate
    executed (1 in 4 passes) and scored by its iteration's reward model; 2% of
    failing candidates labelled hard negatives by it."""
    statements = [
        "INSERT INTO model_versions (kind, name, base_model, metrics, status, created_at) VALUES "
        "('generator', 'gen-v1', 'bench', '{}', 'ready', now()), "
        "('reward', 'rm-v1', 'bench', '{\"pairwise_accuracy\": 0.6}', 'ready', now()), "
        "('reward', 'rm-v2', 'bench', '{\"pairwise_accuracy\": 0.7}', 'ready', now())",
        "INSERT INTO iterations (number, status, reward_model_version_id, params, metrics, "
        "created_at) SELECT g, 'done', CASE WHEN g <= 2 THEN 2 ELSE 3 END, '{}', '{}', now() "
        "FROM generate_series(1, 5) g",
        "INSERT INTO problems (source, task_id, language, prompt, tests, created_at) "
        "SELECT 'bench', 'task/' || g, (ARRAY['python','cpp','java','javascript','typescript',"
        "'php','csharp','bash'])[1 + g % 8], 'def f():', 'assert True', now() "
        "FROM generate_series(1, 200) g",
        "INSERT INTO candidates (problem_id, code, content_hash, origin, generator_version_id, "
        "iteration_id, num_tokens, created_at) "
        "SELECT 1 + g % 200, 'def f(x):\n    return x + ' || g, md5(g::text), "
        "CASE WHEN g % 10 = 0 THEN 'mutation' ELSE 'generator' END, 1, 1 + g % 5, 40, "
        "now() - make_interval(secs => {n} - g) FROM generate_series(1, {n}) g",
        "INSERT INTO executions (candidate_id, iteration_id, verdict, passed, total, duration_ms, "
        "stdout_tail, stderr_tail, attempts, created_at) "
        "SELECT id, iteration_id, (ARRAY['OK','WRONG_ANSWER','RUNTIME_ERROR','TIME_LIMIT'])[1 + id % 4], "
        "CASE WHEN id % 4 = 0 THEN 3 ELSE 1 END, 3, 12.5, '', '', 1, created_at FROM candidates",
        "INSERT INTO scores (candidate_id, reward_model_version_id, score, created_at) "
        "SELECT c.id, i.reward_model_version_id, random(), c.created_at "
        "FROM candidates c JOIN iterations i ON i.id = c.iteration_id",
        "INSERT INTO hard_negative_labels (candidate_id, reward_model_version_id, iteration_id, "
        "rule, created_at) SELECT c.id, i.reward_model_version_id, c.iteration_id, "
        "'above_lowest_passing', now() FROM candidates c JOIN iterations i "
        "ON i.id = c.iteration_id WHERE c.id % 4 <> 0 AND c.id % 50 = 1",
        "ANALYZE",
    ]
    with psycopg.connect(dsn, autocommit=True) as connection:
        for statement in statements:
            # The count is inlined (an int), not bound: with parameters, psycopg
            # would read the `%` modulo operators as placeholders.
            connection.execute(statement.replace("{n}", str(int(candidates))))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used: unlike latency, it does not
    grow when other processes compete for the CPUs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(url: str, port: int, root: Path) -> subprocess.Popen:
    """The API of the checkout at `root`, as its own uvicorn process."""
    env = {**os.environ, "RR_DATABASE_URL": url, "PYTHONPATH": str(root)}
    env.pop("RR_API_TOKEN", None)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.api:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=root,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/models", timeout=2).raise_for_status()
            return server
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the API server did not start") from None
            time.sleep(0.3)


def request_mix(client: httpx.Client, candidates: int) -> dict[str, dict]:
    """The filters people use most, each as a page of 100."""
    cursor = client.get("/candidates", params={"sort": "-score", "limit": PAGE}).json()[
        "next_cursor"
    ]
    return {
        "newest": {},
        "verdict": {"verdict": "WRONG_ANSWER"},
        "language+iteration": {"language": "python", "iteration": 3},
        "problem": {"problem_id": 17},
        "top scores": {"sort": "-score"},
        "wrong answers by score": {"verdict": "WRONG_ANSWER", "sort": "-score"},
        "hard negatives": {"hard_negative": "true"},
        "score range": {"min_score": 0.4, "max_score": 0.6},
        "origin+generator": {"origin": "mutation", "generator_version_id": 1},
        "top scores, page 2": {"sort": "-score", "cursor": cursor},
        # Half-way down: a cursor after the middle score and id.
        "scores, deep page": {
            "sort": "-score",
            "cursor": encode_cursor("-score", 0.5, candidates // 2),
        },
    }


def measure_latency(
    clients: dict[str, httpx.Client], rounds: int, candidates: int
) -> dict[str, list[float]]:
    """Latencies per server; with several, each request goes to each in turn,
    the order alternating by round."""
    mix = request_mix(next(iter(clients.values())), candidates)
    for client in clients.values():
        for params in mix.values():  # warm the caches once
            client.get("/candidates", params={**params, "limit": PAGE}).raise_for_status()
    timings = {(server, name): [] for server in clients for name in mix}
    for round_ in range(rounds):
        order = list(clients.items())[:: -1 if round_ % 2 else 1]
        for name, params in mix.items():
            for server, client in order:
                start = time.perf_counter()
                response = client.get("/candidates", params={**params, "limit": PAGE})
                timings[server, name].append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
                assert len(response.json()["items"]) == PAGE, name
    for name in mix:
        print(
            f"  {name:24s}"
            + "".join(
                f"  {server} p50 {statistics.median(timings[server, name]):6.1f} ms "
                f"p95 {percentile(timings[server, name], 95):6.1f} ms"
                for server in clients
            )
        )
    return {
        server: [value for name in mix for value in timings[server, name]] for server in clients
    }


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure_export(client: httpx.Client, pid: int) -> tuple[int, float, float]:
    before_kb = memory_kb(pid, "VmRSS")
    rows = 0
    start = time.perf_counter()
    with client.stream("GET", "/candidates", params={"format": "csv"}, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            rows += line.startswith("    return x + ")  # one per row (the code spans two lines)
    elapsed = time.perf_counter() - start
    peak_mb = (memory_kb(pid, "VmHWM") - before_kb) / 1024
    return rows, elapsed, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="50k candidates, 3 rounds (under a minute)"
    )
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="requests per filter")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit, served alongside this one and measured in turn",
    )
    args = parser.parse_args()
    candidates = args.candidates or (50_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 20)

    name = f"rr_bench_api_{uuid.uuid4().hex[:8]}"
    params = dict(part.split("=", 1) for part in ADMIN_DSN.split())
    dsn = f"host={params['host']} port={params['port']} user={params['user']} dbname={name}"
    url = f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    roots = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    servers: dict[str, subprocess.Popen] = {}
    clients: dict[str, httpx.Client] = {}
    try:
        migrate.upgrade(url)
        start = time.perf_counter()
        load(dsn, candidates)
        print(
            f"loaded {candidates:,} candidates (+ executions, scores, labels) "
            f"in {time.perf_counter() - start:.1f}s"
        )
        for server, root in roots.items():
            port = free_port()
            servers[server] = serve(url, port, root)
            clients[server] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        print(f"GET /candidates, page of {PAGE}, {rounds} requests per filter:")
        cpu_before = {server: cpu_seconds(process.pid) for server, process in servers.items()}
        latencies = measure_latency(clients, rounds, candidates)
        results = {}
        for server, client in clients.items():
            p50, p95 = statistics.median(latencies[server]), percentile(latencies[server], 95)
            cpu_ms = (cpu_seconds(servers[server].pid) - cpu_before[server]) * 1000
            print(
                f"{server}: all filters: p50 {p50:.1f} ms, p95 {p95:.1f} ms "
                f"over {len(latencies[server])} requests; "
                f"server CPU {cpu_ms / len(latencies[server]):.1f} ms per request"
            )
            rows, elapsed, peak_mb = measure_export(client, servers[server].pid)
            assert rows == candidates, (rows, candidates)
            print(
                f"{server}: CSV export: {rows:,} rows in {elapsed:.1f}s = "
                f"{rows / elapsed:,.0f} rows/s, server peak memory +{peak_mb:.1f} MB"
            )
            results[server] = (
                f"candidates_p95_ms={p95:.1f} export_rows_per_s={rows / elapsed:.0f} "
                f"export_peak_mb={peak_mb:.1f}"
            )
        if "baseline" in results:
            print(f"BASELINE {results['baseline']}")
        print(f"RESULT {results['this']}")
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
