"""Profile: where the µs of one batch go, per stage of the default chain (issue 9, item 1).

Builds ``pipelines/default.toml``'s stages (VPIN with a fixed bucket volume) in a serial
pipeline and runs one batch of ``--rows`` generated trades through every stage ``--reps``
times, timing each stage's call (the runner's ``_process``: the stage's Python, its
kernels, its publishing). Printed: per-stage p50 and min in µs, then, for each stage named
in ``--profile``, the top cProfile entries by own time (cProfile inflates small calls;
read the ranking, not the absolute numbers). Beside them: the framework's own cost per
live tick, ``publish_tick`` with ``batch_size=1`` through one stage that does nothing,
and ``publish_tick`` into a micro-batch (no flush). ``--live N``: also the full default chain
fed N ticks one at a time with ``batch_size=1`` (paced at 1,000/s, then at the maximum
rate): ``publish_tick`` → last stage p50/p99 and each stage's batch p50 from the runners'
histograms inside that chain. ``--mc N``: also N Monte Carlo VaR draws of one report
(10,000 paths × 100 steps bootstrapped from 1,000 returns, the numpy sampler), min and
median ms. Run it with ``PYTHONPATH`` at two checkouts, one after the
other, to compare them on a busy machine.

Run: ``python scripts/profile_stages.py [--rows 1 4096] [--reps 300] [--profile risk]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pathlib
import pstats
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


async def stage_times(rows: int, reps: int, profile: set[str]):
    from bench_pipeline import live_definition

    from nautilus_pipeline import config

    d = config.load(live_definition(pathlib.Path(tempfile.mkdtemp(prefix="profile_stages-"))))
    pipe = config.build_pipeline(d, config.build_stages(d, []), batch_size=max(rows, 64),
                                 execution="serial")
    rng = np.random.default_rng(0)
    profilers = {name: cProfile.Profile() for name in profile}
    async with pipe:
        lease = await pipe.pool.acquire("profile")
        cols = lease.columns
        ts0 = 0

        def fill() -> None:
            nonlocal ts0
            lease.length = rows
            cols["ts_ns"][:rows] = ts0 + np.arange(rows) * 1_000_000
            ts0 += rows * 1_000_000
            cols["price"][:rows] = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-4, rows)))
            cols["size"][:rows] = 0.01
            cols["side"][:rows] = np.where(rng.random(rows) < 0.5, 1, -1)
            cols["kind"][:rows] = 0
            cols["symbol_id"][:rows] = 0

        times: dict[str, list[int]] = {r.stage.name: [] for r in pipe.runners}
        for rep in range(reps + 20):  # the first 20 warm up
            fill()
            for r in pipe.runners:
                prof = profilers.get(r.stage.name) if rep >= 20 else None
                if prof is not None:
                    prof.enable()
                t = time.perf_counter_ns()
                await r._process(lease)
                dt = time.perf_counter_ns() - t
                if prof is not None:
                    prof.disable()
                elif rep >= 20:
                    times[r.stage.name].append(dt)
        lease.release("profile")
    return times, profilers


def mc_report_ms(reports: int) -> tuple[float, float]:
    """One risk-stage VaR report's Monte Carlo draws (10,000 × 100 from 1,000 returns)."""
    from nautilus_pipeline.kernels.montecarlo import McSampler

    r = np.random.default_rng(0).normal(0.0, 1e-3, 1000)
    sampler = McSampler(seed=0)
    sampler.bootstrap(r, 100, 10_000, 1e4)
    times = []
    for _ in range(reports):
        t = time.perf_counter_ns()
        sampler.bootstrap(r, 100, 10_000, 1e4)
        times.append((time.perf_counter_ns() - t) / 1e6)
    return float(np.min(times)), float(np.median(times))


async def framework_cost(ticks: int = 4000):
    from nautilus_pipeline.events import TradeTick
    from nautilus_pipeline.pipeline import Pipeline
    from nautilus_pipeline.stage import Stage

    class Null(Stage):
        name = "null"
        reads = ("ts_ns",)

        async def process(self, lease, stream, ctx):
            pass

    tape = [TradeTick("X", i, 100.0, 1.0, 1) for i in range(ticks)]
    out = {}
    for batch, label in ((1, "publish_tick, batch_size=1, one null stage"),
                         (8192, "publish_tick into a micro-batch (no flush)")):
        async with Pipeline([Null()], batch_size=batch, max_delay_us=60e6, memory="host") as pipe:
            best = []
            for _ in range(15):
                t = time.perf_counter_ns()
                for tick in tape:
                    await pipe.publish_tick(tick)
                best.append((time.perf_counter_ns() - t) / ticks / 1e3)
                await pipe.drain()
        out[label] = (float(np.median(best)), float(np.min(best)))
    return out


async def live_chain(n: int, paced: bool):
    from bench_pipeline import live_definition

    from nautilus_pipeline import config
    from nautilus_pipeline.events import TradeTick

    d = config.load(live_definition(pathlib.Path(tempfile.mkdtemp(prefix="profile_stages-"))))
    pipe = config.build_pipeline(d, config.build_stages(d, []), batch_size=1)
    rng = np.random.default_rng(1)
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 1e-4, n)))
    tape = [TradeTick("BTCUSDT-PERP", i, float(prices[i]), 0.01, 1 if i % 2 else -1)
            for i in range(n)]
    lat = np.zeros(n)
    async with pipe:
        for i, tick in enumerate(tape):
            t = time.perf_counter_ns()
            await pipe.publish_tick(tick)  # idle pipeline, batch_size=1: the chain runs inline
            await pipe.drain()
            lat[i] = (time.perf_counter_ns() - t) / 1e3
            if paced:
                await asyncio.sleep(0.001)
        stages = {r.stage.name: r.metrics.latency.summary() for r in pipe.runners}
    us = lat[n // 10:]
    return float(np.percentile(us, 50)), float(np.percentile(us, 99)), stages


def main() -> None:
    from nautilus_pipeline.machine import describe
    from nautilus_pipeline.runtime import configure_logging, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 4096])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--profile", nargs="*", default=[], help="stages to cProfile (e.g. risk)")
    ap.add_argument("--live", type=int, default=0, help="ticks through the live chain (0: skip)")
    ap.add_argument("--mc", type=int, default=0, help="Monte Carlo reports to time (0: skip)")
    args = ap.parse_args()
    configure_logging(level="error")
    print(f"machine: {describe()}")
    for rows in args.rows:
        reps = args.reps if rows < 1024 else max(args.reps // 20, 10)
        times, profilers = run(stage_times(rows, reps, set(args.profile)))
        print(f"\none batch of {rows:,} rows per stage, µs ({reps} batches)")
        print(f"{'stage':<12} {'p50':>10} {'min':>10}")
        for name, v in times.items():
            if v:
                print(f"{name:<12} {np.median(v) / 1e3:>10.1f} {np.min(v) / 1e3:>10.1f}")
        for name, prof in profilers.items():
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
            start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
            print(f"\ncProfile, stage {name}, {rows} rows, top 12 by own time:")
            print("\n".join(lines[start:start + 13]))
    print("\nframework per live tick, µs (median and min of 15 runs of 4,000 ticks)")
    for label, (us, lo) in run(framework_cost()).items():
        print(f"{label:<46} {us:>8.2f} {lo:>8.2f}")
    if args.mc:
        lo, mid = mc_report_ms(args.mc)
        print(f"\nMonte Carlo VaR, 10,000 paths x 100 steps, {args.mc} reports: "
              f"min {lo:.3f} ms, median {mid:.3f} ms")
    if args.live:
        print(f"\nlive: full default chain, batch_size=1, {args.live:,} ticks, publish → drained, µs")
        for paced in (True, False):
            p50, p99, stages = run(live_chain(args.live, paced))
            per = " ".join(f"{k} {v['p50_us']:.0f}" for k, v in stages.items())
            print(f"{'1,000/s' if paced else 'max':>8}  p50 {p50:8.1f}  p99 {p99:8.1f}   stage p50: {per}")


if __name__ == "__main__":
    main()
