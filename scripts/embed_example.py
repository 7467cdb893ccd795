"""Embedding example: a small asyncio app with a simulated live feed of trades.

A producer task plays a random walk at ~2,000 trades/s and publishes each trade into the
pipeline one at a time (the micro-batcher groups them: up to 64 rows or 2 ms); a consumer
prints signals as they come; every second the app asks the pipeline for its stats over
the bus. Ctrl-C or --seconds ends it cleanly: the feed stops, in-flight batches drain.

    python scripts/embed_example.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

import nautilus_pipeline as nt
from nautilus_pipeline.stages import (
    FeaturesStage,
    InferenceStage,
    RiskStage,
    SignalStage,
    VpinStage,
)


async def live_feed(pipe: nt.Pipeline, rate: float, stop: asyncio.Event) -> int:
    """A stand-in for a websocket client: random-walk BTCUSDT trades at ``rate`` per second."""
    rng = np.random.default_rng(0)
    price, n = 60_000.0, 0
    while not stop.is_set():
        price *= float(np.exp(rng.normal(0, 2e-5)))
        side = 1 if rng.random() < 0.5 else -1
        await pipe.publish_tick(nt.TradeTick("BTCUSDT", time.time_ns(), price, float(rng.exponential(0.05)), side))
        n += 1
        await asyncio.sleep(1 / rate)
    return n


async def main(seconds: float, rate: float) -> None:
    inference = InferenceStage(streams=("cpu",))
    stages = [FeaturesStage(inference.input_names), inference,
              VpinStage(bucket_volume=25.0, window=10, bar_ns=200_000_000),
              RiskStage(var_every=0), SignalStage()]
    stop = asyncio.Event()
    async with nt.Pipeline(stages, name="live", batch_size=64, max_delay_us=2000) as pipe:
        pipe.bus.subscribe("signals.>", lambda e: print(f"signal  {e.payload.side:4} {e.payload.reasons}"))
        pipe.bus.subscribe("vpin.>", lambda e: print(f"vpin    bucket {e.payload.bucket} vpin={e.payload.vpin:.3f}"))
        async with asyncio.TaskGroup() as tg:
            feed = tg.create_task(live_feed(pipe, rate, stop))
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                stats = await pipe.bus.request("control.live.stats", timeout=1.0)
                print(f"stats   {stats['ticks']}")
            stop.set()
        print(f"fed {feed.result()} trades; pool high-water {pipe.pool.stats().high_water} slabs")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=2000.0, help="trades per second")
    args = ap.parse_args()
    nt.configure_logging(level="warning")
    try:
        nt.run(main(args.seconds, args.rate))
    except KeyboardInterrupt:
        pass
