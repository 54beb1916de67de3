"""The app factory: routes, middleware and error handlers."""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from app.api import control, dashboard, store
from app.api.security import BearerAuth, BodySizeLimit
from app.queries import QueryError
from models.settings import Settings, get_settings

MAX_BODY_BYTES = 2 * 1024 * 1024


def create_app(
    settings: Settings | None = None, *, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The API and dashboard; with `RR_API_TOKEN` set, all but /health need the token."""
    settings = settings or get_settings()
    app = FastAPI(
        title="RewardRanker Flywheel",
        version="0.1.0",
        description="Query the candidate store, trigger training, solve with best-of-N.",
    )
    app.state.solver_models = {}
    app.include_router(store.router)
    app.include_router(control.router)
    app.include_router(dashboard.router)
    app.add_exception_handler(QueryError, _query_error)
    app.add_exception_handler(DataError, _data_error)
    # Added last, so it runs first: an unauthenticated caller cannot even make
    # the server read a body.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if settings.api_token is not None:
        app.add_middleware(BearerAuth, token=settings.api_token.get_secret_value())
    return app


async def _query_error(_request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(error)})


async def _data_error(_request: Request, error: DataError) -> JSONResponse:
    # Input the validation let through but PostgreSQL refuses (a value out of a
    # column's range): the caller's mistake, so a 4xx, never a 500.
    reason = str(error.orig).splitlines()[0]
    return JSONResponse(status_code=422, content={"detail": f"the store refused a value: {reason}"})
