"""Shared fixtures: a real PostgreSQL database built by `alembic upgrade head`,
an SQLite one, and per-test transactions that are rolled back.

With CI=true a missing server fails the run instead of skipping it, so a green
CI means every test really ran."""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app import migrate
from models.db import make_engine

IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_DSN = os.environ.get(
    "RR_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)
REDIS_URL = os.environ.get("RR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: CI must never pass by not running a test."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def _pg_url(dbname: str) -> str:
    params = dict(part.split("=", 1) for part in PG_ADMIN_DSN.split())
    return (
        f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}"
        f":{params.get('port', '5432')}/{dbname}"
    )


@contextmanager
def fresh_database(prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database on the real server (migrated to head unless told not to),
    dropped on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        unavailable(f"PostgreSQL at {PG_ADMIN_DSN}: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _pg_url(name)
        if migrated:
            migrate.upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the real server, migrated to head, dropped at the end."""
    with fresh_database("rr_test") as url:
        yield url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_session(pg_engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test; code
    under test may commit, which only releases a savepoint."""
    with pg_engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def sqlite_session(sqlite_url: str) -> Iterator[Session]:
    engine = make_engine(sqlite_url)
    with Session(engine) as session:
        yield session
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request) -> Session:
    """The same test on both databases the store runs on."""
    return request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_session")


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        unavailable(f"Redis at {REDIS_URL}: {error}")
    return REDIS_URL


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A 2-layer Llama with the bundled tokenizer, saved once and reused across
    runs (building it reads the 90 MB GGUF for its tokenizer)."""
    from pipelines.loading import save_tiny_llama

    folder = Path(__file__).resolve().parent.parent / "var" / "test-cache" / "tiny-llama-v1"
    if not (folder / "model.safetensors").is_file():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        save_tiny_llama(staging)
        try:
            staging.rename(folder)  # atomic: a half-written folder is never used
        except OSError:  # another test process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder
