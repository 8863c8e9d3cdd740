"""HTTP ingest: CloudEvents over HTTP onto the ``ingest`` queue, as an ASGI app (Starlette).

``POST /events`` speaks the CloudEvents HTTP protocol binding (v1.0.2): structured, batched and
binary modes, plus ``application/json`` and NDJSON, decoded by :mod:`workers.gateway_modes`.
Valid events are enqueued with the :class:`~common.ingest.producer.Producer` as one batch, whose
id is the ``Idempotency-Key`` header when there is one (a retried request then lands once), and
the answer is ``202 {"batch_id", "accepted"}``; invalid ones are listed in a ``400`` with their
position and reason, while the valid events of the same request are still enqueued. Other
answers: ``409`` (the ``Idempotency-Key`` named other events before: common/coord/bindings.py),
``401`` (bearer token missing or wrong, when ``ICEFLEET_HTTP_TOKEN`` is set), ``413`` (body over
``ICEFLEET_HTTP_MAX_BODY_BYTES``, decoded: ``Content-Encoding: gzip`` is honoured, any other is
a ``415``), ``415`` (content type), ``431`` (headers over 16 KiB), ``400`` for a JSON object
with a key twice or a ``ce-*`` header that is not percent-encoded UTF-8
(:mod:`workers.http_input`), ``429`` with
``Retry-After`` (the fleet's budget of work not yet written is used up:
:mod:`common.coord.budget`), ``503`` with ``Retry-After`` (Redis unreachable, loading its AOF, or
full).

``GET /healthz`` pings Redis (no token needed: load balancers call it). ``GET /metrics`` is the
Prometheus text format, behind the token like ``/events``, unless ``icefleet serve
--metrics-port`` serves it on a port of its own.

Why Starlette and uvicorn: a small, well-kept ASGI toolkit and server (the base of FastAPI) with
streaming request bodies, so the size limit is enforced while reading, not after; the blocking
Redis calls of parsing and enqueueing run in its thread pool (``run_in_threadpool``), each
borrowing a producer from a pool (a Producer is not thread-safe).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.coord.redis_memory import warn_about_eviction
from common.errors import (
    BatchConflictError,
    InvalidBatchIdError,
    InvalidIdentifierError,
    OverloadedError,
)
from common.ingest.producer import Producer
from common.ingest.routing import Router, TableName
from common.observe.logs import log_context
from common.observe.metrics import CONTENT_TYPE_LATEST, Metrics, create_metrics
from common.redaction import redact_text
from common.settings import Settings
from common.wire import check_batch_id
from workers.gateway_modes import (
    Rejection,
    RequestError,
    _is_json,
    media_type,
    parse_request,
    request_mode,
)
from workers.http_input import UVICORN_HEADER_LIMIT, HeaderLimit, decode_body, duplicate_key

__all__ = [
    "UVICORN_HEADER_LIMIT",
    "Gateway",
    "Outcome",
    "ProducerPool",
    "create_gateway",
    "redis_client",
    "redis_state",
]

logger = logging.getLogger(__name__)

UNAVAILABLE_RETRY_S = 5  # Retry-After while Redis is unreachable, loading its AOF, or full


@dataclass
class Outcome:
    """What became of a request's events."""

    batch_id: str | None
    accepted: int
    rejected: list[Rejection] = field(default_factory=list)
    tables: dict[str, int] = field(default_factory=dict)  # accepted events per table
    accepted_bytes: int = 0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch_id": self.batch_id, "accepted": self.accepted}
        if self.rejected:
            out["rejected"] = [{"position": r.position, "reason": r.reason} for r in self.rejected]
        return out


# --- producers -----------------------------------------------------------------------------------


class ProducerPool:
    """Producers lent to one thread at a time (a Producer is not thread-safe); grows on demand,
    one per concurrently running request at most."""

    def __init__(self, factory: Callable[[], Producer]) -> None:
        self._factory = factory
        self._idle: list[Producer] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def borrow(self) -> Iterator[Producer]:
        with self._lock:
            producer = self._idle.pop() if self._idle else None
        if producer is None:
            producer = self._factory()
        try:
            yield producer
        except BaseException:
            producer.close()  # its connection may be broken: a fresh one next time
            raise
        with self._lock:
            if not self._closed:
                self._idle.append(producer)
                return
        producer.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for producer in idle:
            producer.close()


# --- the app -------------------------------------------------------------------------------------


@dataclass
class Gateway:
    """The state behind the routes: settings, producers, metrics, a Redis client for health."""

    settings: Settings
    producers: ProducerPool
    metrics: Metrics
    client: redis.Redis
    router: Router

    def authorized(self, request: Request) -> bool:
        token = self.settings.http_token
        if token is None:
            return True
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(supplied.strip().encode(), token.encode())

    def enqueue(
        self,
        mode: str,
        headers: Mapping[str, str],
        body: bytes,
        table: str | None,
        batch_id: str | None,
    ) -> Outcome:
        """Parse, validate and enqueue (blocking: runs in the thread pool)."""
        body = decode_body(body, headers.get("content-encoding"), self.settings.http_max_body_bytes)
        if mode != "binary" or _is_json(media_type(headers.get("content-type"))):
            duplicate = duplicate_key(body, mode)
            if duplicate is not None:
                raise RequestError(
                    400, f"{duplicate}: keys must be unique (parsers would keep only one value)"
                )
        events, rejected = parse_request(
            mode, headers, body, max_event_bytes=self.settings.max_event_bytes
        )
        outcome = Outcome(batch_id=None, accepted=len(events), rejected=rejected)
        if not events:
            return outcome
        with self.producers.borrow() as producer:
            outcome.batch_id = producer.enqueue(
                [event.raw for event in events], table=table, batch_id=batch_id
            )
        for event in events:
            name = table or str(self.router.table_for(event.attributes["type"]))
            outcome.tables[name] = outcome.tables.get(name, 0) + 1
            outcome.accepted_bytes += len(event.raw.encode("utf-8", "surrogatepass"))
        return outcome

    def record(self, outcome: Outcome) -> None:
        for name, count in outcome.tables.items():
            self.metrics.events_accepted.labels(name).inc(count)
        self.metrics.accepted_bytes.inc(outcome.accepted_bytes)
        if outcome.rejected:
            self.metrics.events_rejected.inc(len(outcome.rejected))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, reason: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="icefleet"'} if status == 401 else {}
    body: dict[str, Any] = {"error": reason}
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
        body["retry_after_s"] = retry_after_s
    return JSONResponse(body, status_code=status, headers=headers or None)


def redis_state(exc: BaseException) -> str:
    """What a Redis failure says of Redis, never where it is: ``loading`` (it restarts and reads
    its AOF), ``full`` (maxmemory reached under noeviction) or ``unreachable``."""
    text = str(exc)
    if isinstance(exc, redis.BusyLoadingError) or text.startswith("LOADING"):
        return "loading"
    if isinstance(exc, redis.OutOfMemoryError) or "maxmemory" in text:
        return "full"
    return "unreachable"


def _options(request: Request) -> tuple[str | None, str | None]:
    """The ``table`` query parameter and the ``Idempotency-Key`` header, checked (400)."""
    table = request.query_params.get("table") or None
    if table is not None:
        try:
            TableName.parse(table)
        except InvalidIdentifierError as exc:
            raise RequestError(400, f"table: {exc}") from None
    key = request.headers.get("idempotency-key")
    if key is not None:
        try:
            check_batch_id(key)  # the producer's own rule: the batch id is the key
        except InvalidBatchIdError as exc:
            raise RequestError(400, f"Idempotency-Key: {exc}") from None
    return table, key


async def post_events(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if not gateway.authorized(request):
        return _error(401, "a valid bearer token is required (Authorization: Bearer <token>)")
    try:
        table, key = _options(request)
        mode = request_mode(request.headers.get("content-type"), request.headers)
        body = await read_body(request, gateway.settings.http_max_body_bytes)
        headers = dict(request.headers.items())
        with log_context(batch_id=key, table=table):
            outcome = await run_in_threadpool(gateway.enqueue, mode, headers, body, table, key)
    except RequestError as exc:
        return _error(exc.status, exc.reason)
    except BatchConflictError as exc:  # the key names other events: nothing was enqueued
        return _error(409, f"Idempotency-Key: {exc}")
    except OverloadedError as exc:
        gateway.metrics.http_refused.labels("overloaded").inc()
        return _error(429, str(exc), retry_after_s=exc.retry_after_s)
    except (redis.RedisError, KombuOperationalError) as exc:
        state = redis_state(exc)
        logger.error("enqueue failed: Redis %s: %s", state, redact_text(str(exc)))
        gateway.metrics.http_refused.labels(f"redis_{state}").inc()
        return _error(
            503, f"the queue is {state}: nothing was enqueued", retry_after_s=UNAVAILABLE_RETRY_S
        )
    gateway.record(outcome)
    if outcome.rejected:
        logger.info(
            "request with %d invalid event(s) of %d; %d enqueued",
            len(outcome.rejected),
            len(outcome.rejected) + outcome.accepted,
            outcome.accepted,
            extra={"batch_id": outcome.batch_id, "mode": mode},
        )
    return JSONResponse(outcome.body(), status_code=400 if outcome.rejected else 202)


async def healthz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    try:
        await run_in_threadpool(gateway.client.ping)
    except redis.RedisError as exc:
        # states only: a health endpoint anyone may call must not name hosts, ports or users
        return JSONResponse(
            {"status": "unavailable", "redis": redis_state(exc)},
            status_code=503,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_S)},
        )
    return JSONResponse({"status": "ok", "redis": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    if not gateway.authorized(request):
        return _error(401, "a valid bearer token is required (Authorization: Bearer <token>)")
    payload = await run_in_threadpool(gateway.metrics.render)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)


class _Instrumentation:
    """Count and time every request by route and status (pure ASGI: streams stay streams)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_request_seconds.labels(route).observe(time.perf_counter() - started)


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client for health checks and metrics that never hangs a request for long."""
    return redis.Redis.from_url(settings.redis_url, socket_timeout=5, health_check_interval=30)


def create_gateway(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    serve_metrics: bool = True,
    producer_factory: Callable[[], Producer] | None = None,
) -> ASGIApp:
    """The ASGI app. ``serve_metrics=False`` leaves ``/metrics`` to a port of its own."""
    client = redis_client(settings)
    metrics = metrics or create_metrics(client, budget=settings.budget)
    pool = ProducerPool(producer_factory or (lambda: Producer(settings)))
    gateway = Gateway(
        settings,
        pool,
        metrics,
        client,
        Router(settings.routes, settings.namespace, settings.unrouted),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.http_token is None:
            logger.warning("ICEFLEET_HTTP_TOKEN is not set: POST /events accepts anyone")
        await run_in_threadpool(warn_about_eviction, client, settings.budget)
        try:
            yield
        finally:
            pool.close()
            client.close()

    routes = [
        Route("/events", post_events, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if serve_metrics:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return _Instrumentation(HeaderLimit(app), metrics, frozenset(r.path for r in routes))
