"""A/B of the NATS bridge: this tree against a baseline tree, alternating, one measuring script.

Each round runs ``scripts/bench_bridge.py`` (this tree's copy, so both sides are measured the
same way) once against the baseline's package and once against this tree's, in that order,
each in its own process: ``--only pipeline hops --modes pre-16k --repeat R``. Within one
invocation in-process ``ingest`` and the bridge alternate, so each bridge run has an
in-process run beside it: the paired ratio (bridge ÷ the in-process run of the same pair)
is less at the mercy of a load that changes between rounds than a ratio of medians. Printed:
per side, medians over all runs of ticks/s, paired ratio, CPU per 4096 ticks, and the one-tick
hop p50/p99 (all hops of a side pooled by rounds: the median of the rounds' p99).

The baseline is a directory holding another commit's tree (``git archive <commit> | tar -x
-C DIR``); this script writes its copy of ``bench_bridge.py`` there as
``scripts/_bench_bridge_ab.py`` (the benchmark imports the package of the tree it lies in).

Run: ``python scripts/bench_bridge_ab.py --baseline DIR [--rounds N] [--repeat R] [--ticks N]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<label>[^|]+) \| (?P<cells>.*) \|$")


def run_side(tree: Path, args: argparse.Namespace) -> dict:
    """One invocation of the benchmark against ``tree``: per-run rates, CPU, hops."""
    script = tree / "scripts" / "_bench_bridge_ab.py"
    if tree != REPO:
        shutil.copy(REPO / "scripts" / "bench_bridge.py", script)
    else:
        script = REPO / "scripts" / "bench_bridge.py"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(script), "--ticks", str(args.ticks), "--repeat", str(args.repeat),
           "--hops", str(args.hops), "--only", "hops", "pipeline", "--modes", "pre-16k"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    side: dict = {"out": out}
    for line in out.splitlines():
        if line.startswith("per run (ticks/s): "):
            for part in line[len("per run (ticks/s): "):].split("; "):
                key, values = part.split(" ", 1)
                side[key] = [float(x) for x in values.strip("[]").split(", ")]
        m = ROW.match(line)
        if not m:
            continue
        cells = [c.strip().replace(",", "") for c in m["cells"].split("|")]
        label = m["label"].strip()
        if label.startswith("now: the ingress's open pull request"):
            side["hop"] = (float(cells[0]), float(cells[1]))
        elif label == "in-process `ingest`":
            side["cpu_local"] = float(cells[2])
        elif label.startswith("filled before; now (16384"):
            side["cpu_bridge"], side["cpu_server"] = float(cells[2]), float(cells[3])
    return side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="a directory with the baseline's tree")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="in-process/bridge pairs per invocation")
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--hops", type=int, default=2000)
    ap.add_argument("--names", nargs=2, default=("baseline", "this tree"))
    args = ap.parse_args()
    sides = {args.names[0]: args.baseline.resolve(), args.names[1]: REPO}
    got: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, tree in sides.items():
            side = run_side(tree, args)
            got[name].append(side)
            ratios = [b / a for a, b in zip(side["local"], side["pre-16k"], strict=True)]
            print(f"round {r + 1} {name}: in-process {[round(x) for x in side['local']]}, bridge "
                  f"{[round(x) for x in side['pre-16k']]}, paired ratios {[round(x, 3) for x in ratios]}, "
                  f"hop p50/p99 {side['hop']}; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n| {args.rounds} rounds x {args.repeat} pairs, {args.ticks:,} ticks, 16384-tick messages "
          "filled before | in-process ticks/s | bridge ticks/s | paired ratio (median) | ratio of medians | "
          "CPU µs per 4096 ticks: in-process | bridge, this process | nats-server | hop p50 µs | hop p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in got.items():
        local = [x for s in runs for x in s["local"]]
        bridge = [x for s in runs for x in s["pre-16k"]]
        paired = [b / a for a, b in zip(local, bridge, strict=True)]
        med = statistics.median
        print(f"| {name} ({sides[name]}) | {med(local):,.0f} | {med(bridge):,.0f} | {med(paired):.3f} | "
              f"{med(bridge) / med(local):.3f} | {med(s['cpu_local'] for s in runs):,.0f} | "
              f"{med(s['cpu_bridge'] for s in runs):,.0f} | {med(s['cpu_server'] for s in runs):,.0f} | "
              f"{med(s['hop'][0] for s in runs):.1f} | {med(s['hop'][1] for s in runs):.1f} |")
    print("\nCPU columns: medians of the invocations' medians; hop: medians of the invocations' p50 and p99")


if __name__ == "__main__":
    main()
