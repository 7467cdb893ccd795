"""Arrow IPC files (Feather v2, ``.arrow``), the IPC stream format, and Feather v1.

The same columns as Parquet (:func:`~nautilus_pipeline.io.parquet.auto_fieldmap`; fixed-point
NautilusTrader columns decoded by ``io/nautilus.py``). IPC files are memory-mapped and read
record batch by record batch, so memory stays at one batch; an IPC *stream* is read batch by
batch from the (possibly compressed) byte stream. Feather v1 (magic ``FEA1``, pre-2019
files) has no batches and is read whole. The record number of a row is its 1-based position.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import DataError
from .chunk import TickChunk
from .files import check_file, decoding_errors, open_stream
from .nautilus import SIZE_FIELDS, fixed_point_to_float
from .parquet import mapped_fields
from .table import FieldMap, arrays_to_chunk

ARROW_FILE_MAGIC = b"ARROW1"
FEATHER_V1_MAGIC = b"FEA1"
IPC_STREAM_MAGIC = b"\xff\xff\xff\xff"


class ArrowReader:
    """Streams an Arrow IPC file or stream (or a Feather v1 file) of trades and/or quotes."""

    def __init__(self, path: str | Path, fmap: FieldMap | None = None, *, symbol: str | None = None):
        self.path = str(check_file(path))
        self.ignored = 0
        with open(self.path, "rb") as fh:
            self._magic = fh.read(6)
        schema = self._schema()
        self.fmap, self._fixed = mapped_fields(self.path, schema, fmap)
        meta = schema.metadata or {}
        instrument = meta.get(b"instrument_id", b"").decode("utf-8", "replace") or None
        self.symbol = symbol if symbol is not None else (
            None if self.fmap.symbol else instrument or Path(path).name.split(".")[0])

    def _schema(self) -> pa.Schema:
        try:
            if self._magic.startswith(ARROW_FILE_MAGIC):
                with pa.memory_map(self.path) as src:
                    return pa.ipc.open_file(src).schema
            if self._magic.startswith(FEATHER_V1_MAGIC):
                return self._feather_v1().schema
            with decoding_errors(self.path), open_stream(self.path) as s:
                return pa.ipc.open_stream(s).schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{self.path}: not a readable Arrow IPC/Feather file ({type(e).__name__}: {e}); "
                            "truncated, corrupt, or another format?") from e

    def _feather_v1(self) -> pa.Table:
        import pyarrow.feather as feather

        with warnings.catch_warnings():  # pyarrow deprecates v1; the user's file is what it is
            warnings.simplefilter("ignore", DeprecationWarning)
            return feather.read_table(self.path)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self._magic.startswith(ARROW_FILE_MAGIC):
            with pa.memory_map(self.path) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        elif self._magic.startswith(FEATHER_V1_MAGIC):
            yield from self._feather_v1().to_batches()
        else:
            with decoding_errors(self.path), open_stream(self.path) as s:
                yield from pa.ipc.open_stream(s)

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]:
        """Chunks of at most ``chunk_rows`` rows, in file order."""
        fields = self.fmap.columns()
        row = 1
        try:
            for batch in self._batches():
                for start in range(0, batch.num_rows, chunk_rows):
                    part = batch.slice(start, chunk_rows)
                    part.validate(full=True)
                    n = part.num_rows
                    arrays = {fld: (fixed_point_to_float(part.column(col), self._fixed[fld], unsigned=fld in SIZE_FIELDS)
                                    if fld in self._fixed else part.column(col)) for fld, col in fields.items()}
                    chunk = arrays_to_chunk(self.path, arrays, self.fmap, np.arange(row, row + n, dtype=np.int64),
                                            symbol=self.symbol, raw=lambda i, b=part: b.slice(i, 1).to_pylist()[0])
                    row += n
                    yield chunk
        except (pa.ArrowException, OSError, ValueError) as e:  # a corrupt compressed buffer is an OSError
            raise DataError(f"{self.path}, rows from {row}: cannot be decoded ({type(e).__name__}: {e}); "
                            "the file is corrupt or truncated") from e
