"""Batch replays: one process over every file vs ``batch`` on N local workers vs Ray (issue 10).

Generates ``--symbols`` × ``--days`` files of ``--trades`` trades each (Binance USD-M trades
layout, a random walk per symbol), then, one after the other on this machine:

- ``sequential``: one process replays each symbol's files in turn (``nt.Run`` per symbol over
  its files), the baseline a user has without ``batch``;
- ``local N``: ``run_batch(..., executor="local", workers=N)`` for each N of ``--workers``;
- ``ray N``: the same on a local Ray of N CPUs (``--executors local,ray`` for every N, or
  ``--ray`` for the largest only; needs the ``cluster`` extra, the local rows do not).

E.g. ``python scripts/bench_batch.py --trades 1000000 --workers 1,2 --ray`` (dev VM) or
``--symbols 16 --days 2 --trades 600000 --workers 1,2,4,8,16 --executors local`` (16 cores).

Printed per row: ticks/s over the wall time (planning, calibration, jobs and merge
included), the speedup over one local worker and its efficiency (speedup / N; the target is
≥ 0.8 up to the core count), and the engine's overhead per job: ``(wall × P − Σ job time) / jobs``
with P = min(N, symbols), the time a worker slot spends not replaying (pool start, planning,
scheduling, transfers, merge), also as a share of the mean job time (target ≤ 1 % for jobs ≥ 1 s),
and below the table where it goes (planning, merge, the rest). Start-up is its own column:
the local pool's spawn and imports, or Ray's import and ``ray.init`` (target ≤ 5 s), both
begun while the batch is planned, then when every worker is warm. Every configuration's
merged outputs are checked equal to the first one's.

Uses the default pipeline with its model on the CPU stream (``streams = ["cpu"]``), so the
numbers measure processes, not a GPU shared by all workers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nautilus_pipeline.config import find_definition  # noqa: E402


def generate(folder: Path, symbols: int, days: int, trades: int, seed: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rng = np.random.default_rng(seed)
    for s in range(symbols):
        sym = f"SYM{s:02d}USDT"
        t0 = 1_722_470_400_000
        price0 = 100.0 * (1 + s)
        for d in range(days):
            ts = t0 + d * 86_400_000 + np.sort(rng.integers(0, 86_400_000, trades))
            price = price0 * np.exp(np.cumsum(rng.normal(0, 2e-4, trades)))
            price0 = float(price[-1])
            qty = np.round(rng.exponential(0.5, trades), 3) + 0.001
            table = pa.table({
                "id": np.arange(d * trades, (d + 1) * trades, dtype=np.int64),
                "price": np.round(price, 4), "qty": qty, "quote_qty": np.round(price * qty, 4),
                "time": ts.astype(np.int64), "is_buyer_maker": rng.random(trades) < 0.5,
            })
            p = folder / f"{sym}-trades-2024-08-{d + 1:02d}.csv"
            pacsv.write_csv(table, p, pacsv.WriteOptions(quoting_style="none"))
            out.append(p)
    return out


def definition(folder: Path, trades: int) -> Path:
    """The default pipeline with the model on the CPU stream and a fixed VPIN bucket volume
    (a day's volume / 50, as 'auto' would give): 'auto' would make the batch read every file
    once more to calibrate, which the sequential run does not (it keeps what it read)."""
    text = find_definition("default").read_text()
    text = text.replace('streams = ["coreml:ane", "mlx:gpu", "torch:cuda", "torch:mps", "cpu"]', 'streams = ["cpu"]')
    text = re.sub(r'bucket_volume = "auto".*', f"bucket_volume = {trades * 0.501 / 50:.3f}", text)
    p = folder / "bench_default_cpu.toml"
    p.write_text(text)
    return p


def sequential_child(defn: str, out: str, files: list[str]) -> None:
    """Run in a child process: each symbol's files through one Run, one symbol after another."""
    import asyncio

    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import plan
    from nautilus_pipeline.config import load

    nt.configure_logging(level="warning")
    t0 = time.perf_counter()
    ticks = 0
    for chain in plan(load(defn), [Path(f) for f in files]):
        run = nt.Run(defn, ticks=[f.path for f in chain.files], out_dir=Path(out) / chain.symbol,
                     trace_every=chain.trace_every, execution="serial")
        summary = asyncio.run(run.execute())
        ticks += summary.ticks.read
    print(orjson.dumps({"ticks": ticks, "wall_s": time.perf_counter() - t0}).decode())


def batch_child(defn: str, pattern: str, out: str, executor: str, workers: str) -> None:
    """Run in a child process: one batch; prints its wall time, exit code and summary."""
    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import run_batch

    nt.configure_logging(level="warning")
    t = time.perf_counter()
    report = run_batch(defn, [pattern], out, executor=executor, workers=int(workers))
    wall = time.perf_counter() - t
    print(orjson.dumps({"wall_s": wall, "exit_code": report.exit_code, "summary": report.summary}).decode())


def control_child(defn: str, out: str, file: str, start_at: float) -> None:
    """Run in a child process: one file through ``replay_job``, started at ``start_at`` (so
    that N children replay at the same time); prints its job time."""
    import nautilus_pipeline as nt
    from nautilus_pipeline.batch import replay_job

    nt.configure_logging(level="warning")
    import pyarrow

    pyarrow.set_cpu_count(1)
    sample = ROOT / "nautilus_pipeline" / "data" / "binance-um-btcusdt-trades-20240808.csv"
    replay_job(defn, [sample], out + "-warm", None, trace_every=1)  # load the kernels first
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    res = replay_job(defn, [file], out, None, trace_every=1)
    print(orjson.dumps({"ticks": res.ticks["read"], "job_s": time.perf_counter() - t0}).decode())


def control(defn: Path, work: Path, files: list[Path], counts: list[int]) -> None:
    """N independent processes, each one job on its own file, all at once: how the machine
    itself scales (no pool, no scheduling, no merge), beside the batch rows."""
    print()
    print("| independent processes at once | mean job s | ticks/s together | vs 1 process |")
    print("|---:|---:|---:|---:|")
    base = None
    for n in counts:
        start_at = time.time() + 25.0  # after every child's imports and warm-up
        procs = [subprocess.Popen([sys.executable, __file__, "--control-child", str(defn),
                                   str(work / f"ctl-{n}-{i}"), str(files[i % len(files)]), str(start_at)],
                                  stdout=subprocess.PIPE, text=True) for i in range(n)]
        results = [orjson.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        rate = sum(r["ticks"] for r in results) / max(r["job_s"] for r in results)
        base = base or rate
        print(f"| {n} | {np.mean([r['job_s'] for r in results]):.2f} | {rate:,.0f} | {rate / base:.2f}x |")


def merged_digest(out: Path) -> dict[str, int]:
    """Rows per merged kind, and a digest of the signals in (symbol, ts) order."""
    digest = {}
    for kind in ("signals", "vpin", "risk"):
        if (out / kind).exists():
            t = pq.read_table(out / kind)
            t = t.set_column(t.column_names.index("symbol"), "symbol", t["symbol"].cast(pa.string()))
            t = t.sort_by([("symbol", "ascending"), ("ts_ns", "ascending")])
            digest[kind] = hash(repr(t.to_pylist()))
    return digest


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--symbols", type=int, default=2)
    ap.add_argument("--days", type=int, default=4)
    ap.add_argument("--trades", type=int, default=250_000, help="trades per file")
    ap.add_argument("--workers", type=_counts, nargs="+", default=[[1, 2]],
                    help="worker counts, e.g. 1,2,4,8,16 or 1 2 4 (default 1,2)")
    ap.add_argument("--executors", default="local",
                    help="local, ray or local,ray: ray runs each worker count on a local Ray of that "
                         "many CPUs (needs the cluster extra; local rows need no Ray)")
    ap.add_argument("--ray", action="store_true", help="also on a local Ray, at the largest --workers")
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    ap.add_argument("--control", type=int, nargs="+", metavar="N",
                    help="only: N independent one-job processes at once, for each N (machine scaling)")
    ap.add_argument("--sequential-child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--control-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--batch-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.control_child:
        defn, out, file, start_at = args.control_child
        control_child(defn, out, file, float(start_at))
        return
    if args.batch_child:
        batch_child(*args.batch_child)
        return
    if args.sequential_child:
        defn, out, *files = args.sequential_child
        sequential_child(defn, out, files)
        return

    import nautilus_pipeline as nt
    from nautilus_pipeline.machine import describe

    nt.configure_logging(level="warning")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_batch_"))
    t0 = time.perf_counter()
    files = generate(work / "in", args.symbols, args.days, args.trades)
    defn = definition(work, args.trades)
    print(f"machine: {describe()}; {os.cpu_count()} cores")
    print(f"input: {args.symbols} symbols x {args.days} days x {args.trades:,} trades = "
          f"{len(files) * args.trades:,} trades in {len(files)} files (generated in {time.perf_counter() - t0:.1f} s)")
    if args.control:
        control(defn, work, files, args.control)
        return
    rows = []
    if not args.no_sequential:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--sequential-child", str(defn), str(work / "seq"),
                               *map(str, files)], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        r = orjson.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"config": "sequential (1 process)", "n": 1, "wall": wall, "ticks": r["ticks"],
                     "jobs": len(files), "overhead": None, "job_s": r["wall_s"] / len(files), "startup": None})
    counts = sorted({n for group in args.workers for n in group})
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if bad := [e for e in executors if e not in ("local", "ray")]:
        ap.error(f"--executors: unknown {bad} (local, ray)")
    configs = [(e, n) for e in executors for n in counts]
    if args.ray and "ray" not in executors:
        configs.append(("ray", max(counts)))
    digests = {}
    for executor, n in configs:
        out = work / f"out-{executor}-{n}"
        # each batch in a process of its own, as a CLI run is: it starts its own pool (fork
        # server) or Ray, none left warm by the row before
        proc = subprocess.run([sys.executable, __file__, "--batch-child", str(defn), str(work / "in" / "*.csv"),
                               str(out), executor, str(n)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{executor} --workers {n} failed: {proc.stderr[-3000:]}")
        r = orjson.loads(proc.stdout.strip().splitlines()[-1])
        s, wall = r["summary"], r["wall_s"]
        assert r["exit_code"] == 0 and s["accounting_closes"], s["failed"]
        jobs = s["jobs"]
        busy = sum(j["wall_s"] for j in jobs)
        slots = min(n, args.symbols)
        rows.append({"config": f"{executor} --workers {n}", "n": n, "wall": wall, "ticks": s["totals"]["read"],
                     "jobs": len(jobs), "overhead": (wall * slots - busy) / len(jobs), "job_s": busy / len(jobs),
                     "startup": s["executor_startup_s"], "warm": s.get("workers_warm_s"),
                     "plan": s["plan_s"], "merge": s["merge_s"],
                     "setup": float(np.median([j["wall_s"] - j["run_s"] for j in jobs])),
                     "transfer": float(np.median([j["overhead_s"] for j in jobs if j["overhead_s"] is not None]))})
        digests[(executor, n)] = merged_digest(out)
    same = len({tuple(sorted(d.items())) for d in digests.values()}) <= 1
    base = next((r for r in rows if r["config"].startswith("local") and r["n"] == 1), None)
    print()
    print("| run | ticks/s | wall s | speedup vs 1 worker | efficiency | mean job s | engine overhead / job | "
          "overhead % of job | start-up s | workers warm s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = r["ticks"] / r["wall"]
        speed = rate / (base["ticks"] / base["wall"]) if base else float("nan")
        eff = speed / r["n"] if not r["config"].startswith("sequential") else float("nan")
        over = "" if r["overhead"] is None else f"{r['overhead']:.2f} s"
        share = "" if r["overhead"] is None else f"{100 * r['overhead'] / r['job_s']:.1f} %"
        start = "" if not r["startup"] else f"{r['startup']:.1f}"
        warm = "" if not r.get("warm") else f"{r['warm']:.1f}"
        print(f"| {r['config']} | {rate:,.0f} | {r['wall']:.1f} | {speed:.2f}x | "
              f"{'' if eff != eff else f'{eff:.2f}'} | {r['job_s']:.2f} | {over} | {share} | {start} | {warm} |")
    print()
    print(f"merged outputs identical across the batch runs: {'yes' if same else 'NO'}")
    print("start-up: local, from the fork server's start to every worker forked (while the batch is planned); "
          "ray, import and ray.init (also while planning), then 'workers warm' when one warm-up task per CPU "
          "has imported the package")
    print("engine overhead / job = (wall x min(N, symbols) - sum of job times) / jobs; where it goes:")
    for r in rows:
        if "plan" in r:
            slots = min(r["n"], args.symbols)
            idle = r["overhead"] * r["jobs"]
            print(f"  {r['config']}: slot time not replaying {idle:.2f} s = plan {r['plan']:.2f} s x {slots} "
                  f"+ merge {r['merge']:.2f} s x {slots} + the rest {idle - (r['plan'] + r['merge']) * slots:.2f} s "
                  f"(start-up not hidden by planning, the chains' tails, waits); per job (median): set-up in the "
                  f"worker {r['setup']:.3f} s, submit-to-result minus job time {r['transfer']:.3f} s")


if __name__ == "__main__":
    main()
