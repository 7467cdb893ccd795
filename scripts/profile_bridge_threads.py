"""Whose CPU the bridge adds: this process's threads, in-process ``ingest`` against the bridge.

The default pipeline and a pipeline of one stage that does nothing, each fed (a) by
``Pipeline.ingest`` and (b) through ``NatsBridge`` from a stream another process filled before
(16384-tick messages), alternating. Per run, the CPU of each thread of this process (Linux
``/proc/self/task/*/schedstat``, ns) is read when the pipeline closes, before its stage
workers end: the main thread (the event loop: the ingress, nats-py's read loop and parser,
the inline stages) apart from the others (the stages' stream workers), and nats-server's,
per 4096 ticks. The do-nothing pipeline shows what the bridge's own code costs beside
``ingest``'s; the default pipeline what the same bridge costs the stages it feeds.

Run: ``python scripts/profile_bridge_threads.py [--ticks N] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_bridge as bb  # noqa: E402

from nautilus_pipeline import Pipeline  # noqa: E402
from nautilus_pipeline.bridge import NatsBridge  # noqa: E402
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.machine import describe  # noqa: E402
from nautilus_pipeline.runtime import configure_logging, loop_factory  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402


def threads() -> dict[str, int]:
    """Thread id → CPU ns so far, for every thread of this process."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


class Split:
    """CPU ns of the main thread and of the others between ``start`` and the pipeline's close."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.main = self.others = 0
        close = pipe.close

        async def closing(*args, **kwargs):
            self.stop()
            return await close(*args, **kwargs)

        pipe.close = closing

    def start(self) -> None:
        self._t0 = threads()

    def stop(self) -> None:
        t1, me = threads(), str(os.getpid())
        for tid, ns in t1.items():
            delta = ns - self._t0.get(tid, 0)
            if tid == me:
                self.main += delta
            else:
                self.others += delta


def noop_pipeline() -> Pipeline:
    return Pipeline([bb._Noop()], batch_size=bb.BATCH, slabs=8, execution="serial")


async def run_in_process(make, frame: dict) -> tuple[Split, float]:
    pipe = make()
    split = Split(pipe)
    async with pipe:
        split.start()
        await pipe.ingest(frame, symbol=bb.SYMBOL)
        await pipe.drain()
    return split, 0.0


async def run_bridge(make, url: str, pid: int, durable: str, n: int) -> tuple[Split, float]:
    pipe = make()
    split = Split(pipe)
    async with pipe:
        handed = bb._count_handoffs(pipe, n)
        s0 = bb.cpu_seconds(pid)
        split.start()
        async with NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable, state=False,
                              fetch_timeout=0.05):
            await handed.wait()
            await pipe.drain()
        server = bb.cpu_seconds(pid) - s0
    return split, server


async def main(args: argparse.Namespace) -> None:
    n = args.ticks // 16384 * 16384
    per = n / bb.BATCH
    print(f"machine: {describe()}; load {os.getloadavg()[0]:.2f}\n{n:,} ticks, 16384-tick messages "
          f"filled before, median of {args.repeat} alternating\n")
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        pid = server.proc.pid
        bb.publish_from_another_process(server.url, n, "now", pid, batch=16384)
        frame = trades_frame(n, seed=7)
        await bb.in_process(trades_frame(bb.BATCH * 4, seed=1))  # warm-up: numba caches, imports
        rows = {("default", "in-process"): [], ("default", "bridge"): [],
                ("one stage doing nothing", "in-process"): [], ("one stage doing nothing", "bridge"): []}
        makers = {"default": bb.default_pipeline, "one stage doing nothing": noop_pipeline}
        for r in range(args.repeat):
            for i, (kind, feed) in enumerate(rows):
                t0 = time.perf_counter()
                if feed == "in-process":
                    split, server_s = await run_in_process(makers[kind], frame)
                else:
                    split, server_s = await run_bridge(makers[kind], server.url, pid, f"t{i}-{r}", n)
                rows[kind, feed].append((split.main / 1e9, split.others / 1e9, server_s, time.perf_counter() - t0))
        print("| pipeline | fed by | CPU µs per 4096 ticks: main thread | other threads | this process | "
              "nats-server | ticks/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for (kind, feed), xs in rows.items():
            med = [statistics.median(x[j] for x in xs) for j in range(3)]
            both = statistics.median(x[0] + x[1] for x in xs)
            rate = n / statistics.median(x[3] for x in xs)
            print(f"| {kind} | {feed} | {med[0] / per * 1e6:,.0f} | {med[1] / per * 1e6:,.0f} | "
                  f"{both / per * 1e6:,.0f} | {med[2] / per * 1e6:,.0f} | {rate:,.0f} |")
        print(f"\nload at the end {os.getloadavg()[0]:.2f}; ticks/s include the bridge's entry (connect, "
              "consumer) and the in-process pre-pass (the ingest checks)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    configure_logging(level="warning")
    a = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(a))
