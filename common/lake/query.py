"""SQL over the catalog's tables: DataFusion, reading Iceberg through iceberg-rust (pyiceberg-core).

The engine embedded in ``icefleet query``. pyiceberg-core already gives the tests their
independent reader (``IcebergDataFusionTable``: iceberg-rust plans the scan from the table's
metadata, so deletes, schema evolution and partition pruning are the Rust implementation's, not
pyiceberg's); DataFusion adds SQL, joins and aggregates over Arrow without a server or a copy of
the data. DuckDB's iceberg extension would be the alternative, but it downloads the extension at
run time and is one more engine to trust.

Tables are registered under their catalog names, a schema per namespace: ``events.order_placed``
is typed as is. A part that is not a plain lowercase identifier (capitals, a dash) is quoted,
``"Sales"."Q1"``, as in any SQL; :func:`sql_name` writes names that way. Only the tables a query
mentions are loaded (a table whose name appears in the text), so a query costs one metadata read
per table it reads, not per table in the catalog. Queries are read-only: DDL, DML and ``SET``
statements are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyiceberg.catalog import Catalog

from common.errors import QueryError, TableNotFoundError

if TYPE_CHECKING:
    from datafusion import DataFrame, SessionContext

_PLAIN = re.compile(r"^[a-z_][a-z0-9_]*$")
_NOT_FOUND = re.compile(r"table '(?:datafusion\.)?(?:public\.)?([^']+)' not found")
# FileIO properties iceberg-rust reads; the catalog's own (its URI, a password) stay here
_FILE_IO_PREFIXES = ("s3.", "gcs.", "adls.", "oss.", "client.")


def sql_name(identifier: Iterable[str]) -> str:
    """``identifier`` as typed in a query: plain lowercase parts bare, others double-quoted."""
    return ".".join(
        part if _PLAIN.match(part) else '"' + part.replace('"', '""') + '"' for part in identifier
    )


def catalog_identifiers(catalog: Catalog) -> list[tuple[str, ...]]:
    """Every table of the catalog (one level of namespaces, as icefleet creates them)."""
    found: list[tuple[str, ...]] = []
    for namespace in catalog.list_namespaces():
        found.extend(tuple(identifier) for identifier in catalog.list_tables(namespace))
    return sorted(found)


def mentioned(sql: str, identifiers: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The tables whose name appears in ``sql`` as a word (case-insensitive): a superset of
    the tables it reads, cheap to find without parsing the SQL."""
    text = sql.lower()
    return [
        identifier
        for identifier in identifiers
        if re.search(rf"(?<![\w]){re.escape(identifier[-1].lower())}(?![\w])", text)
    ]


def file_io_properties(properties: Mapping[str, Any]) -> dict[str, str]:
    """The storage properties iceberg-rust needs, from pyiceberg's FileIO properties."""
    chosen = {
        str(k): str(v)
        for k, v in properties.items()
        if str(k).startswith(_FILE_IO_PREFIXES) and v is not None
    }
    if "s3.endpoint" in chosen:
        # An S3-compatible store (MinIO, R2, moto) behind an endpoint: address buckets by path,
        # as pyiceberg's pyarrow FileIO does; virtual-host style needs a DNS name per bucket.
        chosen.setdefault("s3.path-style-access", "true")
    return chosen


class QueryEngine:
    """A DataFusion session over the catalog's tables (see the module docstring)."""

    def __init__(self, catalog: Catalog) -> None:
        from datafusion import SessionContext

        self.catalog = catalog
        self.ctx: SessionContext = SessionContext()
        self._schemas: set[str] = set()
        self._registered: set[tuple[str, ...]] = set()

    def register(self, identifier: tuple[str, ...]) -> None:
        """Make the table ``identifier`` readable in SQL under :func:`sql_name`."""
        from pyiceberg_core.datafusion import IcebergDataFusionTable

        if identifier in self._registered:
            return
        table = self.catalog.load_table(identifier)
        namespace = sql_name(identifier[:-1])
        if namespace and namespace not in self._schemas:
            self.ctx.sql(f"CREATE SCHEMA IF NOT EXISTS {namespace}")
            self._schemas.add(namespace)
        provider = IcebergDataFusionTable(
            identifier=list(identifier),
            metadata_location=table.metadata_location,
            file_io_properties=file_io_properties(table.io.properties),
        )
        self.ctx.register_table(sql_name(identifier), provider)
        self._registered.add(identifier)

    def dataframe(self, sql: str) -> DataFrame:
        """Plan ``sql`` (read-only) over the tables it mentions; :class:`QueryError` if refused."""
        from datafusion import SQLOptions

        for identifier in mentioned(sql, catalog_identifiers(self.catalog)):
            self.register(identifier)
        options = SQLOptions().with_allow_ddl(False).with_allow_dml(False)
        try:
            return self.ctx.sql_with_options(sql, options.with_allow_statements(False))
        except Exception as exc:  # DataFusion raises ValueError/Exception with its reason
            raise query_error(exc) from None

    def run(self, sql: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The result's schema, and its rows as Arrow record batches streamed as DataFusion
        computes them (a failure while reading, a missing data file, is a :class:`QueryError`)."""
        frame = self.dataframe(sql)
        schema = frame.schema()

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for batch in frame.execute_stream():
                    yield batch.to_pyarrow()
            except Exception as exc:
                raise query_error(exc) from None

        return schema, batches()


def query_error(exc: BaseException) -> QueryError | TableNotFoundError:
    """DataFusion's reason as one of ours: a missing table names the table."""
    text = " ".join(str(exc).split())
    missing = _NOT_FOUND.search(text)
    if missing:
        return TableNotFoundError(missing.group(1))
    return QueryError(f"query failed: {text}")
