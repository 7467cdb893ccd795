"""Generic CSV reader with a column mapping: pyarrow's CSV parser in blocks, no per-row Python.

How it reads. The file is cut into byte blocks of 8 MiB at line ends (memory-mapped without a
copy for plain files; from the decompressing stream for .gz/.zst) and each block is parsed by
``pyarrow.csv.read_csv`` with threads into typed columns. Only the mapped columns are
converted (``include_columns``); each becomes a numpy array in one call
(``table.arrays_to_chunk``). Memory stays at a block or two whatever the size of the file.

Line numbers are exact: data line ``i`` is ``first_line + i``, except for lines the parser
refused (wrong number of fields), which pyarrow reports through ``invalid_row_handler`` and
which count as rows with reason ``wrong_field_count``. Empty lines are rows too (with missing
fields), so numbering never drifts. Only an empty field is missing: ``nan`` or ``inf`` parse
as numbers, so the checks name them ("price not finite"). Quoted fields spanning lines are not
supported (no tick format uses them).

Why fallbacks instead of a lenient parser. A typed, threaded parse is what makes the reader
as fast as ``read_csv`` itself, but pyarrow refuses a whole block on one unparsable value, and
with threads it cannot tell the line of a refused row. So the reader starts typed and threaded;
on the first refused line it restarts on pyarrow's single-threaded streaming reader
(``open_csv``: exact line numbers), and on the first conversion error with text columns that
``convert.py`` converts per column (one bad value refuses one row). Restarts skip the rows
already delivered, so clean files pay nothing and damaged ones give the same rows, slower.

Measured (``scripts/bench_readers.py --repeat 5``; Intel Xeon VM, 2 cores, pyarrow 26.0.1,
other jobs sharing the machine), million trades/s, best of the runs; plain =
``pyarrow.csv.read_csv`` of the whole file with the same columns and types:

=====================================  ==========  =====  ======  =======  ======
file                                   rows        plain  reader  +checks  replay
=====================================  ==========  =====  ======  =======  ======
generated Binance USD-M trades         10,000,000  6.48   9.13    8.59     6.55
binance-um-btcusdt-trades-20240808     21,313      7.60   5.34    4.92     5.23
binance-spot-ethusdt-trades-20240808   6,106       4.50   3.64    3.17     3.21
=====================================  ==========  =====  ======  =======  ======

The plain call varies most with the machine's load (6.5 to 12.8 M/s over the runs on the
10M file, against 9.1 to 10.3 M/s for the reader), so the ratio moved between 0.7x and 1.25x.
Byte blocks also beat pyarrow's own streaming reader (``open_csv`` measured about 6.9 M/s in
the same conditions), which is why the fast path does not use it. On small files a fixed ~1 ms per file (sniffing
the format, opening) dominates.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.io.chunk import BadRow, Reason, TickChunk
from nautilus_pipeline.io.files import (
    check_file,
    decoding_errors,
    iter_lines,
    open_stream,
    read_head,
)
from nautilus_pipeline.io.table import FieldMap, arrays_to_chunk


@dataclass(frozen=True)
class CsvOptions:
    """Layout of the text: a header line and/or explicit ``column_names``, delimiter.

    With ``column_names`` and ``header=True`` the header line is skipped and the given names are
    used (positional layouts whose headers vary by vendor release, like Binance's).
    """

    header: bool = True
    column_names: tuple[str, ...] | None = None
    delimiter: str = ","
    block_size: int | None = None


def _split(line: bytes, delimiter: str) -> list[str]:
    return [c.strip().strip('"') for c in line.decode("utf-8", "replace").split(delimiter)]


class _Restart(Exception):
    def __init__(self, threads: bool, robust: bool):
        self.threads, self.robust = threads, robust


class CsvReader:
    """Streams a CSV (optionally .gz/.zst) of trades or quotes through a :class:`FieldMap`."""

    def __init__(self, path: str | Path, fmap: FieldMap, options: CsvOptions | None = None, *, symbol: str | None = None):
        self.path = str(path)
        self.fmap = fmap
        self.options = options or CsvOptions()
        self.symbol = symbol if symbol is not None else (None if fmap.symbol else Path(path).name.split(".")[0])
        self.ignored = 0
        self._dropped_upto = 0
        self._lines = LineFetcher(self.path)
        self._names, self._first_line = self._check_layout()

    def _check_layout(self) -> tuple[list[str], int]:
        check_file(self.path)
        head = read_head(self.path)
        lines = [ln for ln in head.split(b"\n", 64) if ln.strip()]
        opts = self.options
        if not lines:
            raise DataError(f"{self.path}: the file has no lines (only whitespace); nothing to replay")
        first = _split(lines[0].rstrip(b"\r"), opts.delimiter)
        data_lines = lines[1:] if opts.header else lines
        if opts.column_names is None:
            if not opts.header:
                raise ConfigError(f"{self.path}: a CSV without header needs column_names")
            names = first
        else:
            names = list(opts.column_names)
            sample = _split(data_lines[0].rstrip(b"\r"), opts.delimiter) if data_lines else first
            if len(sample) != len(names):
                raise DataError(
                    f"{self.path}: the first row has {len(sample)} fields {sample!r} but the format "
                    f"expects {len(names)} ({', '.join(names)}): wrong columns, or a different format"
                )
        missing = [c for c in self.fmap.columns().values() if c not in names]
        if missing:
            raise DataError(
                f"{self.path}: wrong columns: {missing} not found in the header {names}; "
                "fix the column mapping or pick the right format"
            )
        if not data_lines:
            raise DataError(f"{self.path}: the file has a header but no rows; nothing to replay")
        rows = (_split(ln.rstrip(b"\r"), opts.delimiter) for ln in data_lines)
        self._sample = next((r for r in rows if len(r) == len(names)), [""] * len(names))
        return names, 2 if opts.header else 1

    def _types(self, robust: bool) -> dict[str, pa.DataType]:
        cols = self.fmap.columns()
        if robust:
            return {c: pa.string() for c in cols.values()}
        types: dict[str, pa.DataType] = {}
        for fld, col in cols.items():
            if fld in ("ts", "ts_recv"):
                unit = self.fmap.ts_unit if fld == "ts" else self.fmap.ts_recv_unit
                sample = self._sample[self._names.index(col)] if col in self._names else ""
                if self.fmap.ts_layout is not None and fld == "ts":
                    types[col] = pa.string()
                elif unit == "iso":  # parsed by pyarrow; a naive time is UTC
                    zoned = re.search(r"(Z|[+-]\d\d:?\d\d)$", sample.strip()) is not None
                    types[col] = pa.timestamp("ns", "UTC") if zoned else pa.timestamp("ns")
                elif unit == "s" or (unit == "auto" and "." in sample and sample.replace(".", "", 1).lstrip("-").isdigit()):
                    types[col] = pa.float64()
                elif unit == "auto" and not sample.lstrip("-").isdigit():
                    types[col] = pa.string()
                else:
                    types[col] = pa.int64()
            elif fld == "side" and self.fmap.side_encoding == "is_buyer_maker":
                types[col] = pa.bool_()  # true/false/True/False/1/0; anything else: text fallback
            elif fld in ("side", "symbol"):
                types[col] = pa.dictionary(pa.int32(), pa.string())
            elif fld == "trade_id":
                types[col] = pa.int64()
            else:
                types[col] = pa.float64()
        return types

    def _parse_options(self, robust: bool, dropped: list[tuple[int | None, str, int]]) -> tuple[pacsv.ParseOptions, pacsv.ConvertOptions]:
        def on_invalid(row: pacsv.InvalidRow) -> str:
            dropped.append((row.number, row.text, row.actual_columns))
            return "skip"

        parse = pacsv.ParseOptions(delimiter=self.options.delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False)
        conv = pacsv.ConvertOptions(
            include_columns=list(dict.fromkeys(self.fmap.columns().values())),
            column_types=self._types(robust),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        return parse, conv

    def _batches(self, threads: bool, robust: bool, dropped: list[tuple[int | None, str, int]]) -> Iterator[pa.RecordBatch]:
        """Arrow batches in file order: threaded byte blocks, or pyarrow's streaming reader."""
        if threads:
            yield from self._block_batches(robust, dropped)
            return
        parse, conv = self._parse_options(robust, dropped)
        opts = self.options
        read = pacsv.ReadOptions(
            use_threads=False,
            block_size=opts.block_size or (1 << 22),
            column_names=self._names if opts.column_names is not None else None,
            skip_rows=1 if opts.header and opts.column_names is not None else 0,
        )
        reader = pacsv.open_csv(open_stream(self.path), read_options=read, parse_options=parse, convert_options=conv)
        while True:
            try:
                yield reader.read_next_batch()
            except StopIteration:
                return

    def _block_batches(self, robust: bool, dropped: list[tuple[int | None, str, int]]) -> Iterator[pa.RecordBatch]:
        """The fast path: the file in bounded byte blocks cut at line ends, each parsed by
        ``read_csv`` with threads (faster than ``read_csv`` on the whole file; see the table).

        Plain files are memory-mapped and sliced without a copy; decompressed streams are
        re-joined at the cut line. Any refused line restarts the file on the exact
        (single-threaded) path, which knows its line number.
        """
        parse, conv = self._parse_options(robust, dropped)
        read = pacsv.ReadOptions(use_threads=True, block_size=1 << 20, column_names=self._names)
        size = self.options.block_size or (1 << 23)
        header = self.options.header
        rest = b""
        with open_stream(self.path) as stream:
            mapped = isinstance(stream, pa.MemoryMappedFile)
            while True:
                if mapped:
                    pos = stream.tell()
                    buf = stream.read_buffer(size)
                    at_end = buf.size < size
                    cut = buf.size if at_end else _after_last_newline(buf)
                    if cut == 0:  # a line longer than the block: read more at once
                        size *= 2
                        stream.seek(pos)
                        continue
                    block: pa.Buffer | bytes = buf.slice(0, cut)
                    stream.seek(pos + cut)
                else:
                    raw = stream.read(size)
                    at_end = not raw  # a stream may return short reads before its end
                    data = rest + raw if rest else raw
                    cut = len(data) if at_end else data.rfind(b"\n") + 1
                    if cut == 0 and not at_end:  # no line end yet: read on
                        rest = data
                        continue
                    block, rest = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
                if header and len(block):
                    nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8, count=min(len(block), 1 << 16)) == 10)
                    block = block[int(nl[0]) + 1 :] if len(nl) else b""
                    header = False
                if len(block):
                    table = pacsv.read_csv(pa.BufferReader(block), read_options=read, parse_options=parse, convert_options=conv)
                    if dropped:
                        raise _Restart(False, robust)
                    yield from table.combine_chunks().to_batches()  # one batch a block: fewer, larger chunks
                if at_end:
                    return

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Chunks of at most ``chunk_rows`` rows, in file order, with exact line numbers."""
        threads, robust = True, False
        emitted = 0
        while True:
            try:
                for c in self._chunks(chunk_rows, threads, robust, emitted):
                    emitted += len(c)
                    yield c
                return
            except _Restart as r:
                threads, robust = r.threads, r.robust

    def _chunks(self, chunk_rows: int, threads: bool, robust: bool, skip: int) -> Iterator[TickChunk]:
        dropped: list[tuple[int | None, str, int]] = []
        reported = 0
        line = self._first_line
        seen = 0
        fields = self.fmap.columns()
        with decoding_errors(self.path):
            batches = self._batches(threads, robust, dropped)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except pa.ArrowInvalid as e:
                    if not robust and _conversion_error(e):
                        raise _Restart(False, True) from e
                    raise DataError(f"{self.path}: the CSV cannot be parsed after line {line} ({e}); check the delimiter and layout") from e
                if dropped and threads:
                    raise _Restart(False, robust)
                for start in range(0, batch.num_rows, chunk_rows):
                    part = batch.slice(start, chunk_rows)
                    n = part.num_rows
                    pending = sorted(d[0] for d in dropped[reported:] if d[0] is not None)
                    records = _line_numbers(line, n, pending)
                    line = int(records[-1]) + 1 if n else line
                    new_dropped = [d for d in dropped[reported:] if d[0] is None or d[0] < line]
                    reported += len(new_dropped)
                    new_dropped = [d for d in new_dropped if (d[0] or 0) > self._dropped_upto]
                    if seen + n <= skip:
                        seen += n
                        continue
                    lo = max(0, skip - seen)
                    seen += n
                    if lo:
                        part, records = part.slice(lo), records[lo:]
                    arrays = {fld: part.column(col) for fld, col in fields.items()}
                    chunk = arrays_to_chunk(self.path, arrays, self.fmap, records, symbol=self.symbol,
                                            raw=_raw_of(part))
                    chunk.raw_line = lambda i, r=records: self._lines.get(int(r[i]))
                    if new_dropped:
                        chunk.dropped = [self._dropped_row(d) for d in new_dropped]
                        self._dropped_upto = max(d[0] or 0 for d in new_dropped)
                    yield chunk
        if dropped and threads:
            raise _Restart(False, robust)  # refused lines but no rows: get their line numbers
        rest = [d for d in dropped[reported:] if (d[0] or 0) > self._dropped_upto]
        if rest:
            self._dropped_upto = max(d[0] or 0 for d in rest)
            yield TickChunk(self.path, {}, np.empty(0, dtype=np.int64), [self.symbol or ""],
                            dropped=[self._dropped_row(d) for d in rest])
        if seen == 0 and not dropped and skip == 0:
            raise DataError(f"{self.path}: the file has a header but no rows; nothing to replay")

    def _dropped_row(self, d: tuple[int | None, str, int]) -> BadRow:
        number, text, actual = d
        return BadRow(self.path, number or -1, Reason.WRONG_FIELD_COUNT, None,
                      f"{actual} fields, expected {len(self._names)}", text, self.symbol)


class LineFetcher:
    """The text of given line numbers, read on demand by a second pass over the file.

    Used only for refused rows (quarantine); requests come in increasing order within a
    pass, so the whole file is read at most once more (from the start again if asked for an
    earlier line).
    """

    def __init__(self, path: str):
        self.path = path
        self._it: Iterator[tuple[int, bytes]] | None = None
        self._at = 0

    def get(self, lineno: int) -> str:
        if self._it is None or lineno <= self._at:
            self._it, self._at = iter_lines(self.path), 0
        for n, line in self._it:
            self._at = n
            if n == lineno:
                return line.decode("utf-8", "replace")
        self._it = None
        return ""


def _after_last_newline(buf: pa.Buffer) -> int:
    """Offset just after the last newline in ``buf`` (0 if none), scanning from the end."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    step = 1 << 16
    for end in range(len(arr), 0, -step):
        hits = np.flatnonzero(arr[max(0, end - step) : end] == 10)
        if len(hits):
            return max(0, end - step) + int(hits[-1]) + 1
    return 0


def _conversion_error(e: Exception) -> bool:
    text = str(e).lower()
    return "conversion error" in text or "invalid value" in text


def _raw_of(batch: pa.RecordBatch):
    def raw(i: int) -> dict[str, object]:
        return batch.slice(i, 1).to_pylist()[0]

    return raw


def _line_numbers(start: int, n: int, dropped: list[int]) -> np.ndarray:
    """Lines of ``n`` consecutive parsed rows from ``start``, skipping ``dropped`` lines."""
    if not dropped or dropped[0] >= start + n + len(dropped):
        return np.arange(start, start + n, dtype=np.int64)
    cand = np.arange(start, start + n + len(dropped), dtype=np.int64)
    keep = ~np.isin(cand, np.asarray(dropped, dtype=np.int64))
    return cand[keep][:n]


def sniff_names(path: str | Path, delimiter: str = ",") -> list[str]:
    """The fields of the first line of the (decompressed) file."""
    head = read_head(path, 8192)
    first = next(itertools.chain((ln for ln in head.split(b"\n", 64) if ln.strip()), [b""]))
    return _split(first.rstrip(b"\r"), delimiter)
