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

**Time limits are per task** (:func:`task_time_limits`, applied as ``task_annotations`` when the
app is created, so nothing is global and nothing is read at import):

* ``icefleet.write_batch``: soft ``ICEFLEET_WRITE_TIMEOUT_S``, hard 30 s later. The writer splits a
  batch that does not fit (common/write/partial.py), so the limit bounds how long a batch holds a writer.
* ``icefleet.commit_table`` and the sweep ``icefleet.commit_all``: soft ``ICEFLEET_LOCK_WAIT_S`` +
  :data:`COMMIT_WORK_S` (the wait for the table lock, then five minutes for the commit and its
  retries), hard 30 s later. Independent of the write timeout: a small write timeout must not cut
  a group commit short. A commit cut short is safe (the prepared record decides at the next run);
  the limit only keeps a hung catalog call from holding the one committer for ever. (The sweep
  logs the table its soft limit interrupts and goes on with the next until the hard limit.)
* the canary's tasks: :data:`CANARY_SOFT_LIMIT_S` (a probe, or one small table scan).
* maintenance tasks (workers/tasks/maintenance.py): their own limits, set on their decorators (an hour);
  they are acknowledged when they start, so they do not count for the visibility timeout (nor do
  commit tasks: see :func:`visibility_timeout_s`).

No result backend: correctness never reads task results. Batches are tracked in Redis keys of our
own (``icefleet:outstanding``, the pending registry, prepared records: see
:mod:`common.ingest.producer`), producers never block on a result, and a backend would write one key per
task. Flower still sees every task, its result and its failure through task events.
"""

from __future__ import annotations

import math
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from common.coord.backlog import COMMIT_QUEUE, INGEST_QUEUE
from common.ingest.producer import WRITE_TASK
from common.settings import Settings, load_settings

COMMIT_TASK = "icefleet.commit_table"
SWEEP_TASK = "icefleet.commit_all"
SWEEP_INTERVAL_S = 5.0
CANARY_TASK = "icefleet.canary.send"
CANARY_CHECK_TASK = "icefleet.canary.check"
CANARY_CHECK_COUNTDOWN_S = 1.0  # the canary schedules its checks this far ahead
# A task may run this long past its soft limit (cleaning up, dead-lettering) before it is killed.
HARD_LIMIT_GRACE_S = 30
#: The longest backoff before a failed write is tried again (workers/tasks/write.py): the retried task
#: waits that long, unacknowledged, in a worker.
WRITE_RETRY_MAX_BACKOFF_S = 60.0
#: A commit task's time once it holds the table lock: a group commit takes seconds (a large one on
#: a REST catalog up to a minute or two), plus the commit retries' backoff.
COMMIT_WORK_S = 300
#: The canary's tasks send one probe or scan the small canary table once.
CANARY_SOFT_LIMIT_S = 60
#: kombu's Redis transport puts a message back on its queue when the visibility timeout has passed
#: since its delivery *and* a restore sweep runs; by default the sweep scans every 10 s x 10 (the
#: throttle) = 100 s. A message of a worker killed hard therefore came back up to 100 s after the
#: timeout. One scan every 10 s bounds that to 10 s, for one SET NX (kombu's restore mutex) and a
#: ZRANGE BYSCORE on ``unacked_index`` per 10 s per worker (not per pool process): negligible even
#: for hundreds of workers. Lower is possible but gains little next to the visibility timeout
#: itself (3 minutes by default, see :func:`visibility_timeout_s`), which is what really decides;
#: that one is not shortened below the longest write, or a slow write would run twice at once.
#: (A throttle of 1
#: also makes a synchronous consumer, such as the reply queue of ``celery inspect``, scan on each
#: empty poll, about once a second while it waits: negligible as well.)
UNACKED_RESTORE_INTERVAL_S = 10
UNACKED_RESTORE_THROTTLE = 1


class IcefleetCelery(Celery):
    """A Celery app that carries the :class:`Settings` it was built from."""

    icefleet_settings: Settings


def task_time_limits(settings: Settings) -> dict[str, tuple[int, int]]:
    """Soft and hard time limit (seconds) of each task name that has icefleet-chosen limits."""
    write_soft = settings.write_timeout_s
    commit_soft = math.ceil(settings.lock_wait_s) + COMMIT_WORK_S
    limits = {
        WRITE_TASK: write_soft,
        COMMIT_TASK: commit_soft,
        SWEEP_TASK: commit_soft,
        CANARY_TASK: CANARY_SOFT_LIMIT_S,
        CANARY_CHECK_TASK: CANARY_SOFT_LIMIT_S,
    }
    return {name: (soft, soft + HARD_LIMIT_GRACE_S) for name, soft in limits.items()}


def task_annotations(settings: Settings) -> dict[str, dict[str, int]]:
    """``task_annotations``: each task's own limits, set on its class when the app binds it."""
    return {
        name: {"soft_time_limit": soft, "time_limit": hard}
        for name, (soft, hard) in task_time_limits(settings).items()
    }


def visibility_timeout_s(settings: Settings) -> int:
    """How long a delivered, unacknowledged message waits before it is delivered again.

    This is how long the batches of a writer killed outright (its main process: a killed pool
    process is seen at once) wait to be written by another, so it is kept as short as is safe:
    longer than a write task may run (its hard limit; twice the write timeout) and than any
    countdown a worker holds a message for (a write retry's backoff, a commit's interval), so a
    write is never delivered again while it runs. With the defaults: 2 x 60 s + 60 s = 180 s.

    Commit, sweep and canary tasks may run longer (a commit waits for its table's lock): one
    delivered again while it runs is harmless, as the copy waits for the lock and commits what
    is left, if anything, from the prepared record and the pending registry. They do not hold
    every killed writer's batches back for their limits (the commit's is 7 minutes).
    """
    limits = task_time_limits(settings)
    longest = max(
        2 * settings.write_timeout_s,
        limits[WRITE_TASK][1],
        math.ceil(WRITE_RETRY_MAX_BACKOFF_S),
        math.ceil(settings.commit_interval_ms / 1000),
        math.ceil(CANARY_CHECK_COUNTDOWN_S),
    )
    return longest + 60


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options: the visibility timeout and the restore sweep's pace."""
    return {
        "visibility_timeout": visibility_timeout_s(settings),
        "unacked_restore_interval": UNACKED_RESTORE_INTERVAL_S,
        "unacked_restore_throttle": UNACKED_RESTORE_THROTTLE,
    }


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
