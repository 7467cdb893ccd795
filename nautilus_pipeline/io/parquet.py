"""Parquet tick files: streamed by row group/batch (``ParquetFile.iter_batches``), typed columns.

Columns are found by name (:func:`auto_fieldmap`) unless a :class:`FieldMap` is given:

- this package's own layout (:func:`write_parquet`): ``ts_ns, ts_recv_ns, symbol, kind, price,
  size, side, trade_id, bid, ask, bid_size, ask_size``, trades and quotes in one file;
- NautilusTrader catalog style: ``ts_event``/``ts_init`` (ns), ``price``/``size``,
  ``aggressor_side`` (1 buyer, 2 seller, 0 none), ``trade_id`` (kept only when the column is
  an integer type: text ids become -1, without a duplicate check); quotes ``bid_price``,
  ``ask_price``, ``bid_size``, ``ask_size``. Only float/integer price columns are supported;
  catalogs written with fixed-size-binary prices (Nautilus >= 1.200 high precision) are refused
  with a ConfigError that says so;
- the pandas-written Nautilus test files: ``timestamp`` (tz-aware), ``trade_id``, ``price``,
  ``quantity``, ``buyer_maker`` (text "True"/"False"); quotes ``timestamp, symbol, bid, ask,
  bid_size, ask_size``.

The record number of a row is its 1-based position in the file.

Damage. The file is read row group by row group and each must yield the rows its metadata
counts: a flipped bit in a page can make pyarrow decode a column chunk as fewer (or no) rows
without an error, which would otherwise pass as a short file. A row group that cannot be
decoded, or yields another number of rows, is a :class:`DataError` naming it and its rows;
so is a file whose footer or schema cannot be read (whatever exception pyarrow raises).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from .chunk import TickChunk
from .files import check_file
from .nautilus import DELTA_COLUMNS, SIZE_FIELDS, fixed_point_to_float, is_fixed_point, precision_of
from .table import FieldMap, arrays_to_chunk

_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError,
           OverflowError, MemoryError)
"""What pyarrow raises on a damaged file, seen in fuzzing: invalid, not implemented (a bit
flipped in a type), decode errors of metadata, allocation failures of a corrupt length."""

_CANDIDATES: dict[str, tuple[str, ...]] = {
    "ts": ("ts_ns", "ts_event", "timestamp", "ts", "time", "T"),
    "ts_recv": ("ts_recv_ns", "ts_init", "ts_recv", "local_timestamp"),
    "price": ("price", "p"),
    "size": ("size", "quantity", "qty", "amount", "q"),
    "side": ("side", "aggressor_side", "buyer_maker", "is_buyer_maker", "isBuyerMaker", "m"),
    "symbol": ("symbol", "instrument_id", "s"),
    "trade_id": ("trade_id", "id", "t"),
    "bid": ("bid", "bid_price", "b"),
    "ask": ("ask", "ask_price", "a"),
    "bid_size": ("bid_size", "bid_amount", "B"),
    "ask_size": ("ask_size", "ask_amount", "A"),
}


def auto_fieldmap(names: Sequence[str], types: Mapping[str, pa.DataType] | None = None) -> FieldMap:
    """Guess a FieldMap from column names (see the module docstring for the layouts)."""
    found: dict[str, str] = {}
    for fld, cands in _CANDIDATES.items():
        for c in cands:
            if c in names and c not in found.values():
                found[fld] = c
                break
    if "ts" not in found:
        raise DataError(f"no timestamp column among {list(names)}; expected one of {_CANDIDATES['ts']} or give a column mapping")
    tid = found.get("trade_id")
    if tid is not None and types is not None and tid in types and not pa.types.is_integer(types[tid]):
        del found["trade_id"]  # text ids (Nautilus catalogs, UUIDs): kept as -1, no duplicate check
    kw: dict[str, object] = dict(found)
    ts_col = found["ts"]
    kw["ts_unit"] = "ns" if ts_col in ("ts_ns", "ts_event") else "auto"
    kw["ts_recv_unit"] = "ns" if found.get("ts_recv") in ("ts_recv_ns", "ts_init") else "auto"
    side_col = found.get("side")
    if side_col is not None:
        kw["side_encoding"] = {"aggressor_side": "nautilus", "buyer_maker": "is_buyer_maker",
                               "is_buyer_maker": "is_buyer_maker", "isBuyerMaker": "is_buyer_maker",
                               "m": "is_buyer_maker"}.get(side_col, "auto")
        if side_col == "side" and types is not None and pa.types.is_integer(types.get("side", pa.string())):
            kw["side_encoding"] = "sign"
    if "kind" in names:
        kw["kind_column"] = "kind"
    elif "price" in found and "size" in found:
        kw["kind"] = "trade"
        for q in ("bid", "ask", "bid_size", "ask_size"):
            kw.pop(q, None)
    elif "bid" in found and "ask" in found:
        kw["kind"] = "quote"
        for t in ("price", "size", "side", "trade_id"):
            kw.pop(t, None)
    else:
        raise DataError(f"columns {list(names)} hold neither trades (price, size) nor quotes (bid, ask); give a column mapping")
    return FieldMap(**kw)  # type: ignore[arg-type]


def mapped_fields(path: str, schema: pa.Schema, fmap: FieldMap | None) -> tuple[FieldMap, dict[str, int | None]]:
    """The field map of an Arrow schema (given, or worked out from its names and types), checked
    against its columns, and the fixed-point (NautilusTrader) fields with their precision."""
    types = {f.name: f.type for f in schema}
    fmap = fmap or auto_fieldmap(schema.names, types)
    missing = [c for c in fmap.columns().values() if c not in schema.names]
    if missing:
        raise DataError(f"{path}: wrong columns: {missing} not in {schema.names}; fix the column mapping")
    meta = schema.metadata or {}
    fixed = {fld: precision_of(meta, col) for fld, col in fmap.columns().items()
             if fld in ("price", "size", "bid", "ask", "bid_size", "ask_size") and is_fixed_point(types[col])}
    return fmap, fixed


class ParquetReader:
    """Streams a Parquet file of trades and/or quotes."""

    def __init__(self, path: str | Path, fmap: FieldMap | None = None, *, symbol: str | None = None):
        self.path = str(check_file(path))
        self.ignored = 0
        try:
            self._file = pq.ParquetFile(self.path)
            schema = self._file.schema_arrow
            self._groups = [self._file.metadata.row_group(i).num_rows for i in range(self._file.metadata.num_row_groups)]
        except _ERRORS as e:
            raise DataError(f"{self.path}: not a readable Parquet file ({type(e).__name__}: {e}); "
                            "truncated, corrupt, or another format?") from e
        if fmap is None and DELTA_COLUMNS <= set(schema.names):
            raise DataError(f"{self.path}: NautilusTrader order-book deltas (OrderBookDelta); not read yet, their "
                            "L2/L3 meaning is not in the file: use the venue's MBO/L2 files, or trades and quotes")
        self.fmap, self._fixed = mapped_fields(self.path, schema, fmap)
        meta = schema.metadata or {}
        if self._file.metadata.num_rows == 0:
            raise DataError(f"{self.path}: the Parquet file has no rows; nothing to replay")
        instrument = meta.get(b"instrument_id", b"").decode("utf-8", "replace") or None
        self.symbol = symbol if symbol is not None else (
            None if self.fmap.symbol else instrument or Path(path).name.split(".")[0])

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Batches of at most ``chunk_rows`` rows, in file order."""
        fields = self.fmap.columns()
        cols = list(dict.fromkeys(fields.values()))
        row = 1
        for group, expected in enumerate(self._groups):
            first, got = row, 0
            where = f"{self.path}: row group {group} (rows {first}-{first + expected - 1})"
            batches = self._file.iter_batches(batch_size=chunk_rows, columns=cols, row_groups=[group])
            while True:
                try:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    n = batch.num_rows
                    got += n
                    if got > expected:
                        break
                    batch.validate(full=True)  # corrupt offsets or UTF-8 surface here, not in a kernel
                    arrays = {fld: (fixed_point_to_float(batch.column(col), self._fixed[fld], unsigned=fld in SIZE_FIELDS)
                                    if fld in self._fixed else batch.column(col)) for fld, col in fields.items()}
                except _ERRORS as e:
                    raise DataError(f"{where} cannot be decoded ({type(e).__name__}: {e}); the file is corrupt "
                                    "or truncated: re-download or re-export it") from e
                try:
                    chunk = arrays_to_chunk(self.path, arrays, self.fmap, np.arange(row, row + n, dtype=np.int64),
                                            symbol=self.symbol, raw=lambda i, b=batch: b.slice(i, 1).to_pylist()[0])
                except pa.ArrowException as e:
                    raise DataError(f"{where} cannot be decoded ({type(e).__name__}: {e}); the file is corrupt "
                                    "or truncated: re-download or re-export it") from e
                row += n
                yield chunk
            if got != expected:
                raise DataError(f"{where}: decoded {got} rows where the file's metadata counts {expected}; "
                                "a page is corrupt: re-download or re-export the file")


def tick_table(columns: Mapping[str, np.ndarray], symbols: Sequence[str]) -> pa.Table:
    """Tick arrays (``symbol_id`` indexing ``symbols``) as an Arrow table in this package's layout."""
    out: dict[str, pa.Array] = {}
    for name, arr in columns.items():
        if name == "symbol_id":
            out["symbol"] = pa.DictionaryArray.from_arrays(pa.array(arr.astype(np.int32)), pa.array(list(symbols)))
        else:
            out[name] = pa.array(arr)
    return pa.table(out)


def write_parquet(path: str | Path, columns: Mapping[str, np.ndarray], symbols: Sequence[str]) -> None:
    """Write tick arrays to Parquet in this package's layout (read back by :class:`ParquetReader`)."""
    pq.write_table(tick_table(columns, symbols), str(path))
