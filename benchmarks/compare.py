"""Compare benchmark figures of two git revisions: ``python -m benchmarks compare REV``.

Runs the chosen benchmarks (``--bench writer``, repeatable; ``writer`` by default) on ``REV`` and
on this working tree (uncommitted changes included; ``--against REV2`` for another revision),
each revision from its own ``git worktree`` in a temporary directory and each run in a fresh
process with ``PYTHONPATH`` at that tree. Rounds are interleaved (A B, then B A, ...), so a
neighbour's load drifting during the comparison hits both sides alike.

Every numeric figure a benchmark writes to its JSON under a key ending in ``_median`` or inside
a ``ratios`` object is compared: per round, the ratio new / old; the change is the geometric mean
of those ratios with a 95 % Student t interval (paired by round, on the logarithms: a neighbour's
load moves both sides of a round together; with few rounds a t interval is honestly wide, where a
bootstrap would not be). Ratios and rates (``*_per_*``) are better higher, all others (``ms``,
seconds, MiB) better lower. Ratios against a baseline measured in the same run (icefleet / raw
ceiling) cancel most of the machine's drift: trust them first. A figure is flagged
REGRESSION when it got worse by more than ``--threshold`` (5 %) and the whole interval is on the
worse side of no change, "worse?" when the point estimate is worse by more than the threshold but
the interval still includes no change (run more rounds). Exit status 1 if any REGRESSION.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Arguments that make one run of a benchmark short: rounds come from the comparison instead.
QUICK_ARGS: dict[str, list[str]] = {
    "writer": ["--rounds", "1"],
    "payload": ["--rounds", "5"],
    "memory": ["--batches", "3"],
    "fleet": ["--events", "20000", "--rounds", "1"],
}
# Student t, 0.975 quantile, by degrees of freedom (stdlib has no t distribution; scipy is not
# a dependency); beyond 30, the normal quantile
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Change:
    """One figure's change from the old to the new revision."""

    figure: str
    old: float  # medians over rounds
    new: float
    change: float  # relative, in the "better" direction's sign as measured (new/old - 1)
    low: float  # 95 % interval of the change
    high: float
    higher_is_better: bool

    def verdict(self, threshold: float) -> str:
        worse = -1 if self.higher_is_better else 1  # the sign of a change for the worse
        if worse * self.change > threshold:
            supported = (self.high < 0) if self.higher_is_better else (self.low > 0)
            return "REGRESSION" if supported else "worse?"
        better = (self.low > 0) if self.higher_is_better else (self.high < 0)
        return "better" if better and abs(self.change) > threshold else ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__)
    parser.add_argument("rev", help="the revision to compare against (the old side)")
    parser.add_argument(
        "--against", default=None, help="the new side: a revision (default: this working tree)"
    )
    parser.add_argument("--bench", action="append", default=None, help="benchmark name")
    parser.add_argument("--rounds", type=int, default=5, help="runs per side and benchmark")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative, default 0.05")
    parser.add_argument(
        "--bench-args", default=None, help="arguments for every run instead of the quick ones"
    )
    return parser.parse_args(argv)


@contextmanager
def checkout(rev: str | None, parent: Path) -> Iterator[Path]:
    """A tree of ``rev`` (a detached ``git worktree``, removed after), or this tree for None."""
    if rev is None:
        yield REPO
        return
    path = parent / f"rev-{len(list(parent.iterdir()))}"
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(path), rev], check=True)
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def run_once(tree: Path, bench: str, args: list[str], output: Path) -> dict[str, Any]:
    """One run of ``bench`` with the code of ``tree``; its JSON results."""
    module = bench if bench.startswith("bench_") else f"bench_{bench}"
    if not (tree / "benchmarks" / f"{module}.py").is_file():
        raise SystemExit(f"{tree}: has no benchmarks/{module}.py")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", f"benchmarks.{module}", *args, "--output", str(output)]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{module} failed in {tree}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def figures(result: Any, prefix: str = "") -> dict[str, float]:
    """Every number under a key ending in ``_median`` or in ``ratios``, by its JSON path."""
    out: dict[str, float] = {}
    if isinstance(result, dict):
        for key, value in result.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            wanted = key.endswith("_median") or prefix.endswith("ratios")
            if number and wanted and value > 0:
                out[path] = float(value)
            elif isinstance(value, dict | list):
                out.update(figures(value, path))
    elif isinstance(result, list):
        for index, item in enumerate(result):
            out.update(figures(item, f"{prefix}[{_label(item, index)}]"))
    return out


def _label(item: Any, index: int) -> str:
    """A list element's name: its first identifying field (``events_per_batch=1000``)."""
    if isinstance(item, dict):
        for key in ("events_per_batch", "name", "size", "writers", "tables"):
            if key in item:
                return f"{key}={item[key]}"
    return str(index)


def change_of(figure: str, old: list[float], new: list[float]) -> Change:
    """The paired change of one figure over rounds, with a t interval (95 %)."""
    logs = [math.log(b / a) for a, b in zip(old, new, strict=True)]
    mean = statistics.fmean(logs)
    if len(logs) > 1:
        t = T975[len(logs) - 2] if len(logs) - 2 < len(T975) else 1.96
        half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    else:
        half = math.inf  # one round says nothing about the noise
    last = figure.rsplit(".", 1)[-1]
    return Change(
        figure,
        statistics.median(old),
        statistics.median(new),
        math.exp(mean) - 1,
        math.exp(mean - half) - 1,
        math.exp(mean + half) - 1 if half != math.inf else math.inf,
        ".ratios." in figure or "_per_" in last,
    )


def compare(args: argparse.Namespace) -> list[Change]:
    benches = args.bench or ["writer"]
    samples: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="icefleet-compare-") as tmp:
        root = Path(tmp)
        trees_dir = root / "trees"
        trees_dir.mkdir()
        with (
            checkout(args.rev, trees_dir) as old_tree,
            checkout(args.against, trees_dir) as new_tree,
        ):
            for bench in benches:
                extra = args.bench_args.split() if args.bench_args else QUICK_ARGS.get(bench, [])
                for r in range(args.rounds):
                    sides = [(0, old_tree), (1, new_tree)]
                    for side, tree in sides if r % 2 == 0 else sides[::-1]:
                        label = "old" if side == 0 else "new"
                        print(f"  {bench} round {r + 1}/{args.rounds}: {label}", flush=True)
                        result = run_once(tree, bench, extra, root / f"{bench}-{r}-{side}.json")
                        for name, value in figures(result).items():
                            pair = samples.setdefault(f"{bench}: {name}", ([], []))
                            pair[side].append(value)
    return [
        change_of(name, old, new)
        for name, (old, new) in samples.items()
        if len(old) == len(new) == args.rounds
    ]


def report(changes: list[Change], args: argparse.Namespace) -> str:
    side = args.against or "working tree"
    lines = [
        f"{args.rev} -> {side}: {args.rounds} interleaved rounds, change with its 95 % "
        f"t interval; flagged when worse by > {args.threshold:.0%}"
    ]
    width = max((len(c.figure) for c in changes), default=10)
    for c in changes:
        lines.append(
            f"  {c.figure:<{width}}  {c.old:>12,.1f} -> {c.new:>12,.1f}  {c.change:+7.1%} "
            f"[{c.low:+7.1%}, {c.high:+7.1%}]  {c.verdict(args.threshold)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    changes = compare(args)
    print(report(changes, args))
    return 1 if any(c.verdict(args.threshold) == "REGRESSION" for c in changes) else 0


if __name__ == "__main__":
    sys.exit(main())
