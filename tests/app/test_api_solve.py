"""POST /solve with real (tiny) models: a 2-layer Llama as the generator and, with
a fresh one-output head, as the reward model; and, with stand-ins for both, that
it holds no transaction open while they run."""

from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api import create_app
from models import Candidate, ModelVersion, Problem, Score, db, settings
from models.enums import ModelKind, Origin
from models.settings import Settings
from pipelines.generation import Sample
from tests.app.conftest import serve_session
from tests.conftest import fresh_database


def test_solve_returns_the_best_scored_sample_and_stores_every_sample(pg_session, tiny_model_dir):
    generator = ModelVersion(
        kind=ModelKind.GENERATOR, name="tiny-gen", base_model="tiny", path=str(tiny_model_dir)
    )
    reward = ModelVersion(
        kind=ModelKind.REWARD, name="tiny-rm", base_model="tiny", path=str(tiny_model_dir)
    )
    pg_session.add_all([generator, reward])
    pg_session.flush()
    app = create_app(Settings(api_token=None))
    serve_session(app, pg_session)
    with TestClient(app) as client:
        response = client.post(
            "/solve", json={"prompt": "def add(a, b):\n", "n": 3, "max_new_tokens": 16}
        )
        assert response.status_code == 200, response.text
        body = response.json()

    assert body["generator_version_id"] == generator.id
    assert body["reward_model_version_id"] == reward.id
    assert body["score"] == max(sample["score"] for sample in body["samples"])
    assert body["candidate_id"] in {sample["candidate_id"] for sample in body["samples"]}
    stored = pg_session.scalars(
        select(Candidate).where(Candidate.problem_id == body["problem_id"])
    ).all()
    assert {c.id for c in stored} == {s["candidate_id"] for s in body["samples"]}
    assert all(
        c.origin is Origin.REQUEST and c.generator_version_id == generator.id for c in stored
    )
    best = next(c for c in stored if c.id == body["candidate_id"])
    assert best.code == body["code"] and best.code.startswith("def add(a, b):")
    scores = pg_session.scalars(
        select(Score).where(Score.reward_model_version_id == reward.id)
    ).all()
    assert {s.candidate_id: s.score for s in scores} == {
        s["candidate_id"]: s["score"] for s in body["samples"]
    }
    problem = pg_session.get(Problem, body["problem_id"])
    assert problem.source == "request" and problem.prompt == "def add(a, b):\n"


# --- transactions ------------------------------------------------------------


def connection_states(url: str) -> list[str]:
    """pg_stat_activity's state of every other connection to the database."""
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
        return [
            state
            for (state,) in connection.execute(
                "SELECT state FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]


class WatchingGenerator:
    """Writes the same programs on every call, noting the store's connections as it runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[list[str]] = []

    def generate(self, prompts, n: int) -> list[list[Sample]]:
        self.seen.append(connection_states(self.url))
        return [
            [
                Sample(code=f"{prompt.prompt}    return {i}\n", completion="", num_tokens=3)
                for i in range(n)
            ]
            for prompt in prompts
        ]


class WatchingScorer(WatchingGenerator):
    def score(self, prompts, codes) -> list[float]:
        self.seen.append(connection_states(self.url))
        return [i / 10 for i in range(len(codes))]


@pytest.fixture
def committed_store(monkeypatch) -> Iterator[str]:
    """A private database the API reaches through RR_DATABASE_URL, as in production:
    its transactions really commit, so none is hidden inside a test's own."""
    with fresh_database("rr_solve") as url:
        monkeypatch.setenv("RR_DATABASE_URL", url)
        for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker):
            cached.cache_clear()
        try:
            yield url
        finally:
            db.get_engine().dispose()
            for cached in (settings.get_settings, db.get_engine, db.get_sessionmaker):
                cached.cache_clear()


def test_solve_generates_with_no_transaction_open_and_a_rerun_stores_nothing_twice(
    committed_store, monkeypatch
):
    with db.session_scope() as session:
        session.add_all(
            [
                ModelVersion(kind=ModelKind.GENERATOR, name="gen", base_model="stub"),
                ModelVersion(kind=ModelKind.REWARD, name="rm", base_model="stub"),
            ]
        )
    generator = WatchingGenerator(committed_store)
    scorer = WatchingScorer(committed_store)
    monkeypatch.setattr("pipelines.generation.make_generator", lambda config: generator)
    monkeypatch.setattr("pipelines.reward_model.RewardScorer", lambda spec: scorer)

    with TestClient(create_app(Settings(api_token=None))) as client:
        request = {"prompt": "def add(a, b):\n", "n": 3}
        first = client.post("/solve", json=request)
        assert first.status_code == 200, first.text
        again = client.post("/solve", json=request)
        assert again.status_code == 200, again.text

    # While generating and scoring, the API's pooled connection sat idle:
    # not "idle in transaction", holding the locks of the problem it stored.
    assert len(generator.seen) == len(scorer.seen) == 2
    seen = generator.seen + scorer.seen
    assert all(states and set(states) == {"idle"} for states in seen), seen
    # The same programs again: the same rows and scores, nothing stored twice.
    assert again.json()["samples"] == first.json()["samples"]
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Problem)) == 1
        assert session.scalar(select(func.count()).select_from(Candidate)) == 3
        assert session.scalar(select(func.count()).select_from(Score)) == 3
