"""HTTP ingest: CloudEvents over HTTP onto the ``ingest`` queue, as an ASGI app (Starlette).

``POST /events`` speaks the CloudEvents HTTP protocol binding (v1.0.2):

- **structured** mode, ``Content-Type: application/cloudevents+json``: the body is one event;
- **batched** mode, ``application/cloudevents-batch+json``: the body is a JSON array of events;
- **binary** mode, any other content type with ``ce-*`` headers: the attributes travel in headers
  (``ce-id``, ``ce-source``, ``ce-type``, ``ce-specversion``, ``ce-time``, extensions...,
  percent-decoded as the binding says), the body is the event's data and ``Content-Type`` its
  ``datacontenttype``; a JSON body (``application/json``, ``*+json``) becomes ``data`` byte for
  byte, any other ``data_base64``;
- and, as a convenience, ``application/json`` (an object or an array) and NDJSON
  (``application/x-ndjson``).

Every event is validated by :func:`common.ingest.events.parse_batch`, the writer's own rules, so what
is accepted here is what a writer lands. Valid events are enqueued with the
:class:`~common.ingest.producer.Producer` as one batch, whose id is the ``Idempotency-Key`` header when
there is one (a retried request then lands once), and the answer is ``202 {"batch_id",
"accepted"}``; invalid ones are listed in a ``400`` with their position and reason, while the
valid events of the same request are still enqueued. Other answers: ``401`` (bearer token
missing or wrong, when ``ICEFLEET_HTTP_TOKEN`` is set), ``413`` (body over
``ICEFLEET_HTTP_MAX_BODY_BYTES``), ``415`` (content type), ``503`` (Redis unreachable).

``GET /healthz`` pings Redis (no token needed: load balancers call it). ``GET /metrics`` is the
Prometheus text format, behind the token like ``/events``, unless ``icefleet serve
--metrics-port`` serves it on a port of its own.

Why Starlette and uvicorn: a small, well-kept ASGI toolkit and server (the base of FastAPI) with
streaming request bodies, so the size limit is enforced while reading, not after; the blocking
Redis calls of parsing and enqueueing run in its thread pool (``run_in_threadpool``), each
borrowing a producer from a pool (a Producer is not thread-safe).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import InvalidBatchIdError, InvalidIdentifierError
from common.ingest.events import Event, parse_batch
from common.ingest.producer import Producer
from common.ingest.routing import Router, TableName
from common.observe.logs import log_context
from common.observe.metrics import CONTENT_TYPE_LATEST, Metrics, create_metrics
from common.redaction import redact_text
from common.settings import Settings
from common.wire import check_batch_id

__all__ = [
    "BATCH",
    "STRUCTURED",
    "Outcome",
    "ProducerPool",
    "Rejection",
    "binary_event",
    "create_gateway",
    "media_type",
    "parse_request",
    "redis_client",
]

logger = logging.getLogger(__name__)

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
NDJSON = ("application/x-ndjson", "application/ndjson")
_JSON_WS = b" \t\r\n"
# Headers that cannot carry attributes in binary mode: the body is the data.
_NOT_HEADERS = ("data", "data_base64", "datacontenttype")


class RequestError(Exception):
    """Raised when a request is refused as a whole; carries the status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Rejection:
    """One event of a request that is not valid, with where it was and why."""

    position: int
    reason: str


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


# --- reading a request -----------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` value, lowercase, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(mtype: str) -> bool:
    return mtype == JSON or mtype.endswith("+json")


def _valid_json(body: bytes) -> bool:
    """Whether ``body`` is exactly one JSON value (orjson, else the standard library, which also
    reads what orjson refuses but the writer may still judge precisely, like lone surrogates)."""
    try:
        orjson.loads(body)
        return True
    except orjson.JSONDecodeError:
        pass
    try:
        json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


def binary_event(headers: Mapping[str, str], body: bytes, content_type: str | None) -> bytes:
    """The structured JSON of a binary-mode event: attributes from the ``ce-*`` headers, the
    body as ``data`` (JSON, spliced in verbatim) or ``data_base64``. Raises :class:`RequestError`
    (400) when a header names the data or a JSON body is not one JSON value."""
    attributes: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if not lowered.startswith("ce-"):
            continue
        attribute = lowered[3:]
        if attribute in _NOT_HEADERS:
            raise RequestError(
                400,
                f"{name}: not allowed in binary mode (the body is the data, "
                "Content-Type its datacontenttype)",
            )
        attributes[attribute] = unquote(value)
    if content_type:
        attributes["datacontenttype"] = content_type
    head = orjson.dumps(attributes)
    stripped = body.strip(_JSON_WS)
    if not stripped:
        return head
    if _is_json(media_type(content_type)):
        # Verbatim, so the writer sees the producer's numbers and keys exactly; only a single
        # JSON value may be spliced in (anything else could smuggle attributes after it).
        if not _valid_json(stripped):
            raise RequestError(
                400, f"data: the body is not one valid JSON value (Content-Type {content_type})"
            )
        return head[:-1] + b',"data":' + stripped + b"}"
    encoded = base64.b64encode(body).decode("ascii")
    return head[:-1] + b',"data_base64":' + orjson.dumps(encoded) + b"}"


def _first_byte(body: bytes) -> bytes:
    stripped = body.lstrip(_JSON_WS).removeprefix(b"\xef\xbb\xbf").lstrip(_JSON_WS)
    return stripped[:1]


def request_mode(content_type: str | None, headers: Mapping[str, str]) -> str:
    """``structured``, ``batch``, ``binary``, ``json`` or ``ndjson``; 415 for anything else."""
    mtype = media_type(content_type)
    if mtype == STRUCTURED:
        return "structured"
    if mtype == BATCH:
        return "batch"
    if any(name.lower() == "ce-specversion" for name in headers):
        return "binary"
    if mtype == JSON:
        return "json"
    if mtype in NDJSON:
        return "ndjson"
    raise RequestError(
        415,
        f"unsupported Content-Type {content_type or '(none)'!r}: send {STRUCTURED}, {BATCH}, "
        f"{JSON}, {NDJSON[0]}, or any type with ce-* headers (binary mode)",
    )


def parse_request(
    mode: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_event_bytes: int,
) -> tuple[list[Event], list[Rejection]]:
    """The valid events of a request body and the rejections, in the body's order."""
    if mode == "binary":
        body = binary_event(headers, body, headers.get("content-type"))
    elif mode == "structured" and _first_byte(body) != b"{":
        raise RequestError(
            400, f"structured mode ({STRUCTURED}) carries one event object; send arrays as {BATCH}"
        )
    elif mode == "batch" and _first_byte(body) != b"[":
        raise RequestError(400, f"a CloudEvents batch ({BATCH}) is a JSON array of events")
    if not body.strip(_JSON_WS):
        raise RequestError(400, "the body holds no events")
    parsed = parse_batch(body, batch_id="http", max_event_bytes=max_event_bytes)
    rejected = [Rejection(d.position, d.reason) for d in parsed.dead_letters]
    if mode in ("structured", "binary") and len(parsed.events) + len(rejected) > 1:
        raise RequestError(400, f"{mode} mode carries exactly one event")
    if not parsed.events and not rejected:
        raise RequestError(400, "the body holds no events")
    return parsed.events, rejected


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


def _error(status: int, reason: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="icefleet"'} if status == 401 else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


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
    except (redis.RedisError, KombuOperationalError) as exc:
        logger.error("enqueue failed: Redis unavailable: %s", exc)
        return _error(503, f"the queue is unavailable: {redact_text(str(exc))}")
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
        return JSONResponse(
            {"status": "unavailable", "redis": redact_text(str(exc))}, status_code=503
        )
    return JSONResponse({"status": "ok"})


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
    metrics = metrics or create_metrics(client)
    pool = ProducerPool(producer_factory or (lambda: Producer(settings)))
    gateway = Gateway(settings, pool, metrics, client, Router(settings.routes, settings.namespace))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.http_token is None:
            logger.warning("ICEFLEET_HTTP_TOKEN is not set: POST /events accepts anyone")
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
    return _Instrumentation(app, metrics, frozenset(r.path for r in routes))
