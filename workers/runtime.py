"""What a worker process holds: one Redis client, one catalog, one BatchWriter, one Committer.

Built lazily on first use in the process that runs the tasks (a prefork child, not the parent
that forked it): a Redis connection or a SQLite/PostgreSQL engine inherited through ``fork`` would
be shared by two processes. The process id is checked on every access for the same reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import redis
from pyiceberg.catalog import Catalog

from common.commit.committer import Committer
from common.coord.backlog import Outstanding
from common.coord.deadletters import DeadLetterStore
from common.coord.locks import lock_factory
from common.coord.pending import PendingRegistry
from common.ingest.events import DeadLetter
from common.ingest.routing import Router
from common.lake.catalog import TableStore, open_catalog
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchWriter

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The per-process state of a worker; the catalog, writer and committer open on first use."""

    settings: Settings
    client: redis.Redis
    pid: int = field(default_factory=os.getpid)
    _catalog: Catalog | None = None
    _writer: BatchWriter | None = None
    _committer: Committer | None = None

    @property
    def dead_letters(self) -> DeadLetterStore:
        return DeadLetterStore(self.client)

    @property
    def outstanding(self) -> Outstanding:
        return Outstanding(self.client)

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = open_catalog(self.settings)
        return self._catalog

    @property
    def writer(self) -> BatchWriter:
        if self._writer is None:
            settings = self.settings
            self._writer = BatchWriter(
                settings,
                TableStore(self.catalog, lock_factory(self.client, settings)),
                Router(settings.routes, settings.namespace, settings.unrouted),
                # PendingRegistry has Registry's methods; Registry is a plain class, not a Protocol
                PendingRegistry(self.client),
                self._sink_dead_letters,
            )
        return self._writer

    @property
    def committer(self) -> Committer:
        if self._committer is None:
            self._committer = Committer(self.settings, self.catalog, self.client)
        return self._committer

    def _sink_dead_letters(self, letters: list[DeadLetter]) -> None:
        self.dead_letters.add(letters)
        logger.warning(
            "batch %s: %d event(s) dead-lettered, e.g. %s",
            letters[0].batch_id,
            len(letters),
            letters[0].reason,
        )


_runtime: Runtime | None = None


def runtime(app: Any = None) -> Runtime:
    """This process' runtime, built from the app's settings (or the environment) on first use."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = getattr(app, "icefleet_settings", None) or load_settings()
        client = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        _runtime = Runtime(settings, client)
        logger.info("worker runtime ready in process %d: %r", _runtime.pid, settings)
    return _runtime


def reset_runtime() -> None:
    """Forget this process' runtime (tests)."""
    global _runtime
    _runtime = None
