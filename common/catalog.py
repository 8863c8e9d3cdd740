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
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import IcebergType, NestedField, StructType
from pyiceberg.utils.config import Config

from common.errors import ConfigError
from common.redaction import REDACTED, is_secret_name, redact_mapping, redact_text
from common.routing import TableName
from common.schema import DATA, base_schema, data_struct, day_partition_spec
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
        new_fields: Callable[[Schema], dict[str, IcebergType]],
        *,
        evolve: bool = True,
    ) -> Table:
        """Load or create ``name`` so that it has every ``data`` field ``new_fields`` asks for.

        ``new_fields(schema)`` returns the fields missing from a schema; it is called again on the
        fresh table under the lock, so concurrent writers evolving the same table add each field
        once and never lose one. With ``evolve=False`` an existing table is used as it is.
        """
        table = self.load(name)
        if table is not None and (not evolve or not new_fields(table.schema())):
            return table
        with self._lock_for(str(name)):
            table = self.load(name, fresh=True)
            if table is None:
                table = self._create(name, new_fields(base_schema()))
            elif evolve:
                missing = new_fields(table.schema())
                if missing:
                    table = self._add_data_fields(table, missing)
            self._cache[name] = _Cached(table, time.monotonic())
            return table

    def _create(self, name: TableName, fields: dict[str, IcebergType]) -> Table:
        with suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace(name.namespace)
        schema = base_schema()
        if fields:
            schema = _with_data_struct(schema, fields)
        try:
            table = self.catalog.create_table(
                name.parts,
                schema=schema,
                partition_spec=day_partition_spec(schema),
                properties=TABLE_PROPERTIES,
            )
            logger.info("created table %s with %d data columns", name, len(fields))
            return table
        except TableAlreadyExistsError:
            # Created by a process that does not take our lock (another tool): use it.
            return self.catalog.load_table(name.parts)

    def _add_data_fields(self, table: Table, fields: dict[str, IcebergType]) -> Table:
        with table.update_schema() as update:
            if data_struct(table.schema()) is None:
                update.add_column(DATA, _struct_of(fields))
            else:
                for key, field_type in fields.items():
                    update.add_column((DATA, key), field_type)
        logger.info("added %d data column(s) to %s: %s", len(fields), table.name(), list(fields))
        return table


def _struct_of(fields: dict[str, IcebergType]) -> StructType:
    # Field ids here are placeholders: pyiceberg assigns fresh ones when the struct is added.
    return StructType(
        *(
            NestedField(i, key, field_type, required=False)
            for i, (key, field_type) in enumerate(fields.items(), start=1)
        )
    )


def _with_data_struct(schema: Schema, fields: dict[str, IcebergType]) -> Schema:
    next_id = schema.highest_field_id + 2
    struct = StructType(
        *(
            NestedField(next_id + i, key, field_type, required=False)
            for i, (key, field_type) in enumerate(fields.items())
        )
    )
    return Schema(
        *schema.fields, NestedField(schema.highest_field_id + 1, DATA, struct, required=False)
    )
