"""Every icefleet task, registered with any Celery app that imports this module.

``write_batch`` (queue ``ingest``) lives in :mod:`workers.tasks.write`; ``commit_table`` and the sweep
``commit_all`` (queue ``commit``) in :mod:`workers.tasks.commit`; the sampled validation in
:mod:`workers.tasks.validation`.
"""

from __future__ import annotations

from workers.tasks import canary, maintenance, validation
from workers.tasks.commit import commit_all, commit_table
from workers.tasks.write import write_batch

__all__ = [
    "canary",
    "commit_all",
    "commit_table",
    "maintenance",
    "validation",
    "write_batch",
]
