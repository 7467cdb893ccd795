"""Replay example: a pipeline built from a definition file, driven from Python.

The same as ``nautilus-pipeline run pipelines/default.toml`` without the command line:
load and validate the definition, build sources, stages and the pipeline, replay the
bundled trades through it, and count what comes out.

    python scripts/replay_example.py [pipelines/default.toml]
"""

from __future__ import annotations

import sys
from collections import Counter

import nautilus_pipeline as nt
from nautilus_pipeline import config
from nautilus_pipeline.io import Replay


async def main(path: str) -> None:
    definition = config.load(path)
    sources = config.make_sources(definition, None, None)
    pipe = config.build_pipeline(definition, config.build_stages(definition, sources))
    replay = Replay(sources, symbols=pipe.symbols)
    sides: Counter[str] = Counter()
    async with pipe:
        pipe.bus.subscribe("signals.>", lambda e: sides.update([e.payload.side.value]))
        async for lease in replay.batches(pipe.pool):
            await pipe.publish_batch(lease, "replay")
    total = replay.accounting.total
    print(f"{total.read:,} rows read, {total.delivered:,} delivered, {total.rejected:,} rejected, "
          f"{total.quarantined:,} quarantined; signals by side: {dict(sides)}")
    for stage in pipe.stats()["stages"]:
        lat = stage["batch_latency"]
        print(f"{stage['stage']:>10} on {stage['stream']:<10} p50 {lat['p50_us']:>9,.0f} µs  p99 {lat['p99_us']:>9,.0f} µs")


if __name__ == "__main__":
    nt.configure_logging(level="warning")
    nt.run(main(sys.argv[1] if len(sys.argv) > 1 else "pipelines/default.toml"))
