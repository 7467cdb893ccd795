"""Generic JSON lines (one object a line) and JSON arrays of objects, decoded with orjson,
columns found by key name.

Keys are mapped like Parquet columns (:func:`~nautilus_pipeline.io.parquet.auto_fieldmap`,
e.g. this package's own layout written by :func:`write_jsonl`), or by a given
:class:`FieldMap`. A line that is not a JSON object is a row refused as unparsable (so it is
counted and can be quarantined); blank lines are skipped. Values of a chunk are collected per
key and converted with pyarrow, so types are checked per column, not per row.

A JSON *array* (``[{...}, {...}]``, what REST APIs such as Binance's ``/api/v3/trades``
return) is one value, so it is decoded whole (:class:`JsonArrayReader`; fine for the sizes
APIs return, not for day files); its record numbers are element positions (1-based).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from ..errors import DataError
from .chunk import BadRow, Reason, TickChunk
from .files import check_file, check_text, iter_lines
from .parquet import auto_fieldmap
from .table import FieldMap, arrays_to_chunk

_EXACT = ("ts", "ts_recv", "trade_id")  # integers that must keep every digit


def _column(values: list[object], exact: bool = False) -> pa.Array:
    """One key's values as an Arrow column; mixed or out-of-range values become text, which
    ``convert.py`` converts (or refuses) per value. With ``exact`` integers mixed with floats
    become text as well, so that a 19-digit ns timestamp is not rounded through float64."""
    try:
        arr = pa.array(values)
        if not (exact and pa.types.is_floating(arr.type) and any(type(v) is int for v in values)):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())



def _fieldmap_of(obj: dict) -> FieldMap:
    """The field map a JSON object's keys and value types suggest (ints as int64)."""
    return auto_fieldmap(list(obj), {k: pa.int64() if type(v) is int else _column([v]).type
                                     for k, v in obj.items() if v is not None})

class JsonLinesReader:
    """Streams a JSON-lines file (optionally .gz/.zst) of trades and/or quotes."""

    def __init__(self, path: str | Path, fmap: FieldMap | None = None, *, symbol: str | None = None):
        self.path = str(check_file(path))
        self.ignored = 0
        self.fmap = fmap or self._sniff()
        self.symbol = symbol if symbol is not None else (None if self.fmap.symbol else Path(path).name.split(".")[0])

    def _sniff(self) -> FieldMap:
        """The mapping, from the keys of the first JSON object among the first 64 lines
        (a damaged first line is then one bad row, not a refused file)."""
        check_text(self.path)
        first_error = None
        seen = 0
        for lineno, line in iter_lines(self.path):
            if not line.strip():
                continue
            seen += 1
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                obj, why = None, f"not JSON ({e})"
            else:
                why = f"a JSON {type(obj).__name__}, expected an object per line"
            if isinstance(obj, dict):
                return _fieldmap_of(obj)
            first_error = first_error or f"{self.path}, line {lineno}: {why}"
            if seen >= 64:
                break
        if first_error is not None:
            raise DataError(f"{first_error}; no JSON object in the first {seen} lines: is this a JSON-lines file?")
        raise DataError(f"{self.path}: no JSON lines in the file (only blank lines); nothing to replay")

    def _objects(self) -> Iterator[tuple[int, dict | None, bytes]]:
        """(line number, the line's object or None when it is not one, its text) per non-blank line."""
        for lineno, line in iter_lines(self.path):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            yield lineno, obj if isinstance(obj, dict) else None, line

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Chunks of at most ``chunk_rows`` rows, in file order; record = line number (a JSON
        array: the element's position), a record that is no JSON object an ``unparsable`` row."""
        fields = self.fmap.columns()
        rows: list[dict] = []
        lines: list[int] = []
        texts: list[bytes] = []
        dropped: list[BadRow] = []
        for recno, obj, raw in self._objects():
            if obj is None:
                text = raw.decode("utf-8", "replace")
                dropped.append(BadRow(self.path, recno, Reason.UNPARSABLE, None, text[:200], text, self.symbol))
                continue
            rows.append(obj)
            lines.append(recno)
            texts.append(raw)
            if len(rows) >= chunk_rows:
                yield self._chunk(rows, lines, texts, dropped, fields)
                rows, lines, texts, dropped = [], [], [], []
        if rows or dropped:
            yield self._chunk(rows, lines, texts, dropped, fields)

    def _chunk(self, rows: list[dict], lines: list[int], texts: list[bytes], dropped: list[BadRow],
               fields: Mapping[str, str]) -> TickChunk:
        arrays = {fld: _column([r.get(col) for r in rows], fld in _EXACT) for fld, col in fields.items()}
        chunk = arrays_to_chunk(self.path, arrays, self.fmap, np.array(lines, dtype=np.int64),
                                symbol=self.symbol, raw=rows.__getitem__)
        chunk.dropped = dropped
        chunk.raw_line = lambda i: texts[i].decode("utf-8", "replace")
        return chunk


def write_jsonl(path: str | Path, columns: Mapping[str, np.ndarray], symbols: Sequence[str]) -> None:
    """Write tick arrays as JSON lines in this package's layout (``symbol`` as text; NaN as null)."""
    names = [k for k in columns if k != "symbol_id"]
    n = len(next(iter(columns.values())))
    sym = [symbols[int(i)] for i in columns["symbol_id"]] if "symbol_id" in columns else [None] * n
    lists = {k: columns[k].tolist() for k in names}
    with open(path, "wb") as fh:
        for i in range(n):
            obj: dict[str, object] = {"symbol": sym[i]}
            for k in names:
                v = lists[k][i]
                obj[k] = None if isinstance(v, float) and v != v else v
            fh.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))


class JsonArrayReader(JsonLinesReader):
    """A JSON array of trade or quote objects (whole-file decode; see the module docstring)."""

    def _items(self) -> list[object]:
        from .files import decoding_errors, open_stream

        check_text(self.path)
        with decoding_errors(self.path), open_stream(self.path) as s:
            data = s.read()
        try:
            items = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise DataError(f"{self.path}: not valid JSON ({e}); a JSON array of objects was expected") from None
        if not isinstance(items, list):
            raise DataError(f"{self.path}: the JSON is a {type(items).__name__}, expected an array of objects")
        return items

    def _sniff(self) -> FieldMap:
        for obj in self._items()[:64]:
            if isinstance(obj, dict):
                return _fieldmap_of(obj)
        raise DataError(f"{self.path}: no JSON object among the array's first elements; nothing to replay")

    def _objects(self) -> Iterator[tuple[int, dict | None, bytes]]:
        """(position, 1-based; the element or None when it is not an object; its JSON text)."""
        for i, obj in enumerate(self._items(), start=1):
            yield i, obj if isinstance(obj, dict) else None, orjson.dumps(obj)
