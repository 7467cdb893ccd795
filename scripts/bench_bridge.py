"""Benchmark: the NATS JetStream bridge on loopback, against in-process ingest.

Starts its own ``nats-server -js`` (temporary store, free port) and measures, in one run:

1. **transport**: 4096-tick batches (the wire format of ``bridge/wire.py``) published by
   another process with JetStream acks (64 in flight), then consumed here with a durable
   pull consumer, acked and decoded: ticks/s each way;
2. **one-tick hop**: one 1-tick batch at a time, publish → durable pull consumer (a fetch
   waiting at the server), p50/p99 µs over ``--hops`` messages;
3. **pipeline**: the default pipeline fed (a) in-process by ``Pipeline.ingest`` of the
   batches and (b) through ``NatsBridge`` from the stream another process filled, each run
   ending when the last tick is through the last stage; alternating a/b ``--repeat`` times;
   ticks/s and the ratio b/a (medians).

Run: ``python scripts/bench_bridge.py [--ticks N] [--repeat R] [--hops H]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nautilus_pipeline.bridge import NatsBridge, decode_batch, encode_batch, ensure_stream  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.machine import describe  # noqa: E402
from nautilus_pipeline.runtime import configure_logging, loop_factory  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

SYMBOL = "BTCUSDT-PERP"
BATCH = 4096

PUBLISHER = """
import asyncio, sys, time
import nats
from nautilus_pipeline.bridge import TickPublisher, ensure_stream
from nautilus_pipeline.testing import trades_frame

async def main(url, n, batch):
    frame = trades_frame(int(n), seed=7)
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js, "TICKS", ["ticks.>"])
    pub = TickPublisher(js, batch_size=int(batch), max_in_flight=64)
    t0 = time.perf_counter()
    await pub.publish(frame, "BTCUSDT-PERP")
    await pub.flush()
    print(time.perf_counter() - t0)
    await nc.close()

asyncio.run(main(*sys.argv[1:]))
"""


def publish_from_another_process(url: str, n: int) -> float:
    """Fill the TICKS stream from a child process; returns its publish wall time (s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PUBLISHER, url, str(n), str(BATCH)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


async def consume_raw(url: str, durable: str, messages: int) -> float:
    """Durable pull consumer: fetch, decode, ack every message; wall time (s)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe("ticks.>", durable=durable, stream="TICKS",
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1024))
    t0 = time.perf_counter()
    got = 0
    rows = 0
    while got < messages:
        for m in await sub.fetch(min(64, messages - got), timeout=5):
            rows += decode_batch(m.data).length
            await m.ack()
            got += 1
    await nc.flush()
    wall = time.perf_counter() - t0
    await nc.close()
    return wall


async def one_tick_hops(url: str, hops: int) -> list[float]:
    """µs from publishing a 1-tick batch to its arrival at a durable pull consumer."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js, "HOP", ["hop.>"])
    sub = await js.pull_subscribe("hop.>", durable="hop", stream="HOP",
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
    data = encode_batch(trades_frame(1, seed=1), SYMBOL)
    out = []
    for i in range(hops + 50):
        fetch = asyncio.ensure_future(sub.fetch(1, timeout=5))
        await asyncio.sleep(0)  # the pull request goes out first: it waits at the server
        t0 = time.perf_counter_ns()
        await nc.publish("hop.BTCUSDT-PERP", data)
        msg = (await fetch)[0]
        dt = (time.perf_counter_ns() - t0) / 1e3
        await msg.ack()
        if i >= 50:  # warm-up
            out.append(dt)
    await nc.close()
    return out


def default_pipeline():
    from nautilus_pipeline import Run

    return Run("default", outputs=False, pipeline_settings={"batch_size": BATCH}).pipeline


async def in_process(frame: dict) -> float:
    pipe = default_pipeline()
    async with pipe:
        t0 = time.perf_counter()
        await pipe.ingest(frame, symbol=SYMBOL)
        await pipe.drain()
        wall = time.perf_counter() - t0
    return wall


async def through_bridge(url: str, durable: str, n: int) -> float:
    pipe = default_pipeline()
    async with pipe:
        bridge = NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable, state=False,
                            fetch_timeout=0.05)
        t0 = time.perf_counter()
        async with bridge:
            while True:  # the last tick through the last stage
                if pipe.tick_flow().ticks_out >= n:
                    break
                await asyncio.sleep(0.001)
            wall = time.perf_counter() - t0
    return wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


async def main(args: argparse.Namespace) -> None:
    n = args.ticks // BATCH * BATCH
    messages = n // BATCH
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        url = server.url
        print(f"machine: {describe()}")
        print(f"nats-server: {server_version()}, nats-py {nats_version()}; {n:,} ticks in {messages} "
              f"batches of {BATCH}\n")

        pub_s = publish_from_another_process(url, n)
        con_s = await consume_raw(url, "raw", messages)
        print("| transport (4096-tick batches, acked) | ticks/s |")
        print("|---|---:|")
        print(f"| publish, another process, 64 in flight | {n / pub_s:,.0f} |")
        print(f"| consume: durable pull, decode, ack | {n / con_s:,.0f} |\n")

        hops = await one_tick_hops(url, args.hops)
        print(f"| one-tick hop publish → durable consumer ({args.hops} hops) | p50 µs | p99 µs |")
        print("|---|---:|---:|")
        print(f"| loopback | {pct(hops, 50):.1f} | {pct(hops, 99):.1f} |\n")

        frame = trades_frame(n, seed=7)
        await in_process(trades_frame(BATCH * 4, seed=1))  # warm-up: numba caches, imports
        local, bridged = [], []
        for r in range(args.repeat):
            local.append(n / await in_process(frame))
            bridged.append(n / await through_bridge(url, f"bench{r}", n))
        ml, mb = statistics.median(local), statistics.median(bridged)
        print(f"| default pipeline, {n:,} ticks, median of {args.repeat} alternating | ticks/s |")
        print("|---|---:|")
        print(f"| in-process `ingest` | {ml:,.0f} |")
        print(f"| through JetStream (`NatsBridge`, filled by another process) | {mb:,.0f} |")
        print(f"| ratio (target >= 0.95) | {mb / ml:.3f} |")
        print(f"\nper run: in-process {[round(x) for x in local]}, bridge {[round(x) for x in bridged]}")


def server_version() -> str:
    from nautilus_pipeline.bridge.server import find_server

    return subprocess.run([find_server(), "--version"], capture_output=True, text=True).stdout.strip()


def nats_version() -> str:
    from importlib.metadata import version

    return version("nats-py")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hops", type=int, default=2000)
    configure_logging(level="warning")
    a = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(a))
