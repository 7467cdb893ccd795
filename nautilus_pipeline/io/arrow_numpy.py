"""Arrow arrays to numpy and back through their buffers, without pyarrow's pandas shim.

Why. pyarrow initialises its pandas support, which imports pandas (0.2-0.7 s), at the first
``Array.to_numpy``, at ``pa.array``/``pa.scalar`` of Python or numpy values, and at a compute
call given a plain Python scalar (``fill_null(0)``, ``pc.equal(a, "")``). pandas is no
dependency of ours, but it is installed wherever NautilusTrader or a notebook stack is, and
there the readers' first chunk paid for it: a 21K-trade replay's whole process was slower
than NautilusTrader's on the same file (issue 9; ``scripts/bench_vs_nautilus.py``). These
helpers read and build the buffers themselves; ``tests/test_io_arrow_numpy.py`` checks them
against pyarrow's own conversions (sliced and chunked arrays, nulls, every width) and that a
replay of the bundled file leaves pandas unimported.

Only fixed-width types (integers, floats, booleans, timestamps, dates, durations) and, for
building, strings: what the readers need. Values under a null are unspecified in Arrow;
``to_numpy`` returns them as they are unless ``fill`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_NUMPY_OF = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float32(): np.float32, pa.float64(): np.float64, pa.date32(): np.int32, pa.date64(): np.int64,
}
_ARROW_OF = {np.dtype(v): k for k, v in _NUMPY_OF.items() if k not in (pa.date32(), pa.date64())}


def _dtype(t: pa.DataType) -> np.dtype:
    if t in _NUMPY_OF:
        return np.dtype(_NUMPY_OF[t])
    if pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time64(t):
        return np.dtype(np.int64)
    if pa.types.is_time32(t):
        return np.dtype(np.int32)
    raise TypeError(f"no fixed-width numpy view of Arrow type {t}")


def _bits(buf: pa.Buffer, offset: int, n: int) -> np.ndarray:
    """Bits ``offset .. offset + n`` of an Arrow bitmap (LSB first) as a bool array."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=(offset + n + 7) // 8)
    return np.unpackbits(raw, bitorder="little", count=offset + n)[offset:].view(bool)


def _chunks(arr: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(arr.chunks) if isinstance(arr, pa.ChunkedArray) else [arr]


def nulls(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A writable bool mask of the null rows."""
    parts = []
    for a in _chunks(arr):
        if pa.types.is_null(a.type):
            parts.append(np.ones(len(a), dtype=bool))
        elif a.null_count == 0 or a.buffers()[0] is None:
            parts.append(np.zeros(len(a), dtype=bool))
        else:
            parts.append(~_bits(a.buffers()[0], a.offset, len(a)))
    return np.concatenate(parts) if len(parts) != 1 else parts[0].copy()


def _one(a: pa.Array) -> np.ndarray:
    if len(a) == 0:
        return np.empty(0, dtype=bool if pa.types.is_boolean(a.type) else _dtype(a.type))
    data = a.buffers()[1]
    if pa.types.is_boolean(a.type):
        return np.zeros(len(a), dtype=bool) if data is None else _bits(data, a.offset, len(a)).copy()
    dtype = _dtype(a.type)
    if data is None:  # (an all-null array may have no value buffer)
        return np.zeros(len(a), dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=len(a), offset=a.offset * dtype.itemsize)


def to_numpy(arr: pa.Array | pa.ChunkedArray, fill: object = None) -> np.ndarray:
    """The values of a fixed-width array (timestamps and dates as their integers).

    Without ``fill`` (and without nulls) a single chunk is a read-only view of Arrow's buffer,
    as ``to_numpy(zero_copy_only=False)`` gives; with ``fill``, a writable copy with ``fill``
    at the null rows."""
    chunks = _chunks(arr)
    if not chunks:
        return np.empty(0, dtype=_dtype(arr.type) if not pa.types.is_boolean(arr.type) else bool)
    out = np.concatenate([_one(a) for a in chunks]) if len(chunks) > 1 else _one(chunks[0])
    if fill is not None and arr.null_count:
        out = out.copy() if not out.flags.writeable else out
        out[nulls(arr)] = fill
    return out


def from_numpy(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """A 1-d numpy array (numbers or bools) as an Arrow array sharing its memory where it can;
    ``mask``: True where the value is null."""
    values = np.ascontiguousarray(values)
    n = len(values)
    validity = None
    if mask is not None and mask.any():
        validity = pa.py_buffer(np.packbits(~np.asarray(mask, dtype=bool), bitorder="little"))
    if values.dtype == np.bool_:
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), n, [validity, data])
    if values.dtype not in _ARROW_OF:
        raise TypeError(f"no Arrow type for numpy dtype {values.dtype}")
    return pa.Array.from_buffers(_ARROW_OF[values.dtype], n, [validity, pa.py_buffer(values)])


def strings(values: Sequence[str | None]) -> pa.Array:
    """Python strings (``None``: null) as an Arrow string array.

    Output text columns repeat a few values (symbols, sides, stage names): a long column is
    coded through a dict and its distinct values taken by code (Arrow's ``take``, in C++),
    one dict lookup per value instead of an encode, a length and a null test. A 1M-row
    column of symbols: ~0.2 s → ~0.06 s on the dev VM."""
    if len(values) > _CODED_MIN:
        codes: dict[str | None, int] = {}
        index = np.fromiter((codes.setdefault(v, len(codes)) for v in values), dtype=np.int32,
                            count=len(values))
        if len(codes) * 4 < len(values):
            return _plain_strings(list(codes)).take(from_numpy(index))
    return _plain_strings(values)


_CODED_MIN = 256


def _plain_strings(values: Sequence[str | None]) -> pa.Array:
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    mask = np.array([v is None for v in values], dtype=bool)
    validity = pa.py_buffer(np.packbits(~mask, bitorder="little")) if mask.any() else None
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def scalar(value: object, type: pa.DataType) -> pa.Scalar:
    """``pa.scalar(value, type)`` for None, a string or a number, without the pandas shim."""
    if value is None:
        return pa.nulls(1, type)[0]
    if pa.types.is_string(type):
        return strings([str(value)])[0]
    if pa.types.is_boolean(type):
        return from_numpy(np.array([bool(value)]))[0]
    return from_numpy(np.array([value], dtype=_dtype(type)))[0].cast(type)


def column(values: np.ndarray | Sequence[object]) -> pa.Array:
    """One output column, typed as ``pa.array`` would type it: numbers and bools through
    :func:`from_numpy`, text through :func:`strings`, lists and dicts (str keys) as list and
    struct arrays of such columns; anything else (mixed kinds) through ``pa.array``."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype in _ARROW_OF:
        return from_numpy(values)
    if isinstance(values, np.ndarray) and values.dtype == np.bool_:
        return from_numpy(values)
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    mask = np.array([v is None for v in items], dtype=bool)
    types_ = {type(v) for v in items if v is not None}
    if len(types_) == 1 and issubclass(next(iter(types_)), np.generic):
        # numpy scalars of one type keep their width (np.float32 -> float, as pa.array does)
        dtype = np.dtype(next(iter(types_)))
        if dtype in _ARROW_OF or dtype == np.bool_:
            zero = dtype.type(0)
            return from_numpy(np.array([zero if v is None else v for v in items], dtype=dtype), mask)
    kinds = {_KIND.get(t) for t in types_}
    if kinds == {"str"}:
        return strings(items)
    if kinds <= {"bool"} and kinds:
        return from_numpy(np.array([bool(v) if v is not None else False for v in items]), mask)
    if kinds <= {"int"} and kinds:
        try:
            ints = np.array([0 if v is None else v for v in items], dtype=np.int64)
        except OverflowError:
            return pa.array(items)  # beyond int64: pyarrow's error or uint64, as before
        return from_numpy(ints, mask)
    if kinds <= {"int", "float"} and kinds:
        return from_numpy(np.array([np.nan if v is None else v for v in items], dtype=np.float64), mask)
    validity = from_numpy(mask) if mask.any() else None
    if kinds == {"list"}:
        offsets = np.zeros(len(items) + 1, dtype=np.int32)
        np.cumsum([0 if v is None else len(v) for v in items], out=offsets[1:])
        flat = [x for v in items if v is not None for x in v]
        return pa.ListArray.from_arrays(from_numpy(offsets), column(flat) if flat else pa.nulls(0),
                                        mask=validity)
    if kinds == {"dict"}:
        keys = list(dict.fromkeys(k for v in items if v is not None for k in v))
        if keys and all(isinstance(k, str) for k in keys):
            children = [column([None if v is None else v.get(k) for v in items]) for k in keys]
            return pa.StructArray.from_arrays(children, names=keys, mask=validity)
    return pa.array(items)


_KIND = {bool: "bool", np.bool_: "bool", int: "int", float: "float", str: "str", list: "list",
         tuple: "list", dict: "dict", np.int64: "int", np.float64: "float"}
"""Python kinds of values (and the numpy scalars that mix with them as pa.array mixes them:
np.float64 is a float, np.int64 an int); other numpy scalars keep their type (above)."""


def table(columns: dict[str, np.ndarray | Sequence[object]]) -> pa.Table:
    """``pa.table(columns)`` for output columns, without the pandas shim."""
    return pa.Table.from_arrays([column(v) for v in columns.values()], names=list(columns))


def table_from_rows(rows: Sequence[dict[str, object]]) -> pa.Table:
    """``pa.Table.from_pylist(rows)``: the first row's keys are the columns (a key missing
    from a later row is null there), types inferred per column as pyarrow does for
    numbers, bools and text."""
    names = list(rows[0]) if rows else []
    return table({n: [r.get(n) for r in rows] for n in names})


__all__ = ["column", "from_numpy", "nulls", "scalar", "strings", "table", "table_from_rows", "to_numpy"]
