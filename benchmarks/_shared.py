"""Helpers the benchmark modules share: timing, medians, the environment, JSON results, tables.

Not a benchmark (the runner only picks ``bench_*`` modules). Conventions, the same as
``bench_group_commit``: every figure is printed beside a baseline measured in the same run, the
ratio and the seed's target; the machine is shared, so figures are medians of repeats; results go
to ``benchmarks/results/<name>.json`` (not committed).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def timed_ms(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def environment(catalog: str = "SQLite (embedded), local file warehouse") -> dict[str, Any]:
    import pyarrow
    import pyiceberg

    return {
        "python": platform.python_version(),
        "pyiceberg": pyiceberg.__version__,
        "pyarrow": pyarrow.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "catalog": catalog,
        "load_average_at_end": load_average(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    ``VmHWM`` from ``/proc/self/status`` where there is one: Linux keeps ``ru_maxrss`` across
    ``exec``, so a child started by a big parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def write_results(name: str, result: dict[str, Any], output: Path | None = None) -> Path:
    path = output or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else "MET" if met else "MISSED"


def row(name: str, value: str, width: int = 46) -> str:
    return f"  {name:<{width}}{value}"


def fmt_rate(events_per_s: float) -> str:
    return f"{events_per_s:>10,.0f} ev/s"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as ``common.ingest.events.paused_gc``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
