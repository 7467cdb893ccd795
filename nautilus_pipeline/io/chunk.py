"""What every reader yields: a :class:`TickChunk` of numpy columns, plus where each row came from.

A chunk is the unit between a reader and the checks/replay: struct-of-arrays columns named as
in :data:`~nautilus_pipeline.events.TICK_COLUMNS` (any subset; :meth:`TickChunk.column` fills
the rest with the layout's defaults), the source file, the line or record number of every row
(1-based, as a text editor or ``dbn`` tool shows it) and the reader's own verdict per row
(``bad``: a reason code where a field could not be parsed). Symbols are local codes into
``symbols`` so a chunk never holds one Python string per row; the replay maps them to the
shared symbol table.

Rows a parser could not turn into columns at all (a CSV line with the wrong number of fields)
travel beside the columns as :class:`BadRow` records so that they are counted and quarantined
like any other bad row.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..events import TICK_COLUMNS, ColumnSpec

SPECS: dict[str, ColumnSpec] = {c.name: c for c in TICK_COLUMNS}


class Reason(enum.IntEnum):
    """Why a row was refused; ``OK`` (0) for a good row. Stored as uint8 per row."""

    OK = 0
    UNPARSABLE = 1
    MISSING_FIELD = 2
    PRICE_NOT_FINITE = 3
    PRICE_NOT_POSITIVE = 4
    SIZE_NOT_POSITIVE = 5
    TS_BACKWARDS = 6
    DUPLICATE_TRADE_ID = 7
    UNKNOWN_SIDE = 8
    CROSSED_QUOTE = 9
    WRONG_FIELD_COUNT = 10
    UNKNOWN_SYMBOL = 11
    TS_AHEAD = 12

    @property
    def advice(self) -> str:
        """What a user can do about a row refused for this reason."""
        return _ADVICE[self]


_ADVICE: dict[Reason, str] = {
    Reason.OK: "",
    Reason.UNPARSABLE: "fix or remove the row, or check the column mapping and units",
    Reason.MISSING_FIELD: "fill the field or remove the row (empty lines count as rows)",
    Reason.PRICE_NOT_FINITE: "prices must be finite numbers; remove the row or use policy='reject'",
    Reason.PRICE_NOT_POSITIVE: "prices must be > 0; remove the row or use policy='reject'",
    Reason.SIZE_NOT_POSITIVE: "trade sizes must be > 0 and quote sizes >= 0; remove the row",
    Reason.TS_BACKWARDS: (
        "rows of one symbol must be in time order: sort the file by time, or use "
        "policy='reject'/'quarantine' to drop late rows"
    ),
    Reason.DUPLICATE_TRADE_ID: "the trade id was seen before for this symbol: de-duplicate the file",
    Reason.UNKNOWN_SIDE: "use buy/sell, B/S, 1/-1/0 or is_buyer_maker true/false, or set side_encoding",
    Reason.CROSSED_QUOTE: "bid must not exceed ask: remove the row or use policy='reject'",
    Reason.WRONG_FIELD_COUNT: "the line has a different number of fields than the header: fix it",
    Reason.UNKNOWN_SYMBOL: (
        "the pipeline trades only the symbols in its [pipeline] symbols list: add this one, "
        "or filter the file"
    ),
    Reason.TS_AHEAD: (
        "the time is later than most of the next rows of its symbol (a corrupt timestamp?): "
        "fix the row; policy 'reject'/'quarantine' drops it and keeps the rows after it"
    ),
}


@dataclass(slots=True)
class BadRow:
    """A refused row, as it is reported, raised and quarantined."""

    source: str
    record: int
    reason: Reason
    field: str | None
    value: object
    raw: object
    symbol: str | None = None

    def message(self) -> str:
        """One line naming file, line/record, field, value found and what to do."""
        parts = [f"{self.source}, line/record {self.record}"]
        if self.field:
            parts.append(f"field {self.field!r}")
        if self.symbol:
            parts.append(f"symbol {self.symbol!r}")
        what = self.reason.name.lower().replace("_", " ")
        return f"{', '.join(parts)}: {what} (found {self.value!r}); {self.reason.advice}"


@dataclass(slots=True)
class TickChunk:
    """Rows of one source, as numpy columns (units as in ``events.TICK_COLUMNS``).

    ``columns["symbol_id"]`` holds codes into ``symbols`` (local to the chunk). ``bad`` holds a
    :class:`Reason` per row found by the reader (parse errors), with ``bad_field`` naming the
    field for those rows (the file's column name); ``field_map`` maps layout names to the file's
    column names for messages. ``raw(i)`` returns the record of row ``i`` as parsed (a dict, or
    the line for JSON readers); ``raw_line(i)``, where a reader offers it, the line's text as it
    is in the file (for quarantine). Both are called only for refused rows.
    ``one_sided_quotes``: the reader marks a quote side that is absent at the source (an empty
    book side) as NaN price and size, so the checks accept a quote with one side missing (never
    both); other readers leave it False and a NaN bid or ask is refused.
    """

    source: str
    columns: dict[str, np.ndarray]
    records: np.ndarray
    symbols: list[str]
    bad: np.ndarray | None = None
    bad_field: dict[int, str] = field(default_factory=dict)
    field_map: dict[str, str] = field(default_factory=dict)
    dropped: list[BadRow] = field(default_factory=list)
    raw: Callable[[int], object] | None = None
    raw_line: Callable[[int], str] | None = None
    one_sided_quotes: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str) -> np.ndarray:
        """The named column, filled with the layout's default where the reader had none."""
        col = self.columns.get(name)
        if col is None:
            spec = SPECS[name]
            col = np.full(len(self.records), spec.fill, dtype=spec.dtype)
            self.columns[name] = col
        return col

    def raw_record(self, i: int) -> object:
        return self.raw(i) if self.raw is not None else None


class TickReader(Protocol):
    """A streaming reader: yields chunks of at most ``chunk_rows`` rows, in file order.

    ``ignored`` counts lines that are not ticks by design (depth updates, snapshots), which are
    therefore not rows in the accounting.
    """

    path: str
    ignored: int

    def chunks(self, chunk_rows: int = 65_536) -> Iterator[TickChunk]: ...


def first_chunk(reader: TickReader, rows: int = 4096) -> TickChunk | None:
    """The first chunk a reader gives (None for an empty file), its generator closed at once:
    what planning and symbol discovery need, without reading on."""
    chunks = reader.chunks(rows)
    try:
        return next(iter(chunks), None)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
