"""The Iceberg catalog: which one, and the event tables in it.

``ICEFLEET_CATALOG`` names a catalog configured the pyiceberg way (``.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__<NAME>__*``). The configuration is read when :func:`open_catalog` is called,
not at import (pyiceberg's own module-level config would miss variables set later). With no name,
the embedded default is a SQLite catalog with a local warehouse under ``ICEFLEET_HOME``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass

from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.utils.config import Config

from common.errors import ConfigError
from common.ingest.routing import TableName
from common.redaction import REDACTED, is_secret_name, redact_mapping, redact_text
from common.schema.evolution import EvolutionReport, SchemaChange, apply_compatible, compare_schemas
from common.schema.layout import base_schema, day_partition_spec
from common.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_CATALOG_NAME = "icefleet"
# Properties every event table is created with. Metadata pruning keeps the metadata folder from
# growing by one file per commit forever; zstd is the codec our writer uses too.
TABLE_PROPERTIES = {
    "format-version": "2",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "write.parquet.compression-codec": "zstd",
}


def open_catalog(settings: Settings) -> Catalog:
    """The configured catalog, or the embedded SQLite one under ``settings.home``."""
    if settings.catalog_name is None:
        home = settings.home.resolve()
        warehouse = home / "warehouse"
        warehouse.mkdir(parents=True, exist_ok=True)
        return load_catalog(
            DEFAULT_CATALOG_NAME,
            type="sql",
            uri=f"sqlite:///{home / 'catalog.db'}",
            warehouse=warehouse.as_uri(),
        )
    conf = Config().get_catalog_config(settings.catalog_name)
    if not conf:
        raise ConfigError(
            "ICEFLEET_CATALOG",
            settings.catalog_name,
            "the name of a catalog configured in .pyiceberg.yaml or with "
            f"PYICEBERG_CATALOG__{settings.catalog_name.upper()}__TYPE (and __URI, __WAREHOUSE...)",
        )
    try:
        # Pass the configuration read just now: pyiceberg's own copy was read at its import.
        properties = {str(k): v for k, v in conf.items() if isinstance(v, str)}
        return load_catalog(settings.catalog_name, **properties)
    except Exception as exc:  # pyiceberg raises ValueError, KeyError, driver errors...
        shown = redact_mapping({str(k): v for k, v in conf.items()})
        detail = redact_text(str(exc))
        for key, value in conf.items():
            if is_secret_name(str(key)) and isinstance(value, str) and value:
                detail = detail.replace(value, REDACTED)
        raise ConfigError(
            "ICEFLEET_CATALOG",
            settings.catalog_name,
            f"a loadable catalog; loading it with {shown} failed: "
            f"{type(exc).__name__}: {detail[:300]}",
        ) from None


LockFactory = Callable[[str], AbstractContextManager[object]]


def catalog_tables(catalog: Catalog) -> list[str]:
    """Every ``namespace.table`` in the catalog (one level of namespaces, as icefleet creates)."""
    names = []
    for namespace in catalog.list_namespaces():
        for identifier in catalog.list_tables(namespace):
            names.append(".".join(identifier))
    return sorted(names)


@dataclass
class _Cached:
    table: Table
    loaded_at: float


class TableStore:
    """Loads, creates and evolves event tables; caches loaded tables per process.

    Writers only need a table's schema, spec, location and FileIO, which change rarely, so a
    loaded table is reused for ``ttl_s``. Anything that changes the catalog happens under the
    table lock given by ``lock_for`` and re-reads the table first.
    """

    def __init__(self, catalog: Catalog, lock_for: LockFactory, ttl_s: float = 30.0) -> None:
        self.catalog = catalog
        self._lock_for = lock_for
        self._ttl_s = ttl_s
        self._cache: dict[TableName, _Cached] = {}

    def load(self, name: TableName, *, fresh: bool = False) -> Table | None:
        """The table, or None if it does not exist."""
        cached = self._cache.get(name)
        if cached and not fresh and time.monotonic() - cached.loaded_at < self._ttl_s:
            return cached.table
        if not self.catalog.table_exists(name.parts):
            self._cache.pop(name, None)
            return None
        table = self.catalog.load_table(name.parts)
        self._cache[name] = _Cached(table, time.monotonic())
        return table

    def forget(self, name: TableName) -> None:
        self._cache.pop(name, None)

    def ensure(
        self,
        name: TableName,
        desired: Callable[[Table | None, Schema], Schema],
        *,
        evolve: bool = True,
    ) -> Table:
        """Load or create ``name`` so that it has the columns ``desired`` asks for.

        ``desired(table, schema)`` returns the schema the table should have (placeholder ids for
        what is new); it is called again on the fresh table under the lock, so concurrent writers
        evolving one table apply each change once, serialised, and never lose one. Only the
        compatible changes are applied (see :mod:`common.schema.evolution`). With ``evolve=False`` an
        existing table is used as it is.
        """
        table = self.load(name)
        if table is not None and (not evolve or not _pending_changes(table, desired)):
            return table
        with self._lock_for(str(name)):
            table = self.load(name, fresh=True)
            if table is None:
                table = self._create(name, desired(None, base_schema()))
            elif evolve and (changes := _pending_changes(table, desired)):
                apply_compatible(table, EvolutionReport(changes), desired(table, table.schema()))
                logger.info("%s: schema evolved: %s", name, "; ".join(map(str, changes)))
                table = self.catalog.load_table(name.parts)
            self._cache[name] = _Cached(table, time.monotonic())
            return table

    def _create(self, name: TableName, schema: Schema) -> Table:
        with suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace(name.namespace)
        # pyiceberg assigns fresh field ids and finds the spec's source column by its id in
        # `schema`: placeholder ids must be unique first (nested ones repeat top-level ids, and
        # `time` would then resolve to e.g. `data.viewport.width`).
        schema = assign_fresh_schema_ids(schema)
        try:
            table = self.catalog.create_table(
                name.parts,
                schema=schema,
                partition_spec=day_partition_spec(schema),
                properties=TABLE_PROPERTIES,
            )
            logger.info("created table %s", name)
            return table
        except TableAlreadyExistsError:
            # Created by a process that does not take our lock (another tool): use it.
            return self.catalog.load_table(name.parts)


def _pending_changes(
    table: Table, desired: Callable[[Table | None, Schema], Schema]
) -> list[SchemaChange]:
    """The compatible changes that would bring ``table`` to what ``desired`` asks for."""
    report = compare_schemas(table.schema(), desired(table, table.schema()), match_by="name")
    return [c for c in report.changes if c.compatible]


#: Imported lazily by pyiceberg and SQLAlchemy on first use (the catalog backend, its dialect and
#: driver, the file IO). :func:`preload_catalog_modules` imports them up front.
LAZY_MODULES = (
    "pyiceberg.catalog.sql",
    "pyiceberg.catalog.rest",
    "pyiceberg.io.pyarrow",
    "sqlalchemy.dialects.sqlite.pysqlite",
    "sqlalchemy.dialects.postgresql.psycopg2",
    "psycopg2",
)


def preload_catalog_modules() -> list[str]:
    """Import what the catalog would import on first use; return the modules that are missing.

    A worker calls this before it takes a task: Celery's soft time limit raises its exception
    wherever the task is, and one raised inside a first ``import`` leaves the package half
    initialised in that process (seen under load: ``module 'sqlalchemy' has no attribute
    'dialects'`` on every later attempt, until the batch was dead-lettered).
    """
    import importlib

    missing = []
    for name in LAZY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing
