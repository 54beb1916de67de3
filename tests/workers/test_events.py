"""Workers on a real broker send the events Flower shows: worker heartbeats and
task events (the embedded broker's workers send none; nothing watches them)."""

from contextlib import suppress

from workers.celery_app import celery
from workers.processes import start_worker, stop_workers


class _Seen(Exception):
    """Ends the capture once a heartbeat and the task's success came through."""


def test_a_worker_on_redis_sends_heartbeats_and_task_events(flywheel_env, tmp_path):
    seen: list[str] = []

    def on_event(event: dict) -> None:
        seen.append(event["type"])
        if event["type"] == "worker-online":
            celery.signature("execution.noop").apply_async()
        if {"task-succeeded", "worker-heartbeat"} <= set(seen):
            raise _Seen

    worker = start_worker(["execution"], env=flywheel_env, log_path=tmp_path / "worker.log")
    try:
        with celery.connection_for_read() as connection:
            receiver = celery.events.Receiver(connection, handlers={"*": on_event})
            # A minute without any event fails the test (a socket timeout).
            with suppress(_Seen):
                receiver.capture(limit=None, timeout=60, wakeup=True)
    finally:
        stop_workers([worker], timeout_s=10)
    assert seen.index("worker-online") < seen.index("task-received") < seen.index("task-succeeded")
    assert "worker-heartbeat" in seen
