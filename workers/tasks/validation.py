"""Continuous validation: the beat's sampled deep verify (common/maintenance/sampling.py).

Every ``ICEFLEET_VERIFY_INTERVAL`` (10m) beat sends ``icefleet.validation.verify_sample``: up to
``ICEFLEET_VERIFY_SAMPLE_FILES`` live files, rotating through the tables, read with every page's
checksum checked and their statistics compared with the manifests. It runs on the ``ingest``
queue, like the canary: it only reads, and must not hold the committer (one task at a time) for
the seconds a deep read takes. Acknowledged when it starts: a lost run is redone by the next.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Task, shared_task

from common.settings import Settings
from common.wire import INGEST_QUEUE, VERIFY_SAMPLE_TASK

SOFT_LIMIT_S = 900


@shared_task(
    name=VERIFY_SAMPLE_TASK,
    bind=True,
    acks_late=False,
    ignore_result=True,
    soft_time_limit=SOFT_LIMIT_S,
    time_limit=SOFT_LIMIT_S + 60,
)
def verify_sample(self: Task) -> dict[str, Any]:
    """Deep-verify the next few files of the rotation."""
    from common.maintenance.sampling import sample_verify
    from workers.tasks.maintenance import maintainer

    m = maintainer(self.app)
    run = sample_verify(m.client, m.table_names(), m.load, m.settings.verify_sample_files)
    return asdict(run)


def validation_schedule(settings: Settings) -> dict[str, Any]:
    """The beat entry of the sampled validation."""
    every_s = settings.verify_interval_s
    return {
        "validation-verify-sample": {
            "task": VERIFY_SAMPLE_TASK,
            "schedule": every_s,
            "options": {"queue": INGEST_QUEUE, "expires": every_s},
        }
    }


__all__ = ["VERIFY_SAMPLE_TASK", "validation_schedule", "verify_sample"]
