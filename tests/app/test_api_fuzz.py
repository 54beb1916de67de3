"""Property-based fuzzing of every operation in the OpenAPI schema: whatever
schemathesis sends, valid or not, the API must never answer 5xx."""

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import update

from app.api import create_app
from models import ModelVersion
from models.enums import ModelStatus
from models.settings import Settings
from tests.app.conftest import seed_store, serve_session

# The schema is read once at import; each test routes the app's sessions to its
# own rolled-back transaction (schemathesis' fixture-based loader does not work
# with this pytest version).
app = create_app(Settings(api_token=None))
# /health takes no input, so there is nothing to fuzz, and each call waits up to
# a second for worker replies; test_api.py covers it.
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/health")


@pytest.fixture
def fuzzed_store(pg_session) -> Iterator[None]:
    # Seeded, so filters, ids and cursors reach real rows, not only empty results.
    # POST /training-runs never enqueues: nothing commits the test's transaction,
    # so the after-commit sends never fire. The seeded models are retired, so
    # POST /solve answers 409 (no current reward model) or 422 without loading
    # one; tests/app/test_api_solve.py runs it with real models.
    seed_store(pg_session)
    pg_session.execute(update(ModelVersion).values(status=ModelStatus.RETIRED))
    serve_session(app, pg_session)
    yield
    app.dependency_overrides.clear()


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    # The fixture's transaction is shared by the examples of one operation, on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_makes_the_api_fail(case, fuzzed_store):
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.text)
    case.validate_response(response, checks=[not_a_server_error])
