"""POST /solve with real (tiny) models: a 2-layer Llama as the generator and, with
a fresh one-output head, as the reward model."""

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api import create_app
from app.settings import Settings
from models import Candidate, ModelVersion, Problem, Score
from models.enums import ModelKind, Origin
from tests.app.conftest import serve_session


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
