"""How this package's Parquet outputs are encoded: a dictionary only where values repeat.

pyarrow dictionary-encodes every column by default and falls back to plain pages once a
column's dictionary grows too large; on our outputs' float columns (prices, P&L, VPIN),
nearly one value a row, that attempt is spent CPU. A batch job's 2M-row ``trace.parquet``
(14 columns, one pyarrow thread, dev VM; ``scripts/bench_parquet_encoding.py``,
``docs/measurements/dev_parquet_encoding_8d65f1d.txt``): in row groups of 65,536 rows 466 ms
with the default against 157 ms with a dictionary only on its string and 8-bit columns (71.9
vs 62.5 MB); written whole 257 vs 156 ms (60.4 vs 62.3 MB); its 68K-row ``signals.parquet``
11.9 vs 8.1 ms (1.03 vs 0.94 MB). The recorder wrote its traces that way already; the batch
merge, which re-writes every job's parts, and the sinks kept the default: most of the merge's
CPU (a batch of 8 files x 2M trades: 0.70 -> 0.41-0.48 s,
``docs/measurements/dev_bench_batch_merge_dictionary_ab_8d65f1d.txt``).
"""

from __future__ import annotations

import pyarrow as pa


def _repeats(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)
            or pa.types.is_boolean(t) or (pa.types.is_integer(t) and t.bit_width == 8))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The top-level columns of ``schema`` worth a dictionary: strings (symbols, sides,
    topics), booleans and 8-bit integers (kinds, flags): few distinct values. (A nested
    column, such as a signal's list of reasons, is named by its leaf path in pyarrow's
    option: left plain.)"""
    return [f.name for f in schema if _repeats(f.type)]


__all__ = ["dictionary_columns"]
