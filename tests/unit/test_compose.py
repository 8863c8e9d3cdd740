"""The promises compose.yaml and docker/ make, checked on the parsed files.

``docker-compose -f compose.yaml config -q`` (run by .ci/run) checks that the file is valid
Compose; these tests check what it says: health checks, restart policies, a writer that scales,
every Redis user waiting for a healthy Redis, Flower behind basic auth, one image for every role
built once, secrets required by the containers rather than by compose, commands the CLI accepts,
a non-root image built from the lock whose entry point dispatches as documented.
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
def compose_text() -> str:
    return (ROOT / "compose.yaml").read_text()


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
    # over TCP: the official image's first-start server listens on the Unix socket only
    test = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in test and test[test.index("-h") + 1] == "127.0.0.1"
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


def test_one_image_for_every_role_built_once(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in ICEFLEET_ROLES}
    assert len(images) == 1
    # one service says how to build it, so `docker compose build` builds it once, not per role
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["writer"]
    assert services["writer"]["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}
    assert all(services[name].get("init") is True for name in ICEFLEET_ROLES)


def test_no_compose_command_needs_env(compose_text: str) -> None:
    # `${VAR:?message}` would make every command (config, ps, down) fail without .env
    assert not re.search(r"\$\{[A-Z0-9_]+:?\?", compose_text)
    r2 = (ROOT / "docker" / "compose.r2.yaml").read_text()
    assert not re.search(r"\$\{[A-Z0-9_]+:?\?", r2)


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
    env = flower["environment"]
    assert env["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    assert "FLOWER_BASIC_AUTH=user:password" in env["ENTRYPOINT_REQUIRE_FLOWER_BASIC_AUTH"]
    assert flower["ports"] == ["${FLOWER_PORT:-5555}:5555"]


def test_gateway_requires_a_token(services: dict[str, dict[str, Any]]) -> None:
    env = services["gateway"]["environment"]
    assert env["ICEFLEET_HTTP_TOKEN"] == "${ICEFLEET_HTTP_TOKEN:-}"
    assert "ICEFLEET_HTTP_TOKEN" in env["ENTRYPOINT_REQUIRE_ICEFLEET_HTTP_TOKEN"]


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
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert bases and all(base == "${PYTHON_IMAGE}" for base in bases)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["icefleet-entrypoint"]' in dockerfile


def test_image_builds_with_the_classic_builder_too() -> None:
    # Debian's docker-compose 1.29 builds with the classic builder: no COPY --chmod (or other
    # BuildKit-only flags), and the context filtered by the root .dockerignore, which BuildKit
    # reads too (a docker/Dockerfile.dockerignore would win over it there, and nowhere else)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert not re.search(r"^(COPY|ADD|RUN) --(chmod|chown|link|mount)", dockerfile, re.M)
    assert not (ROOT / "docker" / "Dockerfile.dockerignore").exists()
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # everything, but what the image needs
    for path in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert f"!{path.rstrip('/')}" in ignored or f"!{path.rstrip('/')}/" in ignored, path


def test_secrets_stay_out_of_git() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_image_installs_the_lock() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install --require-hashes -r requirements\.lock", dockerfile)
    assert re.search(r"pip install --no-deps --no-build-isolation \.", dockerfile)


def test_lock_pins_every_dependency_with_hashes() -> None:
    # made by `make lock` (uv pip compile); here only checked against pyproject.toml
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "docker" / "requirements.lock").read_text()
    pins = {
        canonicalize_name(m["name"]): m["version"]
        for m in re.finditer(r"^(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)", lock, re.M)
    }
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2])
    assert pins and all("--hash=sha256:" in entry for entry in entries if "==" in entry)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in docker/requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {requirement}: run make lock"
        )


@pytest.mark.parametrize(
    ("env", "code", "says"),
    [
        (
            {"ENTRYPOINT_REQUIRE_TOKEN": "set TOKEN in .env"},
            78,
            "TOKEN is not set: set TOKEN in .env",
        ),
        ({"ENTRYPOINT_REQUIRE_TOKEN": "set it", "TOKEN": ""}, 78, "TOKEN is not set: set it"),
        ({"ENTRYPOINT_REQUIRE_TOKEN": "set it", "TOKEN": "s3cret"}, 0, ""),
    ],
)
def test_entrypoint_refuses_to_start_without_a_required_secret(
    tmp_path: Path, env: dict[str, str], code: int, says: str
) -> None:
    stub = tmp_path / "icefleet"
    stub.write_text('#!/bin/sh\necho icefleet "$@"\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), "serve"],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert (result.stdout.strip() == "icefleet serve") == (code == 0)


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
        assert env["PYICEBERG_CATALOG__R2__TOKEN"] == "${R2_CATALOG_TOKEN:-}"
        for variable in ("R2_ACCOUNT_ID", "R2_BUCKET", "PYICEBERG_CATALOG__R2__TOKEN"):
            assert env[f"ENTRYPOINT_REQUIRE_{variable}"].startswith("set R2_"), variable
