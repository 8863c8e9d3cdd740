"""Real servers for the tests: redis-server, PostgreSQL and moto's S3 server, all on 127.0.0.1.

A missing server skips the test locally and fails it in CI (``CI=true``), so a green CI run
always means the real component was exercised.

Subprocesses started by tests (Celery workers, the CLI) should inherit ``os.environ``
(``env={**os.environ, ...}``): coverage of those processes rides on ``COVERAGE_PROCESS_CONFIG``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
LOOPBACK = "127.0.0.1"
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://icefleet:icefleet@127.0.0.1:5432/icefleet_test"
POSTGRES_URL_ENV = "ICEFLEET_TEST_POSTGRES_URL"
PYICEBERG_CATALOG_TABLES = ("iceberg_tables", "iceberg_namespace_properties")
BROKEN_MOTO_VERSIONS = frozenset({"5.2.0", "5.2.1"})  # pyarrow multipart uploads fail


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: a CI run must exercise every real component."""
    if IN_CI:
        pytest.fail(f"required test service unavailable in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    """Ask ``predicate`` every ``poll_s`` seconds until it is true; ``TimeoutError`` naming
    ``what`` once ``timeout_s`` have passed. Waits for a condition, never for a duration: give
    it a timeout generous enough for a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s}s")
        time.sleep(poll_s)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    wait_until(lambda: port_open(port), timeout_s, f"a listener on {LOOPBACK}:{port}", 0.05)


# --- Redis ---------------------------------------------------------------------------------


class RedisProcess:
    """A ``redis-server`` on a fixed loopback port and data dir.

    ``stop()`` then ``start()`` brings it back on the same port with the same data (the AOF when
    ``appendonly``), which is what the chaos tests need; ``stop(kill=True)`` is a crash.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        self.workdir = workdir
        self.appendfsync = appendfsync  # "always": every write on disk before it is answered
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.password = password  # requirepass: clients must AUTH
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and return once it answers PING (an AOF is loaded by then)."""
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server not on PATH (apt-get install -y redis-server)")
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--protected-mode", "yes",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(timeout_s)

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM (clean shutdown) by default, SIGKILL when ``kill``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                log = self.workdir / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{tail}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                    if self.password:  # inline command: a password holds no spaces here
                        sock.sendall(f"AUTH {self.password}\r\n".encode())
                        if not sock.recv(64).startswith(b"+OK"):
                            continue
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop(kill=True)
        raise TimeoutError(f"redis-server on {LOOPBACK}:{self.port} not ready after {timeout_s}s")

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def redis_server(workdir: Path, appendonly: bool = True) -> Iterator[str]:
    """Run a throwaway ``redis-server`` on a free loopback port; yield its URL."""
    with RedisProcess(workdir, appendonly=appendonly) as server:
        yield server.url


# --- PostgreSQL ----------------------------------------------------------------------------


def check_postgres(url: str) -> None:
    """Connect once to ``url``, or call ``unavailable`` with the reason."""
    try:
        import sqlalchemy as sa
    except ImportError as exc:  # pragma: no cover - a dependency of pyiceberg[sql-postgres]
        unavailable(f"sqlalchemy not installed: {exc}")
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # any driver error means "not usable here"
        safe = sa.make_url(url).render_as_string(hide_password=True)
        unavailable(f"PostgreSQL unreachable at {safe} (set {POSTGRES_URL_ENV}): {exc}")


@contextmanager
def fresh_postgres_database(url: str) -> Iterator[str]:
    """Yield the URL of a new, empty database next to ``url``'s, dropped afterwards.

    Needs ``CREATEDB`` for the role. Without it, fall back to ``url``'s own database with the
    pyiceberg catalog tables dropped before and after.
    """
    import sqlalchemy as sa
    from sqlalchemy.exc import ProgrammingError

    name = f"icefleet_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            created = True
        except ProgrammingError:  # insufficient privilege: no CREATEDB
            created = False
        if not created:
            with _emptied_catalog_tables(admin):
                yield url
            return
        try:
            yield sa.make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def _emptied_catalog_tables(engine: Any) -> Iterator[None]:
    import sqlalchemy as sa

    def drop() -> None:
        with engine.connect() as conn:
            for table in PYICEBERG_CATALOG_TABLES:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))

    drop()
    try:
        yield
    finally:
        drop()


# --- S3 (moto server) ----------------------------------------------------------------------


@dataclass(frozen=True)
class S3Endpoint:
    """Where the fake S3 listens and the (fake) credentials it accepts."""

    endpoint_url: str
    access_key_id: str = "icefleet-test-key"
    secret_access_key: str = field(default="icefleet-test-secret", repr=False)
    region: str = "us-east-1"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:<port>``, the form ``pyarrow.fs.S3FileSystem(endpoint_override=)`` takes."""
        return self.endpoint_url.removeprefix("http://")

    def client(self) -> Any:
        """A boto3 S3 client bound to this endpoint and its credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def fileio_properties(self) -> dict[str, str]:
        """pyiceberg FileIO properties (``s3.*``) for a catalog whose warehouse is here."""
        return {
            "s3.endpoint": self.endpoint_url,
            "s3.access-key-id": self.access_key_id,
            "s3.secret-access-key": self.secret_access_key,
            "s3.region": self.region,
        }


@contextmanager
def moto_s3_server() -> Iterator[S3Endpoint]:
    """Run moto's S3 in server mode on a free loopback port, in a thread of this process."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        unavailable(f"moto[server] not installed (pip install -e '.[test]'): {exc}")
    moto_version = importlib.metadata.version("moto")
    if moto_version in BROKEN_MOTO_VERSIONS:
        pytest.fail(
            f"moto {moto_version} answers CompleteMultipartUpload with a root tag that pyarrow's "
            "S3 client rejects (getmoto/moto#10055): pip install -U 'moto[server]>=5.2.2'"
        )
    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield S3Endpoint(endpoint_url=f"http://{LOOPBACK}:{port}")
    finally:
        server.stop()


@contextmanager
def s3_test_bucket(endpoint: S3Endpoint) -> Iterator[str]:
    """Create a uniquely named bucket; yield ``s3://<bucket>``; empty and delete it afterwards."""
    client = endpoint.client()
    bucket = f"icefleet-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
        client.close()
