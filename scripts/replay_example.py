"""Replay example: a bundled definition run from Python, as ``nautilus-pipeline run`` does it.

``nt.Run`` loads and validates the definition, builds sources, stages and the pipeline,
replays the bundled trades through it and returns a typed summary; here we also count the
signals that come out and print each stage's latency.

    python scripts/replay_example.py [default | path/to/definition.toml]
"""

from __future__ import annotations

import sys
from collections import Counter

import nautilus_pipeline as nt


async def main(definition: str) -> None:
    run = nt.Run(definition, outputs=False)
    sides: Counter[str] = Counter()
    run.pipeline.bus.subscribe("signals.>", lambda e: sides.update([e.payload.side.value]))
    summary = await run.execute()
    t = summary.ticks
    print(f"{t.read:,} rows read, {t.delivered:,} delivered, {t.rejected:,} rejected, "
          f"{t.quarantined:,} quarantined; signals by side: {dict(sides)}")
    for stage in summary.stages:
        lat = stage["batch_latency"]
        print(f"{stage['stage']:>10} on {stage['stream']:<10} p50 {lat['p50_us']:>9,.0f} µs  p99 {lat['p99_us']:>9,.0f} µs")


if __name__ == "__main__":
    nt.configure_logging(level="warning")
    nt.run(main(sys.argv[1] if len(sys.argv) > 1 else "default"))
