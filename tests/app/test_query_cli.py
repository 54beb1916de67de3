"""The query CLI, run in-process on an SQLite store (the default, serverless one)."""

import csv
import io
import json
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app
from app.report import PLOTS
from models import db, settings
from models.db import make_engine, session_scope
from tests.app.conftest import Seeded, seed_store
from tests.factories import make_model_version


@pytest.fixture
def store(sqlite_url: str, tmp_path, monkeypatch) -> Iterator[Seeded]:
    """A committed SQLite store the CLI finds through RR_DATABASE_URL."""
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        seeded = seed_store(session)
        session.commit()
    engine.dispose()
    monkeypatch.setenv("RR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("RR_DATA_DIR", str(tmp_path / "data"))
    # The engine and settings are cached per process; start from this store.
    for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()
    yield seeded
    db.get_engine().dispose()
    for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_candidates_list_json_filters_like_the_api(store):
    result = run("candidates", "list", "--verdict", "WRONG_ANSWER", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {row["id"] for row in rows} == set(store.failing)
    assert all(row["verdict"] == "WRONG_ANSWER" for row in rows)


def test_candidates_list_csv_pages_with_the_printed_cursor(store):
    first = run("candidates", "list", "--sort=-score", "--limit", "4", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(first.stdout)))
    assert len(rows) == 4 and float(rows[0]["score"]) >= float(rows[-1]["score"])
    cursor = first.stderr.split("--cursor ")[1].strip()
    second = run(
        "candidates",
        "list",
        "--sort=-score",
        "--limit",
        "100",
        "--format",
        "csv",
        "--cursor",
        cursor,
    )
    more = list(csv.DictReader(io.StringIO(second.stdout)))
    assert len(rows) + len(more) == 10  # every scored candidate, none twice
    assert not {r["id"] for r in rows} & {r["id"] for r in more}


def test_candidates_list_table_and_bad_input(store):
    table = run("candidates", "list", "--hard-negative")
    assert (
        table.exit_code == 0
        and "WRONG_ANSWER" in table.stdout
        and str(store.hard_negative) in table.stdout
    )
    tampered = json.loads(run("candidates", "list", "--tampered", "--format", "json").stdout)
    assert [row["id"] for row in tampered] == [store.failing[0]]
    assert tampered[0]["tampered"] is True
    assert run("candidates", "list", "--sort", "price").exit_code == 2
    assert run("candidates", "list", "--cursor", "garbage").exit_code == 2
    assert run("candidates", "list", "--verdict", "MAYBE").exit_code == 2


def test_candidates_show(store):
    shown = run("candidates", "show", str(store.hard_negative))
    assert shown.exit_code == 0
    assert "above_lowest_passing" in shown.stdout and "return a - 3" in shown.stdout
    detail = json.loads(
        run("candidates", "show", str(store.hard_negative), "--format", "json").stdout
    )
    assert detail["execution"]["verdict"] == "WRONG_ANSWER"
    assert run("candidates", "show", "987654").exit_code == 1


def test_iterations_and_models(store):
    iterations = json.loads(run("iterations", "--format", "json").stdout)
    assert [i["number"] for i in iterations] == [1, 2]
    assert iterations[0]["metrics"]["reranked_pass1"] == 0.5
    as_csv = list(csv.DictReader(io.StringIO(run("iterations", "--format", "csv").stdout)))
    assert float(as_csv[1]["random_pass1"]) == pytest.approx(0.4)
    assert as_csv[1]["pass_at_k"] == "@1:0.400"
    models = list(csv.DictReader(io.StringIO(run("models", "--format", "csv").stdout)))
    assert [m["name"] for m in models] == ["gen-v1", "rm-v1", "rm-v2"]
    assert "rm-v2" in run("models", "--kind", "reward").stdout


def test_report_command_writes_markdown_and_plots(store, tmp_path):
    result = run("report", "--out", str(tmp_path / "report"))
    assert result.exit_code == 0
    assert (tmp_path / "report" / "report.md").read_text().count(".png)") == len(PLOTS)


def test_api_refuses_to_bind_beyond_loopback_without_a_token(store, monkeypatch):
    monkeypatch.delenv("RR_API_TOKEN", raising=False)
    result = run("api", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "RR_API_TOKEN" in result.stderr


def test_candidates_list_shows_each_iterations_scores_after_a_newer_reward_model(store):
    with session_scope() as session:
        make_model_version(session, name="rm-v3")  # the newest, which has scored nothing
    rows = json.loads(run("candidates", "list", "--sort=-score", "--format", "json").stdout)
    assert [row["id"] for row in rows] == store.passing[::-1] + store.failing[::-1]
    assert {row["id"]: row["reward_model_version_id"] for row in rows} == {
        **dict.fromkeys(store.passing, store.old_reward),
        **dict.fromkeys(store.failing, store.reward),
    }
    explicit = run(
        "candidates", "list", "--reward-version", str(store.old_reward), "--format", "json"
    )
    scores = {row["id"]: row["score"] for row in json.loads(explicit.stdout)}
    assert all(scores[cid] == 0.9 for cid in store.failing)  # rm-v1's, not their own rm-v2's
