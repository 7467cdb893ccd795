"""The streaming merge's tail when every job ends at once: one merge thread vs the pool.

Where 16 workers run one job each, the 16 results come in together and the merge appends
all their parts after the last job. This times exactly that: ``--chains`` chains of one job
each are run once (``replay_job`` over generated Binance-layout files, kept in ``--work``),
then a threaded ``StreamingMerge`` is given all the results at once and finished, in a fresh
process per round, against this checkout's package and ``--baseline``'s (another checkout,
e.g. the commit before), alternately, ``--repeat`` times each. Printed: per round and as
medians, the wall of ``add`` × N + ``finish``, the merge threads' CPU (``cpu_s``) and the
process's CPU (pyarrow's pool included), and whether both wrote the same files.

    PYTHONPATH=. python scripts/bench_merge_tail.py --baseline ../main --rows 300000

Uses the default pipeline with its model on the CPU stream (``streams = ["cpu"]``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

SCRIPTS = Path(__file__).resolve().parent


def build(work: Path, chains: int, rows: int) -> list:
    """``chains`` files of ``rows`` trades, one symbol each, replayed once; their results."""
    sys.path.insert(0, str(SCRIPTS))
    from make_synthetic_trades import make

    from nautilus_pipeline.batch import plan, replay_job
    from nautilus_pipeline.config import find_definition, load
    from nautilus_pipeline.runtime import configure_logging

    configure_logging("json", "warning")
    (work / "in").mkdir(parents=True, exist_ok=True)
    text = find_definition("default").read_text()
    text = text.replace('streams = ["coreml:ane", "mlx:gpu", "torch:cuda", "torch:mps", "cpu"]', 'streams = ["cpu"]')
    (work / "default_cpu.toml").write_text(text)
    d = load(work / "default_cpu.toml")
    files = [make(rows, work / "in" / f"SYM{i:02d}USDT-trades-2024-08-09.csv", seed=i) for i in range(chains)]
    results = []
    for chain in plan(d, files):
        (spec,) = chain.jobs()
        t = time.perf_counter()
        results.append(replay_job(d, spec.files, work / "jobs" / chain.symbol, job_id=spec.job_id,
                                  last=spec.last, overrides=chain.overrides, trace_every=chain.trace_every))
        print(f"  job {spec.job_id}: {time.perf_counter() - t:.1f} s, outputs {results[-1].outputs}", flush=True)
    (work / "results.pkl").write_bytes(pickle.dumps(results))
    return results


def time_one(work: Path, label: str) -> dict:
    """One round in this process: every result added at once, then finish()."""
    import nautilus_pipeline
    from nautilus_pipeline.batch import merge

    results = pickle.loads((work / "results.pkl").read_bytes())
    out = work / f"merged-{label}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cpu0, t0 = time.process_time(), time.perf_counter()
    merger = merge.StreamingMerge(out)
    for res in results:
        merger.add(res)
    merged = merger.finish(results)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    digest = hashlib.sha256()
    for p in sorted(out.rglob("*.parquet")):
        digest.update(str(p.relative_to(out)).encode() + p.read_bytes())
    shutil.rmtree(out)
    return {"wall_s": wall, "merge_cpu_s": merger.cpu_s, "process_cpu_s": cpu,
            "threads": getattr(merge, "MERGE_THREADS", 1), "package": nautilus_pipeline.__file__,
            "rows": {k: v["rows"] for k, v in merged.items()},
            "streamed": {k: v["streamed"] for k, v in merged.items()}, "digest": digest.hexdigest()}


def round_in(root: Path, work: Path, label: str) -> dict:
    """:func:`time_one` in a fresh process importing ``root``'s package."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--time-one", label, "--work", str(work)],
                          cwd=root, env=env, capture_output=True, text=True, check=True)
    return orjson.loads(done.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=False, help="another checkout (the old merge)")
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-merge-tail"))
    ap.add_argument("--time-one", metavar="LABEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_one:
        print(orjson.dumps(time_one(args.work, args.time_one)).decode())
        return
    if args.baseline is None:
        ap.error("--baseline is required")
    print(f"{args.chains} chains x 1 job x {args.rows:,} trades; {os.cpu_count()} cores; work {args.work}")
    if not (args.work / "results.pkl").exists():
        t = time.perf_counter()
        build(args.work, args.chains, args.rows)
        print(f"jobs run once in {time.perf_counter() - t:.1f} s")
    here = Path.cwd().resolve()
    sides = {"old": args.baseline.resolve(), "new": here}
    rounds: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.repeat):
        for label, root in sides.items():
            row = round_in(root, args.work, label)
            rounds[label].append(row)
            print(f"round {r + 1} {label}: wall {row['wall_s']:.3f} s, merge threads' CPU {row['merge_cpu_s']:.3f} s, "
                  f"process CPU {row['process_cpu_s']:.3f} s ({row['threads']} threads, {row['package']})", flush=True)
    print(f"\n| {'side':<4} | threads | wall s (median) | merge threads' CPU s | process CPU s | walls |")
    print("|------|---------|-----------------|----------------------|---------------|-------|")
    for label, rows in rounds.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("wall_s", "merge_cpu_s", "process_cpu_s")}
        walls = " ".join(f"{x['wall_s']:.3f}" for x in rows)
        print(f"| {label:<4} | {rows[0]['threads']:>7} | {med['wall_s']:>15.3f} | {med['merge_cpu_s']:>20.3f} | "
              f"{med['process_cpu_s']:>13.3f} | {walls} |")
    old, new = (statistics.median(x["wall_s"] for x in rounds[k]) for k in ("old", "new"))
    print(f"new / old wall: {new / old:.2f}")
    digests = {x["digest"] for rows in rounds.values() for x in rows}
    streamed = {str(x["streamed"]) for rows in rounds.values() for x in rows}
    print(f"rows by kind: {rounds['new'][0]['rows']}; streamed by kind (else merged the whole way): "
          f"{' / '.join(sorted(streamed))}; the same files in every round, old and new: "
          f"{'yes' if len(digests) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
