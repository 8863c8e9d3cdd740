"""How long each task may run, and when a message whose worker died is delivered again.

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
"""

from __future__ import annotations

import math
from typing import Any

from common.settings import Settings
from common.wire import CANARY_CHECK_TASK, CANARY_TASK, COMMIT_TASK, SWEEP_TASK, WRITE_TASK

SWEEP_INTERVAL_S = 5.0
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
