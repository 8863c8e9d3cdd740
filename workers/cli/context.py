"""Which Redis and which catalog a command uses, and where that came from.

``ICEFLEET_REDIS_URL`` wins. Unset, a local fleet's record under ``ICEFLEET_HOME``
(:mod:`workers.fleet_record`) gives the Redis URL and, unless ``ICEFLEET_CATALOG`` is set, the
catalog. With neither, the defaults apply: ``redis://127.0.0.1:6379/0`` and the embedded SQLite
catalog under the home. A record whose fleet is gone is removed, and a command that needs Redis
then fails with one line instead of falling back to the default port: another project's Redis
there would silently receive the events.

Connecting pings at once, so a command fails with one line naming the URL (password redacted),
where it came from and what to do, before it has done anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import redis
from pyiceberg.catalog import Catalog

from common.errors import RedisUnavailableError, StaleFleetRecordError
from common.redaction import redact_text, redact_url
from common.settings import Settings, load_settings
from workers.fleet_record import FleetRecord, read_record, record_path

FROM_ENV = "from ICEFLEET_REDIS_URL"


@dataclass(frozen=True)
class Context:
    """Settings with the local fleet applied, and where the Redis URL and catalog came from."""

    settings: Settings
    redis_from: str
    catalog_from: str
    record: FleetRecord | None = None

    @property
    def redis_configured(self) -> bool:
        """Whether someone chose this Redis (the variable, or a running local fleet)."""
        return self.redis_from == FROM_ENV or self.record is not None

    def status(self) -> dict[str, str]:
        return {
            "redis_url": redact_url(self.settings.redis_url),
            "redis_from": self.redis_from,
            "catalog_from": self.catalog_from,
        }


def load_context(needs_redis: bool = True, env: Mapping[str, str] | None = None) -> Context:
    """The settings a command runs with (see the module docstring).

    Raises :class:`~common.errors.ConfigError` for an invalid variable and
    :class:`StaleFleetRecordError` when the local fleet's record is stale and ``needs_redis``.
    """
    source = os.environ if env is None else env
    settings = load_settings(source)
    catalog_from = (
        "from ICEFLEET_CATALOG"
        if settings.catalog_name
        else "the default: ICEFLEET_CATALOG is unset"
    )
    if source.get("ICEFLEET_REDIS_URL"):
        return Context(settings, FROM_ENV, catalog_from)
    default = Context(
        settings,
        "the default: ICEFLEET_REDIS_URL is unset and no local fleet runs under "
        f"{settings.home.resolve()}",
        catalog_from,
    )
    record = read_record(settings.home)
    if record is None:
        return default
    if not record.owner_alive():
        forget(record)
        if needs_redis:
            raise StaleFleetRecordError(str(record.path), f"its process {record.pid} has exited")
        return default
    if record.catalog and not settings.catalog_name:
        settings = replace(settings, catalog_name=record.catalog)
        catalog_from = f"from {record.describe()}"
    return Context(
        replace(settings, redis_url=record.redis_url),
        f"from {record.describe()}",
        catalog_from,
        record,
    )


def forget(record: FleetRecord) -> None:
    from workers.fleet_record import remove_record

    remove_record(record)


def connect(context: Context, wait_s: float = 0.0) -> redis.Redis:
    """A Redis client that answered PING; else one line saying why not (see module docstring).

    ``wait_s``: keep trying a Redis that refuses connections that long (services starting
    together); a refused password fails at once.
    """
    settings = context.settings
    url = redact_url(settings.redis_url)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=30)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.ping()
            return client
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            client.close()
            raise RedisUnavailableError(
                url,
                context.redis_from,
                f"refused the credentials ({_one_line(exc)})",
                "check the password in the URL (redis://:PASSWORD@host:port/db)",
            ) from None
        except redis.RedisError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            client.close()
            if context.record is not None:
                forget(context.record)
                raise StaleFleetRecordError(
                    str(context.record.path), f"its Redis at {url} is not answering"
                ) from None
            hint = (
                "start it, or point ICEFLEET_REDIS_URL at a running Redis"
                if context.redis_from == FROM_ENV
                else "run `icefleet up` (it records its Redis under ICEFLEET_HOME for the other "
                "commands), or set ICEFLEET_REDIS_URL"
            )
            raise RedisUnavailableError(
                url, context.redis_from, f"is not reachable ({_one_line(exc)})", hint
            ) from None


def open_catalog_checked(context: Context) -> Catalog:
    """The catalog, loaded (a SQL catalog connects to its database as it loads).

    Two commands opening a fresh embedded catalog at once race in pyiceberg's "create the
    catalog tables unless they exist": the loser's CREATE TABLE fails with "already exists",
    and a second load finds them.
    """
    from sqlalchemy.exc import OperationalError

    from common.lake.catalog import open_catalog

    try:
        return open_catalog(context.settings)
    except OperationalError as exc:
        if "already exists" not in str(exc):
            raise
        return open_catalog(context.settings)


def _one_line(exc: BaseException) -> str:
    return " ".join(redact_text(str(exc)).split()) or type(exc).__name__


def fleet_record_path(settings: Settings) -> str:
    return str(record_path(settings.home))
