"""Time limits are per task: the write timeout limits the write task, and only it.

The Celery app is built in this process (no worker, no broker connection): what is checked is
the limit each task class carries once bound to the app, which is what a worker enforces
(``celery.worker.request``: the message's limits, else the task's).
"""

from __future__ import annotations

import pytest

from common.settings import Settings, load_settings
from common.wire import CANARY_CHECK_TASK, CANARY_TASK, COMMIT_TASK, SWEEP_TASK, WRITE_TASK
from workers.app import IcefleetCelery, create_app
from workers.limits import (
    COMMIT_WORK_S,
    HARD_LIMIT_GRACE_S,
    WRITE_RETRY_MAX_BACKOFF_S,
    task_time_limits,
    visibility_timeout_s,
)
from workers.tasks.maintenance import COMPACT_TABLE_TASK, EXPIRE_ALL_TASK, SOFT_LIMIT_S

pytestmark = pytest.mark.unit


def limits(app: IcefleetCelery, name: str) -> tuple[int | None, int | None]:
    app.finalize()
    task = app.tasks[name]
    return task.soft_time_limit, task.time_limit


def settings(**overrides: object) -> Settings:
    return load_settings({}, **overrides)


def test_a_tiny_write_timeout_limits_the_write_task_only() -> None:
    # Given a write timeout of one second
    app = create_app(settings(write_timeout_s=1, lock_wait_s=120.0))

    # When the app binds its tasks
    # Then the write task has that limit (hard: 30 s later) ...
    assert limits(app, WRITE_TASK) == (1, 1 + HARD_LIMIT_GRACE_S)
    # ... the commit tasks have their own: the lock wait plus the commit's budget
    commit = (120 + COMMIT_WORK_S, 120 + COMMIT_WORK_S + HARD_LIMIT_GRACE_S)
    assert limits(app, COMMIT_TASK) == commit
    assert limits(app, SWEEP_TASK) == commit
    # ... maintenance keeps its hour, the canary its minute
    assert limits(app, COMPACT_TABLE_TASK) == (SOFT_LIMIT_S, SOFT_LIMIT_S + 60)
    assert limits(app, EXPIRE_ALL_TASK) == (SOFT_LIMIT_S, SOFT_LIMIT_S + 60)
    assert limits(app, CANARY_TASK)[0] == limits(app, CANARY_CHECK_TASK)[0] == 60
    # ... and nothing is limited globally (a task without limits of its own runs unlimited)
    assert app.conf.task_soft_time_limit is None
    assert app.conf.task_time_limit is None


def test_commit_limits_do_not_follow_the_write_timeout() -> None:
    # Given two apps in one process whose write timeouts differ
    small = create_app(settings(write_timeout_s=2))
    large = create_app(settings(write_timeout_s=900))

    # Then each write task has its own app's limit, and the commit task the same in both
    assert limits(small, WRITE_TASK)[0] == 2
    assert limits(large, WRITE_TASK)[0] == 900
    assert limits(small, COMMIT_TASK) == limits(large, COMMIT_TASK)


@pytest.mark.parametrize("write_timeout_s", [1, 2, 60, 300, 3600])
def test_the_visibility_timeout_outlasts_every_write_and_every_held_countdown(
    write_timeout_s: int,
) -> None:
    # Given any write timeout
    s = settings(write_timeout_s=write_timeout_s, commit_interval_ms=5_000)

    # Then an unacknowledged write is delivered again only after its hard limit has passed (a
    # slow write never runs twice at once), and no message a worker holds for a countdown (a
    # write's retry backoff, a commit's interval) is delivered again while it waits
    visibility = visibility_timeout_s(s)
    hard = {name: limit[1] for name, limit in task_time_limits(s).items()}
    assert visibility > hard[WRITE_TASK] and visibility >= 2 * write_timeout_s
    assert visibility > WRITE_RETRY_MAX_BACKOFF_S + 30 and visibility > 5 + 30


def test_a_killed_writers_batches_wait_minutes_not_a_commits_limit() -> None:
    # Given a long lock wait (commit tasks may then run for many minutes)
    s = settings(lock_wait_s=600)
    # Then the visibility timeout, which a killed writer's batches wait out, does not follow the
    # commit task's limit: a commit delivered again waits for the lock and finds little to do
    assert task_time_limits(s)[COMMIT_TASK][1] > 900
    assert visibility_timeout_s(s) == 2 * 60 + 60


def test_defaults_keep_the_documented_visibility_timeout_and_restore_every_ten_seconds() -> None:
    # Given the default settings, When the app is configured
    app = create_app(settings())

    # Then the visibility timeout is 2 x the write timeout (60 s) + 60 s, as docs/operations.md says, and
    # kombu scans for expired unacknowledged messages every 10 s (not 10 s x its throttle of 10)
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 2 * 60 + 60
    assert options["unacked_restore_interval"] == 10
    assert options["unacked_restore_throttle"] == 1
