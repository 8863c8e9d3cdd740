"""The worker side of metrics and logs, wired through Celery signals.

**Metrics.** Each process that runs tasks holds one :class:`~common.observe.metrics.Metrics`
(:func:`process_metrics`). ``task_prerun``/``task_postrun`` time the write and commit tasks and
count batches, bytes, dead letters and committed rows from what the tasks return. With
``ICEFLEET_METRICS_PORT`` set, that process serves its registry over HTTP on the port plus its
pool index (a prefork child's index, 0 for the solo pool): icefleet's workers run one process
each by default (``icefleet worker``: concurrency 1), so that is one port per worker. A port
already taken (several workers on one host with the same variable) is logged and skipped: the
worker runs on without it. Shared state (backlog, dead letters, freshness, canary) is read from
Redis by the gateway's ``/metrics``; workers don't repeat it.

**Logs.** After Celery sets up its loggers, their handlers get icefleet's context and redaction
filters, and the JSON formatter when ``ICEFLEET_LOG_FORMAT=json``. Around each task the batch id
and table (from its arguments) are put in the log context, so every line a task logs carries
them.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from typing import Any

from celery import current_app
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_process_init,
)

from common.observe.logs import instrument_handler, log_context
from common.observe.metrics import Metrics, create_metrics
from common.settings import Settings, load_settings
from common.wire import COMMIT_TASK, SWEEP_TASK, WRITE_TASK

logger = logging.getLogger(__name__)

_metrics: Metrics | None = None
_metrics_pid: int | None = None
_server_pid: int | None = None
_running: dict[str, tuple[float, ExitStack]] = {}  # task id → (start, log context)


def _settings() -> Settings:
    settings = getattr(current_app, "icefleet_settings", None)
    return settings if isinstance(settings, Settings) else load_settings()


def process_metrics() -> Metrics:
    """This process' metrics, created on first use (again in a forked child)."""
    global _metrics, _metrics_pid
    if _metrics is None or _metrics_pid != os.getpid():
        _metrics, _metrics_pid = create_metrics(), os.getpid()
    return _metrics


def pool_index() -> int:
    """This process' index in a prefork pool (0 for the first child, or when not in a pool)."""
    from billiard.process import current_process

    return int(getattr(current_process(), "index", None) or 0)


def serve_metrics(settings: Settings) -> int | None:
    """Serve this process' metrics on ``ICEFLEET_METRICS_PORT`` + pool index, once per process;
    return the port, or None when not configured or the port is taken."""
    global _server_pid
    if settings.metrics_port is None or _server_pid == os.getpid():
        return None
    from prometheus_client import start_http_server

    _server_pid = os.getpid()
    port = settings.metrics_port + pool_index()
    try:
        start_http_server(port, registry=process_metrics().registry)
    except OSError as exc:
        logger.warning("metrics: cannot listen on port %d (%s); not serving metrics", port, exc)
        return None
    logger.info("metrics: serving on port %d", port)
    return port


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    serve_metrics(_settings())


# --- tasks -----------------------------------------------------------------------------------------


def _context_of(name: str, args: Any, kwargs: dict[str, Any]) -> dict[str, str]:
    if name == WRITE_TASK:
        context = {"batch_id": kwargs.get("batch_id"), "table": kwargs.get("table")}
    elif name == COMMIT_TASK:
        context = {"table": kwargs.get("table") or (args[0] if args else None)}
    else:
        return {}
    return {key: str(value) for key, value in context.items() if value}


@task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **extra: Any) -> None:
    name = getattr(task, "name", "")
    stack = ExitStack()
    stack.enter_context(
        log_context(**_context_of(name, extra.get("args"), extra.get("kwargs") or {}))
    )
    _running[task_id or ""] = (time.perf_counter(), stack)
    if name in (WRITE_TASK, COMMIT_TASK, SWEEP_TASK):
        serve_metrics(_settings())  # the solo pool has no worker_process_init


@task_postrun.connect
def _on_postrun(
    task_id: str | None = None,
    task: Any = None,
    kwargs: dict[str, Any] | None = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    started, stack = _running.pop(task_id or "", (None, None))
    try:
        seconds = None if started is None else time.perf_counter() - started
        record_task(getattr(task, "name", ""), kwargs or {}, retval, state, seconds)
    except Exception:  # metrics must never fail a task
        logger.exception("metrics: recording task %s failed", task_id)
    finally:
        if stack is not None:
            stack.close()


def record_task(
    name: str,
    kwargs: dict[str, Any],
    retval: Any,
    state: str | None,
    seconds: float | None,
    metrics: Metrics | None = None,
) -> None:
    """Count what a finished task did, from its name, arguments and return value."""
    metrics = metrics or process_metrics()
    if name == WRITE_TASK:
        _record_write(metrics, kwargs, retval, state, seconds)
    elif name in (COMMIT_TASK, SWEEP_TASK) and state == "SUCCESS" and isinstance(retval, list):
        for commit in retval:
            table = str(commit.get("table", ""))
            metrics.events_written.labels(table).inc(int(commit.get("records", 0)))
            if commit.get("ms") is not None and not commit.get("recovered"):
                metrics.commit_seconds.labels(table).observe(float(commit["ms"]) / 1000)


def _record_write(
    metrics: Metrics, kwargs: dict[str, Any], retval: Any, state: str | None, seconds: float | None
) -> None:
    if state != "SUCCESS" or not isinstance(retval, dict):
        metrics.batches.labels("retried" if state == "RETRY" else "failed").inc()
        return
    if seconds is not None:
        metrics.batch_write_seconds.observe(seconds)
    # The task reports its payload's size once decoded (common/ingest/payloads.py); what a message
    # carries is compressed.
    payload = kwargs.get("payload") or ""
    table = kwargs.get("table") or "unrouted"
    if "dead_lettered" in retval:
        metrics.batches.labels("dead_lettered").inc()
        lines = retval.get("payload_lines")
        if lines is None:
            lines = sum(1 for line in str(payload).split("\n") if line.strip())
        metrics.events_dead_lettered.labels(table).inc(int(lines))
        return
    metrics.batches.labels("written").inc()
    size = retval.get("payload_bytes")
    if size is None:
        size = len(str(payload).encode("utf-8", "surrogatepass"))
    metrics.batch_bytes.inc(int(size))
    if retval.get("dead_letters"):
        metrics.events_dead_lettered.labels(table).inc(int(retval["dead_letters"]))


# --- logs ------------------------------------------------------------------------------------------


def _instrument(logger: logging.Logger | None = None, **_: Any) -> None:
    fmt = "json" if _settings().log_format == "json" else None  # text: keep Celery's format
    for handler in (logger or logging.getLogger()).handlers:
        instrument_handler(handler, fmt)


after_setup_logger.connect(_instrument, weak=False)
after_setup_task_logger.connect(_instrument, weak=False)
