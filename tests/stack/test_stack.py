"""The production stack, built and run for real (``make test-stack``; issue 15).

docs/compose.md's commands, word for word, on compose.yaml as it is: build the image (once), bring
the stack up with three writers and two committers, send events in the three CloudEvents HTTP
modes to many tables, and meanwhile restart Redis and ``docker kill`` a writer and a committer
(each with a task in hand when Flower shows one). Then every table is read back from the S3 server through the
PostgreSQL catalog with iceberg-rust: each accepted event is there exactly once. Flower lists
every writer and committer, the two committers committed different tables at the same time, and
``docker compose stop`` stops every icefleet role cleanly (exit status 0). Everything is torn
down, also on failure.

Needs a Docker engine with Compose v2 (skips locally without one, fails in CI); on a machine that
cannot pull images, docker/stack/prepare.sh builds stand-ins first (.ci/run does).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.stack.stack import (
    FLOWER_PORT,
    GATEWAY_PORT,
    ICEFLEET_ROLES,
    MODES,
    Stack,
    Traffic,
    doc_blocks,
    duplicates,
    http_json,
    make_posts,
    overlapping,
    read_tables,
    require_engine,
    run,
    say,
    wait_for,
)
from tests.support.services import LOOPBACK

pytestmark = pytest.mark.timeout(2400)  # the `stack` marker comes from the directory

TABLES = [f"stack_t{n:02d}" for n in range(12)]  # routed by type: events.stack_t00 ...
# One event per request in structured and binary mode makes one batch, one data file and one write
# task each: a few hundred of those and thousands of events in batches keep three writers and two
# committers busy for a while on a small machine.
REQUESTS = {"structured": 100, "binary": 100, "batch": 40}
BATCH_EVENTS = 100
FAULTS_AT = (
    0.2,
    0.4,
    0.6,
)  # share of the requests answered: restart Redis, kill a writer, a committer
HOLD_AT = 0.85  # each sender waits there until the faults are done: traffic goes on after them
DOC_EVENTS = {"events.order": {"1", "2", "3"}, "events.refund": {"4"}}  # docs/compose.md's curls


def test_the_documented_stack_lands_every_accepted_event_exactly_once(tmp_path: Path) -> None:
    require_engine()
    started = time.monotonic()
    stack = Stack(tmp_path)
    report: dict[str, Any] = {"phases": {}}
    try:
        exercise(stack, report)
    except BaseException:
        stack.diagnose()
        raise
    finally:
        stack.teardown()
        report["wall_s"] = round(time.monotonic() - started)
        summarise(report)


def exercise(stack: Stack, report: dict[str, Any]) -> None:
    blocks = doc_blocks()
    scale = {name: int(n) for name, n in re.findall(r"--scale (\w+)=(\d+)", blocks["start"])}
    assert scale.get("writer", 1) >= 2 and scale.get("committer", 1) >= 2, scale

    def phase(name: str, since: float) -> None:
        report["phases"][name] = round(time.monotonic() - since)

    # compose commands need no .env (no `${VAR:?}`): the secrets are the containers' business
    report["standins"] = stack.write_override()
    say(f"project {stack.project}; stand-ins: {report['standins'] or 'none'}")
    stack.compose("config", "--quiet")
    stack.compose("down")

    t = time.monotonic()
    stack.sh(blocks["env"], timeout_s=60)
    env = stack.write_env()
    say("docs: start (build, up --wait, ps)")
    out = stack.sh(blocks["start"], timeout_s=1500)
    phase("build and up", t)
    say(
        "\n".join(
            line
            for line in out.splitlines()
            if re.search(r"Buil[dt]|Healthy|NAME|icefleet-stack", line)
        )
    )
    check_one_image(stack, report, out)
    check_secrets_are_required(stack)

    writers, committers = stack.containers("writer"), stack.containers("committer")
    assert (len(writers), len(committers)) == (scale["writer"], scale["committer"])
    fleet = {f"writer@{stack.hostname(c)}": c for c in writers} | {
        f"committer@{stack.hostname(c)}": c for c in committers
    }
    flower_auth = tuple(env["FLOWER_BASIC_AUTH"].split(":", 1))
    assert http_json(f"http://{LOOPBACK}:{FLOWER_PORT}/api/workers")[0] == 401
    check_flower_lists(fleet, flower_auth)
    status, _ = http_json(f"http://{LOOPBACK}:{GATEWAY_PORT}/events", data=b"{}")
    assert status == 401  # the gateway wants its token

    say("docs: send (curl, one request per mode)")
    say(stack.sh(blocks["send"], timeout_s=120))

    t = time.monotonic()
    run_id = secrets.token_hex(3)
    posts = {
        mode: make_posts(
            mode,
            run_id,
            requests=count,
            per_request=BATCH_EVENTS if mode == "batch" else 1,
            tables=TABLES,
            token=env["ICEFLEET_HTTP_TOKEN"],
        )
        for mode, count in REQUESTS.items()
    }
    traffic = Traffic(GATEWAY_PORT, posts, hold_at=HOLD_AT)
    say(f"sending {traffic.total} requests to {len(TABLES)} tables in {len(MODES)} modes")
    traffic.start()
    report["faults"] = faults = inject_faults(stack, traffic, writers, committers, flower_auth)
    traffic.release()
    traffic.join(timeout_s=1200)
    phase("traffic", t)
    report["traffic"] = traffic.stats

    # an operator (or a supervisor) brings the killed containers back
    killed = [f["container"] for f in faults if f["action"] == "kill"]
    run(["docker", "start", *killed], timeout_s=120)

    t = time.monotonic()
    say("docs: watch (icefleet wait, status, Flower)")
    say(stack.sh(blocks["watch"], timeout_s=1200)[-4000:])
    phase("until committed", t)

    # What the killed workers held (delivered, never acknowledged) comes back once Redis'
    # visibility timeout has passed, and runs again. Wait for that and then for a quiet fleet
    # (nothing queued, delivered, outstanding, pending or prepared), so that a batch written
    # twice or lost shows in the tables read next.
    t = time.monotonic()
    last_kill = max(f["epoch_s"] for f in faults if f["action"] == "kill")

    def quiet() -> dict[str, Any] | None:
        held = stack.compose(
            "exec",
            "-T",
            "redis",
            "redis-cli",
            "ZCOUNT",
            "unacked_index",
            "-inf",
            f"{last_kill:.3f}",
        )
        if int(held.strip()) != 0:
            return None
        status = json.loads(
            stack.compose("exec", "-T", "gateway", "icefleet", "status", "--json", "--no-workers")
        )
        backlog = status["backlog"]
        busy = backlog["unacked"] or any(backlog["queued"].values()) or not backlog["idle"]
        return None if busy else status

    quiet_status = wait_for(
        "the killed workers' messages run again, then a quiet fleet",
        quiet,
        timeout_s=900,
        every_s=3,
    )
    phase("until redelivered and quiet", t)
    assert quiet_status["dead_letters"] == 0, quiet_status

    t = time.monotonic()
    report["read"] = read_back(stack, env, traffic)
    phase("read back", t)

    check_flower_lists(fleet, flower_auth)  # the killed ones are back under their names
    committer_names = {name for name in fleet if name.startswith("committer@")}
    report["commits"] = check_parallel_commits(flower_auth, committers=committer_names)

    say("docs: stop")
    stack.sh(blocks["stop"], timeout_s=600)
    report["exit_codes"] = exit_codes = {
        f"{service}#{n}": stack.inspect(c)["State"]["ExitCode"]
        for service in ICEFLEET_ROLES
        for n, c in enumerate(stack.containers(service), 1)
    }
    assert set(exit_codes.values()) == {0}, f"`docker compose stop` exit statuses: {exit_codes}"
    say("docs: down")
    stack.sh(blocks["down"], timeout_s=600)


# --- steps -----------------------------------------------------------------------------------------


def check_one_image(stack: Stack, report: dict[str, Any], build_output: str) -> None:
    """Compose built the image once (one service says how), and every role runs it."""
    config = json.loads(stack.compose("config", "--format", "json"))
    builders = sorted(name for name, s in config["services"].items() if "build" in s)
    assert builders == ["writer"], builders
    built = [line for line in build_output.splitlines() if re.search(r"\bBuilt\s*$", line)]
    image = json.loads(run(["docker", "image", "inspect", stack.image], timeout_s=60).stdout)[0]
    for service in ICEFLEET_ROLES:
        for container in stack.containers(service):
            assert stack.inspect(container)["Image"] == image["Id"], (service, container)
    report["image"] = {"tag": stack.image, "size_bytes": image["Size"], "builds": len(built)}
    assert len(built) == 1, built


def check_secrets_are_required(stack: Stack) -> None:
    """The gateway and Flower refuse to start without their secret, and say which."""
    for service, variable in (("flower", "FLOWER_BASIC_AUTH"), ("gateway", "ICEFLEET_HTTP_TOKEN")):
        result = run(
            ["docker", "compose", "run", "--rm", "--no-deps", "-e", f"{variable}=", service],
            cwd=stack.dir,
            env=stack.env,
            timeout_s=120,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 78, (service, result.returncode, output[-500:])
        assert f"{variable} is not set" in output, output[-500:]


def check_flower_lists(fleet: dict[str, str], auth: tuple[str, ...]) -> None:
    """Flower's API lists every writer and committer, each answering and alive."""
    url = f"http://{LOOPBACK}:{FLOWER_PORT}/api/workers"

    def listed() -> bool:
        status, workers = http_json(url + "?refresh=1", auth=(auth[0], auth[1]), timeout_s=60)
        if status != 200 or not set(fleet) <= set(workers or {}):
            return False
        _, alive = http_json(url + "?status=1", auth=(auth[0], auth[1]))
        return all((alive or {}).get(name) for name in fleet)

    wait_for(f"Flower lists {sorted(fleet)}", listed, timeout_s=300, every_s=3)
    say(f"Flower lists every writer and committer: {sorted(fleet)}")


def inject_faults(
    stack: Stack,
    traffic: Traffic,
    writers: list[str],
    committers: list[str],
    auth: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Mid-stream: restart Redis (requests in flight get 503 and are sent again), then kill a
    writer with a write in hand, then a committer with a commit in hand."""
    faults = []
    plan = [
        ("restart", "redis", stack.containers("redis"), None),
        ("kill", "writer", writers, "icefleet.write_batch"),
        ("kill", "committer", committers, "icefleet.commit_table"),
    ]
    for share, (action, service, candidates, task) in zip(FAULTS_AT, plan, strict=True):
        wait_for(
            f"{share:.0%} of the requests answered",
            lambda share=share: traffic.errors or traffic.done >= share * traffic.total,
            timeout_s=900,
            every_s=0.2,
        )
        if traffic.errors:
            raise traffic.errors[0]
        container, busy = candidates[0], False
        if task is not None:
            container, busy = busy_container(stack, candidates, service, task, auth)
        t = time.monotonic()
        command = (
            ["docker", "kill", container] if action == "kill" else ["docker", "restart", container]
        )
        run(command, timeout_s=120)
        fault = {
            "epoch_s": time.time(),
            "action": action,
            "service": service,
            "container": container,
            "task_in_hand": busy,
            "at_requests": traffic.done,
            "took_s": round(time.monotonic() - t, 1),
        }
        say(f"fault: {fault}")
        faults.append(fault)
    return faults


def busy_container(
    stack: Stack, candidates: list[str], service: str, task: str, auth: tuple[str, ...]
) -> tuple[str, bool]:
    """One of the containers with a ``task`` started and not finished (as Flower's events tell),
    looked for during up to 30 s; else the first."""
    hosts = {f"{service}@{stack.hostname(c)}": c for c in candidates}
    url = f"http://{LOOPBACK}:{FLOWER_PORT}/api/tasks?state=STARTED&taskname={task}&limit=1000"

    def find() -> str | None:
        _, tasks = http_json(url, auth=(auth[0], auth[1]))
        for info in (tasks or {}).values():
            if info.get("worker") in hosts:
                return hosts[info["worker"]]
        return None

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found, True
        time.sleep(0.1)
    return candidates[0], False


def read_back(stack: Stack, env: dict[str, str], traffic: Traffic) -> dict[str, Any]:
    """Every table through the PostgreSQL catalog with iceberg-rust; each accepted event once."""
    catalog_url = (
        f"postgresql+psycopg2://icefleet:{env['POSTGRES_PASSWORD']}@{LOOPBACK}:"
        f"{stack.port('postgres', 5432)}/icefleet"
    )
    file_io = {
        "s3.endpoint": f"http://{LOOPBACK}:{stack.port('minio', 9000)}",
        "s3.access-key-id": env["MINIO_ROOT_USER"],
        "s3.secret-access-key": env["MINIO_ROOT_PASSWORD"],
        "s3.region": "us-east-1",
        "s3.path-style-access": "true",  # http://127.0.0.1:PORT/<bucket>/..., as compose.yaml says
    }
    tables = read_tables(catalog_url, file_io)
    expected: dict[str, set[str]] = {}
    for post in traffic.accepted.values():
        for event_id, table in zip(post.ids, post.tables, strict=True):
            expected.setdefault(table, set()).add(event_id)
    expected_ids = [i for ids in expected.values() for i in ids]
    assert (
        len(expected_ids) == len(set(expected_ids)) == sum(s.events for s in traffic.stats.values())
    )
    for table, ids in expected.items():
        found = tables.get(table, [])
        assert not duplicates(found), f"{table}: duplicated ids {list(duplicates(found))[:10]}"
        missing, extra = ids - set(found), set(found) - ids
        assert not missing, (
            f"{table}: {len(missing)} accepted events missing, e.g. {sorted(missing)[:5]}"
        )
        assert not extra, f"{table}: {len(extra)} rows never sent, e.g. {sorted(extra)[:5]}"
    for table, ids in DOC_EVENTS.items():
        found = tables.get(table, [])
        assert sorted(found) == sorted(ids), f"docs/compose.md's events in {table}: {found}"
    rows = {t: len(tables[t]) for t in sorted(expected)}
    say(f"read back {sum(rows.values())} rows from {len(rows)} tables, no duplicate, none missing")
    return {"rows": sum(rows.values()), "tables": rows, "catalog_tables": sorted(tables)}


def check_parallel_commits(auth: tuple[str, ...], committers: set[str]) -> dict[str, Any]:
    """Both committers committed, and commits of different tables ran at the same time on two
    committers (Flower's task events: worker, start and end of each commit task)."""
    url = f"http://{LOOPBACK}:{FLOWER_PORT}/api/tasks?taskname=icefleet.commit_table&limit=100000"
    _, tasks = http_json(url, auth=(auth[0], auth[1]), timeout_s=120)
    intervals = []
    per_committer: Counter[str] = Counter()
    for info in (tasks or {}).values():
        if info.get("state") != "SUCCESS" or not info.get("started") or not info.get("succeeded"):
            continue
        table = re.search(r"events\.\w+|icefleet\.\w+", str(info.get("args")))
        worker = str(info.get("worker"))
        per_committer[worker] += 1
        intervals.append(
            (worker, table[0] if table else "?", float(info["started"]), float(info["succeeded"]))
        )
    pairs = sum(1 for _ in overlapping(intervals))
    say(f"commit tasks per committer {dict(per_committer)}; concurrent pairs {pairs}")
    assert len(set(per_committer) & committers) >= 2, dict(per_committer)
    assert pairs > 0, "no two commits of different tables ran at the same time"
    return {"per_committer": dict(per_committer), "concurrent_pairs": pairs}


def summarise(report: dict[str, Any]) -> None:
    lines = [f"wall time {report.get('wall_s')} s; phases (s): {report['phases']}"]
    if "image" in report:
        image = report["image"]
        lines.append(
            f"image {image['tag']}: {image['size_bytes'] / 1e6:.0f} MB, built {image['builds']}x"
        )
    for mode, stats in report.get("traffic", {}).items():
        lines.append(
            f"sent {mode}: {stats.requests} requests, {stats.events} events accepted, "
            f"{stats.retries} retries, answers {dict(stats.answers)}"
        )
    for fault in report.get("faults", []):
        lines.append(
            f"fault: {fault['action']} {fault['service']} {fault['container'][:12]} after "
            f"{fault['at_requests']} requests (task in hand: {fault['task_in_hand']})"
        )
    if "read" in report:
        lines.append(f"read back: {report['read']['rows']} rows, {report['read']['tables']}")
    if "commits" in report:
        lines.append(f"commits: {report['commits']}")
    if "exit_codes" in report:
        lines.append(f"exit statuses after docker compose stop: {report['exit_codes']}")
    say("summary\n  " + "\n  ".join(lines))
