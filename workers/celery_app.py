"""The Celery app: four queues, routed by task name, configured from `Settings`.

State lives in the candidate store, not in Celery: there is no result backend,
and every task is idempotent by database state, so a redelivered or
re-enqueued message is harmless.
"""

import kombu.exceptions
import sqlalchemy.exc
from celery import Celery
from kombu import Queue

from models.settings import Settings, get_settings
from workers.names import GENERATION, MAINTENANCE, QUEUES, RECONCILE

TRANSIENT = (sqlalchemy.exc.OperationalError, kombu.exceptions.OperationalError)
"""What a task retries: a database or broker connection that dropped, SQLite's busy
lock. Anything else is a bug or bad data and fails loudly."""
RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 8,
}


def broker_options(settings: Settings) -> dict:
    """Transport options for the configured broker."""
    if settings.celery_broker_url.startswith("filesystem"):
        # Producers write into data_folder_out and consumers read data_folder_in;
        # one shared folder makes every process on this machine see one queue.
        # `processed` must sit on the same file system: a consumer claims a
        # message by renaming it there, which is atomic.
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    # Redis redelivers an unacknowledged message after visibility_timeout; it
    # must outlast the longest short task or a slow task would run twice at once.
    # Training tasks acknowledge on receipt (their run row carries the state),
    # so they do not count here.
    return {"visibility_timeout": 2 * settings.task_time_limit.total_seconds()}


def make_celery(settings: Settings) -> Celery:
    app = Celery("rewardranker", broker=settings.celery_broker_url)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in (*QUEUES, MAINTENANCE)],
        task_default_queue=GENERATION,
        # Task names are "<queue>.<verb>", so routing is by name.
        task_routes={f"{name}.*": {"queue": name} for name in (*QUEUES, MAINTENANCE)},
        # `rewardranker beat` sends the reconcile on this schedule; a copy that waited
        # longer than one interval is dropped, the next one is on its way.
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval.total_seconds(),
                "options": {"expires": settings.reconcile_interval.total_seconds()},
            }
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A task whose worker dies goes back on the queue (Redis); every short
        # task is idempotent, so running it again is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit.total_seconds(),
        # A broker blip (Redis restart) must not drop a follow-up we are sending
        # after commit: retry publishing for ~15 s before giving up.
        task_publish_retry_policy={
            "max_retries": 12,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        worker_hijack_root_logger=False,
        # `rewardranker worker` turns task events on where a broker can carry them
        # (Redis), for Flower; the embedded broker's workers send none.
        worker_send_task_events=False,
    )
    return app


celery = make_celery(get_settings())
# Imported for their @celery.task side effect, after `celery` exists.
celery.conf.imports = (
    "workers.generation",
    "workers.execution",
    "workers.labeling",
    "workers.training",
    "workers.reconcile",
)
