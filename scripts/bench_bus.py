"""Benchmark: the event bus against a plain chain of asyncio.Queues doing the same work.

Four hops (source → s1 → s2 → s3 → sink), measured side by side in one process:

- ``1 tick/event``: every event carries one tick (a small tuple);
- ``1024 ticks/event``: every event carries a batch of 1024 ticks: a pool lease on the
  bus (reference counted per hop), a numpy struct of arrays on the queue chain;
- throughput: events pushed as fast as backpressure allows; latency: one event in flight
  at a time (publish → sink), p50/p99 over the run;
- under uvloop and under the default asyncio loop.

Ratios taken in the same run are what count on a noisy machine. Run:
``python scripts/bench_bus.py [--events N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from nautilus_pipeline.bus import EventBus
from nautilus_pipeline.machine import describe
from nautilus_pipeline.memory import BufferPool
from nautilus_pipeline.metrics import LatencyHistogram
from nautilus_pipeline.runtime import configure_logging, loop_factory

HOPS = 4
QUEUE = 1024


async def bus_chain(n_events: int, batch: int, latency_mode: bool) -> tuple[float, LatencyHistogram]:
    hist = LatencyHistogram()
    done = asyncio.Event()
    count = 0
    pool = BufferPool(capacity=batch, slabs=64) if batch > 1 else None
    arrived = asyncio.Event()

    async with EventBus(default_maxsize=QUEUE) as bus:
        for i in range(1, HOPS):
            nxt = f"chain.{i + 1}"

            async def hop(event, nxt=nxt):
                await bus.publish(nxt, event.payload)

            bus.subscribe(f"chain.{i}", hop, name=f"hop{i}")

        def sink(event):
            nonlocal count
            p = event.payload
            t0 = p.meta["t0"] if pool is not None else p[0]
            hist.record(time.perf_counter_ns() - t0)
            count += 1
            if latency_mode:
                arrived.set()
            if count == n_events:
                done.set()

        bus.subscribe(f"chain.{HOPS}", sink, name="sink")
        start = time.perf_counter()
        for k in range(n_events):
            if pool is not None:
                lease = await pool.acquire("source")
                lease.length = batch
                lease.meta["t0"] = time.perf_counter_ns()
                await bus.publish("chain.1", lease)
                lease.release("source")
            else:
                await bus.publish("chain.1", (time.perf_counter_ns(), k, 100.0, 1.0))
            if latency_mode:
                await arrived.wait()
                arrived.clear()
        await done.wait()
        elapsed = time.perf_counter() - start
    return elapsed, hist


async def queue_chain(n_events: int, batch: int, latency_mode: bool) -> tuple[float, LatencyHistogram]:
    hist = LatencyHistogram()
    queues = [asyncio.Queue(QUEUE) for _ in range(HOPS)]
    done = asyncio.Event()
    arrived = asyncio.Event()
    count = 0
    arrays = {
        "ts_ns": np.zeros(batch, np.int64),
        "price": np.zeros(batch),
        "size": np.zeros(batch),
    }

    async def hop(src: asyncio.Queue, dst: asyncio.Queue):
        while True:
            item = await src.get()
            await dst.put(item)

    async def sink(src: asyncio.Queue):
        nonlocal count
        while True:
            item = await src.get()
            hist.record(time.perf_counter_ns() - item[0])
            count += 1
            if latency_mode:
                arrived.set()
            if count == n_events:
                done.set()

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(hop(queues[i], queues[i + 1])) for i in range(HOPS - 1)]
        tasks.append(tg.create_task(sink(queues[-1])))
        start = time.perf_counter()
        for k in range(n_events):
            item = (time.perf_counter_ns(), arrays) if batch > 1 else (time.perf_counter_ns(), k, 100.0, 1.0)
            await queues[0].put(item)
            if latency_mode:
                await arrived.wait()
                arrived.clear()
        await done.wait()
        elapsed = time.perf_counter() - start
        for t in tasks:
            t.cancel()
    return elapsed, hist


def run_case(loop_name: str, fn, n_events: int, batch: int, latency_mode: bool, repeat: int):
    factory = loop_factory(loop_name == "uvloop")
    results = []
    for _ in range(repeat):
        with asyncio.Runner(loop_factory=factory) as runner:
            results.append(runner.run(fn(n_events, batch, latency_mode)))
    best = min(results, key=lambda r: r[0])
    return best


def machine() -> str:
    return f"{describe()}, numpy {np.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="events per throughput run (1 tick/event)")
    ap.add_argument("--batch-events", type=int, default=20_000, help="events per run with 1024-tick batches")
    ap.add_argument("--latency-events", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    args = ap.parse_args()
    configure_logging(level="warning")

    loops = ["uvloop", "asyncio"] if loop_factory(True) is not None else ["asyncio"]
    print(f"machine: {machine()}")
    print(f"chain: {HOPS} hops, queue bound {QUEUE}; best of {args.repeat} runs\n")
    header = (
        f"{'loop':8} {'ticks/event':>11} {'impl':7} {'events/s':>12} {'ticks/s':>14} "
        f"{'p50 µs':>8} {'p99 µs':>8} {'bus/queue cost':>15}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for loop_name in loops:
        for batch, n in ((1, args.events), (1024, args.batch_events)):
            row = {}
            for impl, fn in (("queue", queue_chain), ("bus", bus_chain)):
                elapsed, _ = run_case(loop_name, fn, n, batch, False, args.repeat)
                _, lat = run_case(loop_name, fn, args.latency_events, batch, True, args.repeat)
                row[impl] = (n / elapsed, lat.percentile(50) / 1e3, lat.percentile(99) / 1e3)
            ratio = row["queue"][0] / row["bus"][0]
            for impl in ("queue", "bus"):
                eps, p50, p99 = row[impl]
                cost = f"{ratio:.2f}x" if impl == "bus" else ""
                print(
                    f"{loop_name:8} {batch:>11} {impl:7} {eps:>12,.0f} {eps * batch:>14,.0f} "
                    f"{p50:>8.1f} {p99:>8.1f} {cost:>15}"
                )
            summary.append((loop_name, batch, ratio, row["bus"][0] * batch))
    print()
    for loop_name, batch, ratio, tps in summary:
        if batch == 1:
            verdict = "meets" if ratio <= 1.5 else "MISSES"
            print(f"{loop_name}: 1 tick/event, bus chain costs {ratio:.2f}x the queue chain ({verdict} target <= 1.5x)")
        else:
            verdict = "meets" if tps >= 20e6 else "MISSES"
            print(f"{loop_name}: 1024 ticks/event, bus moves {tps / 1e6:,.1f}M ticks/s through {HOPS} hops ({verdict} target >= 20M)")


if __name__ == "__main__":
    main()
