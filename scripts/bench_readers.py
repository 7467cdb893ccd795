"""Reader throughput: ticks/s of each reader against the plain library call doing the same parse.

For every bundled sample (``nautilus_pipeline/data``) and for a generated file of 10M trades
(``scripts/make_synthetic_trades.py``, written to /tmp once and reused), it times, best of
``--repeat`` runs, in the same process:

- ``plain``: the library call alone, whole file at once, same columns and types where the
  library allows it: ``pyarrow.csv.read_csv`` for CSV, ``pyarrow.parquet.read_table``,
  ``DBNDecoder`` over the whole decompressed file, ``orjson.loads`` of every line for JSON
  lines (no tick extraction at all);
- ``reader``: our streaming reader (``open_reader(path).chunks()``): numpy columns in the tick
  layout, per-row verdicts, line numbers;
- ``+checks``: reader plus the checks of ``checks.Validator`` (policy ``reject``);
- ``replay``: ``Replay([path]).iter_arrays(65_536)``: everything, as a pipeline gets it.

The ratio column is ``reader`` time / ``plain`` time (the target: at most 1.5 for CSV), and
the last line checks the 5M trades/s target for the 10M-trade CSV. Prints the machine (CPU,
cores, library versions) first: numbers are only comparable on the same machine.

Book rows (also alone with ``--books``): the Databento MBO file of the shared data set through
``io.mbo.mbo_level_deltas``, the reference reader path and the streaming reader (records/s and
level deltas/s; plain = ``DBNDecoder`` alone; the zstd decompression alone, and the reader on
the same records uncompressed, show the codec's share); a generated Tardis
``incremental_book_L2`` CSV (``--book-lines`` lines, written to /tmp once; plain = pyarrow's
streaming CSV parse of the same text columns; the reader's numba parser beside its pyarrow path);
the shared USD-M Binance capture with ``book=True`` (plain = ``orjson.loads`` of every line);
and the L2 book kernel ``kernels.book.book_update`` over the MBO deltas (deltas/s, features
included). Target from issue 13: >= 5M book updates/s on one core.

    python scripts/bench_readers.py [--rows 10000000] [--repeat 3] [--skip-big] [--books] [--book-lines 1000000]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nautilus_pipeline.io import Replay, Validator, detect_format, open_reader
from nautilus_pipeline.io.checks import validated
from nautilus_pipeline.io.csv import CsvReader
from nautilus_pipeline.io.files import byte_blocks, iter_lines, open_stream
from nautilus_pipeline.machine import describe

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"


def machine() -> str:
    """The machine (one description for every benchmark) and the reader libraries' versions."""
    libs = ", ".join(f"{p} {md.version(p)}" for p in ("numpy", "pyarrow", "databento-dbn", "orjson"))
    return f"{describe()}\n{libs}"


def best(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    """Fastest of ``repeat`` runs (seconds) and the rows the call reported."""
    times, rows = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t)
    return min(times), rows


def interleaved(fns: dict[str, Callable[[], int]], repeat: int) -> dict[str, tuple[float, int]]:
    """Fastest run (seconds) and rows of each call, the calls taken in turn ``repeat`` times,
    so that a burst of load on the shared VM hits every call alike, not one of them; garbage is
    collected before each (the reference paths' Python objects would be collected inside the
    next call's timing)."""
    out = {k: (float("inf"), 0) for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            gc.collect()
            t = time.perf_counter()
            rows = fn()
            out[k] = (min(out[k][0], time.perf_counter() - t), rows)
    return out


def plain_call(path: Path, fmt: str) -> Callable[[], int]:
    """The library doing the same parse as our reader, whole file at once."""
    if fmt in ("csv", "binance_trades", "binance_agg_trades", "tardis_trades", "tardis_quotes", "truefx", "histdata"):
        reader = open_reader(path, format=fmt)
        assert isinstance(reader, CsvReader)
        opts = reader.options
        read = pacsv.ReadOptions(column_names=list(reader._names) if opts.column_names else None,
                                 skip_rows=1 if opts.header and opts.column_names else 0, block_size=1 << 22)
        conv = pacsv.ConvertOptions(include_columns=list(dict.fromkeys(reader.fmap.columns().values())),
                                    column_types=reader._types(False))

        def csv_call() -> int:
            with open_stream(path) as s:
                return pacsv.read_csv(s, read_options=read, convert_options=conv).num_rows

        return csv_call
    if fmt == "parquet":
        return lambda: pq.read_table(path).num_rows
    if fmt == "databento":
        import databento_dbn as dbn

        def dbn_call() -> int:
            with open_stream(path) as s:
                dec = dbn.DBNDecoder()
                dec.write(s.read())
                return len(dec.decode()) - 1

        return dbn_call
    if fmt in ("binance_feed", "jsonl"):
        def json_call() -> int:
            n = 0
            for _, line in iter_lines(path):
                if line:
                    orjson.loads(line.partition(b" ")[2] if fmt == "binance_feed" else line)
                    n += 1
            return n

        return json_call
    raise ValueError(fmt)


def ours(path: Path, fmt: str, what: str) -> Callable[[], int]:
    if what == "reader":
        return lambda: sum(len(c) for c in open_reader(path, format=fmt).chunks())
    if what == "checks":
        order = "ts_recv_ns" if fmt == "binance_feed" else "ts_ns"
        return lambda: sum(len(c) for c in validated(open_reader(path, format=fmt).chunks(), Validator(str(path), "reject", order_by=order)))
    return lambda: sum(len(b["ts_ns"]) for b in Replay([path]).iter_arrays(65_536))


def row(name: str, path: Path, repeat: int) -> str:
    fmt = detect_format(path)
    t_plain, n_plain = best(plain_call(path, fmt), repeat)
    t_reader, n = best(ours(path, fmt, "reader"), repeat)
    t_checks, _ = best(ours(path, fmt, "checks"), repeat)
    t_replay, _ = best(ours(path, fmt, "replay"), repeat)

    def rate(t: float, k: int) -> str:
        return f"{k / t / 1e6:8.2f}"

    return (f"| {name[:46]:46} | {fmt:14} | {n:>10,} | {rate(t_plain, n_plain)} | {rate(t_reader, n)} | "
            f"{rate(t_checks, n)} | {rate(t_replay, n)} | {t_reader / t_plain:5.2f} |")


def tardis_l2_file(lines: int, path: Path) -> Path:
    """A Tardis incremental_book_L2 CSV shaped like Deribit's (a snapshot, then updates)."""
    if path.exists():
        return path
    import numpy as np

    rng = np.random.default_rng(0)
    ts = 1_585_699_200_245_000 + np.cumsum(rng.integers(0, 1000, lines))
    side = np.where(rng.random(lines) < 0.5, "bid", "ask")
    px = 6421.0 + rng.integers(-200, 200, lines) * 0.5
    amount = rng.integers(0, 20_000, lines)
    with open(path, "w") as fh:
        fh.write("exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n")
        for i in range(lines):
            snap = "true" if i < 1000 else "false"
            fh.write(f"deribit,BTC-PERPETUAL,{ts[i]},{ts[i] + 1000},{snap},{side[i]},{px[i]:.1f},{amount[i]}\n")
    return path


def book_rows(repeat: int, book_lines: int = 1_000_000) -> None:
    """MBO, Tardis L2 and Binance depth readers and the book kernel (shared files: skipped when absent)."""
    import databento_dbn as dbn
    import orjson
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from nautilus_pipeline.io.binance import BinanceFeedReader
    from nautilus_pipeline.io.databento import DatabentoReader
    from nautilus_pipeline.io.mbo import mbo_level_deltas
    from nautilus_pipeline.io.tardis_book import TardisIncrementalBookReader
    from nautilus_pipeline.kernels.book import book_update, new_book_state

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = shared / "databento-glbx-esh4-mbo-20231225.dbn.zst"
    if not path.exists():
        print(f"(book rows skipped: {path} absent)")
        return

    def decode() -> int:
        with open_stream(path) as s:
            dec = dbn.DBNDecoder()
            dec.write(s.read())
            return len(dec.decode()) - 1

    def rows_of(reader) -> int:
        return sum(len(c) for c in reader.chunks())

    plain_dbn = Path("/tmp") / path.name.removesuffix(".zst")  # the same records, not compressed
    if not plain_dbn.exists():
        plain_dbn.write_bytes(b"".join(byte_blocks(path)))
    print()
    print(f"book updates/s in millions (best of {repeat}); each file's rows measured side by side, in turn")
    print("| input | step | M records or lines/s | M book rows/s |")
    print("|---|---|---:|---:|")
    rows_of(DatabentoReader(path))  # numba's cache loaded before the timing
    m = interleaved({"zstd": lambda: sum(len(b) for b in byte_blocks(path)), "dbn": decode,
                     "deltas": lambda: len(mbo_level_deltas(path)["side"]),
                     "ref": lambda: rows_of(DatabentoReader(path, fast_mbo=False)),
                     "stream": lambda: rows_of(DatabentoReader(path)),
                     "plain": lambda: rows_of(DatabentoReader(plain_dbn))}, repeat)
    (t_zstd, _), (t_plain, records), (t_read, _), (t_ref, _), (t_stream, rows), (t_unz, _) = m.values()
    d = mbo_level_deltas(path)
    deltas = len(d["side"])
    name = f"{path.name} ({records:,} records)"
    print(f"| {name} | zstd decompression alone (zstandard, io/files.byte_blocks) | {records / t_zstd / 1e6:.2f} | |")
    print(f"| {name} | DBNDecoder alone (plain) | {records / t_plain / 1e6:.2f} | |")
    print(f"| {name} | mbo_level_deltas (reference deltas) | {records / t_read / 1e6:.2f} | {deltas / t_read / 1e6:.2f} |")
    print(f"| {name} | DatabentoReader(fast_mbo=False) (reference rows) | {records / t_ref / 1e6:.2f} | "
          f"{rows / t_ref / 1e6:.2f} |")
    print(f"| {name} | DatabentoReader (streaming book rows) | {records / t_stream / 1e6:.2f} | {rows / t_stream / 1e6:.2f} |")
    print(f"| {plain_dbn.name} (same records, uncompressed) | DatabentoReader (streaming book rows) | "
          f"{records / t_unz / 1e6:.2f} | {rows / t_unz / 1e6:.2f} |")
    mbo_rate = rows / t_stream / 1e6
    zstd_share = t_zstd / t_stream

    l2 = tardis_l2_file(book_lines, Path(f"/tmp/tardis-incremental-book-l2-{book_lines}.csv"))
    names = ["exchange", "symbol", "timestamp", "local_timestamp", "is_snapshot", "side", "price", "amount"]
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})

    def parse() -> int:
        with open_stream(l2) as s:
            return sum(b.num_rows for b in pacsv.open_csv(s, read_options=pacsv.ReadOptions(block_size=1 << 22,
                                                                                            use_threads=False),
                                                          convert_options=conv))

    m = interleaved({"parse": parse, "arrow": lambda: rows_of(TardisIncrementalBookReader(l2, fast=False)),
                     "fast": lambda: rows_of(TardisIncrementalBookReader(l2))}, repeat)
    (t_plain, lines), (t_arrow, _), (t_read, rows) = m.values()
    name = f"Tardis incremental_book_L2, generated ({lines:,} lines)"
    print(f"| {name} | pyarrow open_csv, text columns (plain) | {lines / t_plain / 1e6:.2f} | |")
    print(f"| {name} | TardisIncrementalBookReader(fast=False) (pyarrow path) | {lines / t_arrow / 1e6:.2f} | "
          f"{rows / t_arrow / 1e6:.2f} |")
    print(f"| {name} | TardisIncrementalBookReader (numba parser) | {lines / t_read / 1e6:.2f} | {rows / t_read / 1e6:.2f} |")
    l2_rate = rows / t_read / 1e6

    feed = shared / "binance-feed-usdm-btcusdt_20240808.jsonl.gz"
    if feed.exists():
        def loads() -> int:
            n = 0
            for _, line in iter_lines(feed):
                orjson.loads(line.partition(b" ")[2])
                n += 1
            return n

        t_plain, lines = best(loads, repeat)
        t_read, rows = best(lambda: rows_of(BinanceFeedReader(feed, book=True)), repeat)
        name = f"{feed.name} ({lines:,} lines)"
        print(f"| {name} | orjson.loads per line (plain) | {lines / t_plain / 1e6:.2f} | |")
        print(f"| {name} | BinanceFeedReader(book=True) | {lines / t_read / 1e6:.2f} | {rows / t_read / 1e6:.2f} |")

    cols = (d["side"], d["price"], d["size"], d["action"])
    book_update(new_book_state(2048), *(c[:10] for c in cols))  # JIT compile / cache load
    t_kernel, _ = best(lambda: book_update(new_book_state(2048), *cols)[1].shape[0], repeat)
    print(f"| MBO level deltas | book_update kernel (levels + 7 features) | | {deltas / t_kernel / 1e6:.2f} |")
    print()
    print(f"target >= 5M book updates/s: MBO reader {mbo_rate:.2f}M (zstd alone {zstd_share:.0%} of its time), "
          f"Tardis L2 reader {l2_rate:.2f}M, book kernel {deltas / t_kernel / 1e6:.2f}M")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the generated trades CSV")
    ap.add_argument("--big", type=Path, default=Path("/tmp/synthetic-btcusdt-trades.csv"),
                    help="the generated file; made with --rows rows if it does not exist")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--books", action="store_true", help="only the order-book rows")
    ap.add_argument("--book-lines", type=int, default=1_000_000, help="lines of the generated Tardis L2 CSV")
    args = ap.parse_args()
    print(machine())
    if args.books:
        book_rows(args.repeat, args.book_lines)
        return
    print()
    print(f"ticks/s in millions (best of {args.repeat}); ratio = reader time / plain library call time")
    print(f"| {'file':46} | {'format':14} | {'rows':>10} | {'plain':>8} | {'reader':>8} | {'+checks':>8} | {'replay':>8} | ratio |")
    print(f"|{'-' * 48}|{'-' * 16}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|-------|")
    for p in sorted(DATA.iterdir()):
        if p.name == "README.md" or p.name.startswith("__"):
            continue
        print(row(p.name, p, args.repeat), flush=True)
    book_rows(args.repeat, args.book_lines)
    if args.skip_big:
        return
    if not args.big.exists():
        from make_synthetic_trades import make  # type: ignore[import-not-found]

        print(f"(generating {args.rows:,} trades to {args.big})", flush=True)
        make(args.rows, args.big)
    line = row(f"{args.big.name} (generated)", args.big, max(1, min(args.repeat, 2)))
    print(line)
    reader_rate = float(line.split("|")[5])
    ratio = float(line.split("|")[8])
    print()
    print(f"10M-trade CSV: reader {reader_rate:.2f} M trades/s (target >= 5), {ratio:.2f}x the plain read_csv time (target <= 1.5)")


if __name__ == "__main__":
    main()
