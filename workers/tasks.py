"""Every icefleet task, registered with any Celery app that imports this module.

``write_batch`` (queue ``ingest``) lives in :mod:`workers.writer`; ``commit_table`` and the sweep
``commit_all`` (queue ``commit``) in :mod:`workers.committer`.
"""

from __future__ import annotations

from workers.committer import commit_all, commit_table
from workers.writer import write_batch

__all__ = ["commit_all", "commit_table", "write_batch"]
