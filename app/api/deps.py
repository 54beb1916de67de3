"""Request-scoped sessions: the transaction is committed at the edge."""

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from models.db import get_sessionmaker, session_scope


def write_session() -> Iterator[Session]:
    """Commits when the endpoint returns and rolls back when it raises, before
    the response is sent: a 2xx means the change is stored (and only then are
    follow-up tasks enqueued, by the after-commit hooks of the session)."""
    with session_scope() as session:
        yield session


async def stream_session() -> AsyncIterator[Session]:
    """A read-only session that lives until the response has been sent
    (FastAPI's "request" scope), then is rolled back. A session connects at its
    first query, so opening one needs no worker thread; closing it does I/O."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


def transactions() -> Callable[[], AbstractContextManager[Session]]:
    """For an endpoint that must not hold one transaction for the whole request
    (POST /solve generates for minutes): it opens short ones, each committed
    when its block ends."""
    return session_scope


DbSession = Annotated[Session, Depends(write_session, scope="function")]
StreamSession = Annotated[Session, Depends(stream_session, scope="request")]
Transactions = Annotated[Callable[[], AbstractContextManager[Session]], Depends(transactions)]
