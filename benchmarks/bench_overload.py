"""Holding under overload: the budget's cost per batch, the cost of durable acknowledgements, and a
soak at twice the fleet's capacity with its writers paused part of the time.

Three parts, each printed beside its baseline measured in the same run:

1. **Accounting** (common/coord/budget.py): one batch's bookkeeping, admit and release (two Lua
   calls), against the same bookkeeping without a budget (a MULTI to add, a MULTI to remove, as
   before the budget), with 10 and with 10,000 batches outstanding.
2. **Durable acknowledgements**: requests per second through a real gateway (``icefleet serve``,
   a process of its own) on a Redis with ``appendfsync everysec`` (a 202 means "in Redis") and on
   one with ``appendfsync always`` and ``ICEFLEET_ACK_DURABILITY=fsync`` (a 202 means "on disk").
3. **Soak**: a real fleet (``icefleet up``'s embedded Redis, bounded and noeviction, a writer, the
   committer) behind a gateway, a small budget. A calibration phase measures what the fleet
   accepts when saturated (its capacity); then clients post at twice that for the rest of the
   run, the writers stopped (SIGSTOP) from 30 % to 55 % of it. Printed: requests accepted and
   refused (429, 503), Redis ``used_memory`` peak against its ``maxmemory``; then every accepted
   event must be read back exactly once with iceberg-rust, and none of the refused ones.

    python -m benchmarks overload                         # soak of 600 s (OVERLOAD_DURATION_S)
    python -m benchmarks.bench_overload --duration 120    # shorter, on a loaded machine

Exits non-zero when an accepted event is missing or doubled, or a refused one landed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks._shared import environment, now_iso, row, write_results
from common.coord import keys
from common.coord.budget import Budget, admit, release
from tests.support.fleet import wait_idle
from tests.support.readback import rust_ids
from tests.support.services import RedisProcess, free_port, wait_for_port

TABLE = "events.overload"
EVENT_TYPE = "com.bench.overload"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_overload", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("OVERLOAD_DURATION_S", "600")),
        help="seconds of the soak (default 600, or OVERLOAD_DURATION_S)",
    )
    parser.add_argument("--durability-s", type=float, default=10.0, help="seconds per config")
    parser.add_argument("--events", type=int, default=20, help="events per soak request")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--budget-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--budget-batches", type=int, default=200)
    parser.add_argument("--skip", choices=("accounting", "durability", "soak"), action="append")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


# --- 1. accounting ------------------------------------------------------------------------------


def _without_budget(client: redis.Redis, batch_id: str, now_ms: int) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.zadd(keys.outstanding(), {batch_id: now_ms}, nx=True)
    pipe.zscore(keys.outstanding(), batch_id)
    pipe.execute()
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.outstanding(), batch_id)
    pipe.hdel(keys.deliveries(), batch_id)
    pipe.delete(keys.payload(batch_id))
    pipe.execute()


def _with_budget(client: redis.Redis, batch_id: str, now_ms: int) -> None:
    admit(client, batch_id, enqueued_ms=now_ms, size=4_000, budget=Budget(2**40, 2**30))
    release(client, batch_id)


def accounting(work: Path, rounds: int = 3_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with RedisProcess(work / "redis-accounting") as server:
        client = redis.Redis.from_url(server.url)
        for backlog in (10, 10_000):
            client.flushall()
            for n in range(backlog):
                admit(client, f"bg{n}", enqueued_ms=n, size=1_000, budget=None)
            figures = {"without budget": float("inf"), "with budget": float("inf")}
            for repeat in range(5):  # interleaved, best of five: the machine is shared
                for name, step in (
                    ("without budget", _without_budget),
                    ("with budget", _with_budget),
                ):
                    started = time.perf_counter()
                    for n in range(rounds):
                        step(client, f"{name}-{repeat}-{n}", n)
                    elapsed = (time.perf_counter() - started) / rounds * 1e6
                    figures[name] = min(figures[name], elapsed)
            out[f"backlog_{backlog}"] = {
                "us_per_batch_without_budget": round(figures["without budget"], 1),
                "us_per_batch_with_budget": round(figures["with budget"], 1),
                "ratio": round(figures["with budget"] / figures["without budget"], 2),
            }
        client.close()
    return out


# --- HTTP clients --------------------------------------------------------------------------------


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)  # event ids of 202s
    refused: list[str] = field(default_factory=list)  # event ids of 429s and 503s
    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, ids: list[str]) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == 202:
                self.accepted.extend(ids)
            elif status in (429, 503):
                self.refused.extend(ids)


def body_of(ids: list[str], rng: random.Random) -> bytes:
    events = [
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/bench/overload",
            "type": EVENT_TYPE,
            "time": "2026-01-01T00:00:00Z",
            "data": {"user": f"u{rng.randrange(1000)}", "note": rng.randbytes(200).hex()},
        }
        for event_id in ids
    ]
    return json.dumps(events).encode()


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/events", body, {"Content-Type": "application/cloudevents-batch+json"})
    answer = conn.getresponse()
    answer.read()
    return int(answer.status)


@contextmanager
def gateway(redis_url: str, home: Path, **env: str) -> Iterator[int]:
    """``icefleet serve`` in a process of its own; yields its port."""
    port = free_port()
    variables = {k: v for k, v in os.environ.items() if not k.startswith("ICEFLEET_")}
    variables.update({**env, "ICEFLEET_REDIS_URL": redis_url, "ICEFLEET_HOME": str(home)})
    log = (home / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli.main", "serve", "--port", str(port)],
        env=variables,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, timeout_s=60)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def hammer(port: int, seconds: float, clients: int, per_request: int, prefix: str) -> Tally:
    """Post as fast as ``clients`` threads can for ``seconds``."""
    tally = Tally()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        rng = random.Random(n)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        sent = 0
        while time.monotonic() < stop:
            ids = [f"{prefix}-{n}-{sent}-{i}" for i in range(per_request)]
            sent += 1
            try:
                tally.add(post(conn, body_of(ids, rng)), ids)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                tally.add(0, ids)
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


# --- 2. durable acknowledgements --------------------------------------------------------------------


def durability(work: Path, seconds: float, clients: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fsync, ack in (("everysec", "everysec", "redis"), ("always", "always", "fsync")):
        home = work / f"durability-{name}"
        home.mkdir(parents=True, exist_ok=True)
        with RedisProcess(home / "redis") as server:
            redis.Redis.from_url(server.url).config_set("appendfsync", fsync)
            with gateway(server.url, home, ICEFLEET_ACK_DURABILITY=ack) as port:
                tally = hammer(port, seconds, clients, 1, f"dur-{name}")
        accepted = tally.statuses[202]
        out[name] = {
            "requests_per_s": round(accepted / seconds, 1),
            "statuses": dict(tally.statuses),
        }
    out["ratio_always_to_everysec"] = round(
        out["always"]["requests_per_s"] / max(out["everysec"]["requests_per_s"], 1e-9), 2
    )
    return out


# --- 3. soak ----------------------------------------------------------------------------------------


class Load:
    """Clients posting at a target rate (requests/s), open loop; refusals are not retried."""

    def __init__(self, port: int, clients: int, per_request: int) -> None:
        self.port = port
        self.clients = clients
        self.per_request = per_request
        self.rate = 0.0  # 0: as fast as possible
        self.tally = Tally()
        self._stop = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate, self._next, self._started = rate, 0, time.monotonic()

    def _ticket(self) -> float:
        """When this request may go (monotonic), spreading requests evenly at the rate."""
        with self._lock:
            n, self._next = self._next, self._next + 1
            return 0.0 if self.rate <= 0 else self._started + n / self.rate

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        sent = 0
        while not self._stop.is_set():
            at = self._ticket()
            if at and (delay := at - time.monotonic()) > 0 and self._stop.wait(delay):
                break
            ids = [f"soak-{n}-{sent}-{i}" for i in range(self.per_request)]
            sent += 1
            try:
                self.tally.add(post(conn, body_of(ids, rng)), ids)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.tally.add(0, ids)  # unknown outcome: neither accepted nor refused
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _signal_writers(fleet: Any, signum: int) -> None:
    for proc in fleet.processes:
        if proc.name.startswith("writer") and proc.pid:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)


def soak(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from common.settings import load_settings
    from tests.support.fleet import environment, fleet_env
    from tests.support.stack import make_stack
    from workers.fleet import Fleet

    home = work / "soak"
    env = fleet_env(
        ICEFLEET_HOME=str(home),
        ICEFLEET_BUDGET_MAX_BYTES=str(args.budget_bytes),
        ICEFLEET_BUDGET_MAX_BATCHES=str(args.budget_batches),
        ICEFLEET_ROUTES=f"{EVENT_TYPE}={TABLE}",
    )
    env.pop("ICEFLEET_REDIS_URL", None)
    result: dict[str, Any] = {}
    with environment(env):
        settings = load_settings()
        fleet = Fleet(settings, writers=1, spawn_redis=True)
        try:
            fleet.start()
            fleet.wait_ready(timeout_s=180)
            client = redis.Redis.from_url(fleet.settings.redis_url)
            limit = int(client.config_get("maxmemory")["maxmemory"])
            peak = {"used": 0}
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(0.5):
                    with suppress(redis.RedisError):
                        used = int(client.info("memory")["used_memory"])
                        peak["used"] = max(peak["used"], used)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with gateway(fleet.settings.redis_url, home, **env) as port:
                load = Load(port, args.clients, args.events).start()
                calibration = max(10.0, args.duration * 0.15)
                time.sleep(calibration / 2)
                before = load.tally.statuses[202]
                time.sleep(calibration / 2)
                capacity = (load.tally.statuses[202] - before) / (calibration / 2)
                target = 2 * max(capacity, 1.0)
                load.set_rate(target)
                rest = args.duration - calibration
                main_started = time.monotonic()
                at_start = Counter(load.tally.statuses)
                time.sleep(rest * 0.30)
                _signal_writers(fleet, signal.SIGSTOP)
                time.sleep(rest * 0.25)
                _signal_writers(fleet, signal.SIGCONT)
                time.sleep(max(0.0, rest - (time.monotonic() - main_started)))
                load.stop()
            main_statuses = Counter(load.tally.statuses)
            main_statuses.subtract(at_start)
            wait_idle(client, timeout_s=max(300.0, args.duration))
            sampling.set()
            sampler.join()
            info = client.info("memory")
            stack = make_stack(fleet.settings.redis_url, home)
            try:
                found = rust_ids(stack.table(TABLE), {})
            finally:
                stack.close()
            counts = Counter(found)
            accepted = set(load.tally.accepted)
            refused = set(load.tally.refused)
            result = {
                "duration_s": args.duration,
                "calibration_s": round(calibration, 1),
                "capacity_requests_per_s": round(capacity, 1),
                "target_requests_per_s": round(target, 1),
                "statuses_total": dict(load.tally.statuses),
                "statuses_after_calibration": {k: v for k, v in main_statuses.items() if v},
                "events_accepted": len(accepted),
                "events_refused": len(refused),
                "redis_used_memory_peak_sampled": peak["used"],
                "redis_used_memory_peak": int(info["used_memory_peak"]),
                "redis_maxmemory": limit,
                "read_back_rows": len(found),
                "accepted_missing": len(accepted - counts.keys()),
                "accepted_doubled": sum(1 for i in accepted if counts[i] > 1),
                "refused_landed": len(refused & counts.keys()),
                "unexpected": len(counts.keys() - accepted - refused),
            }
            client.close()
        finally:
            _signal_writers(fleet, signal.SIGCONT)
            fleet.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # under `python -m benchmarks overload` the runner's arguments are names
        argv = [a for a in sys.argv[1:] if a not in ("overload", "bench_overload")]
    args = parse_args(argv)
    skip = set(args.skip or ())
    results: dict[str, Any] = {"at": now_iso(), "environment": environment()}
    with tempfile.TemporaryDirectory(prefix="icefleet-overload-") as tmp:
        work = Path(tmp)
        if "accounting" not in skip:
            acc = results["accounting"] = accounting(work)
            print("accounting, microseconds per batch (admit + release), best of 5:")
            for backlog, figures in acc.items():
                print(
                    row(
                        f"{backlog.replace('_', ' ')} outstanding",
                        f"{figures['us_per_batch_with_budget']:>7.1f} with budget vs "
                        f"{figures['us_per_batch_without_budget']:>6.1f} without: "
                        f"x{figures['ratio']:.2f}",
                    )
                )
        if "durability" not in skip:
            dur = results["durability"] = durability(work, args.durability_s, args.clients)
            print("durable acknowledgements, gateway requests/s (1 event each):")
            print(
                row(
                    "appendfsync everysec (202 = in Redis)",
                    f"{dur['everysec']['requests_per_s']:>8.1f}",
                )
            )
            print(
                row(
                    "appendfsync always + ACK_DURABILITY=fsync",
                    f"{dur['always']['requests_per_s']:>8.1f}",
                )
            )
            print(row("ratio always / everysec", f"x{dur['ratio_always_to_everysec']:.2f}"))
        if "soak" not in skip:
            res = results["soak"] = soak(work, args)
            print(f"soak, {args.duration:.0f}s (calibration {res['calibration_s']}s):")
            for key in (
                "capacity_requests_per_s",
                "target_requests_per_s",
                "statuses_after_calibration",
                "events_accepted",
                "events_refused",
                "redis_used_memory_peak",
                "redis_maxmemory",
                "read_back_rows",
                "accepted_missing",
                "accepted_doubled",
                "refused_landed",
                "unexpected",
            ):
                print(row(key.replace("_", " "), str(res[key])))
    path = write_results("overload", results, args.json)
    print(f"results: {path}")
    soak_result = results.get("soak")
    if soak_result and (
        soak_result["accepted_missing"]
        or soak_result["accepted_doubled"]
        or soak_result["refused_landed"]
        or soak_result["unexpected"]
    ):
        print("FAILED: the read-back does not match what was accepted")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
