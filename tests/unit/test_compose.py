"""The promises compose.yaml and docker/ make, checked on the parsed files.

``docker-compose -f compose.yaml config -q`` (run by .ci/run) checks that the file is valid
Compose; these tests check what it says: health checks, restart policies, a writer that scales,
every Redis user waiting for a healthy Redis, Flower behind basic auth, one image for every role,
commands the CLI accepts, and a non-root image whose entry point dispatches as documented.
(PyYAML comes with the test tools: moto's ``responses`` requires it.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.cli.main import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ICEFLEET_ROLES = ("writer", "committer", "beat", "flower", "gateway")
LONG_RUNNING = ("redis", "minio", "postgres", *ICEFLEET_ROLES)
NO_HEALTHCHECK = {"beat"}  # nothing to ask it; a dead beat is restarted by its policy


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    if isinstance(command, str):
        return shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        return shlex.split(command[2])[1:]  # drop the `exec`
    return list(command)


def test_every_service_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {*LONG_RUNNING, "createbuckets"}


def test_long_running_services_restart_and_have_health_checks(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        if name not in NO_HEALTHCHECK:
            assert services[name]["healthcheck"]["test"], name
    assert services["createbuckets"]["restart"] == "no"  # one-shot


def test_redis_keeps_an_append_only_file_on_a_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def _default(value: str) -> str:
    """The default of a ``${VAR:-default}`` compose value (the value itself otherwise)."""
    found = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
    return found.group(1) if found else value


def test_redis_memory_is_bounded_without_eviction_above_the_budget(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    from common.coord.budget import Budget
    from common.coord.redis_memory import required_maxmemory

    # Given the Redis command and the budget every role gets
    command = [_default(str(part)) for part in services["redis"]["command"]]
    env = compose["x-icefleet-env"]
    budget = Budget(
        int(_default(env["ICEFLEET_BUDGET_MAX_BYTES"])),
        int(_default(env["ICEFLEET_BUDGET_MAX_BATCHES"])),
    )

    # Then Redis never evicts, and its limit is above what the budget can make it hold
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    limit = command[command.index("--maxmemory") + 1]
    assert limit.endswith("gb")
    assert int(limit[:-2]) * 1024**3 >= required_maxmemory(budget)


def test_postgres_and_minio_health_and_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["minio"]["healthcheck"]["test"][:2] == ["CMD", "mc"]
    buckets = services["createbuckets"]
    assert buckets["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "mc mb --ignore-existing" in buckets["command"][0]


def test_everything_that_uses_redis_waits_for_it_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ICEFLEET_ROLES:
        service = services[name]
        assert service["environment"]["ICEFLEET_REDIS_URL"].startswith("redis://redis:"), name
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    for name in ("writer", "committer"):
        depends = services[name]["depends_on"]
        assert depends["postgres"] == {"condition": "service_healthy"}
        assert depends["createbuckets"] == {"condition": "service_completed_successfully"}


def test_writers_scale(services: dict[str, dict[str, Any]]) -> None:
    writer = services["writer"]
    assert "container_name" not in writer
    assert "ports" not in writer  # a fixed host port would clash at --scale writer=2
    assert command_of(writer) == ["icefleet", "worker", "writer"]


def test_one_image_for_every_role(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in ICEFLEET_ROLES}
    builds = [services[name]["build"] for name in ICEFLEET_ROLES]
    assert len(images) == 1
    assert all(build == {"context": ".", "dockerfile": "docker/Dockerfile"} for build in builds)
    assert all(services[name].get("init") is True for name in ICEFLEET_ROLES)


def test_roles_run_commands_the_cli_accepts(services: dict[str, dict[str, Any]]) -> None:
    committer = command_of(services["committer"])
    assert committer == ["icefleet", "worker", "committer", "--no-beat"]  # beat runs alone
    assert command_of(services["beat"])[:4] == ["celery", "-A", "workers.app", "beat"]
    assert command_of(services["flower"])[:4] == ["celery", "-A", "workers.app", "flower"]
    gateway = command_of(services["gateway"])
    assert gateway[:2] == ["icefleet", "serve"] and gateway[gateway.index("--port") + 1] == "8080"
    for name in ("writer", "committer", "gateway"):
        argv = command_of(services[name])[1:]
        with main.make_context("icefleet", list(argv), resilient_parsing=False) as ctx:
            command = main.get_command(ctx, argv[0])
            assert command is not None, argv
            command.make_context(argv[0], argv[1:], parent=ctx)  # raises on a bad option


def test_flower_requires_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert '--basic-auth="$$FLOWER_BASIC_AUTH"' in flower["command"][2]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    assert flower["ports"] == ["${FLOWER_PORT:-5555}:5555"]


def test_gateway_requires_a_token(services: dict[str, dict[str, Any]]) -> None:
    token = services["gateway"]["environment"]["ICEFLEET_HTTP_TOKEN"]
    assert re.fullmatch(r"\$\{ICEFLEET_HTTP_TOKEN:\?.+\}", token)


def test_catalog_is_postgres_and_the_warehouse_minio(services: dict[str, dict[str, Any]]) -> None:
    env = services["writer"]["environment"]
    prefix = f"PYICEBERG_CATALOG__{env['ICEFLEET_CATALOG'].upper()}__"
    assert env[prefix + "TYPE"] == "sql"
    assert env[prefix + "URI"].startswith("postgresql+psycopg2://icefleet:")
    assert env[prefix + "URI"].endswith("@postgres:5432/icefleet")
    assert env[prefix + "WAREHOUSE"].startswith("s3://")
    assert env[prefix + "S3__ENDPOINT"] == "http://minio:9000"
    assert env[prefix + "S3__FORCE_VIRTUAL_ADDRESSING"] == "false"  # path-style


def test_image_is_slim_non_root_with_the_entrypoint() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert bases and all(base.startswith("python:3.11-slim") for base in bases)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["icefleet-entrypoint"]' in dockerfile


@pytest.mark.parametrize(
    ("args", "runs"),
    [
        (["worker", "writer"], "icefleet worker writer"),
        (["wait", "--timeout", "5"], "icefleet wait --timeout 5"),  # `wait` is a shell builtin
        (["icefleet", "serve"], "icefleet serve"),
        (["celery", "-A", "workers.app", "beat"], "celery -A workers.app beat"),
        ([], "icefleet --help"),
    ],
)
def test_entrypoint_dispatches(tmp_path: Path, args: list[str], runs: str) -> None:
    # Given stand-ins for icefleet and celery that print what they were asked to run
    for program in ("icefleet", "celery"):
        stub = tmp_path / program
        stub.write_text(f'#!/bin/sh\necho {program} "$@"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}

    # When the entry point runs with the container's command
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    result = subprocess.run(
        ["sh", str(entrypoint), *args], env=env, capture_output=True, text=True, timeout=10
    )

    # Then it ran the right program with the arguments
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == runs


def test_r2_override_switches_every_role_to_the_rest_catalog(
    services: dict[str, dict[str, Any]],
) -> None:
    override = yaml.safe_load((ROOT / "docker" / "compose.r2.yaml").read_text())["services"]
    assert set(override) == set(ICEFLEET_ROLES)
    for name in ICEFLEET_ROLES:
        env = override[name]["environment"]
        assert env["ICEFLEET_CATALOG"] == "r2"
        assert env["PYICEBERG_CATALOG__R2__TYPE"] == "rest"
        assert env["PYICEBERG_CATALOG__R2__URI"].startswith(
            "https://catalog.cloudflarestorage.com/"
        )
        assert env["PYICEBERG_CATALOG__R2__TOKEN"].startswith("${R2_CATALOG_TOKEN:?")
