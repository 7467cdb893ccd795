"""In-memory tables into :meth:`Pipeline.ingest`: pandas, polars and pyarrow frames as well as dicts
of arrays, through the same row checks and policies as the file readers.

Why here and not in the pipeline: a frame handed to ``ingest`` is a source like a file, so a
negative price or a row going back in time must be refused *with its row number and reason*
under the caller's policy (``fail``, ``reject``, ``quarantine``), not fail a whole batch in
a stage four hops later. :class:`IngestGate` keeps one :class:`~nautilus_pipeline.io.checks.Validator`
per pipeline (so time order and trade ids are checked across calls, per symbol) and an
:class:`~nautilus_pipeline.io.checks.Accounting` under the source name ``ingest``.

Frames. Anything with the Arrow PyCapsule stream interface (``__arrow_c_stream__``: polars,
pyarrow, DuckDB results, pandas >= 2.2), a ``pyarrow.Table``/``RecordBatch``, or a pandas
``DataFrame`` is converted with pyarrow (zero-copy where the types allow); column names are
the tick columns of ``events.TICK_COLUMNS``. A ``datetime64`` ``ts_ns``/``ts_recv_ns`` (a
pandas or polars timestamp column) becomes int64 ns; a time zone is honoured (UTC inside).
Row numbers in messages are 1-based positions in the frame, per ``ingest`` call.

One difference from the file readers: a trade of size 0 passes (files refuse it). The kernels
define it (a trade without volume), and synthetic streams that exercise the engine use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from ..events import TICK_COLUMN_NAMES, TICK_COLUMNS
from .checks import Accounting, Policy, Validator
from .chunk import TickChunk

SOURCE = "ingest"
_DTYPES = {c.name: c.dtype for c in TICK_COLUMNS}


def _as_table(data: Any) -> pa.Table | None:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "__arrow_c_stream__"):
        return pa.table(data)
    if type(data).__module__.split(".")[0] == "pandas" and hasattr(data, "columns"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if type(data).__module__.split(".")[0] == "polars" and hasattr(data, "to_arrow"):
        return data.to_arrow()
    return None


def _column(name: str, values: Any) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        t = values.type
        if pa.types.is_timestamp(t):
            values = values.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64())
        elif pa.types.is_dictionary(t):
            values = values.cast(t.value_type)
        values = values.to_numpy(zero_copy_only=False)
    arr = np.asarray(values)
    if arr.dtype.kind == "M":
        arr = arr.astype("datetime64[ns]").astype(np.int64)
    want = _DTYPES[name]
    if arr.dtype != want:
        if arr.dtype.kind in "OUS":
            raise ConfigError(f"ingest: column {name!r} holds {arr.dtype} values; give numbers ({want})")
        arr = _exact_cast(name, arr, want)
    return arr


def _exact_cast(name: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    """``arr`` as ``want`` where every value survives the cast; otherwise a ConfigError
    naming the column and the first value that would change (a float ts_ns past 2**53, a
    NaN side, a fractional id), never a silent rounding."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = arr.astype(want)
        back = out.astype(arr.dtype)
    if want.kind in "iub" and arr.dtype.kind == "f":
        # past 2**53 a float64 no longer holds every integer: the value was rounded already
        bad = ~np.isfinite(arr) | (back != arr) | (np.abs(arr) > 2.0**53)
    elif want.kind in "iub" and arr.dtype.kind in "iub":
        bad = back != arr
    elif want.kind == "f" and arr.dtype.kind in "iu":
        bad = back != arr  # an int64 beyond float64's 53 bits
    else:
        bad = np.zeros(arr.shape, dtype=bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"ingest: column {name!r} cannot be held exactly as {want} "
                          f"({int(bad.sum())} values, the first at row {i}: {arr[i]!r}); "
                          f"give it as {want}")
    return out


def frame_columns(data: Any) -> dict[str, np.ndarray]:
    """Tick columns (name -> numpy array of the layout's dtype) of a dict of arrays or a frame."""
    table = None if isinstance(data, Mapping) else _as_table(data)
    if table is None and not isinstance(data, Mapping):
        raise ConfigError(f"ingest: takes a dict of arrays or a pandas/polars/pyarrow table, got {type(data).__name__}")
    names = list(table.column_names) if table is not None else list(data)
    unknown = sorted(set(names) - set(TICK_COLUMN_NAMES))
    if unknown:
        raise ConfigError(f"ingest: unknown tick columns {unknown}; use {list(TICK_COLUMN_NAMES)}")
    if "ts_ns" not in names:
        raise ConfigError(f"ingest: the ts_ns column is required (event time, int64 ns); got columns {names}")
    cols = {n: _column(n, table.column(n) if table is not None else data[n]) for n in names}
    lengths = {n: len(c) for n, c in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"ingest: columns differ in length: {lengths}")
    return cols


class IngestGate:
    """The checks and policy of :meth:`Pipeline.ingest` (one per pipeline, state across calls)."""

    def __init__(self, symbol_names: Any) -> None:
        self.symbol_names = symbol_names  # the pipeline's SymbolTable (name_of, len)
        self.accounting = Accounting()
        self._validators: dict[tuple[str, str], Validator] = {}
        self._calls = 0

    def admit(self, data: Any, *, symbol_id: int | None = None, policy: Policy | str = Policy.FAIL,
              quarantine: Any = None, order_by: str = "ts_ns") -> dict[str, np.ndarray]:
        """The rows of ``data`` that pass the checks (all columns, layout dtypes), after the policy
        dealt with the others (``fail``: DataError naming the row; else dropped and counted)."""
        cols = frame_columns(data)
        n = len(cols["ts_ns"])
        if symbol_id is not None:
            cols["symbol_id"] = np.full(n, symbol_id, dtype=np.uint32)
        self._calls += 1
        if n == 0:
            return cols
        p = Policy.parse(policy)
        key = (p.value, order_by)
        v = self._validators.get(key)
        if v is None:
            v = self._validators[key] = Validator(SOURCE, p, accounting=self.accounting, quarantine=quarantine,
                                                  order_by=order_by, zero_size_trades=True)
        codes = cols.get("symbol_id", np.zeros(n, dtype=np.uint32))
        table = self.symbol_names
        top = int(codes.max()) + 1
        names = [table.name_of(i) if i < len(table) else str(i) for i in range(top)]
        chunk = TickChunk(f"{SOURCE} (call {self._calls})", dict(cols), np.arange(1, n + 1, dtype=np.int64), names,
                          raw=lambda i: {k: c[i].item() for k, c in cols.items()})
        chunk.column("symbol_id")
        kept = v.process(chunk)
        delivered = kept.column("symbol_id")
        for k in np.unique(delivered) if len(delivered) else ():
            self.accounting.add(SOURCE, names[int(k)], "delivered", int((delivered == k).sum()))
        return {k: c for k, c in kept.columns.items() if k in cols}
