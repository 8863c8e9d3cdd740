"""icefleet's library: events, tables, the write path and the commit path. No Celery here.

Import what you need from the package (``from common import load_settings, BatchWriter``). Names
are resolved on first use, so a producer importing :class:`Producer` does not pay for pyarrow and
pyiceberg at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # configuration
    "Settings": "common.settings",
    "load_settings": "common.settings",
    # errors
    "IcefleetError": "common.errors",
    "ConfigError": "common.errors",
    "InvalidEventError": "common.errors",
    "InvalidIdentifierError": "common.errors",
    "CommitConflictError": "common.errors",
    "CommitStateUnknownError": "common.errors",
    "ConcurrentModificationError": "common.errors",
    "LockNotAcquiredError": "common.errors",
    "RetriesExhaustedError": "common.errors",
    # events and routing
    "Event": "common.ingest.events",
    "DeadLetter": "common.ingest.events",
    "parse_batch": "common.ingest.events",
    "encode_ndjson": "common.ingest.events",
    "Router": "common.ingest.routing",
    "TableName": "common.ingest.routing",
    # the write path
    "open_catalog": "common.lake.catalog",
    "TableStore": "common.lake.catalog",
    "BatchWriter": "common.write.batch_writer",
    "BatchResult": "common.write.batch_writer",
    # the commit path
    "Committer": "common.commit.committer",
    "CommitResult": "common.commit.committer",
    "committed_seq": "common.commit.committer",
    "PendingRegistry": "common.coord.pending",
    "TableLock": "common.coord.locks",
    "DeadLetterStore": "common.coord.deadletters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'common' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
