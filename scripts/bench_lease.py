"""Benchmark: one lease taken from the pool and given back, the live path's per-tick cost.

``pool.acquire_nowait`` + ``lease.release`` on a pool of one-row slabs of the tick columns,
ns per pair, best of ``--repeats`` loops of ``--n``, each tree in its own process, rounds
alternating: what every live tick pays for its slab besides the stages. Run:
``python scripts/bench_lease.py [--baseline DIR]`` (``DIR``: another checkout, e.g. a
``git worktree`` of a change, measured beside this one).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHILD = """
import time
from nautilus_pipeline.events import TICK_COLUMNS
from nautilus_pipeline.memory import BufferPool
pool = BufferPool(TICK_COLUMNS, capacity=1, slabs=4)
n, best = {n}, float("inf")
for _ in range({repeats}):
    t = time.perf_counter_ns()
    for _ in range(n):
        lease = pool.acquire_nowait("x")
        lease.length = 1
        lease.release("x")
    best = min(best, (time.perf_counter_ns() - t) / n)
print(best)
"""


def measure(tree: pathlib.Path, n: int, repeats: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD.format(n=n, repeats=repeats)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=pathlib.Path, help="another checkout, measured alternately")
    args = ap.parse_args()
    trees = ([("baseline", args.baseline)] if args.baseline else []) + [("this tree", ROOT)]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in trees:
            results[name].append(measure(tree, args.n, args.repeats))
    print("| tree | ns per acquire + release, best of each round |")
    print("|---|---|")
    for name, _ in trees:
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in results[name])} |")


if __name__ == "__main__":
    main()
