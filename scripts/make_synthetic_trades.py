"""Write a large synthetic trades CSV in Binance's USD-M public-data layout, for benchmarks.

The real samples are small on purpose; throughput needs millions of rows. The file mimics the
bundled ``binance-um-btcusdt-trades-20240808.csv``: header
``id,price,qty,quote_qty,time,is_buyer_maker``, contiguous ids, a random-walk price around
61,800 with 0.10 ticks, log-normal sizes, millisecond times with about 75% of trades sharing
the previous timestamp (sweeps), as in the real file. Deterministic for a given ``--seed``.

    python scripts/make_synthetic_trades.py --rows 10000000 --out /tmp/synthetic-trades.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv


def make(rows: int, out: Path, seed: int = 7, block: int = 2_000_000) -> Path:
    """Write ``rows`` trades to ``out`` (in blocks, so memory stays bounded)."""
    rng = np.random.default_rng(seed)
    price0, t0, id0 = 61_800.0, 1_723_161_256_322, 5_266_583_935
    last_tick, last_ms = 0, t0
    schema = pa.schema([("id", pa.int64()), ("price", pa.float64()), ("qty", pa.float64()),
                        ("quote_qty", pa.float64()), ("time", pa.int64()), ("is_buyer_maker", pa.bool_())])
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(out, "wb") as fh, pacsv.CSVWriter(fh, schema, write_options=opts) as writer:
        fh.write((",".join(schema.names) + "\n").encode())
        for start in range(0, rows, block):
            n = min(block, rows - start)
            ticks = last_tick + np.cumsum(rng.choice([-1, 0, 0, 1], size=n))
            last_tick = int(ticks[-1])
            price = np.round(price0 + ticks * 0.1, 1)
            qty = np.round(np.exp(rng.normal(-4.0, 1.5, size=n)) + 0.001, 3)
            step = np.where(rng.random(n) < 0.75, 0, rng.geometric(0.02, size=n))
            ms = last_ms + np.cumsum(step)
            last_ms = int(ms[-1])
            table = pa.table({
                "id": np.arange(id0 + start, id0 + start + n, dtype=np.int64),
                "price": price,
                "qty": qty,
                "quote_qty": np.round(price * qty, 4),
                "time": ms.astype(np.int64),
                "is_buyer_maker": rng.random(n) < 0.5,
            })
            writer.write_table(table)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/synthetic-btcusdt-trades.csv"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    t = time.perf_counter()
    make(args.rows, args.out, args.seed)
    size = args.out.stat().st_size
    print(f"wrote {args.rows:,} trades, {size / 1e6:.0f} MB to {args.out} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
