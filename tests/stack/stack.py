"""The compose stack driven as a user drives it, for tests/stack/test_stack.py.

- :class:`Stack`: a copy of the repository (what git tracks, as the working tree has it) in which
  the commands of docs/compose.md run word for word, under a compose project of its own, with
  ``COMPOSE_FILE`` naming ``compose.yaml`` (unmodified) and an override for this machine: the build
  network, stand-ins for images it cannot pull (built by docker/stack/prepare.sh), and ports on
  127.0.0.1 for PostgreSQL and MinIO so the tables can be read back.
- :class:`Traffic`: CloudEvents sent to the gateway in structured, binary and batch mode, each
  request with an ``Idempotency-Key`` of its own and retried with it until it is accepted.
- :func:`read_tables`: every table of the PostgreSQL catalog read with iceberg-rust (pyiceberg-core's
  DataFusion provider) from the S3 server.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.services import LOOPBACK, unavailable

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compose.md"
STANDIN_PREFIX = "icefleet-standin"  # docker/stack/prepare.sh tags its stand-ins so
ICEFLEET_ROLES = ("writer", "committer", "beat", "flower", "gateway")
GATEWAY_PORT = 8080  # docs/compose.md's addresses: 127.0.0.1:8080 and :5555
FLOWER_PORT = 5555
_BLOCK = re.compile(r"^```sh test-stack:(?P<name>[a-z-]+)\n(?P<body>.*?)^```$", re.M | re.S)


def say(message: str) -> None:
    """Progress on the terminal (make test-stack runs pytest with -s), with the wall time."""
    print(f"[stack {time.strftime('%H:%M:%S')}] {message}", flush=True)


def doc_blocks() -> dict[str, str]:
    """docs/compose.md's command blocks that make test-stack runs, by name."""
    blocks = {m["name"]: m["body"] for m in _BLOCK.finditer(DOC.read_text())}
    assert blocks, f"no ```sh test-stack:NAME blocks in {DOC}"
    return blocks


def standin_of(image: str) -> str:
    """prepare.sh's name for an image's stand-in: icefleet-standin/<last path part>:<tag>."""
    name = image.rsplit("/", 1)[-1]
    return f"{STANDIN_PREFIX}/{name if ':' in name else name + ':latest'}"


def run(
    args: list[str], *, timeout_s: float, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def require_engine() -> None:
    """A Docker engine with Compose v2 and free ports, or skip (locally) / fail (CI)."""
    if shutil.which("docker") is None:
        unavailable("no docker client (docker/stack/engine.sh and prepare.sh set one up)")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout_s=30, check=False)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers: {info.stderr.strip()[-300:]}")
    compose = run(["docker", "compose", "version"], timeout_s=30, check=False)
    if compose.returncode != 0:
        unavailable("no Compose v2 (`docker compose`): docker/stack/prepare.sh installs it")
    if shutil.which("curl") is None:
        unavailable("docs/compose.md's examples need curl (apt-get install -y curl)")
    import socket

    for port in (GATEWAY_PORT, FLOWER_PORT):
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                unavailable(f"{LOOPBACK}:{port} is taken; docs/compose.md publishes there")


def copy_repository(dest: Path) -> None:
    """The files git tracks (and new ones not ignored), as the working tree has them."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        timeout_s=60,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the working tree
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@dataclass
class Stack:
    """One compose project in a copy of the repository; every command with the same environment."""

    workdir: Path
    project: str = field(default_factory=lambda: f"icefleet-stack-{secrets.token_hex(4)}")
    image: str = field(default="")
    env: dict[str, str] = field(default_factory=dict)
    override: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = self.workdir / "icefleet"
        self.dir.mkdir(parents=True)
        copy_repository(self.dir)
        self.image = self.image or f"icefleet:{self.project}"
        compose_text = (self.dir / "compose.yaml").read_text()
        # the shell's variables win over .env: drop every one compose.yaml reads
        variables = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_text))
        base = {
            k: v
            for k, v in os.environ.items()
            if k not in variables and not k.startswith("COMPOSE_")
        }
        self.override_file = self.workdir / "compose.override.yaml"
        self.env = {
            **base,
            "COMPOSE_PROJECT_NAME": self.project,
            "COMPOSE_FILE": f"compose.yaml{os.pathsep}{self.override_file}",
        }

    # --- commands ------------------------------------------------------------------------------

    def sh(self, script: str, *, timeout_s: float, check: bool = True) -> str:
        """A shell script (a docs block) in the copy, with the stack's environment; its output."""
        result = run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.dir,
            env=self.env,
            timeout_s=timeout_s,
            check=check,
        )
        return result.stdout + result.stderr

    def compose(self, *args: str, timeout_s: float = 120, check: bool = True) -> str:
        return run(
            ["docker", "compose", *args],
            cwd=self.dir,
            env=self.env,
            timeout_s=timeout_s,
            check=check,
        ).stdout

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers, running or not, in a stable order."""
        out = self.compose("ps", "-a", "-q", service)
        return sorted(out.split())

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(
            run(["docker", "inspect", container], timeout_s=60).stdout
        )
        return data[0]

    def hostname(self, container: str) -> str:
        return str(self.inspect(container)["Config"]["Hostname"])

    def port(self, service: str, container_port: int) -> int:
        out = self.compose("port", service, str(container_port)).strip()
        host, _, port = out.rpartition(":")
        assert host == LOOPBACK, f"{service}:{container_port} published on {out}, not {LOOPBACK}"
        return int(port)

    # --- configuration -------------------------------------------------------------------------

    def images(self) -> dict[str, str]:
        """Service → image, as compose resolves compose.yaml (with .env, without the override)."""
        config = json.loads(
            run(
                ["docker", "compose", "-f", "compose.yaml", "config", "--format", "json"],
                cwd=self.dir,
                env={k: v for k, v in self.env.items() if k != "COMPOSE_FILE"},
                timeout_s=60,
            ).stdout
        )
        return {name: service["image"] for name, service in config["services"].items()}

    def write_override(self) -> dict[str, str]:
        """This machine's override; returns the stand-ins it names (official → stand-in)."""

        def present(image: str) -> bool:
            return (
                run(["docker", "image", "inspect", image], timeout_s=60, check=False).returncode
                == 0
            )

        def local(image: str) -> str:
            # the official image when it is here (or compose can pull it), else prepare.sh's
            # stand-in when that is here
            if present(image) or not present(standin_of(image)):
                return image
            return standin_of(image)

        standins: dict[str, str] = {}
        services: dict[str, Any] = {}
        for name, image in self.images().items():
            if name in ICEFLEET_ROLES:
                continue
            chosen = local(image)
            if chosen != image:
                standins[image] = chosen
                services[name] = {"image": chosen}
        dockerfile = (self.dir / "docker" / "Dockerfile").read_text()
        base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
        assert base, "docker/Dockerfile names its base in ARG PYTHON_IMAGE"
        build: dict[str, Any] = {"network": "host"}  # no default bridge on such machines
        if local(base[1]) != base[1]:
            standins[base[1]] = local(base[1])
            build["args"] = {"PYTHON_IMAGE": standins[base[1]]}
        services["writer"] = {"build": build}
        # PostgreSQL and MinIO on 127.0.0.1 (a free port each) to read the tables back
        services.setdefault("postgres", {})["ports"] = [f"{LOOPBACK}::5432"]
        services.setdefault("minio", {})["ports"] = [f"{LOOPBACK}::9000"]
        self.override = {"services": services}
        self.override_file.write_text(json.dumps(self.override, indent=2) + "\n")  # JSON is YAML
        return standins

    def write_env(self) -> dict[str, str]:
        """Edit .env (made by the docs' `cp docker/env.example .env`) as a user would: a secret of
        its own for every secret, the gateway and Flower on 127.0.0.1, the image's tag."""
        values = {
            "FLOWER_BASIC_AUTH": f"admin:{secrets.token_urlsafe(12)}",
            "ICEFLEET_HTTP_TOKEN": secrets.token_urlsafe(24),
            "POSTGRES_PASSWORD": secrets.token_urlsafe(12),
            "MINIO_ROOT_USER": "icefleet",
            "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(12),
            "ICEFLEET_HTTP_PORT": f"{LOOPBACK}:{GATEWAY_PORT}",
            "FLOWER_PORT": f"{LOOPBACK}:{FLOWER_PORT}",
            "ICEFLEET_IMAGE": self.image,
        }
        path = self.dir / ".env"
        lines = [
            line
            for line in path.read_text().splitlines()
            if line.partition("=")[0].lstrip("# ") not in values
        ]
        path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in values.items())]) + "\n")
        return values

    # --- on failure and at the end ------------------------------------------------------------

    def diagnose(self) -> None:
        """What a failure needs: every container's state and the end of its log."""
        try:
            say("containers:\n" + self.compose("ps", "-a", timeout_s=60, check=False))
            say(
                "logs:\n"
                + self.compose("logs", "--no-color", "--tail", "40", timeout_s=120, check=False)[
                    -20000:
                ]
            )
        except (subprocess.SubprocessError, OSError) as exc:
            say(f"no diagnosis: {exc}")

    def teardown(self) -> None:
        """Containers, networks, volumes and the image: all gone, whatever happened before."""
        self.compose(
            "down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=300, check=False
        )
        run(["docker", "image", "rm", "-f", self.image], timeout_s=120, check=False)
        left = run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
            timeout_s=60,
            check=False,
        ).stdout.split()
        if left:
            run(["docker", "rm", "-f", *left], timeout_s=120, check=False)


# --- HTTP ------------------------------------------------------------------------------------------


def http_json(
    url: str,
    *,
    auth: tuple[str, str] | None = None,
    timeout_s: float = 30,
    data: bytes | None = None,
) -> tuple[int, Any]:
    """GET (or POST ``data`` to) ``url`` on 127.0.0.1; the status and the JSON body (None when
    not JSON)."""
    assert url.startswith(f"http://{LOOPBACK}:"), url
    request = urllib.request.Request(url, data=data)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def wait_for(
    what: str, condition: Callable[[], Any], *, timeout_s: float, every_s: float = 1.0
) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail naming ``what`` after the time."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"not true after {timeout_s:.0f} s: {what} (last: {last!r})")


# --- traffic ---------------------------------------------------------------------------------------

MODES = ("structured", "binary", "batch")


@dataclass(frozen=True)
class Post:
    """One request to POST /events: its events' ids and tables, its key, headers and body."""

    mode: str
    key: str
    ids: tuple[str, ...]
    tables: tuple[str, ...]
    headers: dict[str, str]
    body: bytes


def make_posts(
    mode: str, run_id: str, *, requests: int, per_request: int, tables: list[str], token: str
) -> list[Post]:
    """``requests`` requests of ``per_request`` events each (1 outside batch mode); event n of the
    run goes to table n mod len(tables), routed by its type's last segment."""
    posts = []
    n = 0
    for r in range(requests):
        events = []
        for _ in range(per_request):
            table = tables[n % len(tables)]
            events.append(
                {
                    "specversion": "1.0",
                    "id": f"{run_id}-{mode}-{n:06d}",
                    "source": f"/icefleet/stack/{mode}",
                    "type": f"com.icefleet.{table}",
                    "data": {"n": n, "mode": mode, "note": "exactly once"},
                }
            )
            n += 1
        headers = {
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": f"{run_id}-{mode}-{r:05d}",
        }
        if mode == "structured":
            headers["Content-Type"] = "application/cloudevents+json"
            body = json.dumps(events[0]).encode()
        elif mode == "binary":
            event = events[0]
            headers.update(
                {
                    "Content-Type": "application/json",
                    "ce-specversion": event["specversion"],
                    "ce-id": event["id"],
                    "ce-source": event["source"],
                    "ce-type": event["type"],
                }
            )
            body = json.dumps(event["data"]).encode()
        else:
            headers["Content-Type"] = "application/cloudevents-batch+json"
            body = json.dumps(events).encode()
        posts.append(
            Post(
                mode=mode,
                key=headers["Idempotency-Key"],
                ids=tuple(e["id"] for e in events),
                tables=tuple(f"events.{e['type'].rsplit('.', 1)[-1]}" for e in events),
                headers=headers,
                body=body,
            )
        )
    return posts


@dataclass
class ModeStats:
    requests: int = 0
    events: int = 0
    retries: int = 0
    answers: Counter[str] = field(default_factory=Counter)


class Traffic:
    """Senders, one thread per mode, each request retried with its key until it gets a 202.

    ``hold_at`` (a fraction): each sender stops there until :meth:`release` (the faults are done),
    so some of every mode is sent after the last fault, whatever the machine's speed.
    """

    RETRY_STATUSES = frozenset({502, 503, 504})

    def __init__(self, port: int, posts: dict[str, list[Post]], hold_at: float) -> None:
        self.port = port
        self.posts = posts
        self.hold_at = hold_at
        self.accepted: dict[str, Post] = {}  # key → post, once answered 202
        self.stats = {mode: ModeStats() for mode in posts}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._threads = [
            threading.Thread(target=self._send_all, args=(mode,), name=f"send-{mode}", daemon=True)
            for mode in posts
        ]
        self.total = sum(len(p) for p in posts.values())

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def release(self) -> None:
        self._released.set()

    @property
    def done(self) -> int:
        with self._lock:
            return sum(s.requests for s in self.stats.values())

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise self.errors[0]
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"senders still running after {timeout_s:.0f} s: {alive}"

    def _send_all(self, mode: str) -> None:
        posts = self.posts[mode]
        hold = int(len(posts) * self.hold_at)
        conn: http.client.HTTPConnection | None = None
        try:
            for index, post in enumerate(posts):
                if index == hold and not self._released.wait(timeout=900):
                    raise AssertionError("the faults were not done within 900 s")
                conn = self._send(post, conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def _send(
        self, post: Post, conn: http.client.HTTPConnection | None
    ) -> http.client.HTTPConnection | None:
        stats = self.stats[post.mode]
        deadline = time.monotonic() + 600  # Redis restarts, writers die: the key makes retries safe
        while True:
            status: int | None = None
            body = b""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=60)
                conn.request("POST", "/events", body=post.body, headers=post.headers)
                response = conn.getresponse()
                status, body = response.status, response.read()
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                with self._lock:
                    stats.answers[type(exc).__name__] += 1
            if status is not None:
                with self._lock:
                    stats.answers[str(status)] += 1
            if status == 202:
                answer = json.loads(body)
                assert answer["accepted"] == len(post.ids), (post.key, answer)
                assert answer["batch_id"] == post.key, (post.key, answer)
                with self._lock:
                    self.accepted[post.key] = post
                    stats.requests += 1
                    stats.events += len(post.ids)
                return conn
            if status is not None and status not in self.RETRY_STATUSES:
                raise AssertionError(f"{post.key}: HTTP {status}: {body[:500]!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{post.key}: no 202 within 600 s (last: {status})")
            with self._lock:
                stats.retries += 1
            time.sleep(0.5)


# --- reading back ----------------------------------------------------------------------------------


def read_tables(catalog_url: str, file_io: dict[str, str]) -> dict[str, list[str]]:
    """Every table of the PostgreSQL catalog → the ids of its rows (duplicates kept), read by
    iceberg-rust from the table's current metadata in S3."""
    import sqlalchemy as sa
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    engine = sa.create_engine(catalog_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT table_namespace, table_name, metadata_location FROM iceberg_tables "
                    "ORDER BY table_namespace, table_name"
                )
            ).all()
    finally:
        engine.dispose()
    tables: dict[str, list[str]] = {}
    for namespace, name, metadata_location in rows:
        ctx = SessionContext()
        provider = IcebergDataFusionTable(
            identifier=[*str(namespace).split("."), name],
            metadata_location=metadata_location,
            file_io_properties=file_io,
        )
        ctx.register_table("t", provider)
        result = ctx.sql("SELECT id FROM t").to_arrow_table()
        tables[f"{namespace}.{name}"] = [str(v) for v in result.column("id").to_pylist()]
    return tables


def duplicates(ids: Iterable[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


def overlapping(intervals: list[tuple[str, str, float, float]]) -> Iterator[tuple[str, str]]:
    """Pairs of (worker, table, start, end) intervals that ran at the same time on two workers
    for two different tables: commits proceeding in parallel."""
    ordered = sorted(intervals, key=lambda i: i[2])
    for a, first in enumerate(ordered):
        for second in ordered[a + 1 :]:
            if second[2] >= first[3]:
                break
            if first[0] != second[0] and first[1] != second[1]:
                yield (first[1], second[1])
