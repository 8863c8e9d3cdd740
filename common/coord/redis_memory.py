"""Redis must never be the thing that dies: its memory bounded, its keys never evicted.

Everything icefleet keeps in Redis (queues, pending batches, prepared commits, dead letters) is
state, not cache: an evicted key is a lost batch or a broken commit protocol. So Redis runs with
a ``maxmemory`` sized above the budget of work not yet written (:mod:`common.coord.budget`) and
``maxmemory-policy noeviction``: at worst Redis refuses writes (the gateway answers 503) instead
of the kernel killing it, or it dropping keys. :func:`required_maxmemory` is that size;
:func:`eviction_warnings` is the start-up check of a Redis icefleet did not start.

:func:`require_fsync` backs ``ICEFLEET_ACK_DURABILITY=fsync``: with ``appendonly yes`` and
``appendfsync always`` Redis fsyncs its AOF before it answers a write, so once the producer's
last write (the message) is answered, the batch survives a crash of Redis or of its host.
"""

from __future__ import annotations

import logging

import redis

from common.coord.budget import Budget
from common.errors import ConfigError

__all__ = ["eviction_warnings", "require_fsync", "required_maxmemory"]

logger = logging.getLogger(__name__)

# Measured (Redis 7.0, used_memory over what the budget counted, 300 one-event batches and 30
# 200-event ones, incompressible and repetitive payloads): 2.6-2.7 bytes per budget byte, as each
# is held twice (queue message, the producer's copy) and the message base64-encoded once more by
# kombu; 2.8-5.8 KiB per batch for its envelope and bookkeeping. `python -m benchmarks overload`
# prints the figure of its own run.
BYTES_PER_BUDGET_BYTE = 2.7
BYTES_PER_BATCH = 6 * 1024
HEADROOM_BYTES = 128 * 1024 * 1024  # pending registries, dead letters, dedup memory, buffers


def required_maxmemory(budget: Budget) -> int:
    """The ``maxmemory`` a Redis needs for ``budget`` never to be the limit that bites first."""
    return int(
        budget.max_bytes * BYTES_PER_BUDGET_BYTE
        + budget.max_batches * BYTES_PER_BATCH
        + HEADROOM_BYTES
    )


def eviction_warnings(client: redis.Redis, budget: Budget) -> list[str]:
    """What is wrong with a Redis' memory policy for icefleet (empty: nothing). Reads ``INFO
    memory``, which managed Redis services allow where ``CONFIG`` is refused."""
    info = client.info("memory")
    policy = str(info.get("maxmemory_policy", "unknown"))
    limit = int(info.get("maxmemory", 0) or 0)
    needed = required_maxmemory(budget)
    warnings = []
    if policy != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy}: it may evict icefleet's queues and pending "
            "batches (lost batches); set maxmemory-policy noeviction"
        )
    if limit == 0:
        warnings.append(
            "Redis has no maxmemory: under overload it grows until the kernel kills it; set "
            f"maxmemory to at least {needed // (1024 * 1024)}mb (for the budget of "
            f"{budget.max_bytes // (1024 * 1024)} MiB, {budget.max_batches} batches)"
        )
    elif limit < needed:
        warnings.append(
            f"Redis maxmemory is {limit // (1024 * 1024)} MiB, below the "
            f"{needed // (1024 * 1024)} MiB the budget of work not yet written may take: "
            "raise it or lower ICEFLEET_BUDGET_MAX_BYTES / ICEFLEET_BUDGET_MAX_BATCHES"
        )
    return warnings


def warn_about_eviction(client: redis.Redis, budget: Budget) -> None:
    """Log :func:`eviction_warnings` (a Redis that cannot be read is left to later errors)."""
    try:
        warnings = eviction_warnings(client, budget)
    except redis.RedisError as exc:
        logger.warning("could not check Redis' memory policy: %s", type(exc).__name__)
        return
    for warning in warnings:
        logger.warning("%s", warning)


def require_fsync(client: redis.Redis) -> None:
    """Raise :class:`ConfigError` unless Redis fsyncs every write before answering it."""
    try:
        config = client.config_get("append*")
    except redis.ResponseError:  # CONFIG disabled (managed Redis): cannot be checked here
        logger.warning(
            "ICEFLEET_ACK_DURABILITY=fsync: Redis refuses CONFIG GET, so appendfsync always "
            "cannot be checked; make sure it is set"
        )
        return
    if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
        raise ConfigError(
            "ICEFLEET_ACK_DURABILITY",
            "fsync",
            "fsync only with a Redis running appendonly yes and appendfsync always (found "
            f"appendonly {config.get('appendonly')}, appendfsync {config.get('appendfsync')}); "
            "set them, or use redis",
        )
