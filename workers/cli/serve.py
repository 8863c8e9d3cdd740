"""``icefleet serve``: the HTTP ingest gateway (:mod:`workers.gateway`) under uvicorn.

Kept apart from ``workers/cli/main.py`` (which registers it with ``main.add_command``) and importing
nothing from it, so ``python -m workers.cli.main`` does not import the CLI module twice.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from workers.cli.errors import errors

logger = logging.getLogger(__name__)
STARTUP_WAIT_S = 5.0  # services started together come up in any order (compose waits for Redis)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve /metrics on this port of its own (on --host), not on --port. "
    "Default: ICEFLEET_METRICS_PORT when set.",
)
def serve(host: str, port: int, metrics_port: int | None) -> None:
    """Accept CloudEvents over HTTP: POST /events (structured, batched or binary mode), GET
    /healthz, GET /metrics. One process; run more gateways behind a load balancer to scale.

    A bearer token is required when ICEFLEET_HTTP_TOKEN is set; bodies are limited to
    ICEFLEET_HTTP_MAX_BODY_BYTES (10 MiB). Logs follow ICEFLEET_LOG_FORMAT (json or text).
    """
    import uvicorn

    from common.observe.logs import configure_logging
    from workers.cli.context import connect, load_context
    from workers.gateway import UVICORN_HEADER_LIMIT, create_gateway

    with errors():  # one line now, not a gateway answering 503 to every request
        context = load_context()
        connect(context, wait_s=STARTUP_WAIT_S).close()
    settings = context.settings
    configure_logging(settings.log_format, settings.log_level)
    metrics_port = metrics_port or settings.metrics_port
    if metrics_port == port:
        raise click.BadParameter("must differ from --port", param_hint="--metrics-port")
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from common.observe.metrics import create_metrics
        from workers.gateway import redis_client

        metrics = create_metrics(redis_client(settings), budget=settings.budget)
        start_http_server(metrics_port, addr=host, registry=metrics.registry)
        logger.info("metrics on http://%s:%d/metrics", host, metrics_port)
        app = create_gateway(settings, metrics=metrics, serve_metrics=False)
    else:
        app = create_gateway(settings)
    logger.info("gateway listening on http://%s:%d (POST /events)", host, port)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again so that the process
    # dies of it: exit status 143, which `docker stop` and compose report as a failure. A clean
    # shutdown is a success: this handler, which uvicorn puts back before raising, exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,  # our root handler (JSON or text, redacted) formats uvicorn's records
        server_header=False,
        timeout_graceful_shutdown=10,
        # the parser's own limit above the gateway's, which answers 431 (not h11's bare 400)
        h11_max_incomplete_event_size=UVICORN_HEADER_LIMIT,
    )
