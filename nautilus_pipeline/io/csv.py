"""Generic CSV reader with a column mapping: pyarrow's CSV parser in blocks, no per-row Python.

How it reads. The file is cut into byte blocks of 8 MiB at line ends (memory-mapped without a
copy for plain files; from the decompressing stream for .gz/.zst) and each block is parsed by
``pyarrow.csv.read_csv`` with threads into typed columns. Only the mapped columns are
converted (``include_columns``); each becomes a numpy array in one call
(``table.arrays_to_chunk``). Memory stays at a block or two whatever the size of the file.

Every line is accounted for. A *line* is what ends in ``\\n`` (a ``\\r`` before it is
dropped), numbered from 1 as a text editor shows it; every data line becomes exactly one row
or one refused row, so rows parsed + refused = data lines, always. Each block's newlines are
counted (numpy, about 6 % of the parse) and a block whose row count differs is never
delivered. Empty lines are rows too (with missing fields). Only an empty field is missing:
``nan`` or ``inf`` parse as numbers, so the checks name them ("price not finite"). Blank lines
before a header are not data; a UTF-8 byte-order mark is skipped.

Quotes. Tick files do not quote their fields, and pyarrow's quote handling is what let one
stray ``"`` swallow the rest of a file into one field. So quoting is off unless the start of
the file shows quoted fields (pandas' ``QUOTE_ALL``, spreadsheet exports): then the fast path
reads them quoted, and the exact path (below) strips a pair of quotes around a value. A stray
quote is then a character in a field: that row is unparsable, the others are read. Quoted
fields holding the delimiter or a newline are not supported (no tick format has them).

Why two paths instead of a lenient parser. A typed, threaded parse is what makes the reader
as fast as ``read_csv`` itself, but pyarrow refuses a whole block on one unparsable value or
one line with the wrong number of fields, and cannot say which line. So the reader starts on
the *fast* path; on the first block that pyarrow refuses, or whose rows do not match its
lines, or that holds a line over 1 MiB (pyarrow reads some, the numba parser any: whether
such a line is a row must not depend on the other lines of its block), it restarts on the
*exact* path, which splits each block at its line ends itself (numpy over the bytes) and
sets aside, with their line numbers, the lines pyarrow would misread: a wrong number of
fields, bytes that are not UTF-8 in a field it reads (in another, pyarrow never decodes
them: the row is delivered on both paths), a carriage return inside a line, a line over
1 MiB. The rest is parsed with threads as before. On the first conversion error with typed
columns the exact path restarts once more with text columns that ``convert.py`` converts per
column (one bad value refuses one row). Restarts skip the lines already delivered, so clean
files pay nothing and damaged ones give the same rows, slower.

A format's own parser. A reader for one fixed layout may parse a block itself
(``_plain_chunks``) when every line of it is in that layout's plain form, and give the chunks
the pyarrow path would give; on any other line it declines and pyarrow parses the block as
above. Binance trades do (``binance_fast.py``): on 1M generated trades pyarrow's parse and
the conversions after it were ~75 % of the reader's time.

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
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import ConfigError, DataError
from .chunk import BadRow, Reason, TickChunk
from .files import (
    UTF8_BOM,
    check_file,
    check_text,
    decoding_errors,
    iter_lines,
    open_stream,
    read_head,
)
from .table import FieldMap, arrays_to_chunk

MAX_LINE = 1 << 20
"""Longest line read (bytes); a longer one is a refused row (no tick row is near it)."""

_RAW_KEEP = 4096  # characters of a refused line kept in its quarantine record


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
    def __init__(self, robust: bool):
        self.robust = robust


@dataclass(slots=True)
class _Block:
    first: int  # line number of the block's first line
    data: pa.Buffer | bytes  # whole lines; the last may lack its newline at the end of the file
    lines: int
    long_line: bool = False  # a line over MAX_LINE (its CR counted): only the exact path reads it


class CsvReader:
    """Streams a CSV (optionally .gz/.zst) of trades or quotes through a :class:`FieldMap`."""

    def __init__(self, path: str | Path, fmap: FieldMap, options: CsvOptions | None = None, *, symbol: str | None = None):
        self.path = str(path)
        self.fmap = fmap
        self.options = options or CsvOptions()
        if len(self.options.delimiter) != 1:
            raise ConfigError(f"{self.path}: the delimiter must be one character, got {self.options.delimiter!r}")
        self.symbol = symbol if symbol is not None else (None if fmap.symbol else Path(path).name.split(".")[0])
        self.ignored = 0
        self._upto = 0
        self._lines = LineFetcher(self.path)
        self._names, self._first_line = self._check_layout()

    def _check_layout(self) -> tuple[list[str], int]:
        check_file(self.path)
        check_text(self.path)
        head = read_head(self.path)
        numbered = [(i + 1, ln) for i, ln in enumerate(head.split(b"\n", 64)) if ln.strip()]
        lines = [ln for _, ln in numbered]
        opts = self.options
        if not lines:
            raise DataError(f"{self.path}: the file has no lines (only whitespace); nothing to replay")
        self._header_line = numbered[0][0] if opts.header else 0
        # quotes in the data lines, not in a header (pyarrow's writer quotes the names of a
        # file whose values it leaves plain, and its string values only where they are not
        # null): such a file takes the plain paths, and each block that holds a quote is
        # parsed as quoted where it is (_fast, _exact), so a quoted string is never kept whole
        self._quoted = b'"' in head.split(b"\n", self._header_line)[-1]
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
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"{self.path}: the header names columns {dupes} more than once; rename them")
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
        return names, self._header_line + 1

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

    def _parse(self, data: pa.Buffer | bytes, *, robust: bool, quoted: bool, block_size: int) -> pa.Table:
        parse = pacsv.ParseOptions(delimiter=self.options.delimiter, ignore_empty_lines=False,
                                   quote_char='"' if quoted else False)
        conv = pacsv.ConvertOptions(
            include_columns=list(dict.fromkeys(self.fmap.columns().values())),
            column_types=self._types(robust),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        read = pacsv.ReadOptions(use_threads=True, block_size=block_size, column_names=self._names)
        return pacsv.read_csv(pa.BufferReader(data), read_options=read, parse_options=parse, convert_options=conv)

    # --- blocks ------------------------------------------------------------------------
    def _blocks(self) -> Iterator[_Block]:
        """Byte blocks at line ends, numbered; header (and blank lines before it) and BOM removed.

        Plain files are memory-mapped and sliced without a copy; decompressed streams are
        re-joined at the cut line. A line longer than the block makes the block grow.
        """
        size = self.options.block_size or (1 << 23)
        skip = self._header_line  # lines before the data
        line = 1
        first = True
        rest = b""
        with open_stream(self.path) as stream:
            mapped = isinstance(stream, pa.MemoryMappedFile)
            while True:
                if mapped:
                    pos = stream.tell()
                    buf = stream.read_buffer(size)
                    at_end = buf.size < size
                    cut = buf.size if at_end else _after_last_newline(buf)
                    if cut == 0 and not at_end:  # a line longer than the block: read more at once
                        # (at the end, nothing was left: the block before ended at the file's end)
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
                if first:
                    first = False
                    if len(block) >= 3 and bytes(block[:3]) == UTF8_BOM:
                        block = block[3:]
                newlines, gap = _count_newlines(block)
                if skip and len(block):
                    nl = _first_newlines(np.frombuffer(block, dtype=np.uint8), skip)
                    if len(nl) < skip:  # (blank lines before a header filling a block)
                        skip -= len(nl)
                        line += len(nl)
                        block, newlines = block[len(block):], 0
                    else:
                        block = block[int(nl[skip - 1]) + 1 :]
                        line += skip
                        newlines -= skip
                        skip = 0
                if len(block):
                    lines = newlines + (0 if block[len(block) - 1] == 10 else 1)
                    yield _Block(line, block, lines, gap and _longest_line(block) > MAX_LINE)
                    line += lines
                if at_end:
                    return

    # --- chunks ------------------------------------------------------------------------
    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Chunks of at most ``chunk_rows`` rows, in file order, with exact line numbers."""
        self._upto = 0  # last line delivered (as a row or a refused row)
        self._any = False
        exact, robust = False, False
        while True:
            try:
                with decoding_errors(self.path):
                    yield from (self._exact(chunk_rows, robust) if exact else self._fast(chunk_rows))
                break
            except _Restart as r:
                exact, robust = True, robust or r.robust
        if not self._any:
            raise DataError(f"{self.path}: the file has a header but no rows; nothing to replay")

    def _fast(self, chunk_rows: int) -> Iterator[TickChunk]:
        for blk in self._blocks():
            self._any = True
            if blk.long_line:  # refused on the exact path; pyarrow and the numba parser would read it
                raise _Restart(robust=False)
            plain = None if self._quoted else self._plain_chunks(blk, chunk_rows)
            if plain is not None:
                yield from plain
                continue
            data = blk.data if isinstance(blk.data, bytes) else bytes(memoryview(blk.data))
            quoted = self._quoted or b'"' in data
            if quoted and _bare_cr(data):
                # a quoted parse can merge lines at a stray quote and a bare CR split one: a
                # merge and a split in one block would leave the count below right and a line
                # lost; the exact path sorts such lines out one by one
                raise _Restart(robust=False)
            try:
                table = self._parse(blk.data, robust=False, quoted=quoted, block_size=1 << 20)
            except pa.ArrowException as e:
                raise _Restart(robust=_conversion_error(e)) from e
            if table.num_rows != blk.lines:  # a stray quote or carriage return: lines merged/split
                raise _Restart(robust=False)
            yield from self._emit(table, np.arange(blk.first, blk.first + blk.lines, dtype=np.int64), [], chunk_rows)

    def _plain_chunks(self, blk: _Block, chunk_rows: int) -> list[TickChunk] | None:
        """A format's own parse of a block whose every line is in its plain form: the chunks
        the pyarrow path would give for it, or None to let pyarrow parse it (``binance_fast.py``)."""
        return None

    def _exact(self, chunk_rows: int, robust: bool) -> Iterator[TickChunk]:
        robust = robust or self._quoted  # quoted values go through the text path (quotes stripped)
        for blk in self._blocks():
            self._any = True
            last = blk.first + blk.lines - 1
            if last <= self._upto:
                continue  # delivered before the restart
            data = blk.data.to_pybytes() if isinstance(blk.data, pa.Buffer) else bytes(blk.data)
            buffer, kept, bad, longest = self._sort_lines(data, blk.first)
            text = robust or b'"' in data  # a block with a quote: its values stripped of them
            if len(kept):
                try:
                    table = self._parse(buffer, robust=text, quoted=False, block_size=max(1 << 20, 2 * longest + 2))
                except pa.ArrowException as e:
                    if not text and _conversion_error(e):
                        raise _Restart(robust=True) from e
                    raise DataError(f"{self.path}: lines {blk.first}-{last} cannot be parsed ({e}); "
                                    "check the delimiter and layout") from e
                if table.num_rows != len(kept):
                    raise DataError(f"{self.path}: lines {blk.first}-{last}: {table.num_rows} rows parsed from "
                                    f"{len(kept)} lines; cannot account for every line, so nothing of them is used")
                if text:
                    table = _unquote(table)
            else:
                table = None
            yield from self._emit(table, kept, bad, chunk_rows)

    def _sort_lines(self, data: bytes, first: int) -> tuple[bytes, np.ndarray, list[BadRow], int]:
        """Split a block into the lines pyarrow reads right and the refused ones.

        Returns the parse buffer (kept lines, each ending in a newline), their line numbers,
        the refused lines as :class:`BadRow` (in line order) and the longest kept line.
        """
        a = np.frombuffer(data, dtype=np.uint8)
        nl = np.flatnonzero(a == 10)
        complete = bool(len(a)) and a[-1] == 10
        n = len(nl) + (0 if complete else 1)
        starts = np.empty(n, dtype=np.int64)
        starts[0] = 0
        starts[1:] = nl[: n - 1] + 1
        ends = nl[:n] if complete else np.append(nl, len(a)).astype(np.int64)
        cr_end = (ends > starts) & (a[np.maximum(ends - 1, 0)] == 13)
        ends_eff = ends - cr_end
        length = ends_eff - starts
        why: dict[int, tuple[Reason, str]] = {}
        for i in np.flatnonzero(length > MAX_LINE).tolist():
            why[i] = (Reason.UNPARSABLE, f"a line of {int(length[i]):,} bytes (at most {MAX_LINE:,} are read)")

        def line_of(pos: np.ndarray) -> np.ndarray:
            return np.searchsorted(starts, pos, side="right") - 1

        high = np.flatnonzero(a >= 0x80)
        for i in np.unique(line_of(high)).tolist() if len(high) else ():
            if i in why:
                continue
            try:
                data[starts[i] : ends_eff[i]].decode("utf-8")
            except UnicodeDecodeError as e:
                if not self._read_fields_are_text(data[starts[i] : ends_eff[i]]):
                    why[i] = (Reason.UNPARSABLE, f"not UTF-8 text (byte 0x{data[starts[i] + e.start]:02x} at "
                              f"character {e.start + 1})")
        cr = np.flatnonzero(a == 13)
        if len(cr):
            at = line_of(cr)
            for i in np.unique(at[cr < ends_eff[at]]).tolist():
                why.setdefault(i, (Reason.UNPARSABLE, "a carriage return inside the line"))
        delims = np.flatnonzero(a == ord(self.options.delimiter))
        fields = np.bincount(line_of(delims), minlength=n) + 1 if len(delims) else np.ones(n, dtype=np.int64)
        expected = len(self._names)
        for i in np.flatnonzero((fields != expected) & (length > 0)).tolist():
            why.setdefault(i, (Reason.WRONG_FIELD_COUNT, f"{int(fields[i])} fields, expected {expected}"))
        numbers = np.arange(first, first + n, dtype=np.int64)
        if not why:
            buffer = data if complete else data + b"\n"
            return buffer, numbers, [], int(length.max()) if n else 0
        refused = sorted(why)
        keep = np.ones(n, dtype=bool)
        keep[refused] = False
        bad = []
        for i in refused:
            reason, value = why[i]
            text = data[starts[i] : min(ends_eff[i], starts[i] + _RAW_KEEP)].decode("utf-8", "replace")
            bad.append(BadRow(self.path, int(numbers[i]), reason, None, value, text, self.symbol))
        idx = np.flatnonzero(keep)
        parts = []
        if len(idx):
            runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
            for run in runs:
                lo, hi = int(starts[run[0]]), int(ends[run[-1]])
                parts.append(data[lo:hi])
        buffer = b"\n".join(parts) + b"\n" if parts else b""
        return buffer, numbers[keep], bad, int(length[keep].max()) if len(idx) else 0

    def _read_fields_are_text(self, line: bytes) -> bool:
        """Whether a line that is not all UTF-8 has the expected fields and its bad bytes only
        in fields the mapping does not read: pyarrow never decodes those, so the fast path
        delivers the row, and so must this one."""
        fields = line.split(self.options.delimiter.encode())
        if len(fields) != len(self._names):
            return False
        try:
            for col in set(self.fmap.columns().values()):
                fields[self._names.index(col)].decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def _emit(self, table: pa.Table | None, records: np.ndarray, bad: list[BadRow], chunk_rows: int) -> Iterator[TickChunk]:
        """Chunks of a parsed block, each with the refused lines up to its last row."""
        fields = self.fmap.columns()
        upto = self._upto
        bad = [b for b in bad if b.record > upto]
        batch = table.combine_chunks().to_batches()[0] if table is not None and table.num_rows else None
        n = 0 if batch is None else batch.num_rows
        if n and records[0] <= upto:  # lines delivered before a restart
            lo = int(np.searchsorted(records, upto, side="right"))
            batch, records, n = batch.slice(lo), records[lo:], n - lo
        if n == 0:
            if bad:
                self._upto = bad[-1].record
                yield TickChunk(self.path, {}, np.empty(0, dtype=np.int64), [self.symbol or ""], dropped=bad)
            return
        for start in range(0, n, chunk_rows):
            part = batch.slice(start, chunk_rows)
            recs = records[start : start + chunk_rows]
            last_part = start + chunk_rows >= n
            cut = len(bad) if last_part else int(np.searchsorted([b.record for b in bad], recs[-1], side="right"))
            mine, bad = bad[:cut], bad[cut:]
            arrays = {fld: part.column(col) for fld, col in fields.items()}
            chunk = arrays_to_chunk(self.path, arrays, self.fmap, recs, symbol=self.symbol, raw=_raw_of(part))
            chunk.raw_line = lambda i, r=recs: self._lines.get(int(r[i]))
            chunk.dropped = mine
            self._upto = max(int(recs[-1]), mine[-1].record if mine else 0)
            yield chunk


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
        self._last = b""  # the bytes of line _at (a refused row asks for its record and its line)

    def get(self, lineno: int, keep: int | None = _RAW_KEEP) -> str:
        """The text of line ``lineno``: its first ``keep`` bytes (None: all), "" past the end."""
        if self._it is None or lineno != self._at:
            self._last = self._read(lineno)
        return self._last[:keep].decode("utf-8", "replace")

    def _read(self, lineno: int) -> bytes:
        if self._it is None or lineno < self._at:
            self._it, self._at = iter_lines(self.path), 0
        for n, line in self._it:
            self._at = n
            if n == lineno:
                return line
        self._it = None
        return b""


def _after_last_newline(buf: pa.Buffer) -> int:
    """Offset just after the last newline in ``buf`` (0 if none), scanning from the end."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    step = 1 << 16
    for end in range(len(arr), 0, -step):
        hits = np.flatnonzero(arr[max(0, end - step) : end] == 10)
        if len(hits):
            return max(0, end - step) + int(hits[-1]) + 1
    return 0


def _first_newlines(arr: np.ndarray, k: int) -> np.ndarray:
    """Offsets of the first ``k`` newlines of ``arr`` (fewer if it has fewer), looking at a
    growing prefix: the header is at the start of an 8 MiB block."""
    window = 1 << 16
    while True:
        nl = np.flatnonzero(arr[:window] == 10)
        if len(nl) >= k or window >= len(arr):
            return nl[:k]
        window *= 4


_PIECE = 1 << 18
"""Bytes counted at a time: a line over MAX_LINE (4 pieces) covers a whole piece."""


def _count_newlines(block: pa.Buffer | bytes) -> tuple[int, bool]:
    """Newlines in ``block``, in cache-sized pieces (faster than one pass over 8 MiB), and
    whether a piece has none (then a line may be over MAX_LINE: see :func:`_longest_line`)."""
    arr = np.frombuffer(block, dtype=np.uint8)
    counts = [int(np.count_nonzero(arr[i : i + _PIECE] == 10)) for i in range(0, len(arr), _PIECE)]
    return sum(counts), 0 in counts


def _longest_line(block: pa.Buffer | bytes) -> int:
    """Bytes of the longest line in ``block``, a carriage return before its newline included."""
    arr = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    return int(np.diff(ends, prepend=-1, append=len(arr)).max()) - 1


def _conversion_error(e: Exception) -> bool:
    text = str(e).lower()
    return "conversion error" in text or "invalid value" in text


def _bare_cr(data: bytes) -> bool:
    """Whether a block holds a carriage return that does not end a line (a CRLF's does)."""
    return b"\r" in data and data.count(b"\r") != data.count(b"\r\n")


def _unquote(table: pa.Table) -> pa.Table:
    """Text columns with a pair of double quotes around a value stripped (``"1.5"`` -> ``1.5``)."""
    cols = []
    for col in table.columns:
        if pa.types.is_string(col.type) and pc.any(pc.starts_with(col, '"')).as_py():
            # an empty quoted value ("") is a null, as pyarrow's quoted parse reads it
            empty = pc.match_substring_regex(col, pattern=r'^\s*""\s*$')
            col = pc.replace_substring_regex(col, pattern=r'^\s*"(.*)"\s*$', replacement=r"\1")
            col = pc.if_else(empty, pa.scalar(None, col.type), col)
        cols.append(col)
    return pa.table(cols, names=table.column_names)


def _raw_of(batch: pa.RecordBatch):
    def raw(i: int) -> dict[str, object]:
        return batch.slice(i, 1).to_pylist()[0]

    return raw


def sniff_names(path: str | Path, delimiter: str = ",") -> list[str]:
    """The fields of the first line of the (decompressed) file."""
    check_text(path)
    head = read_head(path, 8192)
    first = next(itertools.chain((ln for ln in head.split(b"\n", 64) if ln.strip()), [b""]))
    return _split(first.rstrip(b"\r"), delimiter)
