"""Run benchmarks: ``python -m benchmarks [NAME ...]``; compare two revisions:
``python -m benchmarks compare REV [--bench NAME ...]`` (benchmarks/compare.py).

With no name, every ``bench_*.py`` module of this package runs, in name order; a NAME is a module
name with or without its ``bench_`` prefix. Options after one NAME are that benchmark's own
(``python -m benchmarks overload --duration 600``; ``python -m benchmarks.bench_<name> --help``
lists them); with several names, each runs with its defaults.
Exits non-zero if a benchmark failed or a name is unknown; one failure does not stop the others.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

PREFIX = "bench_"


def available() -> list[str]:
    """The benchmark modules of this package, by module name."""
    here = [str(Path(__file__).parent)]
    return sorted(m.name for m in pkgutil.iter_modules(here) if m.name.startswith(PREFIX))


def select(names: list[str]) -> list[str]:
    """The modules the names ask for, all when none; raises KeyError naming an unknown one."""
    known = available()
    if not names:
        return known
    chosen = []
    for name in names:
        module = name if name.startswith(PREFIX) else PREFIX + name
        if module not in known:
            raise KeyError(name)
        chosen.append(module)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["compare"]:
        from benchmarks.compare import main as compare

        return compare(args[1:])
    cut = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:cut], args[cut:]
    if options and len(names) != 1:
        print("options go after exactly one benchmark name", file=sys.stderr)
        return 2
    if not names and any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        print("\navailable:", ", ".join(m.removeprefix(PREFIX) for m in available()))
        return 0
    try:
        modules = select(names)
    except KeyError as unknown:
        shown = ", ".join(m.removeprefix(PREFIX) for m in available()) or "none"
        print(f"unknown benchmark {unknown}; available: {shown}", file=sys.stderr)
        return 2
    failed = []
    for name in modules:
        print(f"=== {name.removeprefix(PREFIX)} ===", flush=True)
        started = time.perf_counter()
        try:
            code = importlib.import_module(f"{__package__}.{name}").main(options) or 0
        except Exception:
            traceback.print_exc()
            code = 1
        print(
            f"=== {name.removeprefix(PREFIX)}: exit {code} in {time.perf_counter() - started:.1f}s"
        )
        if code:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
