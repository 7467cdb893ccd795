"""Where the bridged run's gap to in-process ``ingest`` goes: fixed costs vs steady rate vs stalls.

The default pipeline fed (a) in-process by ``Pipeline.ingest`` and (b) through ``NatsBridge``
from a stream another process filled before (16384-tick messages), alternating. Each run is
cut into phases on one clock: the bridge's entry (connect, stream and consumer info, the
pull subscription), the time from the start to the first batch handed to the first stage
(the entry included: total = to first + steady + drain), the steady part
from the first to the last hand-off, and the drain after it. A thread samples the first
stage every 0.2 ms: the share of the steady part in which it had nothing queued and nothing
in hand (the pipeline waiting for its input).

Run: ``python scripts/profile_bridge_phases.py [--ticks N ...] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
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
from nautilus_pipeline.bridge.server import NatsServer  # noqa: E402
from nautilus_pipeline.machine import describe  # noqa: E402
from nautilus_pipeline.runtime import configure_logging, loop_factory  # noqa: E402
from nautilus_pipeline.testing import trades_frame  # noqa: E402

PHASES = ("enter", "to first", "steady", "drain", "total")


class Starved(threading.Thread):
    """Samples, every 0.2 ms, whether the first stage has nothing queued and nothing in hand."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.stop, self.samples = pipe, False, []

    def run(self) -> None:
        first = self.pipe.runners[0]
        while not self.stop:
            self.samples.append((time.perf_counter(), not first.subscription._queue and first._inside == 0))
            time.sleep(0.0002)

    def share(self, t0: float, t1: float) -> float:
        inside = [idle for t, idle in self.samples if t0 <= t <= t1]
        return sum(inside) / max(len(inside), 1)


def _handoffs(pipe, n: int) -> tuple[asyncio.Event, list[float]]:
    """An event set at ``n`` ticks handed over, and the times of the first and last hand-off."""
    done = asyncio.Event()
    handoff = pipe.publish_batch
    seen, times = [0], []

    async def counted(lease, holder="source"):
        seen[0] += lease.length
        times[1:] = [time.perf_counter()] if times else []
        if not times:
            times.append(time.perf_counter())
        await handoff(lease, holder)
        if seen[0] >= n:
            done.set()

    pipe.publish_batch = counted
    return done, times


async def bridged(url: str, durable: str, n: int) -> dict[str, float]:
    pipe = bb.default_pipeline()
    async with pipe:
        handed, times = _handoffs(pipe, n)
        probe = Starved(pipe)
        probe.start()
        bridge = NatsBridge(pipe, servers=url, ingest="ticks.>", durable=durable, state=False, fetch_timeout=0.05)
        t0 = time.perf_counter()
        async with bridge:
            t_in = time.perf_counter()
            await handed.wait()
            await pipe.drain()
            t_end = time.perf_counter()
        probe.stop = True
        probe.join()
        assert pipe.tick_flow().ticks_out == n
    first, last = times[0], times[-1]
    return {"enter": t_in - t0, "to first": first - t0, "steady": last - first, "drain": t_end - last,
            "total": t_end - t0, "starved": probe.share(first, last)}


async def local(frame: dict, n: int) -> dict[str, float]:
    pipe = bb.default_pipeline()
    async with pipe:
        times: list[float] = []
        send = pipe._send

        async def timed(lease, holder, inline=False):
            times[1:] = [time.perf_counter()] if times else []
            if not times:
                times.append(time.perf_counter())
            await send(lease, holder, inline)

        pipe._send = timed
        probe = Starved(pipe)
        probe.start()
        t0 = time.perf_counter()
        await pipe.ingest(frame, symbol=bb.SYMBOL)
        await pipe.drain()
        t_end = time.perf_counter()
        probe.stop = True
        probe.join()
        assert pipe.tick_flow().ticks_out == n
    first, last = times[0], times[-1]
    return {"enter": 0.0, "to first": first - t0, "steady": last - first, "drain": t_end - last,
            "total": t_end - t0, "starved": probe.share(first, last)}


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {describe()}")
    await bb.in_process(trades_frame(bb.BATCH * 4, seed=1))  # warm-up: numba caches, imports
    for ticks in args.ticks:
        n = ticks // 16384 * 16384
        with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
            bb.publish_from_another_process(server.url, n, "now", server.proc.pid, batch=16384)
            frame = trades_frame(n, seed=7)
            res: dict[str, list[dict[str, float]]] = {"in-process": [], "bridge": []}
            for r in range(args.repeat):
                res["in-process"].append(await local(frame, n))
                res["bridge"].append(await bridged(server.url, f"ph-{r}", n))
        print(f"\n{n:,} ticks (stream filled before, 16384-tick messages), medians of {args.repeat} alternating")
        print("| run | " + " | ".join(f"{p} ms" for p in PHASES) + " | ticks/s | steady ticks/s | first stage starved |")
        print("|---|" + "---:|" * (len(PHASES) + 3))
        rates = {}
        for label, runs in res.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            steady = statistics.median((n - 4096) / r["steady"] for r in runs)
            rates[label] = (statistics.median(n / r["total"] for r in runs), steady)
            print(f"| {label} | " + " | ".join(f"{1e3 * med[p]:.1f}" for p in PHASES)
                  + f" | {rates[label][0]:,.0f} | {steady:,.0f} | {100 * med['starved']:.1f} % |")
        print(f"ratio bridge ÷ in-process: whole run {rates['bridge'][0] / rates['in-process'][0]:.3f}, "
              f"steady part {rates['bridge'][1] / rates['in-process'][1]:.3f}")
        print("per run (total ms): " + "; ".join(
            f"{k} {[round(1e3 * r['total']) for r in v]}" for k, v in res.items()))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--repeat", type=int, default=5)
    configure_logging(level="warning")
    a = ap.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(a))
