"""The VPIN stage's path for a batch of one symbol's trades gives the general path's values.

Most replay batches hold one symbol's trades only; the stage runs the kernel on the slab's
own columns and writes the carried buckets straight into the output columns
(``kernels.rows.fill_events_into``). Checked against ``ffill_rows`` (the general path's fill)
on random events, and end to end against the general path on real trades, where buckets
complete inside batches and several at one row.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from test_integration import Capture, btc_trades

from nautilus_pipeline.kernels.rows import ffill_rows, fill_events_into
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stages import VpinStage


@pytest.mark.parametrize("events", [0, 1, 7, 300])
def test_fill_events_into_is_ffill_rows(events):
    rng = np.random.default_rng(events)
    n = 1000
    rows = np.sort(rng.integers(0, n, events))  # repeats: several events at one row
    v = rng.standard_normal((events, 3))
    v[:, 2] = rng.integers(0, 2, events)
    carry = np.array([0.25, 0.5, 1.0])
    values = np.zeros((n, 3))
    has = np.zeros(n, dtype=bool)
    values[rows] = v  # fancy assignment: the last of repeated rows wins
    has[rows] = True
    want = ffill_rows(values, has, carry)
    o0, o1, o2 = np.full(n, -1.0), np.full(n, -1.0), np.full(n, 9, dtype=np.uint8)
    got_carry = carry.copy()
    fill_events_into(n, rows, v[:, 0].copy(), v[:, 1].copy(), v[:, 2].copy(), got_carry, o0, o1, o2)
    np.testing.assert_array_equal(o0, want[:, 0])
    np.testing.assert_array_equal(o1, want[:, 1])
    np.testing.assert_array_equal(o2, want[:, 2].astype(np.uint8))
    np.testing.assert_array_equal(got_carry, want[-1])


async def _vpin(data, batch_size: int, one_symbol: bool):
    vpin = VpinStage(2.0, window=10, bar_ns=1_000_000_000)
    taken = []
    if not one_symbol:
        vpin._one_symbol_batch = lambda groups, kind: False  # the general path for every batch
    else:
        fast = vpin._one_symbol
        vpin._one_symbol = lambda *a: taken.append(1) or fast(*a)
    capture = Capture(("ts_ns", "vpin", "vpin_cdf", "toxic"))
    pipe = Pipeline([vpin, capture], batch_size=batch_size, slabs=4, memory="host")
    buckets: list = []
    async with pipe:
        pipe.bus.subscribe("vpin.>", lambda e: buckets.append(e.payload), maxsize=1 << 16)
        pipe.symbols.id_of("BTCUSDT-PERP")
        await pipe.ingest(data)
    return capture.result(), orjson.dumps(buckets), len(taken)


@pytest.mark.parametrize("batch_size", [300, 4096])
async def test_one_symbol_batches_give_the_general_paths_values(sample_dir, batch_size):
    data = btc_trades(sample_dir)
    ref, ref_buckets, _ = await _vpin(data, batch_size, one_symbol=False)
    got, got_buckets, taken = await _vpin(data, batch_size, one_symbol=True)
    assert taken >= len(data["price"]) // batch_size  # every full batch took it
    assert got_buckets == ref_buckets and got_buckets.count(b'"bucket"') > 50
    for c in ("ts_ns", "vpin", "vpin_cdf", "toxic"):
        np.testing.assert_array_equal(got[c], ref[c], err_msg=c)
