"""Enqueue after commit, never before.

`enqueue_after_commit(session, signature)` buffers a Celery signature on the
session; it is sent when the session's outermost transaction commits and dropped
when it rolls back, so a follow-up never runs against rows that do not exist.
A send that fails after the commit is logged, not raised: the rows are
committed, and `reconcile` re-enqueues whatever the store shows as unfinished.
"""

import logging

from celery.canvas import Signature
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger(__name__)
_KEY = "rr_after_commit"


def enqueue_after_commit(session: Session, signature: Signature) -> None:
    session.info.setdefault(_KEY, []).append(signature)


def pending(session: Session) -> list[Signature]:
    """Signatures waiting for the session's commit (for tests and logging)."""
    return list(session.info.get(_KEY, []))


@event.listens_for(Session, "after_commit")
def _send_buffered(session: Session) -> None:
    signatures = session.info.pop(_KEY, [])
    for signature in signatures:
        try:
            signature.apply_async()
        except Exception:  # the broker is down past the publish retries
            log.exception("could not enqueue %s after commit; reconcile will", signature)


@event.listens_for(Session, "after_soft_rollback")
def _drop_buffered(session: Session, previous: SessionTransaction) -> None:
    # Only the outermost transaction's rollback discards the buffer: a rolled-back
    # savepoint (an upsert race) leaves the enclosing unit of work intact.
    if previous.parent is None:
        session.info.pop(_KEY, None)
