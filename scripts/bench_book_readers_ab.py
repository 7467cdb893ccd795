"""The two book readers beside their plain library calls, for comparing two checkouts.

Run it once per checkout, back to back, with ``PYTHONPATH`` naming the checkout (a tree of an
earlier commit: ``git archive <commit> | tar -x -C /tmp/old``); every call is taken in turn,
garbage collected before each, best of ``N``. It uses only what both old and new readers
have (``DatabentoReader(path).chunks()``, ``TardisIncrementalBookReader(path).chunks()``), so
the numbers of two commits come from the same harness:

    PYTHONPATH=/tmp/old python scripts/bench_book_readers_ab.py 7
    PYTHONPATH=$PWD python scripts/bench_book_readers_ab.py 7

Needs ../shared/data's MBO file and the generated Tardis file of ``bench_readers.py --books``.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import databento_dbn as dbn
import pyarrow as pa
import pyarrow.csv as pacsv

from nautilus_pipeline.io.databento import DatabentoReader
from nautilus_pipeline.io.files import open_stream
from nautilus_pipeline.io.tardis_book import TardisIncrementalBookReader

MBO = Path(__file__).resolve().parents[2] / "shared" / "data" / "databento-glbx-esh4-mbo-20231225.dbn.zst"
L2 = Path("/tmp/tardis-incremental-book-l2-1000000.csv")
NAMES = ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"]


def decode() -> int:
    with open_stream(MBO) as s:
        d = dbn.DBNDecoder()
        d.write(s.read())
        return len(d.decode()) - 1


def parse() -> int:
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in NAMES})
    with open_stream(L2) as s:
        return sum(b.num_rows for b in pacsv.open_csv(s, read_options=pacsv.ReadOptions(block_size=1 << 22,
                                                                                        use_threads=False),
                                                      convert_options=conv))


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    fns = {"DBNDecoder alone": decode,
           "DatabentoReader (MBO book rows)": lambda: sum(len(c) for c in DatabentoReader(MBO).chunks()),
           "pyarrow parse alone": parse,
           "TardisIncrementalBookReader": lambda: sum(len(c) for c in TardisIncrementalBookReader(L2).chunks())}
    best = {k: (float("inf"), 0) for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeat):
        for k, f in fns.items():
            gc.collect()
            t = time.perf_counter()
            n = f()
            best[k] = (min(best[k][0], time.perf_counter() - t), n)
    for k, (t, n) in best.items():
        print(f"| {k} | {n:,} | {t * 1e3:.1f} ms | {n / t / 1e6:.2f} M/s |")


if __name__ == "__main__":
    main()
