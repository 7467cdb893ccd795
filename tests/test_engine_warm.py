"""A started pipeline has its live kernels ready: the first live ticks (trades, a quote, a
new symbol, a VaR report) neither compile nor load a numba kernel from the cache.

Each check runs in a fresh interpreter: in this one an earlier test may already have loaded
every kernel, which would make the check pass whatever ``start`` does. Every numba
dispatch that finds no ready overload goes through ``Dispatcher.compile`` (a cache load
too), which the child counts: during ``start`` (which must see them, or the spy is blind)
and after it (which must see none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import asyncio, sys
import orjson
from numba.core import dispatcher
from nautilus_pipeline import config
from nautilus_pipeline.events import QuoteTick, TradeTick
from nautilus_pipeline.runtime import configure_logging

configure_logging(level="error")
loads = []
real = dispatcher.Dispatcher.compile

def counted(self, sig):
    loads.append(self.py_func.__qualname__)
    return real(self, sig)

dispatcher.Dispatcher.compile = counted

async def main(definition, batch, execution):
    d = config.load(definition)
    pipe = config.build_pipeline(d, config.build_stages(d, []), batch_size=batch,
                                 execution=execution)
    seen = {"start": [], "ticks": []}
    async with pipe:
        seen["start"], loads[:] = list(loads), []
        signals = []
        pipe.bus.subscribe("risk.>", lambda e: signals.append(e.payload))
        for i in range(2100):  # var_every = 2000: one VaR report on the live path
            t = TradeTick("BTCUSDT-PERP", 10**9 + i * 10**7, 100.0 + (i % 7) * 0.1, 0.01,
                          1 if i % 2 else -1)
            await pipe.publish_tick(t)
            if i == 10:
                await pipe.publish_tick(QuoteTick("BTCUSDT-PERP", t.ts_ns, 99.9, 100.1, 1.0, 2.0))
            if i == 20:
                await pipe.publish_tick(TradeTick("ETHUSDT-PERP", t.ts_ns, 3000.0, 0.1, 1))
        await pipe.drain()
        seen["ticks"] = list(loads)
        seen["reports"] = sum(1 for s in signals if s.kind == "var")
        seen["fused"] = pipe.runners[3].stats()["fused_batches"]
    sys.stdout.write(orjson.dumps(seen).decode())

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


@pytest.mark.parametrize(("batch", "execution"), [(1, "concurrent"), (7, "serial")])
def test_the_first_live_ticks_of_a_started_pipeline_load_no_kernel(tmp_path, batch, execution):
    text = (ROOT / "pipelines/default.toml").read_text()
    definition = tmp_path / "live.toml"
    definition.write_text(text.replace('bucket_volume = "auto"', "bucket_volume = 2.0"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(definition), str(batch), execution],
                          cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    seen = orjson.loads(done.stdout)
    assert seen["start"]  # the spy sees loads: at start, where they belong
    assert seen["reports"] >= 1 and seen["fused"] > 100  # the live paths ran, a report among them
    assert seen["ticks"] == []
