"""HTTP API against the real PostgreSQL; every test runs in a transaction that is rolled back."""

import io

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from app.api import create_app
from models import TrainingRun
from models.enums import RunKind, RunStatus
from models.settings import Settings
from tests.app.conftest import seed_held_out, serve_session


def all_pages(client: TestClient, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        page = client.get(
            "/candidates", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


# --- problems ---------------------------------------------------------------

NATIVE = {
    "task_id": "sum/1",
    "language": "python",
    "prompt": "def add(a, b):\n",
    "tests": "assert add(1, 2) == 3\n",
}


def test_post_problems_imports_and_reimport_is_harmless(client):
    first = client.post("/problems", json=[NATIVE, {**NATIVE, "task_id": "sum/2"}])
    assert first.status_code == 201 and first.json() == {"imported": 2, "unchanged": 0}
    again = client.post("/problems", json=[NATIVE])
    assert again.json() == {"imported": 0, "unchanged": 1}
    listed = client.get("/problems", params={"source": "api"}).json()
    assert [p["task_id"] for p in listed] == ["sum/1", "sum/2"]
    detail = client.get(f"/problems/{listed[0]['id']}").json()
    assert detail["tests"] == NATIVE["tests"] and detail["language"] == "python"


@pytest.mark.parametrize(
    ("problem", "field"),
    [
        ({**NATIVE, "tests": ""}, "tests"),
        ({**NATIVE, "language": "cobol"}, "language"),
        ({**NATIVE, "task_id": "x" * 201}, "task_id"),
        ({**NATIVE, "prompt": "def f():\x00"}, "<object>"),
        ({**NATIVE, "io_cases": [{"input": 1}]}, "io_cases"),
    ],
)
def test_post_problems_rejects_bad_problems_and_stores_none(client, problem, field):
    response = client.post("/problems", json=[{**NATIVE, "task_id": "good/1"}, problem])
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["index"] == 2 and error["field"] == field
    assert client.get("/problems", params={"source": "api"}).json() == []


def test_post_problems_rejects_malformed_bodies(client):
    assert (
        client.post(
            "/problems", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/problems", json=[]).status_code == 422
    assert client.post("/problems", json={"task_id": "x"}).status_code == 422


def test_body_over_the_limit_is_413_with_a_clear_message(pg_session):
    app = create_app(Settings(api_token=None), max_body_bytes=1000)
    serve_session(app, pg_session)
    with TestClient(app) as small:
        response = small.post("/problems", json=[{**NATIVE, "prompt": "x" * 2000}])
        assert response.status_code == 413
        assert "limit is 1000 bytes" in response.json()["detail"]
        # A chunked body announces no length; it is counted as it arrives.
        chunked = small.post(
            "/problems",
            content=iter([b"[", b" " * 1200, b"]"]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413


def test_unknown_problem_is_404(client):
    assert client.get("/problems/999999").status_code == 404
    assert client.get("/problems/0").status_code == 422
    assert client.get("/problems/99999999999999").status_code == 422


# --- candidates -------------------------------------------------------------


def test_candidate_filters(client, seeded):
    def ids(**params) -> set[int]:
        return {item["id"] for item in all_pages(client, **params)}

    assert ids(verdict="OK") == set(seeded.passing)
    assert ids(verdict="WRONG_ANSWER", iteration=2) == set(seeded.failing)
    assert ids(language="cpp") == {seeded.cpp_candidate}
    assert ids(origin="mutation") == {seeded.cpp_candidate}
    assert ids(hard_negative="true") == {seeded.hard_negative}
    # Reward-hacking attempts the sandbox caught: listed for analysis.
    assert ids(tampered="true") == {seeded.failing[0]}
    assert ids(tampered="false") == set(seeded.passing + seeded.failing[1:])
    assert seeded.hard_negative not in ids(hard_negative="false")
    assert ids(problem_id=seeded.python_problem) == set(seeded.passing + seeded.failing)
    assert ids(generator_version_id=seeded.generator) == set(seeded.passing)
    # By default each candidate's own iteration's scores: rm-v1's of iteration 1's.
    assert ids(min_score=0.6, max_score=0.85) == set(seeded.passing[1:4])
    # A chosen version's scores: rm-v1 also gave iteration 2's failing ones 0.9,
    # where their own rm-v2 gave them at most 0.3; rm-v2 scored only those.
    assert ids(
        reward_model_version_id=seeded.old_reward, verdict="WRONG_ANSWER", min_score=0.9
    ) == set(seeded.failing)
    assert ids(verdict="WRONG_ANSWER", min_score=0.9) == set()
    assert ids(reward_model_version_id=seeded.reward, min_score=0.0) == set(seeded.failing)


def test_candidates_sorted_by_score_page_through_every_row_once(client, seeded):
    items = all_pages(client, sort="-score", limit=3)
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True) and len(items) == 10
    assert len({item["id"] for item in items}) == 10
    # Each shows its own iteration's score: rm-v1's in iteration 1, rm-v2's in 2.
    assert {item["id"]: item["reward_model_version_id"] for item in items} == {
        **dict.fromkeys(seeded.passing, seeded.old_reward),
        **dict.fromkeys(seeded.failing, seeded.reward),
    }
    ascending = all_pages(client, sort="score", limit=4)
    assert [item["id"] for item in ascending] == [item["id"] for item in reversed(items)]


def test_candidates_sorted_by_time(client, seeded):
    newest_first = [item["id"] for item in all_pages(client, limit=2)]
    assert newest_first == sorted(newest_first, reverse=True) and len(newest_first) == 11
    oldest_first = [item["id"] for item in all_pages(client, sort="time", limit=5)]
    assert oldest_first == sorted(newest_first)


@pytest.mark.parametrize("sort", ["time", "-time", "score", "-score"])
def test_filtered_listings_page_through_every_row_once(client, seeded, sort):
    # A cursor also bounds the executions and scores that a filter joins.
    for params in (
        {"verdict": "OK"},
        {"min_score": 0.0},
        {"verdict": "WRONG_ANSWER", "max_score": 0.25},
    ):
        whole = [item["id"] for item in all_pages(client, sort=sort, **params)]
        paged = [item["id"] for item in all_pages(client, sort=sort, limit=2, **params)]
        assert whole and paged == whole and len(set(paged)) == len(paged), params


def test_candidate_row_shows_verdict_score_and_label(client, seeded):
    [row] = client.get("/candidates", params={"hard_negative": True}).json()["items"]
    assert row["verdict"] == "WRONG_ANSWER" and row["hard_negative"] is True
    assert (
        row["iteration"] == 2 and row["task_id"] == "api/add" and row["score"] == pytest.approx(0.3)
    )


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not-a-cursor"},
        {"verdict": "MAYBE"},
        {"language": "cobol"},
        {"sort": "price"},
        {"limit": 0},
        {"limit": 5000},
        {"min_score": "nan"},
        {"min_score": "inf"},
        {"problem_id": 2**40},
        {"format": "xml"},
    ],
)
def test_bad_candidate_queries_are_4xx(client, seeded, params):
    response = client.get("/candidates", params=params)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]


def test_cursor_from_another_sort_is_rejected(client, seeded):
    cursor = client.get("/candidates", params={"sort": "-score", "limit": 2}).json()["next_cursor"]
    response = client.get("/candidates", params={"sort": "-time", "cursor": cursor})
    assert response.status_code == 400 and "sort='-score'" in response.json()["detail"]


def test_candidate_detail_has_code_execution_scores_labels_and_lineage(client, seeded):
    detail = client.get(f"/candidates/{seeded.hard_negative}").json()
    assert detail["code"].startswith("def add(a, b):")
    assert detail["execution"]["verdict"] == "WRONG_ANSWER"
    assert {s["reward_model_version_id"]: s["score"] for s in detail["scores"]} == {
        seeded.old_reward: 0.9,
        seeded.reward: pytest.approx(0.3),
    }
    assert detail["hard_negative_labels"] == [
        {
            "reward_model_version_id": seeded.old_reward,
            "rule": "above_lowest_passing",
            "iteration": 1,
            "created_at": detail["hard_negative_labels"][0]["created_at"],
        }
    ]
    assert detail["lineage"]["iteration"] == 2
    # Labelled in iteration 1, so iteration 1's dataset carries it.
    assert [d["dvc_tag"] for d in detail["lineage"]["dataset_versions"]] == ["iter-1"]
    produced = client.get(f"/candidates/{seeded.passing[0]}").json()
    assert produced["lineage"]["generator"]["name"] == "gen-v1"
    assert client.get("/candidates/123456789").status_code == 404


# --- exports ----------------------------------------------------------------


def test_csv_export_streams_every_matching_row(client, seeded):
    response = client.get("/candidates", params={"format": "csv", "verdict": "OK", "sort": "score"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    import csv

    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["id"]) for r in rows] == seeded.passing  # ascending scores were assigned in order
    assert rows[0]["code"].startswith("def add") and rows[0]["verdict"] == "OK"


def test_parquet_export_round_trips(client, seeded):
    response = client.get("/candidates", params={"format": "parquet", "language": "python"})
    assert response.status_code == 200
    table = pq.read_table(io.BytesIO(response.content))
    assert table.num_rows == 10
    assert set(table.column("id").to_pylist()) == set(seeded.passing + seeded.failing)
    assert table.schema.field("score").type == "double"


def test_empty_export_still_has_a_header(client):
    response = client.get("/candidates", params={"format": "csv", "problem_id": 424242})
    assert response.text.strip().startswith("id,problem_id,task_id")
    assert len(response.text.strip().splitlines()) == 1


# --- iterations and models -------------------------------------------------


def test_tampered_runs_show_their_reason(client, seeded):
    [row] = client.get("/candidates", params={"tampered": "true"}).json()["items"]
    assert row["tampered"] is True and row["verdict"] == "WRONG_ANSWER"
    detail = client.get(f"/candidates/{seeded.failing[0]}").json()
    assert detail["execution"]["tamper_reason"] == "success token printed before the tests ran"
    assert client.get("/candidates", params={"tampered": "maybe"}).status_code == 422


def test_iterations_and_models(client, seeded):
    iterations = client.get("/iterations").json()
    assert [i["number"] for i in iterations] == [1, 2]
    assert iterations[0]["candidates"] == 6 and iterations[0]["verdicts"] == {"OK": 6}
    assert (
        iterations[0]["hard_negatives"] == 1 and iterations[0]["metrics"]["reranked_pass1"] == 0.5
    )
    assert [i["tampered"] for i in iterations] == [0, 1]
    one = client.get("/iterations/1").json()
    assert one["dataset_version"]["dvc_tag"] == "iter-1"
    assert client.get("/iterations/77").status_code == 404
    models = client.get("/models").json()
    assert [m["name"] for m in models] == ["gen-v1", "rm-v1", "rm-v2"]
    assert [m["name"] for m in client.get("/models", params={"kind": "generator"}).json()] == [
        "gen-v1"
    ]


def test_evaluations_show_the_table_and_each_change_paired_over_the_same_problems(
    client, seeded, pg_session
):
    seed_held_out(pg_session, seeded)
    body = client.get("/evaluations").json()
    assert [(row["evaluation"], row["row"]) for row in body["rows"]] == [
        (0, "generator"), (0, "reranked"), (1, "generator"), (1, "reranked"),
    ]  # fmt: skip
    changes = {change["change"]: change for change in body["changes"]}
    assert list(changes) == ["reranking", "generator", "flywheel", "overall"]
    # The same draws both times: the generator did not change. Evaluation 0's
    # reward model tied every draw (a random pick, 0.125); evaluation 1's picks the
    # passing draw on both problems that have one (0.5).
    assert changes["generator"]["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert changes["flywheel"]["difference"]["value"] == pytest.approx(0.375)
    assert all(change["problems"] == 4 for change in changes.values())
    assert body["verdict"].startswith("within noise: reranked at evaluation 1 against")


# --- training runs ----------------------------------------------------------


def test_training_trigger_is_202_then_409_while_active(client, pg_session):
    from workers.after_commit import pending

    first = client.post("/training-runs", json={"kind": "reward"})
    assert first.status_code == 202, first.text
    run_id = first.json()["id"]
    assert first.json()["status"] == "queued"
    # The task waits for the commit (the test's transaction never commits).
    assert len(pending(pg_session)) == 1

    second = client.post("/training-runs", json={"kind": "reward"})
    assert second.status_code == 409 and second.json()["run_id"] == run_id
    assert client.post("/training-runs", json={"kind": "policy"}).status_code == 202
    shown = client.get(f"/training-runs/{run_id}").json()
    assert shown["kind"] == "reward" and shown["progress"] == 0.0
    # Queued, not claimed: no attempt, owner or checkpoint yet.
    assert (shown["attempt"], shown["owner"], shown["resumed_from_step"]) == (0, None, None)


def test_training_trigger_is_accepted_again_after_the_run_finished(client, pg_session):
    done = TrainingRun(kind=RunKind.REWARD, status=RunStatus.SUCCEEDED)
    pg_session.add(done)
    pg_session.flush()
    response = client.post("/training-runs", json={"kind": "reward"})
    assert response.status_code == 202 and response.json()["id"] != done.id


def test_bad_training_requests_are_4xx(client):
    assert client.post("/training-runs", json={"kind": "dpo"}).status_code == 422
    assert (
        client.post("/training-runs", json={"kind": "reward", "iteration": 999}).status_code == 422
    )
    assert client.get("/training-runs/999999").status_code == 404


# --- auth -------------------------------------------------------------------


def test_with_a_token_every_endpoint_but_health_needs_it(pg_session, seeded):
    app = create_app(Settings(api_token="s3cret-token"))
    serve_session(app, pg_session)
    with TestClient(app) as authed:
        for path in (
            "/problems",
            "/candidates",
            "/iterations",
            "/models",
            "/",
            "/browse",
            "/openapi.json",
        ):
            assert authed.get(path).status_code == 401, path
            assert authed.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = authed.get(path, headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status_code == 200, path
        refused = authed.post("/training-runs", json={"kind": "reward"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert authed.get("/health").status_code in (200, 503)


def test_without_a_token_no_header_is_needed(client, seeded):
    assert client.get("/candidates").status_code == 200


# --- solve and health --------------------------------------------------------


def test_solve_without_a_reward_model_is_409(client):
    response = client.post("/solve", json={"prompt": "def add(a, b):\n", "n": 2})
    assert response.status_code == 409 and "no reward model" in response.json()["detail"]


def test_bad_solve_requests_are_422(client):
    assert client.post("/solve", json={"prompt": ""}).status_code == 422
    assert client.post("/solve", json={"prompt": "x", "n": 1000}).status_code == 422
    assert client.post("/solve", json={"prompt": "x", "language": "cobol"}).status_code == 422
    assert client.post("/solve", json={"prompt": "x\x00"}).status_code == 422


def test_health_reports_database_broker_and_queues(client):
    response = client.get("/health")
    body = response.json()
    assert body["database"] == "ok"
    assert set(body["workers"]) >= {"generation", "execution", "labeling", "training"}
    assert response.status_code == (200 if body["broker"] == "ok" else 503)
