"""Engines and sessions. Transactions are committed at the edge (CLI command,
task wrapper, request dependency); everything below only flushes."""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.settings import get_settings

T = TypeVar("T")
log = logging.getLogger(__name__)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the embedded workers read while one writes; foreign keys are off
    # by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().sqlalchemy_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_connection_error(error: BaseException) -> bool:
    """A lost or refused database connection (a cut, a restart, a failover) or
    SQLite's busy lock: the same write may succeed once the store is back."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def write_with_retry(write: Callable[[Session], T], *, give_up_after: timedelta | None = None) -> T:
    """Run `write` in its own unit of work, again and again with backoff while the
    store is unreachable, for at most `give_up_after` (RR_STORE_RETRY_FOR); then
    the last error is raised. For writes that follow long work, which a cut
    connection must not throw away. `write` must be idempotent: a commit whose
    acknowledgement was lost is retried too."""
    limit = (give_up_after or get_settings().store_retry_for).total_seconds()
    deadline = time.monotonic() + limit
    delay = 0.5
    while True:
        try:
            with session_scope() as session:
                return write(session)
        except Exception as error:
            if not is_connection_error(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("store unreachable, retrying in %.1fs: %s", delay, error)
            time.sleep(delay)
            delay = min(2 * delay, 15.0)
