"""Typed settings, read once from ``ICEFLEET_*`` environment variables by :func:`load_settings`.

Nothing is read at import: tests and workers build a :class:`Settings` explicitly (from
``os.environ`` or a mapping of their own), so no global needs patching. Every invalid value raises
:class:`~common.errors.ConfigError` naming the variable and what it accepts.

The catalog is not configured here but the pyiceberg way (``.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__<NAME>__*``); ``ICEFLEET_CATALOG`` only names which catalog to use. With no
name, the embedded default is a SQLite catalog and a local warehouse under ``ICEFLEET_HOME``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from common.coord.budget import Budget
from common.errors import ConfigError, InvalidIdentifierError
from common.redaction import REDACTED, redact_url

ENV_PREFIX = "ICEFLEET_"
SchemaMode = Literal["evolve", "strict", "raw"]
AckDurability = Literal["redis", "fsync"]
ACK_DURABILITIES: tuple[AckDurability, ...] = ("redis", "fsync")
SCHEMA_MODES: tuple[SchemaMode, ...] = ("evolve", "strict", "raw")
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "none")
HotPath = Literal["compiled", "reference"]
HOT_PATHS: tuple[HotPath, ...] = ("compiled", "reference")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Events whose ``type`` matches ``pattern`` (fnmatch syntax) go to ``table`` (``ns.name``)."""

    pattern: str
    table: str


@dataclass(frozen=True)
class Settings:
    """Everything icefleet reads from its environment. Units are in the names."""

    home: Path = Path(".icefleet")
    """Where the embedded defaults live (relative to the working directory): the SQLite catalog, the local warehouse, and for
    ``icefleet demo`` and ``icefleet up`` the files of their ``redis-server`` and the logs."""
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    """The Celery broker and all of icefleet's coordination (pending batches, locks, dead
    letters)."""
    catalog_name: str | None = None
    """Name of a pyiceberg catalog (``.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__*``);
    unset: the embedded SQLite catalog with a local warehouse under ``ICEFLEET_HOME``."""
    namespace: str = "events"
    """Namespace of the tables routed by event ``type`` when no ``ICEFLEET_ROUTES`` rule matches."""
    routes: tuple[Route, ...] = ()
    """Routing rules tried before the default, first match wins: ``com.github.*=github.events``
    sends every event whose type matches the fnmatch pattern to that table."""
    unrouted: str = "by-type"
    """Where events whose type matches no ``ICEFLEET_ROUTES`` rule go: ``by-type``, a table
    named after the type (any client can then create tables); ``dead-letter``, the dead-letter
    store with the reason; or one ``namespace.table`` for them all."""
    max_tables: int = 1_000
    """Writers create no table past this many in the catalog: the events of a new table beyond
    it are dead-lettered, the reason naming this variable and ``ICEFLEET_UNROUTED``."""
    max_event_bytes: int = 1_048_576
    """Events larger than this many bytes, as received, are dead-lettered with the reason."""
    batch_max_events: int = 10_000
    """The producer cuts what it is given into batches of at most this many events (part ids
    ``<id>~p<n>``); writers write a batch in chunks of half of it."""
    batch_max_bytes: int = 8_388_608
    """... and of at most this many bytes of NDJSON."""
    row_group_rows: int = 100_000
    """Rows per Parquet row group, honoured exactly."""
    compression: str = "zstd"
    """Parquet compression codec of the data files writers write."""
    hot_path: HotPath = "compiled"
    """``compiled``: batches that fit an existing table exactly are parsed, checked and projected
    by Arrow's JSON reader (common/write/compiled.py), anything else by the reference path;
    ``reference``: every batch by the reference path (to rule the compiled one out)."""
    commit_interval_ms: int = 1_000
    """A table is committed once its oldest pending batch, or its last commit, is this old (a
    table quiet for this long commits a new batch at once; later batches wait for this long
    since that commit and go together, so no batch waits longer) ..."""
    commit_max_files: int = 1_000
    """... or once this many files are pending (also the most files of one snapshot) ..."""
    commit_max_bytes: int = 1_073_741_824
    """... or this many bytes. At least ``ICEFLEET_BATCH_MAX_BYTES``."""
    commit_attempts: int = 8
    """Attempts of one catalog commit on a conflict or an unknown outcome (the watermark is
    re-read before each)."""
    commit_concurrency: int = 1
    """Processes of a committer worker (``icefleet worker committer``, ``demo``, ``up``): each
    commits one table at a time, under the table's lock, so different tables commit in
    parallel (a batch for 200 tables is 200 commits)."""
    retry_base_ms: int = 100
    """Base of the commit retries' exponential backoff with jitter; it also scales the storage and
    catalog retry policies (the default, 100, gives their own pauses)."""
    lock_ttl_ms: int = 30_000
    """Lease of a table lock: renewed while held, freed this long after its owner died."""
    lock_wait_s: float = 120.0
    """How long a commit or maintenance run waits for a table's lock (a commit task's time limit
    is this plus five minutes)."""
    dedup_window_s: int = 7 * 24 * 3600
    """How long icefleet remembers what landed: committed batch ids (the same id sent again lands
    once), what each batch id is bound to (the same id with other events is refused) and event
    identities (an event whose ``source`` and ``id`` landed in its table is not written again);
    docs/exactly-once.md."""
    dedupe: bool = True
    """Exactly once per CloudEvent: an event whose ``(source, id)`` landed or is pending in its
    table within the dedup window is not written again (same bytes: counted; other bytes:
    dead-lettered). ``off`` for producers that reuse ids on purpose; per table in
    ``ICEFLEET_DEDUPE_TABLES``."""
    dedupe_tables: tuple[tuple[str, bool], ...] = ()
    """Per-table dedupe, overriding ``ICEFLEET_DEDUPE``: ``ns.table=on|off`` pairs."""
    schema_mode: SchemaMode = "evolve"
    """Schema mode of every table without its own: ``evolve`` (new ``data`` fields become new
    columns), ``strict`` (events that do not fit are dead-lettered), ``raw`` (envelope and
    ``raw_event`` only)."""
    schema_modes: tuple[tuple[str, SchemaMode], ...] = ()
    """Per-table schema modes, e.g. ``events.orders=strict,events.logs=raw``."""
    max_columns: int = 1_000
    """A table grows no typed column beyond this many leaf columns; further values are rescued
    (``_rescued_data``)."""
    max_depth: int = 8
    """``data`` nested deeper than this is not typed but rescued."""
    write_timeout_s: int = 60  # a 10,000-event batch takes well under a second; see workers/app.py
    """A write task's soft time limit: a batch that would take longer is split and its rest sent
    again as a child batch. Also sets the visibility timeout (twice this plus 60 s)."""
    resend_after_s: float = 0.0  # 0: the visibility timeout + 60 s (common/coord/resend.py)
    """The sweep sends a batch again from the producer's copy when it has been outstanding this
    long while the ingest queue is empty (its message was lost). ``0``: the visibility timeout
    plus 60 s."""
    log_level: str = "INFO"
    """Level of icefleet's logs."""
    # backpressure and durability (common/coord/budget.py, common/coord/redis_memory.py)
    budget_max_bytes: int = 0  # 0: 1/16 of the machine's memory, at least 64 MiB
    """Fleet-wide budget of work not yet written, in bytes of packed (zstd) payload: past it
    producers are refused (the gateway answers 429 with ``Retry-After``). Redis holds about 2.7
    bytes per budget byte (message and copy). ``0``: 1/16 of this machine's memory, at least 64
    MiB; set the same value on every host."""
    budget_max_batches: int = 0  # 0: one per 64 KiB of the byte budget, at least 1,000
    """... and in batches not yet written (each costs Redis 3 to 6 KiB besides its payload).
    ``0``: one per 64 KiB of ``ICEFLEET_BUDGET_MAX_BYTES``, at least 1,000."""
    ack_durability: AckDurability = "redis"
    """What an acknowledgement (the producer's return, the gateway's 202) promises: ``redis``,
    the batch is in Redis (with AOF ``everysec`` a host crash can lose up to a second of
    acknowledged batches); ``fsync``, it is in Redis' AOF on disk (needs ``appendfsync
    always``, which ``icefleet up`` then sets on its Redis; checked at start)."""
    # HTTP ingest, metrics, canary, log format (workers/gateway.py, canary.py, common/observe/logs.py)
    http_max_body_bytes: int = 10_485_760
    """The gateway refuses larger request bodies (413), while reading them."""
    flower_basic_auth: str | None = field(default=None, repr=False)
    """``user:password`` that ``icefleet up --flower`` requires of Flower's visitors (its task
    pages show batch ids and tracebacks); unset: a random password, printed once at start."""
    http_token: str | None = None  # a secret: never shown by __repr__
    """Bearer token the gateway requires on ``POST /events`` and ``GET /metrics``; unset: anyone
    may post (and the gateway logs a warning)."""
    metrics_port: int | None = None
    """Port of a process' Prometheus metrics; a writer's prefork child *n* uses this plus *n*.
    Unset: no metrics server (the gateway still serves ``/metrics`` on its HTTP port)."""
    canary_interval_s: float = 300.0  # 0: no canary
    """Every this many seconds beat sends a probe event to ``icefleet.canary`` and times it until
    a scan shows it. ``0`` turns the canary off."""
    log_format: str = "text"
    """``text``, or ``json``: one JSON object per line with ``batch_id`` and ``table``."""
    # table maintenance (common/maintenance/compaction.py, expiry.py, orphans.py; workers/tasks/maintenance.py)
    compact_target_file_size_bytes: int = 134_217_728
    """Size of the files compaction writes."""
    compact_small_file_fraction: float = 0.75
    """A file smaller than this fraction of the target size is small, a compaction candidate."""
    compact_min_files: int = 5
    """A partition is compacted when it has at least this many small files."""
    compact_trigger_files: int = 50
    """The scheduled compaction takes up a table once it has this many small files."""
    expire_older_than_s: float = 900.0
    """Scheduled expiry (and the CLI's default) expires snapshots older than this ..."""
    expire_retain_last: int = 100
    """... keeping at least this many of the newest."""
    orphan_min_age_s: float = 3 * 86_400.0
    """Orphan removal keeps files younger than this (a write in flight looks like an orphan)."""
    maintenance_compact_interval_s: float = 600.0
    """How often beat runs the scheduled compaction."""
    maintenance_expire_interval_s: float = 300.0
    """How often beat runs the scheduled snapshot expiry."""
    maintenance_orphans_interval_s: float = 86_400.0
    """How often beat runs the scheduled orphan removal."""
    # data integrity (common/lake/integrity.py, uploads.py; common/maintenance/sampling.py)
    page_checksums: bool = True
    """Every page of every Parquet file icefleet writes carries its CRC, which icefleet's own
    reads (compaction, deletes, ``verify --deep``) check; ``off`` only to measure its cost."""
    s3_checksum: str = "crc32c"
    """Data files uploaded to S3-compatible storage carry this additional checksum, computed from
    the bytes written, which the store verifies on receipt; ``off``: uploaded through the
    table's FileIO without one."""
    verify_interval_s: float = 600.0
    """How often beat runs the sampled deep verify (continuous validation)."""
    verify_sample_files: int = 20
    """How many live files each sampled deep verify reads, rotating through the tables."""

    def __repr__(self) -> str:
        hidden = ("redis_url", "http_token", "flower_basic_auth")
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in hidden
        )
        token = None if self.http_token is None else REDACTED
        return f"Settings(redis_url={redact_url(self.redis_url)!r}, http_token={token!r}, {shown})"

    @property
    def budget(self) -> Budget:
        """The budget of work not yet written, ``0`` settings sized from this machine's memory."""
        return Budget.sized(self.budget_max_bytes, self.budget_max_batches)

    @property
    def warehouse_dir(self) -> Path:
        """Where the embedded default keeps data files."""
        return self.home / "warehouse"

    def mode_for(self, table: str) -> SchemaMode:
        """The schema mode of a table: its own override, else the default."""
        for name, mode in self.schema_modes:
            if name == table:
                return mode
        return self.schema_mode

    def dedupe_for(self, table: str) -> bool:
        """Whether events of a table are deduplicated by (source, id): its own override, else
        the default."""
        for name, on in self.dedupe_tables:
            if name == table:
                return on
        return self.dedupe


# --- value parsers: each raises ValueError with what the variable accepts ------------------------


def _positive_int(raw: str) -> int:
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError("a positive whole number, e.g. 1000") from None
    if value <= 0:
        raise ValueError("a positive whole number, e.g. 1000")
    return value


def _size_or_auto(raw: str) -> int:
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError("a whole number, e.g. 536870912, or 0 for the automatic size") from None
    if value < 0:
        raise ValueError("a whole number, e.g. 536870912, or 0 for the automatic size")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a positive number of seconds, e.g. 30 or 0.5") from None
    if not value > 0:
        raise ValueError("a positive number of seconds, e.g. 30 or 0.5")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError("one of " + ", ".join(options))
        return value

    return parse


def _identifier_part(raw: str) -> str:
    if not _IDENT.match(raw):
        raise ValueError(
            "a lowercase name of letters, digits and _ (at most 63, not starting with a digit)"
        )
    return raw


def _table_name(raw: str) -> str:
    parts = raw.strip().split(".")
    if len(parts) != 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError("table names as namespace.table, each part lowercase [a-z0-9_]")
    return raw.strip()


def _routes(raw: str) -> tuple[Route, ...]:
    routes = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        pattern, sep, table = item.partition("=")
        if not sep or not pattern.strip():
            raise ValueError(
                "comma-separated PATTERN=namespace.table rules, e.g. 'com.github.*=github.events'"
            )
        routes.append(Route(pattern.strip(), _table_name(table)))
    return tuple(routes)


def _unrouted(raw: str) -> str:
    value = raw.strip()
    if value in ("by-type", "dead-letter"):
        return value
    try:
        return _table_name(value)
    except ValueError:
        raise ValueError(
            "by-type, dead-letter, or one namespace.table (lowercase [a-z0-9_])"
        ) from None


def _schema_modes(raw: str) -> tuple[tuple[str, SchemaMode], ...]:
    out: list[tuple[str, SchemaMode]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        table, sep, mode = item.partition("=")
        if not sep or mode.strip().lower() not in SCHEMA_MODES:
            raise ValueError(
                "comma-separated namespace.table=MODE pairs, MODE one of evolve, strict, raw"
            )
        out.append((_table_name(table), mode.strip().lower()))  # type: ignore[arg-type]
    return tuple(out)


def _dedupe_tables(raw: str) -> tuple[tuple[str, bool], ...]:
    out: list[tuple[str, bool]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        table, sep, switch = item.partition("=")
        if not sep or switch.strip().lower() not in ("on", "off"):
            raise ValueError("comma-separated namespace.table=on|off pairs, e.g. 'events.ping=off'")
        out.append((_table_name(table), switch.strip().lower() == "on"))
    return tuple(out)


def _redis_url(raw: str) -> str:
    accepts = "a Redis URL such as redis://127.0.0.1:6379/0 (or rediss://, unix://)"
    if not re.match(r"^(redis|rediss|unix)://", raw):
        raise ValueError(accepts)
    if re.search(r"[?&]password=", raw):
        # kombu, the broker's client, fails on it with a bare TypeError
        raise ValueError(
            "a Redis URL with the password in its user part, redis://:PASSWORD@host:port/db, "
            "not as ?password= (which the Celery broker cannot read)"
        )
    if raw.startswith("unix://"):
        return raw
    # Checked here, not when the first command connects: redis-py would raise a bare ValueError
    # there, deep in a traceback ("Port could not be cast to integer value").
    try:
        port = urlsplit(raw).port
    except ValueError:
        raise ValueError(f"{accepts}; its port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(f"{accepts}; its port is not a number from 1 to 65535")
    return raw


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("a non-empty value")
    return raw.strip()


def _basic_auth(raw: str) -> str:
    user, sep, password = raw.partition(":")
    if not sep or not user or not password or "," in raw:
        raise ValueError("user:password, both non-empty (one pair)")
    return raw


def _log_level(raw: str) -> str:
    return _choice(("debug", "info", "warning", "error"))(raw).upper()


def _port(raw: str) -> int:
    value = _positive_int(raw)
    if value > 65_535:
        raise ValueError("a TCP port number, 1 to 65535")
    return value


def _seconds_or_off(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a number of seconds, e.g. 300, or 0 to turn it off") from None
    if not value >= 0:
        raise ValueError("a number of seconds, e.g. 300, or 0 to turn it off")
    return value


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a fraction above 0 and at most 1, e.g. 0.75") from None
    if not 0 < value <= 1:
        raise ValueError("a fraction above 0 and at most 1, e.g. 0.75")
    return value


def _min_files(raw: str) -> int:
    value = _positive_int(raw)
    if value < 2:
        raise ValueError("a whole number of at least 2 (one file alone is not compacted)")
    return value


def _on_off(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError("on or off (also true/false, 1/0, yes/no)")


def _duration_s(raw: str) -> float:
    from common.durations import parse_duration_s

    return parse_duration_s(raw)


def _positive_duration_s(raw: str) -> float:
    value = _duration_s(raw)
    if value <= 0:
        raise ValueError("a positive duration such as 10m, 1h or 1d")
    return value


# variable suffix -> (settings field, parser, secret?)
_VARIABLES: dict[str, tuple[str, Callable[[str], Any], bool]] = {
    "HOME": ("home", lambda raw: Path(_nonempty(raw)), False),
    "REDIS_URL": ("redis_url", _redis_url, True),
    "CATALOG": ("catalog_name", _nonempty, False),
    "NAMESPACE": ("namespace", _identifier_part, False),
    "ROUTES": ("routes", _routes, False),
    "UNROUTED": ("unrouted", _unrouted, False),
    "MAX_TABLES": ("max_tables", _positive_int, False),
    "MAX_EVENT_BYTES": ("max_event_bytes", _positive_int, False),
    "BATCH_MAX_EVENTS": ("batch_max_events", _positive_int, False),
    "BATCH_MAX_BYTES": ("batch_max_bytes", _positive_int, False),
    "ROW_GROUP_ROWS": ("row_group_rows", _positive_int, False),
    "COMPRESSION": ("compression", _choice(COMPRESSIONS), False),
    "HOT_PATH": ("hot_path", _choice(HOT_PATHS), False),
    "COMMIT_INTERVAL_MS": ("commit_interval_ms", _positive_int, False),
    "COMMIT_MAX_FILES": ("commit_max_files", _positive_int, False),
    "COMMIT_MAX_BYTES": ("commit_max_bytes", _positive_int, False),
    "COMMIT_ATTEMPTS": ("commit_attempts", _positive_int, False),
    "COMMIT_CONCURRENCY": ("commit_concurrency", _positive_int, False),
    "RETRY_BASE_MS": ("retry_base_ms", _positive_int, False),
    "LOCK_TTL_MS": ("lock_ttl_ms", _positive_int, False),
    "LOCK_WAIT_S": ("lock_wait_s", _positive_float, False),
    "DEDUP_WINDOW_S": ("dedup_window_s", _positive_int, False),
    "DEDUPE": ("dedupe", _on_off, False),
    "DEDUPE_TABLES": ("dedupe_tables", _dedupe_tables, False),
    "SCHEMA_MODE": ("schema_mode", _choice(SCHEMA_MODES), False),
    "SCHEMA_MODES": ("schema_modes", _schema_modes, False),
    "MAX_COLUMNS": ("max_columns", _positive_int, False),
    "MAX_DEPTH": ("max_depth", _positive_int, False),
    "WRITE_TIMEOUT_S": ("write_timeout_s", _positive_int, False),
    "RESEND_AFTER": ("resend_after_s", _duration_s, False),
    "LOG_LEVEL": ("log_level", _log_level, False),
    "BUDGET_MAX_BYTES": ("budget_max_bytes", _size_or_auto, False),
    "BUDGET_MAX_BATCHES": ("budget_max_batches", _size_or_auto, False),
    "ACK_DURABILITY": ("ack_durability", _choice(ACK_DURABILITIES), False),
    "HTTP_MAX_BODY_BYTES": ("http_max_body_bytes", _positive_int, False),
    "HTTP_TOKEN": ("http_token", _nonempty, True),
    "FLOWER_BASIC_AUTH": ("flower_basic_auth", _basic_auth, True),
    "METRICS_PORT": ("metrics_port", _port, False),
    "CANARY_INTERVAL_S": ("canary_interval_s", _seconds_or_off, False),
    "LOG_FORMAT": ("log_format", _choice(("json", "text")), False),
    "COMPACT_TARGET_FILE_SIZE_BYTES": ("compact_target_file_size_bytes", _positive_int, False),
    "COMPACT_SMALL_FILE_FRACTION": ("compact_small_file_fraction", _fraction, False),
    "COMPACT_MIN_FILES": ("compact_min_files", _min_files, False),
    "COMPACT_TRIGGER_FILES": ("compact_trigger_files", _min_files, False),
    "EXPIRE_OLDER_THAN": ("expire_older_than_s", _duration_s, False),
    "EXPIRE_RETAIN_LAST": ("expire_retain_last", _positive_int, False),
    "ORPHAN_MIN_AGE": ("orphan_min_age_s", _duration_s, False),
    "MAINTENANCE_COMPACT_INTERVAL": ("maintenance_compact_interval_s", _positive_duration_s, False),
    "MAINTENANCE_EXPIRE_INTERVAL": ("maintenance_expire_interval_s", _positive_duration_s, False),
    "MAINTENANCE_ORPHANS_INTERVAL": ("maintenance_orphans_interval_s", _positive_duration_s, False),
    "PAGE_CHECKSUMS": ("page_checksums", _on_off, False),
    "S3_CHECKSUM": ("s3_checksum", _choice(("crc32c", "off")), False),
    "VERIFY_INTERVAL": ("verify_interval_s", _positive_duration_s, False),
    "VERIFY_SAMPLE_FILES": ("verify_sample_files", _positive_int, False),
}


def _shown(secret: str) -> str:
    """A secret variable's value for an error: a URL without its credentials, else nothing."""
    return redact_url(secret) if "://" in secret else REDACTED


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``ICEFLEET_*`` variables (``os.environ`` by default).

    ``overrides`` replace fields after parsing (for tests and the CLI's flags). Unknown
    ``ICEFLEET_*`` variables are logged as a warning with the known names: a typo silently
    ignored is a setting not applied, but refusing to start over a stray variable is worse.
    """
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, raw in source.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_PREFIX + "TEST_"):
            continue
        suffix = name[len(ENV_PREFIX) :]
        if suffix not in _VARIABLES:
            known = ", ".join(ENV_PREFIX + key for key in sorted(_VARIABLES))
            logger.warning("ignoring %s: not an icefleet setting (known: %s)", name, known)
            continue
        attr, parse, secret = _VARIABLES[suffix]
        try:
            values[attr] = parse(raw)
        except (ValueError, InvalidIdentifierError) as exc:
            raise ConfigError(name, _shown(raw) if secret else raw, str(exc)) from None
    values.update(overrides)
    settings = Settings(**values)
    if settings.commit_max_bytes < settings.batch_max_bytes:
        raise ConfigError(
            ENV_PREFIX + "COMMIT_MAX_BYTES",
            str(settings.commit_max_bytes),
            f"a size at least ICEFLEET_BATCH_MAX_BYTES ({settings.batch_max_bytes})",
        )
    return settings
