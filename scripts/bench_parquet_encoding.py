"""Benchmark: the CPU of writing an output Parquet file with pyarrow's default encoding (a
dictionary tried on every column) against this package's (``io.parquet_out``: a dictionary
on strings, booleans and 8-bit integers only), one pyarrow thread, best of 3.

Run: ``python scripts/bench_parquet_encoding.py OUT/trace.parquet [OUT/signals.parquet ...]``
(a batch job's outputs, e.g. under ``scripts/bench_batch.py --dir D``'s ``D/out-*/jobs``).
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa
import pyarrow.parquet as pq


def _cpu(table: pa.Table, row_group: int | None, **options) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(3):
        sink = pa.BufferOutputStream()
        t0 = time.thread_time()
        with pq.ParquetWriter(sink, table.schema, **options) as writer:
            step = row_group or max(table.num_rows, 1)
            for i in range(0, max(table.num_rows, 1), step):
                writer.write_table(table.slice(i, step))
        best = min(best, time.thread_time() - t0)
        size = sink.getvalue().size
    return best, size


def main() -> None:
    from nautilus_pipeline.io.parquet_out import dictionary_columns

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--row-group", type=int, default=65_536, help="rows a write (the recorder's row group)")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    print("| file | rows | columns | written as | default ms | MB | ours ms | MB | ours / default |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for path in args.files:
        table = pq.read_table(path)
        for label, rg in ((f"row groups of {args.row_group:,}", args.row_group), ("whole", None)):
            d_s, d_b = _cpu(table, rg)
            o_s, o_b = _cpu(table, rg, use_dictionary=dictionary_columns(table.schema))
            print(f"| {path} | {table.num_rows:,} | {table.num_columns} | {label} | {d_s * 1e3:.1f} | "
                  f"{d_b / 1e6:.2f} | {o_s * 1e3:.1f} | {o_b / 1e6:.2f} | {o_s / d_s:.2f} |")


if __name__ == "__main__":
    main()
