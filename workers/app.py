"""The Celery app: queues, delivery guarantees and routes for the writers and the committer.

``celery -A workers.app worker -Q ingest`` finds the module attribute ``app``. It is built on first
access (PEP 562 ``__getattr__``) from :func:`common.settings.load_settings`, so importing this
module reads no environment and opens no connection; tests and the CLI call :func:`create_app`
with settings of their own.

Delivery is at least once and every step is idempotent (design.md §3): ``acks_late`` with
``reject_on_worker_lost`` puts a task back on the queue when its process dies, prefetch 1 keeps a
worker from sitting on messages another could run, and Redis' visibility timeout (after which an
unacknowledged message is delivered again) is set above the longest write task so a slow write is
never run twice at once (:func:`visibility_timeout_s`).

Time limits, the visibility timeout and the restore sweep's pace come from :mod:`workers.limits`.

No result backend: correctness never reads task results. Batches are tracked in Redis keys of our
own (``icefleet:outstanding``, the pending registry, prepared records: see
:mod:`common.ingest.producer`), producers never block on a result, and a backend would write one key per
task. Flower still sees every task, its result and its failure through task events.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from common.settings import Settings, load_settings
from common.wire import (
    CANARY_TASK,
    COMMIT_QUEUE,
    COMMIT_TASK,
    INGEST_QUEUE,
    SWEEP_TASK,
    VERIFY_SAMPLE_TASK,
    WRITE_TASK,
)
from workers.limits import SWEEP_INTERVAL_S, broker_transport_options, task_annotations


class IcefleetCelery(Celery):
    """A Celery app that carries the :class:`Settings` it was built from."""

    icefleet_settings: Settings


def _queue(name: str) -> Queue:
    # A direct exchange of the queue's own name, as Celery creates for a routed queue: without
    # one, a Queue takes the default exchange and routing key (those of "ingest").
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def canary_schedule(settings: Settings) -> dict[str, Any]:
    """The canary's beat entry (workers/tasks/canary.py), unless ICEFLEET_CANARY_INTERVAL_S is 0."""
    if settings.canary_interval_s <= 0:
        return {}
    every_s = settings.canary_interval_s
    options = {"queue": INGEST_QUEUE, "expires": every_s}
    return {"canary": {"task": CANARY_TASK, "schedule": every_s, "options": options}}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from icefleet's settings."""
    from workers.tasks.maintenance import beat_schedule as maintenance_schedule
    from workers.tasks.validation import validation_schedule

    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        "result_backend": None,
        "task_ignore_result": True,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A hard time limit puts the message back instead of dropping it: the writer dead-letters
        # a batch that keeps failing (common/ingest/producer.py counts deliveries), nothing is lost.
        "task_acks_on_timeout": False,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # No global time limit: each task has its own (task_time_limits, module docstring).
        "task_annotations": task_annotations(settings),
        "task_queues": [_queue(INGEST_QUEUE), _queue(COMMIT_QUEUE)],
        "task_default_queue": INGEST_QUEUE,
        "task_routes": {
            WRITE_TASK: {"queue": INGEST_QUEUE},
            COMMIT_TASK: {"queue": COMMIT_QUEUE},
            SWEEP_TASK: {"queue": COMMIT_QUEUE},
            "icefleet.maintenance.*": {"queue": COMMIT_QUEUE},
            VERIFY_SAMPLE_TASK: {"queue": INGEST_QUEUE},
        },
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": {
            "commit-sweep": {
                "task": SWEEP_TASK,
                "schedule": SWEEP_INTERVAL_S,
                # a sweep not started within its interval is superseded by the next one
                "options": {"queue": COMMIT_QUEUE, "expires": SWEEP_INTERVAL_S},
            },
            **canary_schedule(settings),
            **maintenance_schedule(settings),
            **validation_schedule(settings),
        },
        "beat_schedule_filename": str(settings.home.resolve() / "celerybeat-schedule"),
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts_level": "INFO",
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_app(settings: Settings | None = None) -> IcefleetCelery:
    """A configured Celery app with icefleet's tasks registered. Connects to nothing yet."""
    settings = settings if settings is not None else load_settings()
    app = IcefleetCelery("icefleet", set_as_current=True)
    app.icefleet_settings = settings
    app.conf.update(celery_config(settings))
    # registers the shared tasks with every app; observability: metrics and log hooks (signals)
    import workers.observability
    import workers.tasks  # noqa: F401

    return app


def run_worker(
    app: Celery,
    *,
    queue: str,
    hostname: str,
    pool: str = "prefork",
    concurrency: int = 1,
    loglevel: str = "INFO",
    beat: bool = False,
) -> int:
    """Run a worker of ``app`` on ``queue`` in the foreground until it is stopped; its exit code.

    What ``celery worker`` does after parsing its arguments (``celery/bin/worker.py``), without
    importing Celery's command line (click, the REPL, every subcommand: half a second of CPU
    per worker start). Mingle and gossip are off: icefleet's workers never ask each other for
    revoked task ids or clocks at start, a round trip that only delays readiness.
    """
    from celery.utils.nodenames import default_nodename, host_format

    worker = app.Worker(
        hostname=host_format(default_nodename(hostname)),
        queues=[queue],
        pool_cls=pool,
        concurrency=concurrency,
        loglevel=loglevel,
        beat=beat,
        without_mingle=True,
        without_gossip=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


_app: IcefleetCelery | None = None


def get_app() -> IcefleetCelery:
    """The process' default app, built from the environment on first use."""
    global _app
    if _app is None:
        _app = create_app()
    return _app


def __getattr__(name: str) -> Any:
    # `celery -A workers.app` looks up `app`, then `celery`.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
