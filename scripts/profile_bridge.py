"""Where the NATS bridge's time goes: per-message costs, nats-server's CPU, free slabs.

The default pipeline through ``NatsBridge`` (stream filled before, by another process) is
compared with in-process ``ingest``; this script splits the difference:

1. **per message, this process**: decode (``decode_batch``), copy into a slab, ack, timed on
   messages already fetched (µs, medians over the messages);
2. **ingress options** (alternating, medians): ticks/s, this process's CPU and nats-server's
   per 4096-tick message for ``read_ahead``/``ack_every`` variants against in-process;
3. **free slabs**: the pool's ``in_use`` sampled by a thread every 0.2 ms during one run of
   each, and the share of samples with a free slab and nothing delivered to fill it (the
   pipeline waiting for JetStream).

Run: ``python scripts/profile_bridge.py [--ticks N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_bridge as bb  # noqa: E402

from nautilus_pipeline.bridge import NatsBridge  # noqa: E402
from nautilus_pipeline.bridge.pull import PullFeed  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.bridge.wire import decode_batch  # noqa: E402
from nautilus_pipeline.events import TICK_COLUMNS  # noqa: E402
from nautilus_pipeline.machine import describe  # noqa: E402
from nautilus_pipeline.runtime import configure_logging, loop_factory  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

VARIANTS = {
    "read_ahead=0, ack_every=1 (b22cc61's flow)": {"read_ahead": 0, "ack_every": 1},
    "read_ahead=slabs, ack_every=1": {"ack_every": 1},
    "read_ahead=slabs, ack_every=4 (defaults)": {},
}


async def per_message(url: str, messages: int) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer("TICKS", ConsumerConfig(durable_name="micro", ack_policy=AckPolicy.EXPLICIT,
                                                  max_ack_pending=4096))
    feed = await PullFeed(nc, "TICKS", "micro").open()
    msgs: list = []
    while len(msgs) < messages:
        msgs += await feed.get(64, 5.0)
    pipe = bb.default_pipeline()
    dec, copy, ack = [], [], []
    async with pipe:
        lease = await pipe.acquire("profile")
        for m in msgs:
            t0 = time.perf_counter_ns()
            batch = decode_batch(m.data)
            t1 = time.perf_counter_ns()
            lease.length = batch.length
            for spec in TICK_COLUMNS:
                col = lease[spec.name]
                if spec.name == "symbol_id":
                    col.fill(1)
                elif spec.name in batch:
                    batch.copy_into(spec.name, col)
                else:
                    col.fill(spec.fill)
            t2 = time.perf_counter_ns()
            await m.ack()
            t3 = time.perf_counter_ns()
            dec.append(t1 - t0)
            copy.append(t2 - t1)
            ack.append(t3 - t2)
        lease.release("profile")
    await nc.close()
    print(f"| per 4096-tick message, this process ({len(msgs)} messages, medians) | µs |")
    print("|---|---:|")
    for label, xs in (("decode (header, column views)", dec), ("copy into a slab", copy),
                      ("ack (handed to the client)", ack)):
        print(f"| {label} | {statistics.median(xs) / 1e3:.1f} |")
    print()


class Sampler(threading.Thread):
    """``pool.in_use`` and the feed's delivered-not-taken count every 0.2 ms."""

    def __init__(self, pipe, feed_of):
        super().__init__(daemon=True)
        self.pipe, self.feed_of, self.stop, self.samples = pipe, feed_of, False, []

    def run(self) -> None:
        while not self.stop:
            feed = self.feed_of()
            self.samples.append((self.pipe.pool.in_use, feed.ready if feed is not None else 0))
            time.sleep(0.0002)


async def timeline(url: str, n: int, durable: str, options: dict) -> tuple[dict, float, float]:
    pipe = bb.default_pipeline()
    async with pipe:
        handed = bb._count_handoffs(pipe, n)
        bridge = NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable, state=False,
                            fetch_timeout=0.05, **options)
        sampler = Sampler(pipe, lambda: bridge._feed)
        sampler.start()
        t0 = time.perf_counter()
        async with bridge:
            await handed.wait()
            await pipe.drain()
            wall = time.perf_counter() - t0
        sampler.stop = True
        sampler.join()
        slabs = len(pipe.pool.slabs)
    s = sampler.samples
    hist = collections.Counter(u for u, _ in s)
    starved = sum(1 for u, r in s if u < slabs and r == 0) / len(s)
    return {k: 100 * v / len(s) for k, v in sorted(hist.items())}, starved, n / wall


async def main(args: argparse.Namespace) -> None:
    n = args.ticks // bb.BATCH * bb.BATCH
    messages = n // bb.BATCH
    print(f"machine: {describe()}\n{n:,} ticks in {messages} messages of {bb.BATCH}\n")
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        pid = server.proc.pid
        bb.publish_from_another_process(server.url, n, "now", pid)
        await per_message(server.url, min(messages, 200))
        frame = trades_frame(n, seed=7)
        await bb.in_process(trades_frame(bb.BATCH * 4, seed=1))
        res: dict[str, list[tuple[float, float, float]]] = {"in-process `ingest`": []}
        res.update({k: [] for k in VARIANTS})
        for r in range(args.repeat):
            for i, label in enumerate(res):
                usage = bb.Usage(pid)
                if label in VARIANTS:
                    wall = await bb.through_bridge(server.url, f"v{i}-{r}", n, usage, **VARIANTS[label])
                else:
                    wall = await bb.in_process(frame, usage)
                res[label].append((n / wall, usage.ours, usage.server))
        local = statistics.median(x[0] for x in res["in-process `ingest`"])
        print(f"| default pipeline, stream filled before, median of {args.repeat} alternating | ticks/s | "
              "÷ in-process | CPU µs per message: this process | nats-server |")
        print("|---|---:|---:|---:|---:|")
        for label, xs in res.items():
            m = statistics.median(x[0] for x in xs)
            ours = statistics.median(x[1] for x in xs) / messages * 1e6
            srv = statistics.median(x[2] for x in xs) / messages * 1e6
            print(f"| {label} | {m:,.0f} | {m / local:.3f} | {ours:,.0f} | {srv:,.0f} |")
        print()
        print("| one run each | pool slabs in use, % of samples (0.2 ms) | free slab, nothing delivered | ticks/s |")
        print("|---|---|---:|---:|")
        for i, (label, options) in enumerate(VARIANTS.items()):
            hist, starved, rate = await timeline(server.url, n, f"timeline-{i}", options)
            shown = ", ".join(f"{k}: {v:.0f}" for k, v in hist.items() if v >= 0.5)
            print(f"| {label} | {shown} | {100 * starved:.0f} % | {rate:,.0f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    configure_logging(level="warning")
    a = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(a))
